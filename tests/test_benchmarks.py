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


def _pair_rows(correct_by_pair: list[list[bool]], tokens: int = 10) -> list[dict]:
    return [
        {"problem_id": f"p{i}", "heuristic_id": "h", "correct": ok, "completion_tokens": tokens}
        for i, samples in enumerate(correct_by_pair)
        for ok in samples
    ]


def test_adaptive_bootstrap_is_paired_over_pairs_and_brackets_the_ratio() -> None:
    fixed = _pair_rows([[True, False, False, False]] * 6 + [[False] * 4] * 10)
    same = bench_adaptive.bootstrap_ratio(fixed, fixed, resamples=300)
    assert same["interval"] == [1.0, 1.0] and same["pairs"] == 16  # paired: the same pairs both sides
    adaptive = _pair_rows([[True, False]] * 9 + [[False, False]] * 7)  # half the tokens, more accepted
    boot = bench_adaptive.bootstrap_ratio(fixed, adaptive, resamples=500)
    point = (
        bench_adaptive.summarize(adaptive, set())["accepted_per_token"]
        / (bench_adaptive.summarize(fixed, set())["accepted_per_token"])
    )
    lo, hi = boot["interval"]
    assert lo < point < hi and lo > 1.0  # 3x the acceptance rate per token, clearly above 1
    assert boot == bench_adaptive.bootstrap_ratio(fixed, adaptive, resamples=500)  # seeded
    none_accepted = bench_adaptive.bootstrap_ratio(_pair_rows([[False] * 4] * 16), adaptive, resamples=50)
    assert none_accepted["interval"] is None and none_accepted["undefined"] == 50


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


# ---------------------------------------------------------------- issue 16 item 2: 1b and 3b
def test_bound_share_of_rows_with_different_contexts_and_shared_prompts() -> None:
    # rows 0, 1 sample prompt "a" (6 tokens), row 2 prompt "b" (5 tokens)
    step = bounds.StepRows(contexts=(10, 10, 7), prompt_of_row=("a", "a", "b"), prompt_len_of_row=(6, 6, 5))
    assert bounds.kv_positions_read_rows(step, shared=False) == 27
    assert bounds.kv_positions_read_rows(step, shared=True) == 27 - 17 + 11  # "a" read once: 21
    # FLOP: 3 * 2N + 4 L d_att * 27 = 600 + 1728; bytes: 200 + 2 (K,V) * 2 L * 21 * 4 * 2 = 872
    assert bounds.decode_step_parts_rows_s(SHAPE, step, 2328, 872) == pytest.approx((1.0, 1.0))
    assert bounds.decode_step_bound_rows_s(SHAPE, step, 1e12, 872) == pytest.approx(1.0)
    assert bounds.decode_step_bound_rows_s(SHAPE, step, 1e12, 872, shared=False) == pytest.approx(1064 / 872)
    assert bounds.decode_step_bound_rows_s(SHAPE, step, 2328 / 2, 1e12) == pytest.approx(2.0)
    # two such steps (1 s of bound each) measured in 4 s: half of the bound
    assert bounds.bound_share(SHAPE, [step, step], 4.0, 1e12, 872) == pytest.approx(0.5)
    # equal contexts, one prompt: the same as the scalar shared-prefix bound of figure 3
    same = bounds.StepRows((10, 10), ("p", "p"), (6, 6))
    assert bounds.decode_step_bound_rows_s(SHAPE, same, 1e12, 1e3) == pytest.approx(
        bounds.decode_step_bound_s(SHAPE, 2, 10, 1e12, 1e3, shared=6, prompts=1)
    )
    with pytest.raises(ValueError):
        bounds.bound_share(SHAPE, [step], 0.0, 1e12, 872)
    with pytest.raises(ValueError):
        bounds.kv_positions_read_rows(bounds.StepRows((5,), ("a",), (6,)), shared=True)


def test_step_rows_keeps_the_unfinished_rows_with_their_prompt_and_context() -> None:
    import bench_generation

    from manyways.backends.hf import _Row

    a, b = object(), object()
    rows = [
        _Row(a, None, 6, tokens=[1, 2]),  # type: ignore[arg-type]
        _Row(a, None, 6, tokens=[1, 2], finish="stop"),  # type: ignore[arg-type]
        _Row(b, None, 4, tokens=[3, 4]),  # type: ignore[arg-type]
    ]
    step = bench_generation.step_rows(rows)
    assert step.contexts == (8, 6) and step.prompt_len_of_row == (6, 4)
    assert step.prompt_of_row == (id(a), id(b))


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir: Path):
    import torch

    from manyways.backends.hf import HFBackend
    from manyways.models import load_model_and_tokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    return HFBackend(model, tokenizer, model_id="tiny", batch_size=80)


