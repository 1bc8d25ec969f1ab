"""Roofline bounds measured on this machine in the same run: matmul rate and read bandwidth.

Decode needs at least ``max(B*(2N + 4*L*d_att*c)/peak, (weight bytes + KV bytes read)/bandwidth)``
seconds per step (B rows, N parameters, L layers, d_att attention width, c context); training
needs about 6N FLOP per token. The KV bytes read are ``2*L*kv_width*kv_bytes`` per position read:
``B*c`` positions when every row holds its own copy of the prompt (replicated), ``P*s + B*(c - s)``
when the ``B`` rows of ``P`` prompts share each prompt's ``s`` positions (shared-prefix / cascade
decode, which reads each prompt's KV once per step). At a real batch the rows differ in context (and
finished rows leave): :func:`decode_step_bound_rows_s` takes each row's context and prompt, and
:func:`bound_share` is a sequence of such steps' bound time over their measured time.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from common import median_spread


@dataclass(frozen=True)
class ModelShape:
    """What the bounds need to know about a decoder-only transformer."""

    params: int  # N, tied embeddings counted once (the LM head matmul)
    layers: int  # L
    d_att: int  # heads * head_dim
    kv_width: int  # kv_heads * head_dim
    bytes_per_param: int

    @classmethod
    def of(cls, model: Any) -> ModelShape:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        params = sum(p.numel() for p in model.parameters())
        first = next(model.parameters())
        return cls(
            params=params,
            layers=c.num_hidden_layers,
            d_att=c.num_attention_heads * head_dim,
            kv_width=kv_heads * head_dim,
            bytes_per_param=first.element_size(),
        )


def decode_flops_per_step(shape: ModelShape, batch: int, context: int) -> float:
    """FLOP of one decode step: B * (2N + 4 * L * d_att * c)."""
    return batch * (2 * shape.params + 4 * shape.layers * shape.d_att * context)


def kv_positions_read(batch: int, context: int, shared: int = 0, prompts: int = 1) -> int:
    """KV positions one decode step reads: each row's ``context``, of which the first ``shared``
    (``<= context``) are read once per prompt when the rows of ``prompts`` prompts share them."""
    if not 0 <= shared <= context:
        raise ValueError(f"shared prefix {shared} must be within the context {context}")
    if shared and not 1 <= prompts <= batch:
        raise ValueError(f"{prompts} prompts cannot share a prefix among {batch} rows")
    return batch * (context - shared) + (prompts * shared if shared else 0)


def decode_bytes_per_step(
    shape: ModelShape, batch: int, context: int, kv_bytes: int = 2, shared: int = 0, prompts: int = 1
) -> float:
    """Bytes one decode step must read: every weight once plus K and V of the positions read
    (:func:`kv_positions_read`; ``shared=0``: every row's own copy of its context)."""
    kv = 2 * shape.layers * kv_positions_read(batch, context, shared, prompts) * shape.kv_width * kv_bytes
    return shape.params * shape.bytes_per_param + kv


def decode_step_bound_s(
    shape: ModelShape,
    batch: int,
    context: int,
    peak_flops: float,
    bandwidth: float,
    kv_bytes: int = 2,
    shared: int = 0,
    prompts: int = 1,
) -> float:
    """The least time one decode step can take on this machine (compute or memory bound); with
    ``shared``/``prompts``, for shared-prefix decode (the FLOP are the same, fewer bytes)."""
    compute = decode_flops_per_step(shape, batch, context) / peak_flops
    memory = decode_bytes_per_step(shape, batch, context, kv_bytes, shared, prompts) / bandwidth
    return max(compute, memory)


@dataclass(frozen=True)
class StepRows:
    """The rows of one decode step: each row's context (positions it attends, the token fed in
    this step included), its prompt (any hashable key) and that prompt's length."""

    contexts: tuple[int, ...]
    prompt_of_row: tuple[Hashable, ...]
    prompt_len_of_row: tuple[int, ...]


def kv_positions_read_rows(step: StepRows, shared: bool) -> int:
    """KV positions a decode step over ``step``'s rows reads: every row's context, or with
    ``shared``, each distinct prompt's positions once plus every row's own generated positions."""
    total = sum(step.contexts)
    if not shared:
        return total
    once: dict[Hashable, int] = {}
    for prompt, length, context in zip(
        step.prompt_of_row, step.prompt_len_of_row, step.contexts, strict=True
    ):
        if not 0 <= length <= context:
            raise ValueError(f"prompt length {length} must be within the row's context {context}")
        once[prompt] = length
    return total - sum(step.prompt_len_of_row) + sum(once.values())


def decode_step_parts_rows_s(
    shape: ModelShape,
    step: StepRows,
    peak_flops: float,
    bandwidth: float,
    kv_bytes: int = 2,
    shared: bool = True,
) -> tuple[float, float]:
    """(compute, memory) seconds of one decode step over rows of different contexts:
    ``sum_r (2N + 4 L d_att c_r)`` FLOP at ``peak_flops``; the weights once plus the KV of
    :func:`kv_positions_read_rows` at ``bandwidth``."""
    flops = len(step.contexts) * 2 * shape.params + 4 * shape.layers * shape.d_att * sum(step.contexts)
    kv = 2 * shape.layers * kv_positions_read_rows(step, shared) * shape.kv_width * kv_bytes
    return flops / peak_flops, (shape.params * shape.bytes_per_param + kv) / bandwidth


def decode_step_bound_rows_s(
    shape: ModelShape,
    step: StepRows,
    peak_flops: float,
    bandwidth: float,
    kv_bytes: int = 2,
    shared: bool = True,
) -> float:
    """:func:`decode_step_bound_s` for rows of different contexts: the slower of
    :func:`decode_step_parts_rows_s`."""
    return max(decode_step_parts_rows_s(shape, step, peak_flops, bandwidth, kv_bytes, shared))


def bound_share(
    shape: ModelShape,
    steps: Sequence[StepRows],
    measured_s: float,
    peak_flops: float,
    bandwidth: float,
    kv_bytes: int = 2,
    shared: bool = True,
) -> float:
    """The share of the bound the decode reached: the steps' summed bound time / their measured
    time (equal to the mean bound step time over the mean measured step time)."""
    if measured_s <= 0:
        raise ValueError(f"measured time must be positive, got {measured_s}")
    bound = sum(decode_step_bound_rows_s(shape, s, peak_flops, bandwidth, kv_bytes, shared) for s in steps)
    return bound / measured_s


def decode_bound_detail(
    shape: ModelShape,
    runs: Sequence[dict[str, Any]],
    peak_flops: float,
    bandwidth: float,
    kv_bytes: int = 2,
    *,
    shared: bool = True,
) -> dict[str, Any]:
    """The share of the decode bound reached by measured decode ``runs`` (each a dict with
    ``steps``: the :class:`StepRows` of its decode steps, ``step_s``: each step's time, ``decode_s``:
    the whole decode's time): the median over runs of :func:`bound_share` with the shared-prefix
    bound (``shared``) or the replicated one (both reported), the first run's share in its wide
    steps (at least half its first step's rows) and narrow ones (finished rows leave the batch),
    and which limit binds (compute or memory, summed over the first run's steps)."""
    limits = (peak_flops, bandwidth, kv_bytes)
    shares = {
        kind: [bound_share(shape, r["steps"], r["decode_s"], *limits, kind == "shared_prefix") for r in runs]
        for kind in ("shared_prefix", "replicated")
    }
    used = "shared_prefix" if shared else "replicated"
    first = runs[0]
    parts = [decode_step_parts_rows_s(shape, s, *limits, shared) for s in first["steps"]]
    compute, memory = sum(c for c, _ in parts), sum(m for _, m in parts)
    steps = [len(r["steps"]) for r in runs]
    rows = [len(s.contexts) for r in runs for s in r["steps"]]
    out: dict[str, Any] = {
        "decode_fraction_of_bound": median_spread(shares[used])[0],
        "decode_bound_kind": used,
        "decode_fraction_of_shared_prefix_bound": median_spread(shares["shared_prefix"])[0],
        "decode_fraction_of_replicated_bound": median_spread(shares["replicated"])[0],
        "decode_fraction_of_bound_per_repeat": shares[used],
        "decode_steps": steps,
        "decode_step_s": [r["decode_s"] / max(1, n) for r, n in zip(runs, steps, strict=True)],
        "decode_rows_per_step_mean": sum(rows) / max(1, len(rows)),
        "decode_rows_per_step_max": max(rows, default=0),
        "decode_bound_compute_s": compute,
        "decode_bound_memory_s": memory,
        "decode_bound_limited_by": "compute" if compute >= memory else "memory",
    }
    half = len(first["steps"][0].contexts) / 2 if first["steps"] else 0
    for name, keep in (("wide", lambda n: n >= half), ("narrow", lambda n: n < half)):
        picked = [
            (s, t) for s, t in zip(first["steps"], first["step_s"], strict=True) if keep(len(s.contexts))
        ]
        if picked:
            took = sum(t for _, t in picked)
            out[f"decode_{name}_steps"], out[f"decode_{name}_s"] = len(picked), took
            out[f"decode_{name}_fraction_of_bound"] = bound_share(
                shape, [s for s, _ in picked], took, *limits, shared
            )
    return out


def train_tokens_per_s_bound(params: int, peak_flops: float) -> float:
    """Tokens/s at 6N FLOP per token (forward + backward) and the given peak rate."""
    return peak_flops / (6 * params)


def peak_spread(values: Sequence[float]) -> tuple[float, float]:
    """(best, (max - min) / median) of rate samples: a bound is the best rate the machine showed,
    not its median. On a shared machine a neighbour can take the matmul units for seconds at a
    time (on the AMX machine one-thread bf16 rates of 313-869 GFLOP/s within a minute,
    2026-12-03): a median there measures the neighbour, and a figure's share of such a "bound"
    looks better than the hardware warrants."""
    if not values:
        raise ValueError("peak_spread needs at least one value")
    return max(values), median_spread(values)[1]


def sample_rates(measure: Any, samples: int, spacing_s: float) -> list[float]:
    """``samples`` calls of ``measure()`` (a rate), ``spacing_s`` apart: contention on a shared
    machine comes and goes over seconds, so samples spread out see its quiet moments too."""
    rates = []
    for i in range(samples):
        if i and spacing_s:
            time.sleep(spacing_s)
        rates.append(measure())
    return rates


def matmul_rate(
    dtype_name: str, size: int = 1024, samples: int = 8, spacing_s: float = 1.0
) -> tuple[float, float]:
    """(best FLOP/s, spread) of ``size``-square matmuls in ``dtype_name`` on the current threads:
    ``samples`` timings of 4 matmuls each, ``spacing_s`` apart (:func:`peak_spread`)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)  # warm-up (oneDNN kernel selection)
    inner = 4

    def once() -> float:
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        return inner * 2 * size**3 / (time.perf_counter() - start)

    return peak_spread(sample_rates(once, samples, spacing_s))


def read_bandwidth(megabytes: int = 256, samples: int = 8, spacing_s: float = 0.5) -> tuple[float, float]:
    """(best bytes/s, spread) of summing a buffer much larger than the caches (:func:`peak_spread`)."""
    import torch

    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    x.sum()

    def once() -> float:
        start = time.perf_counter()
        x.sum()
        return x.numel() * 4 / (time.perf_counter() - start)

    return peak_spread(sample_rates(once, samples, spacing_s))


def measure_bounds() -> dict[str, float]:
    """The machine's fp32 / bf16 matmul rate and read bandwidth (each the best of spaced samples),
    with their spreads."""
    fp32, fp32_spread = matmul_rate("float32")
    bf16, bf16_spread = matmul_rate("bfloat16")
    bandwidth, bw_spread = read_bandwidth()
    return {
        "peak_fp32_flops": fp32,
        "peak_fp32_spread": fp32_spread,
        "peak_bf16_flops": bf16,
        "peak_bf16_spread": bf16_spread,
        "read_bandwidth_bytes_s": bandwidth,
        "read_bandwidth_spread": bw_spread,
    }
