"""``dtype: auto`` per workload: decided from measured rates, cached per machine and model, recorded."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from manyways import dtype_auto
from manyways.dtype_auto import Shapes, decide, decisions_since, resolve_auto_dtype

SMOL = Shapes(hidden=576, intermediate=1536, layers=30)
# single-thread rates BENCHMARKS.md measured: AMX Xeon (bf16 ~10x fp32) and a CPU with avx512_bf16
# but no AMX (bf16 matmuls slower than fp32)
AMX = {"float32": 109e9, "bfloat16": 1099e9}
NO_AMX = {"float32": 125e9, "bfloat16": 74e9}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANYWAYS_CACHE", str(tmp_path / "cache"))


class FakeMeasure:
    """Returns given rates per workload (three interleaved samples each) and counts its calls."""

    def __init__(self, rates: dict[str, dict[str, float]]) -> None:
        self.rates = rates
        self.calls: list[tuple[Shapes, str]] = []

    def __call__(self, shapes: Shapes, workload: str) -> dict[str, list[float]]:
        self.calls.append((shapes, workload))
        r = self.rates[workload]
        return {k: [v * 0.9, v, v * 1.05] for k, v in r.items()}


@pytest.mark.parametrize(
    "rates",
    [
        AMX,
        NO_AMX,
        {"float32": 1.0, "bfloat16": 1.0},
        {"float32": 2.0, "bfloat16": 2.001},
        {"float32": 3, "bfloat16": 1},
    ],
)
def test_never_picks_the_slower_dtype(rates: dict[str, float]) -> None:
    chosen = decide(rates)
    other = "float32" if chosen == "bfloat16" else "bfloat16"
    assert rates[chosen] >= rates[other]
    if rates["float32"] == rates["bfloat16"]:
        assert chosen == "float32"  # a tie keeps full precision


def test_each_workload_decides_from_its_own_measured_rates() -> None:
    # decode faster in bf16 (half the bytes), training faster in fp32 (no AMX): the choices differ
    fake = FakeMeasure({"generation": {"float32": 10e9, "bfloat16": 18e9}, "training": NO_AMX})
    assert resolve_auto_dtype("generation", SMOL, measure_fn=fake)[0] == "bfloat16"
    assert resolve_auto_dtype("training", SMOL, measure_fn=fake)[0] == "float32"
    amx = FakeMeasure({"generation": AMX, "training": AMX})
    assert resolve_auto_dtype("training", Shapes(64, 128, 2), measure_fn=amx)[0] == "bfloat16"
    with pytest.raises(ValueError, match="unknown workload"):
        resolve_auto_dtype("inference", SMOL, measure_fn=fake)


def test_the_cache_is_used_per_machine_workload_and_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMeasure({"generation": NO_AMX, "training": AMX})
    first = resolve_auto_dtype("generation", SMOL, measure_fn=fake)
    again = resolve_auto_dtype("generation", SMOL, measure_fn=fake)
    assert len(fake.calls) == 1  # no second measurement
    assert first[0] == again[0] == "float32"
    assert not first[1]["cached"] and again[1]["cached"]
    assert again[1]["rates_flops"] == first[1]["rates_flops"]
    resolve_auto_dtype("training", SMOL, measure_fn=fake)  # another workload: measured
    resolve_auto_dtype("generation", Shapes(64, 128, 2), measure_fn=fake)  # another model: measured
    assert len(fake.calls) == 3
    cache_file = Path(first[1]["cache_file"])
    assert len(json.loads(cache_file.read_text())) == 3
    other_cpu = {**dtype_auto.machine(), "cpu": "another CPU", "key": "0123456789abcdef"}
    monkeypatch.setattr(dtype_auto, "machine", lambda: other_cpu)
    resolve_auto_dtype("generation", SMOL, measure_fn=fake)  # another machine: measured
    assert len(fake.calls) == 4


def test_the_numbers_are_in_the_decision_record_the_log_and_the_manifest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from manyways.artifacts import StageDir

    stage = StageDir(tmp_path / "stage", "generate", {"x": 1})
    stage.open()
    fake = FakeMeasure({"generation": {"float32": 1.25e11, "bfloat16": 7.4e10}})
    with caplog.at_level(logging.INFO, logger="manyways.dtype_auto"):
        dtype, record = resolve_auto_dtype("generation", SMOL, measure_fn=fake)
    assert record["rate_samples"] == {
        "float32": [1.125e11, 1.25e11, 1.3125e11],
        "bfloat16": [6.66e10, 7.4e10, 7.77e10],
    }
    assert record["rates_flops"] == {"float32": 1.25e11, "bfloat16": 7.4e10}
    assert record["bf16_over_fp32_median_ratio"] == pytest.approx(0.592)
    assert record["shapes"] == {"hidden": 576, "intermediate": 1536, "layers": 30}
    assert record["workload"] == "generation" and record["dtype"] == dtype == "float32"
    assert record["machine"]["cpu"] and "torch" in record["machine"]
    assert "1.25e+11" in caplog.text and "7.4e+10" in caplog.text and "0.59" in caplog.text
    manifest = stage.finish({"rows": 0})
    [recorded] = manifest["dtype_decisions"]
    assert recorded["rates_flops"] == record["rates_flops"] and recorded["dtype"] == "float32"
    assert json.loads((tmp_path / "stage" / "manifest.json").read_text())["dtype_decisions"] == [recorded]
    assert decisions_since(time.time() + 60) == []  # a stage that starts later used none


def test_cuda_is_bf16_without_measuring() -> None:
    def never(*_):
        raise AssertionError("measured")

    dtype, record = resolve_auto_dtype("training", SMOL, device="cuda:0", measure_fn=never)
    assert dtype == "bfloat16" and record["reason"] == "cuda device"


def test_resolve_dtype_and_use_bf16_ask_their_own_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    from manyways.backends.config import resolve_dtype
    from manyways.training import use_bf16

    fake = FakeMeasure({"generation": AMX, "training": NO_AMX})
    monkeypatch.setattr(dtype_auto, "measure", fake)
    assert resolve_dtype("auto", "cpu", model=SMOL) == "bfloat16"
    assert use_bf16("auto", SMOL) is False
    assert [w for _, w in fake.calls] == ["generation", "training"]
    assert resolve_dtype("float32", "cpu", model=SMOL) == "float32" and use_bf16("bfloat16", SMOL)
    assert len(fake.calls) == 2  # explicit dtypes are not measured


def test_shapes_from_configs_dicts_and_model_directories(tiny_model_dir: Path) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=3)
    assert Shapes.of(config) == Shapes(96, 200, 3)
    assert Shapes.of({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2}) == Shapes(8, 16, 2)
    assert Shapes.of(str(tiny_model_dir)) == Shapes(64, 128, 2)
    with pytest.raises(ValueError, match="hidden_size"):
        Shapes.of({"layers": 2})


@pytest.mark.parametrize(("workload", "budget_s", "pairs"), [("generation", 1e9, 5), ("training", 0.0, 3)])
def test_the_measurement_runs_both_dtypes_interleaved_on_one_thread(
    workload: str, budget_s: float, pairs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    order: list[str] = []
    real = dtype_auto.SAMPLERS[workload]

    def traced(shapes: Shapes, name: str):
        step, flops = real(shapes, name)

        def counted() -> None:
            assert torch.get_num_threads() == 1
            order.append(name)
            step()

        return counted, flops

    monkeypatch.setitem(dtype_auto.SAMPLERS, workload, traced)
    monkeypatch.setattr(dtype_auto, "MIN_SAMPLE_S", 0.0)  # one step per sample: a quick test
    monkeypatch.setattr(dtype_auto, "BUDGET_S", budget_s)  # no budget left: the fewest pairs
    threads = torch.get_num_threads()
    rates = dtype_auto.measure(Shapes(64, 128, 2), workload)
    assert torch.get_num_threads() == threads
    assert {k: len(v) for k, v in rates.items()} == {"float32": pairs, "bfloat16": pairs}
    assert all(r > 0 for v in rates.values() for r in v)
    timed = order[4:]  # after two warm-ups and two calibration steps
    assert timed == ["float32", "bfloat16"] * pairs


def test_bf16_generation_is_measured_as_the_hf_back_end_runs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 decode runs with weights packed for oneDNN (manyways.backends.packed_linear) where
    torch can: the measurement times that path, not plain F.linear's per-call weight reorder."""
    from manyways.backends import packed_linear

    packed: list[tuple[int, ...]] = []
    real = packed_linear.pack
    monkeypatch.setattr(packed_linear, "pack", lambda w: packed.append(tuple(w.shape)) or real(w))
    step, _ = dtype_auto.SAMPLERS["generation"](Shapes(64, 128, 2), "float32")
    step()
    assert packed == []
    step, _ = dtype_auto.SAMPLERS["generation"](Shapes(64, 128, 2), "bfloat16")
    step()
    if packed_linear.available():  # a torch and CPU with oneDNN bf16 (the back-end packs too)
        assert sorted(set(packed)) == [(64, 128), (128, 64)] and len(packed) == 4  # 2 layers x up, down
    else:
        assert packed == []