def test_backend_run_records_every_decode_step_of_the_real_backend(tiny_backend) -> None:
    import bench_generation

    from manyways.backends.protocol import GenRequest

    questions = ["What is 2 + 3?", "Compute 12 * 7, then subtract 5 from it."]
    requests = [
        GenRequest(f"r{i}", [{"role": "user", "content": q}], (1, 2, 3), 6, 0.7)
        for i, q in enumerate(questions)
    ]
    run = bench_generation.backend_run(tiny_backend, requests)
    steps = run["steps"]
    assert steps and len(run["step_s"]) == len(steps) and run["decode_s"] > 0
    # each forward feeds the rows still running; the first token of each row needs no forward
    assert sum(len(s.contexts) for s in steps) == run["decode_tokens"] - 6
    prompt_lens = [len(tiny_backend.encode(r.messages)) for r in requests]
    first = steps[0]
    assert sorted(first.contexts) == sorted(n + 1 for n in prompt_lens for _ in range(3))
    assert len(set(first.prompt_of_row)) == 2 and sorted(first.prompt_len_of_row) == sorted(prompt_lens * 3)
    assert "_forward" not in vars(tiny_backend) and "_decode" not in vars(tiny_backend)  # unwrapped
    limits = {"peak_fp32_flops": 1e9, "peak_bf16_flops": 1e9, "read_bandwidth_bytes_s": 1e9}
    # these short prompts save too little KV for the cascade: the back-end decodes replicated, and
    # the figure's bound is the replicated one
    assert run["cascade"] is False
    assert (
        bench_generation.decode_bound_shares(tiny_backend, [run], limits)["decode_bound_kind"] == "replicated"
    )
    default, tiny_backend.cascade_min_saved = tiny_backend.cascade_min_saved, 0
    try:
        run = bench_generation.backend_run(tiny_backend, requests)
    finally:
        tiny_backend.cascade_min_saved = default
    shares = bench_generation.decode_bound_shares(tiny_backend, [run], limits)
    assert run["cascade"] is True
    assert shares["decode_bound_kind"] == "shared_prefix" and shares["decode_fraction_of_bound"] > 0
    assert shares["decode_fraction_of_shared_prefix_bound"] <= shares["decode_fraction_of_replicated_bound"]
    assert shares["decode_rows_per_step_max"] == 6


def test_best_plain_is_one_left_padded_batch_with_num_return_sequences(tiny_model_dir: Path) -> None:
    import bench_best_plain
    import torch

    decided: list[tuple[str, str]] = []

    def decide(workload: str, model: str) -> tuple[str, dict]:
        decided.append((workload, model))
        return "bfloat16", {"workload": workload, "dtype": "bfloat16", "reason": "measured", "other": 1}

    model, tokenizer, decision = bench_best_plain.load_best_plain(str(tiny_model_dir), decide=decide)
    assert decided == [("generation", str(tiny_model_dir))]
    assert next(model.parameters()).dtype == torch.bfloat16 and tokenizer.padding_side == "left"
    assert decision == {"workload": "generation", "dtype": "bfloat16", "reason": "measured"}
    calls: list[dict] = []
    inner = model.generate

    def generate(**kwargs):
        calls.append(kwargs)
        return inner(**kwargs)

    model.generate = generate
    messages = [
        [{"role": "user", "content": q}] for q in ("Hi", "Compute 12 * 7, then subtract 5.", "2 + 2?")
    ]
    out = bench_best_plain.best_plain_generate(model, tokenizer, messages, samples=3, max_new_tokens=4)
    assert len(calls) == 1  # all prompts in one call
    (call,) = calls
    ids, mask = call["input_ids"], call["attention_mask"]
    assert ids.shape[0] == 3 and call["num_return_sequences"] == 3 and call["do_sample"]
    assert (call["temperature"], call["top_p"], call["max_new_tokens"]) == (0.7, 1.0, 4)
    assert bool(mask[:, -1].all()) and not bool(mask[:, 0].all())  # padded on the left
    assert bool((ids[mask == 0] == tokenizer.pad_token_id).all())
    assert out["rows"] == 9 and 0 < out["tokens"] <= 9 * 4 and len(out["texts"]) == 9


