"""``dtype: auto``: bf16 or fp32 per workload, decided by a short measurement on this machine.

Whether bf16 is faster than fp32 on a CPU depends on the CPU and on the workload: decode is
bandwidth-bound (bf16 weights halve the bytes read), training is compute-bound (bf16 autocast
pays off only where bf16 matmuls are fast: AMX; on AVX512-BF16 without AMX they measured slower
than fp32). :func:`resolve_auto_dtype` therefore times, on one thread, the model's own matmul
shapes in both dtypes, interleaved (fp32, bf16, fp32, bf16, ...), and picks the dtype with the
higher median rate (fp32 on a tie):

- ``generation``: ``rows`` (16) decode rows through the up- and down-projections
  (hidden x intermediate, intermediate x hidden) of as many layers as the model has (at most
  128 MiB of fp32 weights; more than a CPU cache holds, so they stream from memory as in decode),
  weights stored in the dtype (bf16 packed for oneDNN where the hf back-end packs them:
  :mod:`manyways.backends.packed_linear`);
- ``training``: one forward and backward of ``tokens`` (128) through the same two projections,
  fp32 weights, bf16 under CPU autocast (the weight casts included, as in the trainers).

A CUDA device is bf16 without measuring. The decision is cached in
``<MANYWAYS_CACHE>/dtype_auto.json`` per machine (CPU model string, CPU flags, torch version),
workload and model shapes, so each is measured once; it is logged with its numbers, and every
decision used in this process is kept (:func:`decisions_since`) for the stage manifests
(``dtype_decisions``, written by :meth:`manyways.artifacts.StageDir.finish`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Workload = Literal["generation", "training"]
WORKLOADS = ("generation", "training")
CACHE_FILE = "dtype_auto.json"
DECODE_ROWS = 16
TRAIN_TOKENS = 128
STREAM_BYTES = 128 * 2**20  # larger than CPU caches: decode streams its weights from memory
REPEATS = 5  # interleaved pairs, fewer (MIN_REPEATS) where one pair takes over BUDGET_S / REPEATS
MIN_REPEATS = 3
BUDGET_S = 2.0
MIN_SAMPLE_S = 0.02
RECORD_VERSION = 2  # 2: bf16 generation measured with packed weights (what the hf back-end runs)

Measure = Callable[["Shapes", str], dict[str, list[float]]]
_USED: list[tuple[float, dict[str, Any]]] = []


@dataclass(frozen=True)
class Shapes:
    """The matmul shapes of a decoder-only model that the measurement uses."""

    hidden: int
    intermediate: int
    layers: int

    @classmethod
    def of(cls, model: Any) -> Shapes:
        """From ``Shapes``, a transformers config, a model (its ``.config``), a dict with the same
        keys, or a model name/path (its config is read; no weights are loaded)."""
        if isinstance(model, Shapes):
            return model
        if isinstance(model, (str, Path)):
            from transformers import AutoConfig

            from manyways.models import resolve_model_path

            model = AutoConfig.from_pretrained(resolve_model_path(str(model)))
        config = getattr(model, "config", model)
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        hidden = get("hidden_size")
        if not hidden:
            raise ValueError(f"cannot read hidden_size from {type(config).__name__}")
        intermediate = get("intermediate_size") or 4 * hidden
        layers = get("num_hidden_layers") or get("layers") or 1
        return cls(int(hidden), int(intermediate), int(layers))


def machine() -> dict[str, Any]:
    """The CPU model string, its flags, the torch version, and a key over all three."""
    import torch

    name, flags = "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = sorted(value.split())
    except OSError:
        pass
    digest = hashlib.sha256(json.dumps([name, flags, torch.__version__]).encode()).hexdigest()[:16]
    bf16_flags = [f for f in flags if "bf16" in f or f.startswith("amx") or f == "avx512f"]
    return {"cpu": name, "bf16_flags": bf16_flags, "torch": torch.__version__, "key": digest}


def decide(rates: dict[str, float]) -> str:
    """The dtype with the higher rate; fp32 unless bf16 is strictly faster."""
    return "bfloat16" if rates["bfloat16"] > rates["float32"] else "float32"


def _generation_sampler(shapes: Shapes, dtype_name: str) -> tuple[Callable[[], None], float]:
    import torch
    import torch.nn.functional as F

    from manyways.backends import packed_linear

    dtype = getattr(torch, dtype_name)
    per_layer = 2 * shapes.hidden * shapes.intermediate * 4
    layers = max(1, min(shapes.layers, STREAM_BYTES // per_layer))
    # constant values: the rate does not depend on them, and filling is much faster than sampling
    up = [torch.full((shapes.intermediate, shapes.hidden), 0.01, dtype=dtype) for _ in range(layers)]
    down = [torch.full((shapes.hidden, shapes.intermediate), 0.01, dtype=dtype) for _ in range(layers)]
    x = torch.full((DECODE_ROWS, shapes.hidden), 0.01, dtype=dtype)

    linear: Callable[..., Any] = F.linear
    if dtype == torch.bfloat16 and packed_linear.available():  # as the hf back-end runs bf16
        up, down, linear = (
            [packed_linear.pack(w) for w in up],
            [packed_linear.pack(w) for w in down],
            packed_linear.linear,
        )

    def step() -> None:
        with torch.inference_mode():
            for w_up, w_down in zip(up, down, strict=True):
                linear(linear(x, w_up), w_down)

    return step, 4 * DECODE_ROWS * shapes.hidden * shapes.intermediate * layers


def _training_sampler(shapes: Shapes, dtype_name: str) -> tuple[Callable[[], None], float]:
    import torch

    gen = torch.Generator().manual_seed(0)
    up = torch.nn.Linear(shapes.hidden, shapes.intermediate, bias=False)
    down = torch.nn.Linear(shapes.intermediate, shapes.hidden, bias=False)
    x = torch.rand(TRAIN_TOKENS, shapes.hidden, generator=gen)
    autocast = dtype_name == "bfloat16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = down(up(x))
        out.float().sum().backward()

    return step, 6 * TRAIN_TOKENS * 2 * shapes.hidden * shapes.intermediate


SAMPLERS = {"generation": _generation_sampler, "training": _training_sampler}


def measure(shapes: Shapes, workload: str) -> dict[str, list[float]]:
    """FLOP/s of the workload's step in fp32 and bf16, one thread, interleaved pairs (``REPEATS``,
    or down to ``MIN_REPEATS`` when a pair takes longer than ``BUDGET_S / REPEATS``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = {name: SAMPLERS[workload](shapes, name) for name in ("float32", "bfloat16")}
        inner, pair_s = {}, 0.0
        for name, (step, _) in steps.items():
            step()  # warm-up (kernel selection)
            start = time.perf_counter()
            step()
            took = max(time.perf_counter() - start, 1e-6)
            inner[name] = max(1, int(MIN_SAMPLE_S / took))
            pair_s += inner[name] * took
        repeats = max(MIN_REPEATS, min(REPEATS, int(BUDGET_S / pair_s)))  # slow steps: fewer pairs
        rates: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        for _ in range(repeats):
            for name, (step, flops) in steps.items():
                start = time.perf_counter()
                for _ in range(inner[name]):
                    step()
                rates[name].append(inner[name] * flops / (time.perf_counter() - start))
        return rates
    finally:
        torch.set_num_threads(threads)


