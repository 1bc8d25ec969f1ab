"""Shared helpers of the benchmarks: interleaved (ABAB) timing, medians and spread, machine facts.

The machines these run on are shared and noisy, so every comparison times its variants
interleaved (A, B, A, B, ...) and reports the median of each and the spread
``(max - min) / median``. Figures are ratios or fractions of a bound, never absolute times.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")


@dataclass
class Figure:
    """One row of the results table."""

    number: int | str  # 1-9, or a letter figure next to its number ("1b")
    name: str
    value: float | None
    target: str
    met: bool | None
    spread: float | None = None
    baseline: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# the plain transformers baselines' sampling (figure 1's workload: ours samples at the same settings)
PLAIN_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 1.0}


def median_spread(values: Sequence[float]) -> tuple[float, float]:
    """(median, (max - min) / median) of ``values``; spread is 0 for one value."""
    if not values:
        raise ValueError("median_spread needs at least one value")
    med = statistics.median(values)
    if len(values) == 1 or med == 0:
        return med, 0.0
    return med, (max(values) - min(values)) / abs(med)


def ratio_samples(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-repeat ratios a[i] / b[i] of paired (interleaved) measurements."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return [x / y for x, y in zip(a, b, strict=True)]


def interleave(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Run each variant once per repeat, in ABAB order; results per variant in repeat order."""
    out: dict[str, list[Any]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            log.info("  repeat %d/%d: %s", r + 1, repeats, name)
            out[name].append(fn())
    return out


def useful_tokens(rows: Any, eos_ids: set[int]) -> list[int]:
    """Generated tokens per row of a ``[rows, new tokens]`` tensor up to and including the first EOS
    (padding after it excluded)."""
    counts = []
    for row in rows.tolist():
        n = len(row)
        for i, tok in enumerate(row):
            if tok in eos_ids:
                n = i + 1
                break
        counts.append(n)
    return counts


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of ``fn()``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_facts() -> dict[str, Any]:
    """CPU model, the SIMD flags that matter here, and the core count."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_flags": [f for f in INTERESTING_FLAGS if f in flags],
        "cores": os.cpu_count(),
    }


def cpu_kind(flags: list[str]) -> str:
    """The kind of CPU that decides bf16's speed: AMX, AVX512-BF16 without AMX, or neither."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16 without AMX"
    return "no bf16 instructions"


def machine_facts() -> dict[str, Any]:
    """CPU facts plus the library versions the figures depend on."""
    import torch
    import transformers
    import trl

    return {
        **cpu_facts(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "python": platform.python_version(),
    }


def meets(value: float | None, target: float, *, higher_is_better: bool) -> bool | None:
    """Whether ``value`` meets ``target`` (None when not measured)."""
    if value is None:
        return None
    return value >= target if higher_is_better else value <= target


def set_threads(n: int = 1) -> None:
    """Pin torch's intra-op threads (benchmarks use 1 thread per process, see BENCHMARKS.md)."""
    import torch

    torch.set_num_threads(n)
