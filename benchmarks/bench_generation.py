"""Figures 1-3 and 5: the ``hf`` back-end against a plain transformers ``generate`` loop.

1. generation tokens/s, ``HFBackend`` (project dtype choice, prefix sharing) / plain fp32
   ``generate`` with ``num_return_sequences``, same model, prompts and token limit; its details
   include the share of the decode bound the back-end's decode steps reach (``bounds.bound_share``);
1b. the same, over the best plain usage a knowledgeable user would write: the model in the dtype
   ``dtype: auto`` picks for generation on this machine, every prompt in one left-padded batch,
   ``num_return_sequences`` (timed ABAB with 1's variants; reported, no target;
   ``bench_best_plain.py``);
2. prefill tokens computed / prompt tokens submitted on 16 problems x 4 heuristics x 8 samples
   (the plain loop's ratio is counted with a forward hook on the same model);
3. decode tokens/s at ~1.1K tokens of context / at ~128, for both, plus the fraction of the
   decode bound (see ``bounds.py``) the back-end reaches; the bound is the shared-prefix one when
   the back-end decodes with cascade attention (the 8 rows read the prompt's KV once per step),
   and both bounds' short/long ratios are reported (``bound_ratio_shared_prefix``,
   ``bound_ratio_replicated``);
5. verification time / generation time for the completions generated in figure 1.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from bench_best_plain import best_plain_generate, figure_1b
from bounds import ModelShape, StepRows, decode_bound_detail, decode_step_bound_s
from common import (
    PLAIN_SAMPLING,
    Figure,
    interleave,
    median_spread,
    meets,
    ratio_samples,
    timed,
    useful_tokens,
)
from workloads import heuristic_prompts, long_context_messages, prompt_length

from manyways.backends.cascade import CascadeCache
from manyways.backends.config import BackendConfig
from manyways.backends.hf import HFBackend
from manyways.backends.protocol import GenRequest
from manyways.dtype_auto import decisions_since
from manyways.models import DEFAULT_MODEL, load_model_and_tokenizer

log = logging.getLogger(__name__)


class PrefillCounter:
    """Counts positions a model runs in multi-token (prefill) forwards, via a forward pre-hook."""

    def __init__(self, model: Any) -> None:
        self.tokens = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > 1:
            self.tokens += ids.numel()


class DecodeClock:
    """A logits processor that notes when the first token is chosen (prefill done) and the last."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        self.last = now
        self.steps += 1
        return scores


def plain_generate(
    model: Any, tokenizer: Any, messages: list[list[dict[str, str]]], samples: int, max_new_tokens: int
) -> dict[str, Any]:
    """The baseline: one ``model.generate`` per prompt with ``num_return_sequences``."""
    from transformers import LogitsProcessorList

    eos = {int(tokenizer.eos_token_id)}
    counter = PrefillCounter(model)
    tokens, texts, decode_s, decode_steps, submitted = 0, [], 0.0, 0, 0
    start = time.perf_counter()
    try:
        for m in messages:
            text = tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            clock = DecodeClock()
            with torch.inference_mode():
                out = model.generate(
                    **ids,
                    **PLAIN_SAMPLING,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=samples,
                    pad_token_id=tokenizer.pad_token_id,
                    logits_processor=LogitsProcessorList([clock]),
                )
            new = out[:, ids["input_ids"].shape[1] :]
            counts = useful_tokens(new, eos)
            tokens += sum(counts)
            texts += [
                tokenizer.decode(r[:c], skip_special_tokens=True) for r, c in zip(new, counts, strict=True)
            ]
            decode_s += clock.last - (clock.first or clock.last)
            decode_steps += max(0, clock.steps - 1) * samples
            submitted += ids["input_ids"].shape[1] * samples
    finally:
        counter.handle.remove()
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "tokens": tokens,
        "texts": texts,
        "prefill_computed": counter.tokens,
        "prompt_submitted": submitted,
        "decode_s": decode_s,
        "decode_tokens": decode_steps,
    }


def step_rows(rows: list[Any]) -> StepRows:
    """The unfinished rows of a decode step (``HFBackend``'s ``_Row``s): context = prompt + tokens
    generated so far (the one fed in this step included), prompt = the request."""
    live = [r for r in rows if r.finish is None]
    return StepRows(
        tuple(r.prompt_tokens + len(r.tokens) for r in live),
        tuple(id(r.request) for r in live),
        tuple(r.prompt_tokens for r in live),
    )


