"""Smoke tests of the benchmark helpers' pure functions (never timings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_adaptive  # noqa: E402
import bench_verify  # noqa: E402
import bounds  # noqa: E402
import common  # noqa: E402
import profile_figure  # noqa: E402
import run as bench_run  # noqa: E402

SHAPE = bounds.ModelShape(params=100, layers=2, d_att=8, kv_width=4, bytes_per_param=2)


def test_median_spread_and_paired_ratios() -> None:
    assert common.median_spread([3.0, 1.0, 2.0]) == (2.0, 1.0)
    assert common.median_spread([5.0]) == (5.0, 0.0)
    assert common.ratio_samples([4.0, 9.0], [2.0, 3.0]) == [2.0, 3.0]
    with pytest.raises(ValueError):
        common.ratio_samples([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        common.median_spread([])


def test_interleave_runs_variants_in_abab_order() -> None:
    calls: list[str] = []
    out = common.interleave({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3)
    assert calls == ["a", "b"] * 3
    assert out == {"a": [1, 1, 1], "b": [2, 2, 2]}


def test_meets_direction() -> None:
    assert common.meets(5.0, 5, higher_is_better=True)
    assert not common.meets(0.2, 0.15, higher_is_better=False)
    assert common.meets(None, 1, higher_is_better=True) is None


def test_decode_bound_takes_the_slower_of_compute_and_memory() -> None:
    # FLOP: B * (2N + 4 L d_att c) = 2 * (200 + 4*2*8*10) = 1680
    assert bounds.decode_flops_per_step(SHAPE, batch=2, context=10) == 1680
    # bytes: N * 2 + 2 (K,V) * L * B * c * kv_width * 2 bytes = 200 + 640
    assert bounds.decode_bytes_per_step(SHAPE, batch=2, context=10) == 840
    assert bounds.decode_step_bound_s(SHAPE, 2, 10, peak_flops=1680, bandwidth=1e9) == pytest.approx(1.0)
    assert bounds.decode_step_bound_s(SHAPE, 2, 10, peak_flops=1e12, bandwidth=840) == pytest.approx(1.0)


def test_training_bound_is_six_n_flop_per_token() -> None:
    assert bounds.train_tokens_per_s_bound(params=1000, peak_flops=6e6) == pytest.approx(1000)


def test_ordinary_pairs_are_deterministic_and_pathological_fraction_holds() -> None:
    pairs = bench_verify.ordinary_pairs(300)
    assert pairs == bench_verify.ordinary_pairs(300)
    bad = bench_verify.with_pathological(pairs, 0.01)
    changed = [i for i, (a, b) in enumerate(zip(pairs, bad, strict=True)) if a != b]
    assert changed == [99, 199, 299]


def test_adaptive_summary_counts_pairs_tokens_and_hard_coverage() -> None:
    rows = [
        {"problem_id": "p1", "heuristic_id": "h", "correct": True, "completion_tokens": 10},
        {"problem_id": "p1", "heuristic_id": "h", "correct": True, "completion_tokens": 10},
        {"problem_id": "p2", "heuristic_id": "h", "correct": False, "completion_tokens": 10},
        {"problem_id": "p2", "heuristic_id": "g", "correct": False, "completion_tokens": 10},
    ]
    hard = bench_adaptive.hard_problems(rows)
    assert hard == {"p2"}
    s = bench_adaptive.summarize(rows, hard)
    assert (s["accepted_pairs"], s["tokens"], s["hard_pairs"], s["hard_coverage"]) == (1, 40, 2, 0.0)
    assert bench_adaptive.safe_ratio(1.0, 0.0) is None


def test_markdown_generated_section_is_replaced_not_duplicated(tmp_path: Path) -> None:
    doc = {
        "date": "d", "wall_s": 60.0, "repeats": 3, "load_average_start": [1], "load_average_end": [2],
        "machine": {"cpu_model": "cpu", "cores": 2, "cpu_flags": ["avx2"], "torch": "t",
                    "transformers": "x", "trl": "y", "python": "3"},
        "bounds": {"peak_fp32_flops": 1e9, "peak_bf16_flops": 2e9, "read_bandwidth_bytes_s": 1e9},
        "figures": [common.Figure(1, "f", 2.5, ">= 5x", False, 0.1, "plain").to_dict()],
    }  # fmt: skip
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\nhand-written method\n")
    bench_run.update_markdown(path, doc)
    bench_run.update_markdown(path, doc)
    text = path.read_text()
    assert text.count(bench_run.BEGIN) == 1 and "hand-written method" in text
    assert "| 1 | f | 2.5 | >= 5x | **no** | 0.1 | plain |" in text


def _doc(date: str, figures: list[dict], cpu: str = "cpu", only: list[int] | None = None) -> dict:
    return {
        "date": date, "wall_s": 120.0, "repeats": 3, "load_average_start": [1], "load_average_end": [2],
        "only": only or list(range(1, 10)),
        "machine": {"cpu_model": cpu, "cores": 2, "cpu_flags": ["avx2"], "torch": "t",
                    "transformers": "x", "trl": "y", "python": "3"},
        "bounds": {"peak_fp32_flops": 1e9, "peak_bf16_flops": 2e9, "read_bandwidth_bytes_s": 1e9},
        "figures": figures,
    }  # fmt: skip


def _fig(number: int, value: float | None, run: str | None = None) -> dict:
    f = common.Figure(
        number, f"fig{number}", value, "t", None if value is None else True, None, "-"
    ).to_dict()
    return f if run is None else {**f, "run": run}


def test_partial_run_keeps_other_figures_marked_with_their_run(tmp_path: Path) -> None:
    previous = _doc("old", [_fig(1, 4.0), _fig(7, 1.5), _fig(9, 20.0)])
    previous["last_full_run"] = {"date": "old", "wall_s": 600.0}
    partial = _doc("new", [_fig(7, 2.5, "new")], only=[7])
    merged = bench_run.merge_previous(partial, previous)
    by_number = {f["number"]: f for f in merged["figures"]}
    assert sorted(by_number) == [1, 7, 9]
    assert by_number[7]["value"] == 2.5 and by_number[7]["run"] == "new"
    assert by_number[1]["value"] == 4.0 and by_number[1]["run"] == "old"
    path = tmp_path / "B.md"
    bench_run.update_markdown(path, merged)
    text = path.read_text()
    assert "| 1 | fig1 (earlier run: old) | 4 |" in text and "| 7 | fig7 | 2.5 |" in text
    assert "figures 7 only" in text and "last full `make bench`: old, 10.0 min" in text


def test_unmeasured_figure_takes_previous_value_and_other_machine_is_named() -> None:
    previous = _doc("old", [_fig(9, 20.0)], cpu="AMD EPYC")
    full = _doc("new", [_fig(1, 5.0, "new"), _fig(9, None, "new")], cpu="Xeon")
    merged = bench_run.merge_previous(full, previous)
    fig9 = next(f for f in merged["figures"] if f["number"] == 9)
    assert fig9["value"] == 20.0 and fig9["run"] == "old on AMD EPYC"
    assert [f["number"] for f in merged["figures"]] == [1, 9]
    assert bench_run.merge_previous(full, None) is full


def test_profile_summary_ranks_ops_by_self_cpu_time() -> None:
    import torch

    a = torch.randn(256, 256)

    def work() -> None:
        for _ in range(20):
            a @ a
        a + 1

    text = profile_figure.summarize(profile_figure.profiled(work), top=3)
    lines = text.splitlines()
    assert lines[0].startswith("self CPU total:") and len(lines) <= 2 + 3
    assert "aten::mm" in lines[2]  # the matmuls dominate
    assert int(lines[2].split()[2]) == 20  # calls


def test_shared_prefix_decode_bound_reads_each_prompt_once() -> None:
    # 8 rows of one prompt of 1,000 tokens, 16 generated: 1,000 + 8 * 16 positions, not 8 * 1,016
    assert bounds.kv_positions_read(8, 1016) == 8 * 1016
    assert bounds.kv_positions_read(8, 1016, shared=1000, prompts=1) == 1000 + 8 * 16
    assert bounds.kv_positions_read(8, 1016, shared=1000, prompts=2) == 2000 + 8 * 16
    replicated = bounds.decode_bytes_per_step(SHAPE, batch=2, context=10)
    shared = bounds.decode_bytes_per_step(SHAPE, batch=2, context=10, shared=6, prompts=1)
    # 200 weight bytes + 2 (K,V) * 2 layers * (6 + 2*4 positions) * 4 wide * 2 bytes
    assert (replicated, shared) == (840, 200 + 448)
    assert bounds.decode_step_bound_s(SHAPE, 2, 10, 1e12, 648, shared=6, prompts=1) == pytest.approx(1.0)
    # the FLOP do not change: at a compute-bound rate the two bounds are equal
    assert bounds.decode_step_bound_s(SHAPE, 2, 10, 1680, 1e12, shared=6) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bounds.kv_positions_read(2, 10, shared=11)
    with pytest.raises(ValueError):
        bounds.kv_positions_read(2, 10, shared=5, prompts=3)


def test_generated_section_states_dtype_auto_choices_with_their_rate_ratio() -> None:
    doc = {
        "dtype_auto": {
            "generation": {"dtype": "bfloat16", "bf16_over_fp32_median_ratio": 1.83, "measured_at": "t1"},
            "training": {"dtype": "float32", "bf16_over_fp32_median_ratio": 0.59, "measured_at": "t1"},
        }
    }
    line = bench_run.dtype_auto_line(doc)
    assert (
        "generation bfloat16 (bf16/fp32 rate 1.83" in line and "training float32 (bf16/fp32 rate 0.59" in line
    )
    assert bench_run.dtype_auto_line({}) == ""


def test_latest_figures_are_kept_per_kind_of_cpu_and_labelled(tmp_path: Path) -> None:
    assert common.cpu_kind(["avx512f", "avx512_bf16", "amx_bf16"]) == "AMX"
    assert common.cpu_kind(["avx512f", "avx512_bf16"]) == "AVX512-BF16 without AMX"
    assert common.cpu_kind(["avx2"]) == "no bf16 instructions"
    store = tmp_path / "results_by_kind.json"
    amx = _doc("monday", [_fig(1, 5.2, "monday")], cpu="Xeon")
    amx["machine"]["cpu_flags"] = ["avx512_bf16", "amx_bf16"]
    zen = _doc("tuesday", [_fig(1, 3.1, "tuesday")], cpu="EPYC")
    zen["machine"]["cpu_flags"] = ["avx512_bf16"]
    assert bench_run.keep_by_kind(store, amx)["other_kinds"] == {}
    shown = bench_run.keep_by_kind(store, zen)
    assert list(shown["other_kinds"]) == ["AMX"]
    text = bench_run.generated_section(shown)
    assert "Machine (AVX512-BF16 without AMX): EPYC" in text
    assert "Latest figures on another kind of CPU (AMX: Xeon, run monday)" in text
    assert "| 1 | fig1 | 5.2 |" in text and "| 1 | fig1 | 3.1 |" in text
    newer = _doc("wednesday", [_fig(1, 5.4, "wednesday")], cpu="Xeon")
    newer["machine"]["cpu_flags"] = ["amx_bf16"]
    assert bench_run.keep_by_kind(store, newer)["other_kinds"]["AVX512-BF16 without AMX"]["date"] == "tuesday"
    assert json.loads(store.read_text())["AMX"]["date"] == "wednesday"  # the latest of each kind