def test_demo_decode_workload_is_the_generate_stage_batch(
    repo_root: Path, tmp_path: Path, monkeypatch, tiny_backend
) -> None:
    import workloads
    from bench_demo_decode import figure_3b

    from manyways.config import load_config

    monkeypatch.chdir(repo_root)
    cfg = load_config("configs/tiny_cpu.yaml")
    requests, _ = workloads.demo_generate_requests("configs/tiny_cpu.yaml", shards=1)
    g = cfg.generate
    assert len(requests) == g.shard_size * cfg.heuristics.n
    assert {r.n for r in requests} == {g.samples} and sum(r.n for r in requests) == 4 * g.backend.batch_size
    assert {(r.max_new_tokens, r.temperature) for r in requests} == {(g.max_new_tokens, g.temperature)}
    assert len({r.messages[0]["content"] for r in requests}) == cfg.heuristics.n  # the heuristics' prompts
    assert len(requests[0].messages) == 2 + 2 * cfg.heuristics.exemplars  # system, exemplars, question
    assert workloads.demo_generate_requests("configs/tiny_cpu.yaml", shards=1)[0] == requests  # seeded
    from bench_demo_decode import first_batches

    batch = first_batches(tiny_backend, requests, 1)  # as the back-end plans: one heuristic's prompts
    assert len(batch) == g.shard_size and len({r.messages[0]["content"] for r in batch}) == 1
    short = tmp_path / "short.yaml"  # the demo's batch shape, 8 new tokens (the test's time)
    short.write_text(
        Path("configs/tiny_cpu.yaml").read_text().replace("max_new_tokens: 160", "max_new_tokens: 8")
    )
    assert load_config(short).generate.max_new_tokens == 8
    sizes = {"fig3b_batches": 1, "fig3b_config": str(short)}
    limits = {"peak_fp32_flops": 1e9, "peak_bf16_flops": 1e9, "read_bandwidth_bytes_s": 1e9}
    fig = figure_3b(tiny_backend, 1, sizes, limits)
    assert fig.number == "3b" and fig.value is not None and fig.value > 0 and fig.target == ">= 50%"
    # the first planned batch: 80 rows of 20 prompts, one heuristic's (its exemplar prefix shared)
    assert (fig.detail["first_step_rows"], fig.detail["first_step_prompts"]) == (80, 20)
    assert "the first 1 planned batch(es)" in fig.detail["workload"]
    assert fig.detail["decode_steps"] == [7] and "max_new_tokens=8" in fig.detail["workload"]


def test_letter_figures_are_registered_sorted_and_rendered(tmp_path: Path, monkeypatch) -> None:
    assert {"1b", "3b"} <= bench_run.ALL_FIGURES and {"1b", "3b"} <= bench_run.GENERATION_FIGURES
    assert bench_run.parse_only("1, 1B,3b") == {1, "1b", "3b"}
    with pytest.raises(SystemExit):
        bench_run.parse_only("1c")
    assert sorted([9, "3b", 2, "1b", 1, 3], key=bench_run.figure_key) == [1, "1b", 2, 3, "3b", 9]
    previous = _doc("old", [_fig(1, 4.0), _fig(9, 20.0)])
    partial = _doc("new", [_fig("3b", 0.3, "new"), _fig("1b", 1.2, "new")], only=["1b", "3b"])
    merged = bench_run.merge_previous(partial, previous)
    assert [f["number"] for f in merged["figures"]] == [1, "1b", "3b", 9]
    path = tmp_path / "B.md"
    bench_run.update_markdown(path, merged)
    text = path.read_text()
    assert "| 1b | fig1b | 1.2 |" in text and "| 3b | fig3b | 0.3 |" in text and "figures 1b,3b only" in text
    # run_all dispatches the letter figures to the generation step
    asked: list[set] = []

    def generation(repeats: int, limits: dict, only: set) -> list:
        asked.append(set(only))
        return [common.Figure("3b", "share", 0.4, ">= 50%", False)]

    monkeypatch.setattr(bench_run, "generation_figures", generation)
    monkeypatch.setattr(bench_run, "machine_facts", lambda: {"cpu_model": "cpu"})
    monkeypatch.setattr(bench_run, "dtype_auto_decisions", lambda: {})
    monkeypatch.setattr(bounds, "measure_bounds", lambda: {})
    doc = bench_run.run_all(1, {"3b"})
    assert asked == [{"3b"}] and [f["number"] for f in doc["figures"]] == ["3b"] and doc["only"] == ["3b"]