def backend_generate(
    backend: HFBackend, messages: list[list[dict[str, str]]], samples: int, max_new_tokens: int
) -> dict[str, Any]:
    """The project's back-end on the same prompts (seeds ``1000 * i + j``, temperature 0.7)."""
    requests = [
        GenRequest(
            f"r{i}",
            m,
            tuple(range(1000 * i, 1000 * i + samples)),
            max_new_tokens,
            PLAIN_SAMPLING["temperature"],
        )
        for i, m in enumerate(messages)
    ]
    return backend_run(backend, requests)


def backend_run(backend: HFBackend, requests: list[GenRequest]) -> dict[str, Any]:
    """``backend.generate(requests)``; decode time measured around ``_decode``, and the rows of
    every decode-step forward recorded (``steps``: :class:`bounds.StepRows`) for the bound."""
    clock = {"decode_s": 0.0}
    steps: list[StepRows] = []
    stamps: list[float] = []  # when each decode-step forward started
    step_s: list[float] = []  # each step's time: its forward and the next token's selection
    live: list[Any] = []  # the rows of the decode in progress (empty during prefill)
    cascaded: list[bool] = []  # whether each decode step ran on a shared-prefix (cascade) cache
    inner_decode = HFBackend._decode.__get__(backend)
    inner_forward = HFBackend._forward.__get__(backend)

    def decode(rows: list[Any], *args: Any) -> None:
        live[:] = rows
        stamps.clear()
        t0 = time.perf_counter()
        try:
            inner_decode(rows, *args)
        finally:
            end = time.perf_counter()
            clock["decode_s"] += end - t0
            # a decode that ends before any forward (1 new token: figure 2) records no step
            step_s.extend(b - a for a, b in zip(stamps, [*stamps[1:], end][: len(stamps)], strict=True))
            live.clear()

    def forward(ids: torch.Tensor, *args: Any) -> torch.Tensor:
        if live:
            steps.append(step_rows(live))
            stamps.append(time.perf_counter())
            cascaded.append(isinstance(args[-1], CascadeCache))
        return inner_forward(ids, *args)

    backend._decode = decode  # type: ignore[method-assign]
    backend._forward = forward  # type: ignore[method-assign]
    before = (backend.stats.decode_tokens, backend.stats.prefill_tokens_computed)
    before_submitted = backend.stats.prompt_tokens_submitted
    try:
        wall, results = timed(lambda: backend.generate(requests))
    finally:
        del backend._decode, backend._forward
    samples_out = [s for r in results for s in r]
    return {
        "wall_s": wall,
        "tokens": sum(s.completion_tokens for s in samples_out),
        "texts": [s.text for s in samples_out],
        "prefill_computed": backend.stats.prefill_tokens_computed - before[1],
        "prompt_submitted": backend.stats.prompt_tokens_submitted - before_submitted,
        "decode_s": clock["decode_s"],
        "decode_tokens": backend.stats.decode_tokens - before[0],
        "steps": steps,
        "step_s": step_s,
        "cascade": bool(cascaded) and all(cascaded),  # the back-end chose shared-prefix decode
    }


def decode_bound_shares(backend: HFBackend, runs: list[dict[str, Any]], bounds: dict) -> dict[str, Any]:
    """:func:`bounds.decode_bound_detail` of ``runs`` of :func:`backend_run` for ``backend``'s model
    (the matmul rate of its dtype, its KV dtype); the shared-prefix bound when it decodes with
    cascade attention (as it chose in these runs), else the replicated one."""
    shape = ModelShape.of(backend.model)
    peak = bounds["peak_bf16_flops"] if shape.bytes_per_param == 2 else bounds["peak_fp32_flops"]
    limits = (peak, bounds["read_bandwidth_bytes_s"], backend.kv_dtype.itemsize)
    shared = all(r.get("cascade", False) for r in runs)
    return {**decode_bound_detail(shape, runs, *limits, shared=shared), "decode_peak_flops": peak}


def load_pair(backend_cfg: BackendConfig) -> tuple[HFBackend, Any, Any]:
    """The project's back-end (as configured) and a plain fp32 copy of the same model."""
    backend = HFBackend.from_config(backend_cfg, DEFAULT_MODEL)
    plain, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, dtype="float32")
    return backend, plain.eval(), tokenizer


