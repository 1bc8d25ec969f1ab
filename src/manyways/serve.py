"""``manyways serve``: an OpenAI-compatible HTTP server around any generation back-end.

Endpoints: ``POST /v1/chat/completions`` (messages, max_tokens, temperature, top_p, seed, stop, n;
``logprobs`` + ``top_logprobs`` return the first token's top log-probabilities), ``GET /v1/models``
and ``GET /health``. Access to the back-end is serialised with a lock. Sample ``i`` of a request
with ``seed=s`` and ``n>1`` uses seed ``s + i``; a request without a seed uses seed 0, so answers
are reproducible. Run on CPU: ``manyways serve --backend hf --model PATH --port 8000``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from manyways.backends.protocol import GenerationBackend, GenRequest, GenSample

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20


class BadRequest(ValueError):
    """A client error answered with HTTP 400."""


def _stop_tuple(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise BadRequest("stop must be a string or a list of strings")


def request_from_body(body: dict[str, Any]) -> GenRequest:
    """The :class:`GenRequest` a chat-completions body asks for."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    n = int(body.get("n") or 1)
    seed = int(body.get("seed") or 0)
    if n < 1:
        raise BadRequest("n must be >= 1")
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    return GenRequest(
        request_id=str(body.get("id") or uuid.uuid4().hex),
        messages=[{"role": str(m["role"]), "content": str(m["content"])} for m in messages],
        seeds=tuple(seed + i for i in range(n)),
        max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 256),
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        stop=_stop_tuple(body.get("stop")),
        json_schema=response_format_schema(body.get("response_format")),
    )


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema of an OpenAI ``response_format`` (``json_schema`` type), else None.

    The back-end then constrains its answer to the schema (hf: llguidance). ``json_object`` and
    anything else unknown is refused rather than silently ignored."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    if not isinstance(schema, dict):
        raise BadRequest(
            "response_format: only {type: json_schema, json_schema: {schema: {...}}} is supported"
        )
    return schema


def _completion(
    model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish_reason,
        "logprobs": logprobs,
    }


def chat_completion(backend: GenerationBackend, body: dict[str, Any], lock: threading.Lock) -> dict:
    """Answer one chat-completions body with ``backend``."""
    request = request_from_body(body)
    if body.get("logprobs") and body.get("top_logprobs"):
        return _top_logprobs_completion(backend, request, int(body["top_logprobs"]), lock)
    with lock:
        samples: list[GenSample] = backend.generate([request])[0]
    choices = [_choice(i, s.text, s.finish_reason) for i, s in enumerate(samples)]
    prompt_tokens = samples[0].prompt_tokens if samples else 0
    return _completion(backend.model_id, choices, prompt_tokens, sum(s.completion_tokens for s in samples))


def _top_logprobs_completion(
    backend: GenerationBackend, request: GenRequest, top_k: int, lock: threading.Lock
) -> dict:
    top_k = max(1, min(top_k, MAX_TOP_LOGPROBS))
    method = getattr(backend, "next_token_logprobs", None)
    if method is None:
        raise BadRequest(f"the {backend.name} back-end does not give top log-probabilities")
    with lock:
        top = method([request.messages], top_k)[0]
    ranked = sorted(top.items(), key=lambda kv: kv[1], reverse=True)
    token, logprob = ranked[0]
    content = [
        {
            "token": token,
            "logprob": logprob,
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in ranked],
        }
    ]
    choice = _choice(0, token, "length", {"content": content})
    return _completion(backend.model_id, [choice], 0, 1)


def make_handler(backend: GenerationBackend, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    """A request-handler class bound to ``backend``."""

    class ChatHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            logger.debug("%s %s", self.address_string(), format % args)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "code": status}})

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", "model": backend.model_id, "backend": backend.name})
            elif self.path.rstrip("/") == "/v1/models":
                model = {"id": backend.model_id, "object": "model", "owned_by": "manyways"}
                self._send(200, {"object": "list", "data": [model]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                self._send(200, chat_completion(backend, body, lock))
            except (BadRequest, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                self._error(400, f"bad request: {err}")
            except Exception as err:  # the back-end failed: tell the client, keep serving
                logger.exception("back-end error")
                self._error(500, f"back-end error: {type(err).__name__}: {err}")

    return ChatHandler


def make_server(backend: GenerationBackend, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A ready (not yet serving) HTTP server; ``port=0`` picks a free port (see ``server_address``)."""
    server = ThreadingHTTPServer((host, port), make_handler(backend, threading.Lock()))
    server.daemon_threads = True
    return server


def run_server(backend: GenerationBackend, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted, then close the back-end."""
    server = make_server(backend, host, port)
    bound_host, bound_port = server.server_address[:2]
    logger.info("serving %s (%s) on http://%s:%s/v1", backend.model_id, backend.name, bound_host, bound_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("interrupted; shutting down")
    finally:
        server.server_close()
        backend.close()