def test_figure_1b_is_ours_over_best_plain_per_repeat_with_its_dtype_decision() -> None:
    import types

    import bench_best_plain
    import torch

    backend = types.SimpleNamespace(model=torch.nn.Linear(2, 2))
    rate = {"ours": [10.0, 12.0, 9.0], "best_plain": [5.0, 4.0, 4.5]}
    runs = {"best_plain": [{"rows": 16, "tokens": 100}] * 3}
    decision = {"dtype": "float32", "reason": "measured", "bf16_over_fp32_median_ratio": 0.4}
    fig = bench_best_plain.figure_1b(backend, rate, runs, decision, "4 prompts x 4 samples", 4)
    assert fig.number == "1b" and fig.value == pytest.approx(2.0) and fig.met is None  # ratios 2, 3, 2
    assert (
        fig.spread == pytest.approx(0.5)
        and "float32" in fig.baseline
        and "num_return_sequences=4" in fig.baseline
    )
    assert fig.detail["best_plain_dtype_decision"] == decision


def test_decode_bound_detail_splits_wide_and_narrow_steps_and_takes_the_median() -> None:
    wide = bounds.StepRows((10,) * 4, ("a",) * 4, (6,) * 4)  # shared: 200 + 2*2*(6 + 4*4)*4*2 = 904 bytes
    narrow = bounds.StepRows((11,), ("a",), (6,))  # 1 row < half of 4: 200 + 2*2*11*4*2 = 552 bytes
    run = {"steps": [wide, narrow], "step_s": [2.0, 4.0 * 552 / 904], "decode_s": 6.0}
    slow = {**run, "decode_s": 12.0}
    d = bounds.decode_bound_detail(SHAPE, [run, slow, slow], 1e12, 904, shared=True)
    assert d["decode_wide_fraction_of_bound"] == pytest.approx(0.5)
    assert d["decode_narrow_fraction_of_bound"] == pytest.approx(0.25)
    whole = (1 + 552 / 904) / 12.0  # the median run
    assert d["decode_fraction_of_bound"] == pytest.approx(whole) and d["decode_bound_kind"] == "shared_prefix"
    assert d["decode_fraction_of_bound_per_repeat"] == pytest.approx([2 * whole, whole, whole])
    assert d["decode_bound_limited_by"] == "memory" and d["decode_rows_per_step_max"] == 4
    # replicated: the wide step reads 40 positions (200 + 1280 bytes), the narrow one the same 11
    replicated = bounds.decode_bound_detail(SHAPE, [run], 1e12, 904, shared=False)
    assert replicated["decode_bound_kind"] == "replicated"
    assert replicated["decode_fraction_of_bound"] == pytest.approx((1480 + 552) / 904 / 6.0)


def test_figure_9_is_the_experiment_wall_time_with_stage_shares(tmp_path: Path) -> None:
    import bench_demo

    run = tmp_path / "tiny_cpu"
    for name, wall in (("generate-a", 300.0), ("midtrain-b", 200.0), ("midtrain-c", 100.0)):
        (run / "stages" / name).mkdir(parents=True)
        (run / "stages" / name / "manifest.json").write_text(json.dumps({"wall_s": wall}))
    older = bench_demo.figure_9(run)  # no experiment.json: the summed stage time
    assert older.value == pytest.approx(10.0) and "sum of stage wall_s" in older.name
    (run / "experiment.json").write_text(json.dumps({"wall_s": 360.0, "jobs": 2, "reused": []}))
    fig = bench_demo.figure_9(run)
    assert fig.value == pytest.approx(6.0) and fig.met is True and "experiment wall time" in fig.name
    assert fig.detail["jobs"] == 2 and fig.detail["parallel_speedup"] == pytest.approx(600 / 360, abs=0.01)
    assert fig.detail["share"] == {"generate": 0.5, "midtrain": 0.5}
    assert fig.detail["stage_minutes_summed"] == pytest.approx(10.0)


def test_a_partial_run_in_a_fresh_clone_keeps_the_committed_figures_of_its_kind(tmp_path: Path) -> None:
    store = tmp_path / "results_by_kind.json"
    zen = _doc("tuesday", [_fig(1, 3.1, "tuesday"), _fig(9, 35.9, "tuesday")], cpu="EPYC")
    zen["machine"]["cpu_flags"] = ["avx2"]
    bench_run.keep_by_kind(store, zen)
    partial = _doc("wednesday", [_fig(9, 19.3, "wednesday")], cpu="EPYC")
    partial["machine"]["cpu_flags"] = ["avx2"]
    missing = tmp_path / "bench_out" / "results.json"  # a fresh clone has none
    merged = bench_run.merge_previous(partial, bench_run.previous_results(missing, store, partial))
    assert {f["number"]: f["value"] for f in merged["figures"]} == {1: 3.1, 9: 19.3}
    amx = _doc("thursday", [_fig(9, 11.0, "thursday")], cpu="Xeon")
    amx["machine"]["cpu_flags"] = ["amx_bf16"]
    assert bench_run.previous_results(missing, store, amx) is None  # no figures of its kind yet
    missing.parent.mkdir()
    missing.write_text(json.dumps(zen))
    assert bench_run.previous_results(missing, store, partial)["date"] == "tuesday"


