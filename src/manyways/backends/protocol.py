"""The one small contract every generation back-end implements.

A stage builds :class:`GenRequest` objects (chat messages plus one seed per wanted sample), hands
them to any :class:`GenerationBackend` and gets back, per request, one :class:`GenSample` per seed,
in seed order. Stages never ask which back-end they got; ``name`` is recorded in output rows only.

Sample ``i`` of a request must depend only on (prompt, ``seeds[i]``, sampling parameters), never on
which other requests share a batch (back-ends document the floating-point batch effects they have).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

FINISH_REASONS: tuple[str, ...] = ("stop", "length", "decode_error")

ProgressCallback = Callable[[int, int], None]
"""``progress(samples_done, tokens_done)``: increments since the previous call."""


@dataclass(frozen=True)
class GenRequest:
    """One prompt to sample ``len(seeds)`` completions for."""

    request_id: str
    messages: list[dict[str, str]]  # chat messages; the back-end applies the chat template
    seeds: tuple[int, ...]  # one per sample
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings; the matched stop string is not part of the text
    json_schema: dict | None = None  # constrain the answer to this JSON schema (back-ends that can)
    # the start of the last message's content that many requests share (a judge's menu): back-ends
    # that keep prefixes (hf: manyways.backends.prefix_store) prefill it once for all of them
    shared_prefix: str = ""

    @property
    def n(self) -> int:
        """How many samples this request asks for."""
        return len(self.seeds)


@dataclass(frozen=True)
class GenSample:
    """One sampled completion."""

    text: str
    finish_reason: str  # "stop" | "length" | "decode_error"
    prompt_tokens: int
    completion_tokens: int
    reasoning: str = ""  # a reasoning server's separate chain of thought (see backends/openai.py)


@dataclass
class BackendStats:
    """Token counters a back-end keeps over its lifetime.

    ``prompt_tokens_submitted`` counts prompt tokens once per *sample* (what a naive engine would
    prefill); ``prefill_tokens_computed`` counts prompt tokens actually run through the model
    (after prefix sharing and KV expansion); ``decode_tokens`` counts generated tokens.
    Remote back-ends cannot see the server's prefix cache and report computed == submitted.
    """

    prompt_tokens_submitted: int = 0
    prefill_tokens_computed: int = 0
    decode_tokens: int = 0

    @property
    def prefill_ratio(self) -> float:
        """Prefill tokens computed per prompt token submitted (lower is better)."""
        if self.prompt_tokens_submitted == 0:
            return 0.0
        return self.prefill_tokens_computed / self.prompt_tokens_submitted


@runtime_checkable
class GenerationBackend(Protocol):
    """What a stage may call on a back-end."""

    name: str  # "hf" | "vllm" | "openai" | "fake"
    model_id: str
    stats: BackendStats

    def generate(
        self, requests: Sequence[GenRequest], progress: ProgressCallback | None = None
    ) -> list[list[GenSample]]:
        """Samples for each request, in request order and seed order."""
        ...

    def next_token_probs(
        self, messages_list: Sequence[list[dict[str, str]]], options: Sequence[str]
    ) -> list[dict[str, float]]:
        """P(option) of each option's first token right after the assistant turn opens,
        renormalised over the options, for each conversation."""
        ...

    def close(self) -> None:
        """Release the model / connections. Safe to call twice."""
        ...


def check_request(request: GenRequest) -> None:
    """Raise ValueError for a request no back-end can serve."""
    if not request.seeds:
        raise ValueError(f"request {request.request_id!r} has no seeds (asks for 0 samples)")
    if request.max_new_tokens < 1:
        raise ValueError(f"request {request.request_id!r}: max_new_tokens must be >= 1")
    if request.temperature < 0:
        raise ValueError(f"request {request.request_id!r}: temperature must be >= 0")
    if not 0 < request.top_p <= 1:
        raise ValueError(f"request {request.request_id!r}: top_p must be in (0, 1]")
    if request.shared_prefix and not (
        request.messages and str(request.messages[-1].get("content", "")).startswith(request.shared_prefix)
    ):
        raise ValueError(
            f"request {request.request_id!r}: shared_prefix is not the start of the last message's content"
        )


def renormalise(probs: dict[str, float]) -> dict[str, float]:
    """Scale option probabilities to sum to 1 (uniform when they are all zero)."""
    total = sum(probs.values())
    if total <= 0:
        return {k: 1.0 / len(probs) for k in probs} if probs else {}
    return {k: v / total for k, v in probs.items()}


def option_probs_from_top(top: dict[str, float], options: Sequence[str]) -> dict[str, float]:
    """Map top-token log-probs to options: a token counts for the option it equals after
    stripping whitespace, or else for the only option it begins; renormalised over options."""
    probs = dict.fromkeys(options, 0.0)
    for token, logprob in top.items():
        text = token.strip()
        if not text:
            continue
        exact = [o for o in options if o.strip() == text]
        starts = [o for o in options if o.strip().startswith(text)]
        target = exact[0] if exact else (starts[0] if len(starts) == 1 else None)
        if target is not None:
            probs[target] += math.exp(logprob)
    return renormalise(probs)


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; return (text, whether one was found)."""
    cut = -1
    for s in stop:
        if not s:
            continue
        at = text.find(s)
        if at >= 0 and (cut < 0 or at < cut):
            cut = at
    if cut < 0:
        return text, False
    return text[:cut], True
