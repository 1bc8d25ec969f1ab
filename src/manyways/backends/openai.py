"""A back-end that talks to any OpenAI-compatible server (vLLM serve, SGLang, llama.cpp, TGI,
``manyways serve``) over ``POST /v1/chat/completions`` with the standard library only.

Every sample is its own request carrying its own ``seed`` (no ``n``), so sample ``i`` depends only
on (prompt, seeds[i], sampling parameters) wherever the server honours seeds. Requests run
``concurrency`` at a time; connection errors, timeouts, HTTP 429 and 5xx are retried with
exponential backoff, and a server still unreachable after the retries raises
:class:`BackendUnavailableError` naming its URL. The server's prefix cache is invisible from here,
so ``stats.prefill_tokens_computed`` equals ``prompt_tokens_submitted``. A reasoning server's
separate chain of thought is kept in ``GenSample.reasoning`` (see :func:`sample_from_answer`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from manyways.backends.config import BackendConfig
from manyways.backends.protocol import (
    FINISH_REASONS,
    BackendStats,
    GenRequest,
    GenSample,
    ProgressCallback,
    check_request,
    option_probs_from_top,
)

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


class BackendUnavailableError(RuntimeError):
    """The server did not answer after every retry."""


class BackendRequestError(RuntimeError):
    """The server refused a request (HTTP 4xx other than 429): retrying will not help."""


def _retryable(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code == 429 or err.code >= 500
    return isinstance(err, (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout))


def sample_from_answer(answer: dict[str, Any]) -> GenSample:
    """The :class:`GenSample` of a chat-completions answer's first choice.

    A reasoning server (vLLM with a reasoning parser, SGLang, DeepSeek's API) returns the chain of
    thought apart from the answer, as ``message.reasoning`` (vLLM since PR #27752, late 2025) or
    ``message.reasoning_content`` (older vLLM, SGLang, DeepSeek); it is kept in
    ``GenSample.reasoning``. ``text`` is the answer (``content``). When there is no answer text but there is reasoning (the answer was cut while
    the model was still thinking, or the model never closed its thinking), ``text`` is the
    reasoning, so the sample reads like a plain model's cut-off answer (usually ``no_answer`` to the
    verifier) instead of an empty string that hides what the model wrote. ``manyways serve``'s
    ``manyways_finish_reason`` (e.g. ``decode_error``) is read back when present.
    """
    choice = answer["choices"][0]
    message = choice.get("message") or {}
    usage = answer.get("usage") or {}
    finish = choice.get("manyways_finish_reason") or choice.get("finish_reason") or "stop"
    content = message.get("content") or ""
    reasoning = message.get("reasoning") or message.get("reasoning_content") or ""
    return GenSample(
        text=content if content.strip() or not reasoning else reasoning,
        finish_reason=finish if finish in FINISH_REASONS else "stop",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        reasoning=str(reasoning),
    )


class OpenAIBackend:
    """Client of an OpenAI-compatible chat-completions server."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model_id: str,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 4,
        request_timeout_s: float = 300.0,
        backoff_s: float = 1.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_id = model_id
        self.api_key = api_key
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.request_timeout_s = request_timeout_s
        self.backoff_s = backoff_s
        self.stats = BackendStats()

    @classmethod
    def from_config(cls, cfg: BackendConfig, model_id: str) -> OpenAIBackend:
        """Build from a :class:`BackendConfig` (the key is read from ``cfg.api_key_env``)."""
        api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and api_key is None:
            raise ValueError(f"environment variable {cfg.api_key_env} (api_key_env) is not set")
        return cls(
            cfg.base_url,
            model_id,
            api_key=api_key,
            concurrency=cfg.concurrency,
            max_retries=cfg.max_retries,
            request_timeout_s=cfg.request_timeout_s,
        )

    @property
    def url(self) -> str:
        """The chat-completions endpoint."""
        return f"{self.base_url}/chat/completions"

    def post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload`` with retries; the parsed JSON answer."""
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1))
                logger.warning(
                    "retry %d/%d of %s in %.1fs: %s", attempt, self.max_retries, self.url, delay, last
                )
                time.sleep(delay)
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.request_timeout_s) as response:
                    return json.loads(response.read())
            except Exception as err:  # classified below: retry, or fail at once
                if not _retryable(err):
                    if isinstance(err, urllib.error.HTTPError):
                        body = err.read().decode(errors="replace")[:500]
                        raise BackendRequestError(
                            f"{self.url} refused the request: HTTP {err.code} {body}"
                        ) from err
                    raise
                last = err
        raise BackendUnavailableError(
            f"OpenAI-compatible server at {self.url} did not answer after {self.max_retries + 1} tries: {last}"
        ) from last

    def _payload(self, request: GenRequest, seed: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model_id,
            "messages": request.messages,
            "max_tokens": request.max_new_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": seed,
        }
        if request.stop:
            payload["stop"] = list(request.stop)
        if request.json_schema is not None:  # OpenAI structured outputs (vLLM and others honour it)
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.json_schema},
            }
        return payload

    def _one_sample(self, request: GenRequest, seed: int) -> GenSample:
        return sample_from_answer(self.post(self._payload(request, seed)))

    def generate(
        self, requests: Sequence[GenRequest], progress: ProgressCallback | None = None
    ) -> list[list[GenSample]]:
        """One HTTP request per sample, ``concurrency`` in flight."""
        for request in requests:
            check_request(request)
        results: list[list[GenSample | None]] = [[None] * r.n for r in requests]
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = {
                pool.submit(self._one_sample, request, seed): (i, j)
                for i, request in enumerate(requests)
                for j, seed in enumerate(request.seeds)
            }
            for future in as_completed(futures):
                i, j = futures[future]
                sample = future.result()
                results[i][j] = sample
                self._count(sample)
                if progress is not None:
                    progress(1, sample.completion_tokens)
        finally:  # on failure, drop the samples not yet started instead of retrying each one
            pool.shutdown(wait=True, cancel_futures=True)
        return [[s for s in row if s is not None] for row in results]

    def _count(self, sample: GenSample) -> None:
        self.stats.prompt_tokens_submitted += sample.prompt_tokens
        self.stats.prefill_tokens_computed += sample.prompt_tokens
        self.stats.decode_tokens += sample.completion_tokens

    def next_token_logprobs(
        self, messages_list: Sequence[list[dict[str, str]]], top_k: int = 20
    ) -> list[dict[str, float]]:
        """The server's top-``top_k`` first-token log-probabilities per conversation."""
        out = []
        for messages in messages_list:
            payload = {
                "model": self.model_id,
                "messages": messages,
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": True,
                "top_logprobs": top_k,
            }
            content = self.post(payload)["choices"][0]["logprobs"]["content"][0]
            out.append({t["token"]: float(t["logprob"]) for t in content["top_logprobs"]})
        return out

    def next_token_probs(
        self, messages_list: Sequence[list[dict[str, str]]], options: Sequence[str]
    ) -> list[dict[str, float]]:
        """P(option) from the top-20 first-token log-probabilities, renormalised over options."""
        return [option_probs_from_top(top, options) for top in self.next_token_logprobs(messages_list, 20)]

    def close(self) -> None:
        """Nothing is held between calls."""