def _cache_path() -> Path:
    from manyways.models import cache_dir

    return cache_dir() / CACHE_FILE


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(workload: str, shapes: Shapes, host: dict[str, Any], samples: dict[str, list[float]]) -> dict:
    ratios = [b / f for f, b in zip(samples["float32"], samples["bfloat16"], strict=True)]
    rates = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "version": RECORD_VERSION,
        "workload": workload,
        "dtype": decide(rates),
        "reason": "measured: the dtype with the higher median matmul rate (one thread, interleaved)",
        "rates_flops": rates,
        "rate_samples": samples,
        "bf16_over_fp32_median_ratio": statistics.median(ratios),
        "shapes": asdict(shapes),
        "rows": DECODE_ROWS if workload == "generation" else TRAIN_TOKENS,
        "machine": host,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def resolve_auto_dtype(
    workload: str,
    model_config_or_shapes: Any,
    *,
    device: str = "cpu",
    measure_fn: Measure | None = None,
    cache_path: Path | None = None,
) -> tuple[str, dict[str, Any]]:
    """``(dtype name, decision record)`` for ``dtype: auto`` of ``workload`` ("generation" or
    "training") on this machine for a model (see :meth:`Shapes.of`); measured once per machine,
    workload and shapes, then read from the cache."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: use one of {', '.join(WORKLOADS)}")
    if device.startswith("cuda"):
        return _used({"workload": workload, "dtype": "bfloat16", "reason": "cuda device", "cached": False})
    shapes = Shapes.of(model_config_or_shapes)
    host = machine()
    key = f"{host['key']}|{workload}|{shapes.hidden}x{shapes.intermediate}x{shapes.layers}"
    path = cache_path or _cache_path()
    cached = _load(path).get(key)
    if isinstance(cached, dict) and cached.get("version") == RECORD_VERSION:
        return _used({**cached, "cached": True, "cache_file": str(path)})
    start = time.perf_counter()
    record = _record(workload, shapes, host, (measure_fn or measure)(shapes, workload))
    record["measure_s"] = round(time.perf_counter() - start, 3)
    _store(path, key, record)
    log.info(
        "dtype auto for %s on %s (%s): %s (median rate fp32 %.3g, bf16 %.3g FLOP/s, bf16/fp32 %.2f; "
        "shapes %s; %.1f s; cached in %s)",
        workload,
        host["cpu"],
        ",".join(host["bf16_flags"]) or "no bf16 flags",
        record["dtype"],
        record["rates_flops"]["float32"],
        record["rates_flops"]["bfloat16"],
        record["bf16_over_fp32_median_ratio"],
        record["shapes"],
        record["measure_s"],
        path,
    )
    return _used({**record, "cached": False, "cache_file": str(path)})


def _store(path: Path, key: str, record: dict[str, Any]) -> None:
    from manyways.artifacts import write_json_atomic

    data = _load(path)
    data[key] = record
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    except OSError as exc:  # a read-only cache: decide anyway, measure again next time
        log.warning("could not cache the dtype decision in %s: %s", path, exc)


def _used(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    _USED.append((time.time(), record))
    return record["dtype"], record


def decisions_since(started: float) -> list[dict[str, Any]]:
    """The auto-dtype decisions used in this process at or after ``started`` (a ``time.time()``),
    one per workload and shapes (the latest)."""
    latest: dict[str, dict[str, Any]] = {}
    for when, record in _USED:
        if when >= started:
            latest[f"{record['workload']}|{record.get('shapes')}"] = record
    return list(latest.values())
