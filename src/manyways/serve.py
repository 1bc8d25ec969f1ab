"""``manyways serve``: an OpenAI-compatible HTTP server around any generation back-end.

Run on CPU: ``manyways serve CONFIG --port 8000`` (the back-end is ``generate.backend``); point
the ``openai`` client (or any OpenAI-compatible tool) at ``http://127.0.0.1:8000/v1``.

Endpoints (checked against the ``openai`` Python client's own response types in the tests):

- ``POST /v1/chat/completions``: ``messages`` (``content`` a string, a list of text parts, or
  null), ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``,
  ``stop``, ``n`` (>= 1), ``stream`` (server-sent events, ``stream_options.include_usage``),
  ``logprobs`` / ``top_logprobs`` (0-20).
- ``POST /v1/completions``: ``prompt`` (a string or a list of strings) with the same options;
  our back-ends are chat back-ends, so each prompt is answered as one user turn through the
  model's chat template.
- ``GET /v1/models`` and ``/v1/models/{id}`` (``created``: when the server started), ``GET /health``.

Sample ``i`` of a request with ``seed=s`` and ``n>1`` uses seed ``s + i``; a request without a
seed uses seed 0, so answers are reproducible. ``finish_reason`` is one of OpenAI's values: a
back-end's ``decode_error`` (text with undecodable bytes) goes out as ``stop`` with the original
in ``manyways_finish_reason``. Log-probabilities are those of the first answer token: a logprobs
request answers one token (``max_tokens`` absent or 1, ``n`` 1), the likeliest one, and reports
the prompt's tokens. Errors are OpenAI-shaped: ``{"error": {"message", "type", "param",
"code"}}``. The back-end's ``reasoning`` text, when it has one, goes out as the message's
``reasoning`` field. Access to the back-end is serialised with a lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from manyways.backends.protocol import GenerationBackend, GenRequest, GenSample

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
OPENAI_FINISH_REASONS = {"stop": "stop", "length": "length"}
ROLES = {"system", "user", "assistant", "tool", "developer"}


class BadRequest(ValueError):
    """A client error answered with HTTP 400 (``param`` names the offending field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ------------------------------------------------------------------------------------ requests
def _int_field(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {value!r}", name)
    return value


def _float_field(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number, got {value!r}", name)
    return float(value)


def _stop_tuple(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise BadRequest("stop must be a string or a list of strings", "stop")


def content_text(content: Any, where: str) -> str:
    """A message's ``content`` as text: a string, null (empty), or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(f"{where}.content[{j}]: only text parts are supported, got {kind!r}", where)
            texts.append(part["text"])
        return "\n".join(texts)
    raise BadRequest(f"{where}.content must be a string, a list of text parts or null", where)


def parse_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages as plain ``{"role", "content"}`` strings (``developer`` is a system turn)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {sorted(ROLES)}", f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content_text(m.get("content"), f"messages[{i}]")})
    return out


def request_from_body(body: dict[str, Any], messages: list[dict[str, str]] | None = None) -> GenRequest:
    """The :class:`GenRequest` a chat-completions (or completions, given ``messages``) body asks for."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    msgs = parse_messages(body.get("messages")) if messages is None else messages
    n = _int_field(body, "n", 1)
    if n is None or n < 1:
        raise BadRequest(f"n must be >= 1, got {n}", "n")
    seed = _int_field(body, "seed", 0) or 0
    max_tokens = _int_field(body, "max_completion_tokens", None)
    max_tokens = _int_field(body, "max_tokens", max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    options: dict[str, Any] = {
        "request_id": str(body.get("id") or uuid.uuid4().hex),
        "messages": msgs,
        "seeds": tuple(seed + i for i in range(n)),
        "max_new_tokens": max_tokens or 256,
        "temperature": _float_field(body, "temperature", 1.0),
        "top_p": _float_field(body, "top_p", 1.0),
        "stop": _stop_tuple(body.get("stop")),
    }
    options["json_schema"] = response_format_schema(body.get("response_format"))
    return GenRequest(**options)


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
            "response_format: only {type: json_schema, json_schema: {schema: {...}}} is supported",
            "response_format",
        )
    return schema


@dataclass(frozen=True)
class LogprobsAsk:
    """What a body asks of log-probabilities: none, or the first token with ``top`` alternatives."""

    wanted: bool
    top: int = 0


def logprobs_ask(body: dict[str, Any]) -> LogprobsAsk:
    """Validate ``logprobs`` / ``top_logprobs`` of a chat body."""
    top = _int_field(body, "top_logprobs", None)
    if not body.get("logprobs"):
        if top is not None:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return LogprobsAsk(False)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs")
    if (_int_field(body, "n", 1) or 1) != 1:
        raise BadRequest("logprobs are given for n = 1 only", "n")
    limit = _int_field(body, "max_tokens", _int_field(body, "max_completion_tokens", None))
    if limit not in (None, 1):
        raise BadRequest("logprobs are given for one-token answers only: set max_tokens to 1", "max_tokens")
    return LogprobsAsk(True, top or 0)


# ----------------------------------------------------------------------------------- responses
def finish_reason(sample: GenSample) -> dict[str, str]:
    """OpenAI's ``finish_reason`` for a sample (plus ours when it is not one of OpenAI's)."""
    mapped = OPENAI_FINISH_REASONS.get(sample.finish_reason)
    if mapped is not None:
        return {"finish_reason": mapped}
    return {"finish_reason": "stop", "manyways_finish_reason": sample.finish_reason}


def _message(sample: GenSample) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": sample.text}
    if sample.reasoning:
        message["reasoning"] = sample.reasoning
    return message


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(kind: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None) -> dict:
    prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
    out = {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if use is not None:
        out["usage"] = use
    return out


def _generate(
    backend: GenerationBackend, requests: list[GenRequest], lock: threading.Lock
) -> list[GenSample]:
    with lock:
        rows = backend.generate(requests)
    return [s for row in rows for s in row]


def chat_completion(backend: GenerationBackend, body: dict[str, Any], lock: threading.Lock) -> dict:
    """Answer one chat-completions body with ``backend`` (the whole answer, not streamed)."""
    request = request_from_body(body)
    ask = logprobs_ask(body)
    if ask.wanted:
        return _logprobs_completion(backend, request, ask.top, lock)
    samples = _generate(backend, [request], lock)
    choices = [
        {"index": i, "message": _message(s), "logprobs": None, **finish_reason(s)}
        for i, s in enumerate(samples)
    ]
    prompt_tokens = samples[0].prompt_tokens if samples else 0
    use = usage(prompt_tokens, sum(s.completion_tokens for s in samples))
    return _envelope("chat.completion", backend.model_id, choices, use)


def prompt_token_count(backend: GenerationBackend, request: GenRequest, lock: threading.Lock) -> int:
    """Prompt tokens of ``request``: the back-end's ``encode`` when it has one, else one greedy token."""
    encode = getattr(backend, "encode", None)
    with lock:
        if encode is not None:
            return len(encode(request.messages))
        probe = GenRequest(f"{request.request_id}-count", request.messages, (0,), 1, 0.0)
        rows = backend.generate([probe])
    return rows[0][0].prompt_tokens if rows and rows[0] else 0


def _logprobs_completion(
    backend: GenerationBackend, request: GenRequest, top_k: int, lock: threading.Lock
) -> dict:
    method = getattr(backend, "next_token_logprobs", None)
    if method is None:
        raise BadRequest(f"the {backend.name} back-end does not give log-probabilities", "logprobs")
    with lock:
        top = method([request.messages], max(1, top_k))[0]
    ranked = sorted(top.items(), key=lambda kv: kv[1], reverse=True)
    token, logprob = ranked[0]
    entry = {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in ranked[:top_k]],
    }
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": token},
        "logprobs": {"content": [entry]},
        "finish_reason": "length",
    }
    use = usage(prompt_token_count(backend, request, lock), 1)
    return _envelope("chat.completion", backend.model_id, [choice], use)


def text_completion(backend: GenerationBackend, body: dict[str, Any], lock: threading.Lock) -> dict:
    """Answer one completions body: each prompt as one user turn, ``n`` choices per prompt."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(
            "prompt must be a string or a non-empty list of strings (token ids: not supported)", "prompt"
        )
    for name, default in (("echo", False), ("suffix", None), ("logprobs", None), ("best_of", 1)):
        if body.get(name) not in (None, default):
            raise BadRequest(f"{name} is not supported on /v1/completions", name)
    requests = [request_from_body(body, [{"role": "user", "content": p}]) for p in prompts]
    samples = _generate(backend, requests, lock)
    choices = [
        {"index": i, "text": s.text, "logprobs": None, **finish_reason(s)} for i, s in enumerate(samples)
    ]
    n = requests[0].n
    prompt_tokens = sum(samples[i * n].prompt_tokens for i in range(len(prompts)) if i * n < len(samples))
    use = usage(prompt_tokens, sum(s.completion_tokens for s in samples))
    return _envelope("text_completion", backend.model_id, choices, use)


def stream_events(answer: dict[str, Any], include_usage: bool) -> Iterator[dict[str, Any]]:
    """A finished answer as OpenAI's streaming chunks (role, content, finish, optional usage)."""
    chat = answer["object"] == "chat.completion"
    head = {k: answer[k] for k in ("id", "created", "model")}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if include_usage else {}
    for c in answer["choices"]:
        finish = {k: v for k, v in c.items() if k in ("finish_reason", "manyways_finish_reason")}
        if chat:
            message = c["message"]
            delta = {k: v for k, v in message.items() if k != "role"}
            parts = [{"role": "assistant", "content": ""}, delta, {}]
            ends = [{"finish_reason": None}, {"finish_reason": None}, finish]
            for d, end in zip(parts, ends, strict=True):
                lp = c["logprobs"] if d is delta else None
                yield {**head, "choices": [{"index": c["index"], "delta": d, "logprobs": lp, **end}], **extra}
        else:  # one chunk per choice: the openai types want a finish_reason in every completion chunk
            yield {
                **head,
                "choices": [{"index": c["index"], "text": c["text"], "logprobs": None, **finish}],
                **extra,
            }
    if include_usage:
        yield {**head, "choices": [], "usage": answer["usage"]}


# -------------------------------------------------------------------------------------- server
ROUTES = {"/v1/chat/completions": chat_completion, "/v1/completions": text_completion}


def make_handler(backend: GenerationBackend, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    """A request-handler class bound to ``backend``."""
    started = int(time.time())

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

        def _stream(self, chunks: Iterator[dict[str, Any]]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for chunk in chunks:
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def _error(self, status: int, message: str, param: str | None = None) -> None:
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "server_error")
            self._send(status, error_body(message, kind, param, None if status == 400 else str(status)))

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            path = self.path.rstrip("/")
            model = {"id": backend.model_id, "object": "model", "created": started, "owned_by": "manyways"}
            if path == "/health":
                self._send(200, {"status": "ok", "model": backend.model_id, "backend": backend.name})
            elif path == "/v1/models":
                self._send(200, {"object": "list", "data": [model]})
            elif path == f"/v1/models/{backend.model_id}":
                self._send(200, model)
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            route = ROUTES.get(self.path.rstrip("/"))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if route is None:
                self._error(404, f"no route {self.path}")
                return
            try:
                body = json.loads(raw or b"{}")
                answer = route(backend, body, lock)
                stream = body.get("stream")
                if stream:
                    include = bool((body.get("stream_options") or {}).get("include_usage"))
                    self._stream(stream_events(answer, include))
                else:
                    self._send(200, answer)
            except BadRequest as err:
                self._error(400, f"bad request: {err}", err.param)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                self._error(400, f"bad request: {type(err).__name__}: {err}")
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