def test_figure_8_rewards_vary_within_every_group_so_its_steps_train() -> None:
    """Figure 8 times steps that train: the base model's rewards are all 0 (or unjudgeable), which
    rl.skip_zero_advantage would turn into steps without a backward."""
    import torch
    from bench_train import vary_rewards

    from manyways.zero_advantage import zero_rows

    trainer = type("T", (), {})()
    trainer._calculate_rewards = lambda *a, **k: torch.tensor([[0.0], [float("nan")], [0.0], [0.0]])
    vary_rewards(trainer)
    rewards = trainer._calculate_rewards()
    assert rewards[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    advantages = rewards[:, 0] - rewards[:, 0].mean()  # one group of 4
    assert not zero_rows(advantages).any()


def test_figure_7_times_one_layers_attention_both_ways(tiny_model_dir) -> None:
    """Figure 7's ``attention_layer`` detail runs sdpa with the block mask and the per-sequence
    attention on the same packed row and reports both medians and their ratio."""
    from bench_train import attention_layer_ms

    from manyways import packed_attention

    before = packed_attention.stats()
    out = attention_layer_ms([7, 3, 5], repeats=2, inner=1, model=str(tiny_model_dir), bf16=False)
    assert out["sdpa_ms"] > 0 and out["per_sequence_ms"] > 0 and out["speedup"] > 0
    assert out["lengths"] == [7, 3, 5] and out["dtype"] == "float32"
    assert packed_attention.stats()["packed"] == before["packed"] + 2  # not the fallback


def test_figure_7_trains_at_the_demos_midtrain_batch(repo_root: Path) -> None:
    """Figure 7 measures the batch the demo trains with (per-step work that does not grow with the
    batch weighs more at a smaller one), and the examples it needs exist."""
    from bench_train import sft_examples

    from manyways.config import load_config

    cfg = load_config(repo_root / "configs" / "tiny_cpu.yaml")
    batch, steps = bench_run.SIZES["fig7_batch"], bench_run.SIZES["fig7_steps"]
    assert batch == cfg.midtrain.batch_size
    assert len(sft_examples(4 * batch)) == 4 * batch  # profile_figure.py 7 runs 4 steps
    assert steps >= 2  # the first step is excluded


def test_figure_7_share_of_the_bound_pairs_each_round_with_its_own_bound_sample() -> None:
    """A round run while a neighbour held the matmul units is judged against the rate measured
    then, not against another moment's: shares follow the rounds' own rates, and rounds without a
    bound sample are an error."""
    from bench_train import paired_bound_shares

    n = 135_000_000
    tokens = [200.0, 100.0, 210.0]
    rates = [6 * n * 1000.0, 6 * n * 500.0, 6 * n * 1000.0]  # bounds: 1000, 500, 1000 tokens/s
    assert paired_bound_shares(tokens, rates, n) == pytest.approx([0.2, 0.2, 0.21])
    with pytest.raises(ValueError, match="2 bound samples"):
        paired_bound_shares(tokens, rates[:2], n)


def test_bounds_are_the_best_of_spaced_samples(monkeypatch) -> None:
    """A bound is the best rate seen, not the median: a contended sample must not lower it."""
    assert bounds.peak_spread([300.0, 900.0, 320.0]) == (900.0, (900.0 - 300.0) / 320.0)
    with pytest.raises(ValueError):
        bounds.peak_spread([])
    slept: list[float] = []
    monkeypatch.setattr(bounds.time, "sleep", slept.append)
    rates = iter([300.0, 900.0, 310.0])
    assert bounds.sample_rates(lambda: next(rates), 3, 1.5) == [300.0, 900.0, 310.0]
    assert slept == [1.5, 1.5]  # between samples, not before the first
    rate, _ = bounds.matmul_rate("float32", size=32, samples=2, spacing_s=0)
    assert rate > 0


def test_packed_linear_micro_benchmark_runs_interleaved_pairs(monkeypatch) -> None:
    import bench_packed_linear

    from manyways.backends import packed_linear

    if not packed_linear.available():
        assert bench_packed_linear.main(["--pairs", "1", "--rows", "2"]) == 1  # says so, no crash
        return
    monkeypatch.setattr(bench_packed_linear, "LAYERS", 2)
    ratios = bench_packed_linear.stack_ratios(rows=3, pairs=2)
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