def verify_seconds(problems: list[Any], texts: list[str]) -> float:
    """Wall time of the shared verifier over (problem, completion) pairs (one worker, so an upper
    bound on its CPU time)."""
    from manyways.verify.registry import verify_many

    start = time.perf_counter()
    verify_many(list(zip(problems, texts, strict=True)))
    return time.perf_counter() - start


def figures_1_2_5(
    backend: HFBackend,
    plain: Any,
    tokenizer: Any,
    repeats: int,
    sizes: dict[str, int],
    bounds: dict | None = None,
    best_plain: tuple[Any, Any, dict] | None = None,
    want: set[Any] | None = None,
) -> list[Figure]:
    """Throughput of the back-end vs the plain loop (1) and vs the best plain usage (1b, when
    ``best_plain``, :func:`bench_best_plain.load_best_plain`'s result, is given), prefill ratio
    (2), verify share (5); 2 and 5 only when in ``want`` (default: all). With ``bounds``, figure
    1's details include the decode's share of the bound."""
    prompts = heuristic_prompts(sizes["fig1_problems"], sizes["fig1_heuristics"])
    messages = [p.messages for p in prompts]
    samples, new = sizes["fig1_samples"], sizes["fig1_new_tokens"]
    variants = {
        "ours": lambda: backend_generate(backend, messages, samples, new),
        "plain": lambda: plain_generate(plain, tokenizer, messages, samples, new),
    }
    if best_plain is not None:
        variants["best_plain"] = lambda: best_plain_generate(
            best_plain[0], best_plain[1], messages, samples, new
        )
    runs = interleave(variants, repeats)
    rate = {k: [r["tokens"] / r["wall_s"] for r in v] for k, v in runs.items()}
    ratio, spread = median_spread(ratio_samples(rate["ours"], rate["plain"]))
    workload = f"{len(messages)} prompts x {samples} samples, max_new_tokens={new}"
    fig1 = Figure(
        1,
        "generation tokens/s, hf back-end / plain fp32 generate",
        ratio,
        ">= 5x (stretch 10x)",
        meets(ratio, 5, higher_is_better=True),
        spread,
        "plain transformers generate, fp32",
        {
            "ours_tokens_per_s": median_spread(rate["ours"])[0],
            "plain_tokens_per_s": median_spread(rate["plain"])[0],
            "ours_dtype": str(next(backend.model.parameters()).dtype),
            "dtype_decisions": decisions_since(0.0),  # dtype auto's measurement, when it was used
            "workload": workload,
            "ours_tokens": [r["tokens"] for r in runs["ours"]],
            "plain_tokens": [r["tokens"] for r in runs["plain"]],
            **(decode_bound_shares(backend, runs["ours"], bounds) if bounds else {}),
        },
    )
    figures = [fig1]
    if best_plain is not None:
        figures.append(figure_1b(backend, rate, runs, best_plain[2], workload, samples))
    plain_ratio = runs["plain"][0]["prefill_computed"] / runs["plain"][0]["prompt_submitted"]
    if want is None or 2 in want:
        figures.append(figure_2(backend, sizes, plain_ratio))
    if want is None or 5 in want:
        figures.append(figure_5([p.problem for p in prompts for _ in range(samples)], runs["ours"]))
    return figures


def figure_5(problems: list[Any], runs: list[dict[str, Any]]) -> Figure:
    """Verification time of figure 1's completions (``problems``: one per completion) / their
    generation time, per run of ours."""
    from manyways.verify.math import prefilter_counts

    verify_seconds(problems[:1], runs[0]["texts"][:1])  # start the worker pool
    paths_before = prefilter_counts()
    shares = [verify_seconds(problems, r["texts"]) / r["wall_s"] for r in runs]
    share, share_spread = median_spread(shares)
    return Figure(
        5,
        "verification time / generation time (generate+verify)",
        share,
        "<= 2%",
        meets(share, 0.02, higher_is_better=False),
        share_spread,
        "-",
        {
            "note": "verify wall time (1 worker) of figure 1's completions / their generation time",
            "decision_paths": {k: v - paths_before.get(k, 0) for k, v in prefilter_counts().items()},
        },
    )


def figure_2(backend: HFBackend, sizes: dict[str, int], plain_ratio: float) -> Figure:
    """Prefill computed / submitted on the heuristic-generation workload (one token generated:
    the ratio depends only on the prompts and the batching)."""
    prompts = heuristic_prompts(sizes["fig2_problems"], sizes["fig2_heuristics"])
    result = backend_generate(backend, [p.messages for p in prompts], sizes["fig2_samples"], 1)
    value = result["prefill_computed"] / result["prompt_submitted"]
    return Figure(
        2,
        "prefill tokens computed / prompt tokens submitted",
        value,
        "<= 0.15",
        meets(value, 0.15, higher_is_better=False),
        0.0,
        f"plain loop: {plain_ratio:.2f}",
        {
            "workload": f"{sizes['fig2_problems']} problems x {sizes['fig2_heuristics']} heuristics "
            f"x {sizes['fig2_samples']} samples, batch_size={backend.batch_size}",
            "prefill_computed": result["prefill_computed"],
            "prompt_submitted": result["prompt_submitted"],
            "plain_ratio": plain_ratio,
        },
    )


def figure_3(
    backend: HFBackend, plain: Any, tokenizer: Any, repeats: int, sizes: dict[str, int], bounds: dict
) -> Figure:
    """Decode tokens/s at long context over short context, ours and plain, ABAB."""
    short_m = long_context_messages(tokenizer, sizes["fig3_short"])
    long_m = long_context_messages(tokenizer, sizes["fig3_long"])
    b, new = sizes["fig3_batch"], sizes["fig3_new_tokens"]
    runs = interleave(
        {
            "ours_short": lambda: backend_generate(backend, [short_m], b, new),
            "ours_long": lambda: backend_generate(backend, [long_m], b, new),
            "plain_short": lambda: plain_generate(plain, tokenizer, [short_m], b, new),
            "plain_long": lambda: plain_generate(plain, tokenizer, [long_m], b, new),
        },
        repeats,
    )
    rate = {k: [r["decode_tokens"] / r["decode_s"] for r in v] for k, v in runs.items()}
    ours, spread = median_spread(ratio_samples(rate["ours_long"], rate["ours_short"]))
    plain_ratio, plain_spread = median_spread(ratio_samples(rate["plain_long"], rate["plain_short"]))
    shape = ModelShape.of(backend.model)
    peak = bounds["peak_bf16_flops"] if shape.bytes_per_param == 2 else bounds["peak_fp32_flops"]
    # whether ours read each prompt's KV once per step (cascade decode), as it chose per workload
    shared = {name: all(r.get("cascade", False) for r in runs[f"ours_{name}"]) for name in ("short", "long")}
    detail: dict[str, Any] = {
        "plain_ratio": plain_ratio,
        "plain_spread": plain_spread,
        "batch": b,
        "shared_prefix_decode": shared,
    }
    step_bound, bound_of = {}, {"replicated": {}, "shared_prefix": {}}
    for name, m in (("short", short_m), ("long", long_m)):
        prompt = prompt_length(tokenizer, m)
        ctx = prompt + new // 2
        args = (shape, b, ctx, peak, bounds["read_bandwidth_bytes_s"], backend.kv_dtype.itemsize)
        bound_of["replicated"][name] = decode_step_bound_s(*args)
        bound_of["shared_prefix"][name] = decode_step_bound_s(*args, shared=prompt, prompts=1)
        step_bound[name] = bound_of["shared_prefix" if shared[name] else "replicated"][name]
        actual = b / median_spread(rate[f"ours_{name}"])[0]  # seconds per step of b rows
        detail[f"ours_{name}_tokens_per_s"] = median_spread(rate[f"ours_{name}"])[0]
        detail[f"plain_{name}_tokens_per_s"] = median_spread(rate[f"plain_{name}"])[0]
        detail[f"ours_{name}_fraction_of_bound"] = step_bound[name] / actual
        detail[f"{name}_context"] = ctx
    # the best ratio the machine allows: the bound's step time at short over long context (the KV
    # bytes read per step grow with the context; on a bandwidth-bound machine this caps the figure)
    detail["bound_ratio"] = step_bound["short"] / step_bound["long"]
    for kind, bound in bound_of.items():
        detail[f"bound_ratio_{kind}"] = bound["short"] / bound["long"]
    return Figure(
        3,
        "decode tokens/s at ~1.1K context / at ~128",
        ours,
        ">= 0.8",
        meets(ours, 0.8, higher_is_better=True),
        spread,
        f"plain loop: {plain_ratio:.2f}",
        detail,
    )
