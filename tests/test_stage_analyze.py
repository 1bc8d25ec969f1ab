"""Stage analyze on fake select / verify / evaluate outputs: Vendi, yield, composition."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from manyways.artifacts import StageDir, write_json_atomic, write_parquet_atomic
from manyways.backends.fake import FakeBackend
from manyways.backends.protocol import BackendStats, GenSample
from manyways.config import load_config
from manyways.diversity import vendi_of_texts
from manyways.schema import SFT_SCHEMA, VERDICT_SCHEMA
from manyways.stages import analyze, evaluate

QUESTIONS = {f"What is {i} times {i + 2}?": str(i * (i + 2)) for i in range(4)}
TRACES = {
    "decompose": "Split the product into parts: {i} times {j} is {i} times {j} summed. \\boxed{{{a}}}",
    "work_backward": "We want the product; working back from the answer we check {a}. \\boxed{{{a}}}",
}


def sft_rows() -> list[dict]:
    rows = []
    for i, (q, a) in enumerate(QUESTIONS.items()):
        for h, tpl in TRACES.items():
            trace = tpl.format(i=i, j=i + 2, a=a)
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "sys"},
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": trace},
                    ],
                    "problem_id": f"p{i}",
                    "heuristic_id": h,
                    "sample_idx": 0,
                    "variant": "best",
                    "correct": True,
                    "score": 0.5,
                }
            )
    return rows


def finished_stage(path: Path, name: str, inputs: dict[str, Path] | None = None) -> StageDir:
    stage = StageDir(path, name, {"fake": name}, inputs)
    stage.open()
    return stage


@pytest.fixture()
def stages(tmp_path: Path) -> dict[str, Path]:
    verify_dir = tmp_path / "run" / "verify"
    v = finished_stage(verify_dir, "verify")
    verdicts = [
        {
            "problem_id": f"p{i}",
            "heuristic_id": h,
            "sample_idx": 0,
            "answer_type": "math",
            "status": "correct" if ok else "incorrect",
            "correct": ok,
            "extracted": "1",
        }
        for i in range(4)
        for h, ok in (("decompose", True), ("work_backward", i % 2 == 0))
    ]
    v.write_shard(0, pa.Table.from_pylist(verdicts, schema=VERDICT_SCHEMA))
    write_json_atomic(
        verify_dir / "yield.json",
        {
            "decompose": {"n": 4, "correct": 4, "yield": 1.0},
            "work_backward": {"n": 4, "correct": 2, "yield": 0.5},
        },
    )
    v.finish({})
    select_dir = tmp_path / "run" / "select"
    s = finished_stage(select_dir, "select", {"verify": verify_dir})
    write_parquet_atomic(select_dir / "train.parquet", pa.Table.from_pylist(sft_rows(), schema=SFT_SCHEMA))
    s.finish({})
    return {"select": select_dir, "verify": verify_dir, "evaluate": _evaluate(tmp_path)}


def _evaluate(tmp_path: Path) -> Path:
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS.items()))
    mc = tmp_path / "mc.jsonl"  # a non-math benchmark: its traces are never judged
    mc.write_text(json.dumps({"question": "Who did it? A or B", "answer": "A", "choices": ["A", "B"]}) + "\n")
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            "run.name=run",
            f"data.eval={{b: {{kind: local, path: {data}}}, mc: {{kind: local, path: {mc}, answer_type: choice, fields: {{choices: choices}}}}}}",
            "evaluate.samples=2",
            "evaluate.bootstrap=0",
            "evaluate.models={m2: other}",
        ],
    )
    out = tmp_path / "run" / "evaluate"
    evaluate.run(
        cfg,
        out,
        show_progress=False,
        backend_factory=lambda _c, path: FakeBackend(answers=QUESTIONS, empty_rate=0.25, model_id=path),
    )
    return out


class JsonJudge:
    """A stand-in judge that always answers with a valid two-heuristic JSON list."""

    name = "stand-in"
    model_id = "stand-in-judge"
    stats = BackendStats()

    def __init__(self) -> None:
        self.requests: list = []

    def generate(self, requests, progress=None):  # type: ignore[no-untyped-def]
        self.requests += requests
        out = []
        for r in requests:
            ids = r.json_schema["items"]["enum"]
            if r.json_schema["maxItems"] == 1:  # mode assignment: the generation heuristic menu
                text = json.dumps([ids[len(r.messages[-1]["content"]) % len(ids)]])
            elif "product" in r.messages[-1]["content"].split("Solution:")[-1]:  # mid-training traces
                text = '["bolzano_bracketing", "decompose"]'
            else:
                text = '["decompose", "carry_out"]'
            out.append([GenSample(text, "stop", 1, 1)])
        return out

    def next_token_probs(self, messages_list, options):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def close(self) -> None:
        pass


def run_analyze(tmp_path: Path, stages: dict[str, Path], judge, *extra: str) -> dict:  # type: ignore[no-untyped-def]
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=run", "analyze.max_traces=5", *extra])
    out = tmp_path / "run" / "analyze"
    manifest = analyze.run(
        cfg,
        out,
        inputs={"select": stages["select"], "evaluate": stages["evaluate"]},
        show_progress=False,
        judge=judge,
        overwrite=True,
    )
    return {"manifest": manifest, "analysis": json.loads((out / "analysis.json").read_text())}


def test_vendi_yield_and_trace_samples(tmp_path: Path, stages: dict[str, Path]) -> None:
    got = run_analyze(tmp_path, stages, JsonJudge())
    a = got["analysis"]
    texts = [r["messages"][-1]["content"] for r in sft_rows()]
    ngram = a["vendi"]["kernels"]["ngram"]
    assert ngram["kernel"] == "ngram"
    assert ngram["overall"] == pytest.approx(vendi_of_texts(texts, "ngram", ngram_dim=4096))
    assert "hashed to 4096" in ngram["kernel_label"]
    assert 1.0 < ngram["overall"] <= len(texts)
    assert ngram["problems_with_2plus"] == 4
    per_q = [vendi_of_texts(texts[2 * i : 2 * i + 2]) for i in range(4)]  # 2 traces per problem
    assert ngram["per_problem_mean"] == pytest.approx(sum(per_q) / 4)
    low, high = ngram["per_problem_ci"]
    assert min(per_q) - 1e-9 <= low <= ngram["per_problem_mean"] <= high <= max(per_q) + 1e-9
    assert ngram["per_problem_max_traces"] == 2 and high <= 2.0 + 1e-9  # at most n at n traces
    assert set(ngram["per_heuristic"]) == {"decompose", "work_backward"}
    assert got["manifest"]["counts"]["vendi_ngram"] == ngram["overall"]
    assert a["yield"]["per_heuristic"] == {"decompose": 1.0, "work_backward": 0.5}
    assert a["mid_training_rows"] == 8
    samples = a["trace_samples"]
    assert [s["heuristic"] for s in samples] == ["decompose"] * 3 + ["work_backward"] * 3
    assert all(s["question"] in QUESTIONS for s in samples)


def test_yield_falls_back_to_verdicts(tmp_path: Path, stages: dict[str, Path]) -> None:
    (stages["verify"] / "yield.json").unlink()
    a = run_analyze(tmp_path, stages, JsonJudge())["analysis"]
    assert a["yield"]["per_heuristic"] == {"decompose": 1.0, "work_backward": 0.5}


def test_composition_with_a_judge_that_parses(tmp_path: Path, stages: dict[str, Path]) -> None:
    judge = JsonJudge()
    a = run_analyze(tmp_path, stages, judge)["analysis"]
    comp = a["composition"]
    assert set(comp["per_model"]) == {"base", "m2"}
    assert comp["left_out"]["not_math"] == 4  # the choice benchmark: 2 models x 2 samples
    for summary in comp["per_model"].values():
        assert summary["traces"] == 5
        assert summary["parse_failures"] == summary["failure_reasons"].get("empty_trace", 0)
        assert summary["multi_heuristic_share"] == 1.0 and summary["multi_heuristic_share_ci"] == [1.0, 1.0]
        # mid-training traces were labelled bolzano+decompose; carry_out never appeared with them
        assert summary["new_combinations"] == [
            {"combination": "carry_out + decompose", "count": summary["parsed"]}
        ]
    assert comp["mid_training"]["traces"] == 5
    assert comp["taxonomy_size"] == 64 and comp["judge_model"] == "stand-in-judge"
    assert all(r.json_schema is not None for r in judge.requests)  # constrained by default
    assert not any("Who did it" in r.messages[-1]["content"] for r in judge.requests)
    menu_first = [r.messages[-1]["content"] for r in judge.requests if r.json_schema["maxItems"] > 1]
    assert all(m.startswith("Heuristics (id: description):") for m in menu_first)
    validity = a["judge_validity"]
    assert validity["exemplars"] > 0 and validity["recall"] is not None
    assert validity["skipped_heuristics"] == []
    modes = a["modes"]
    assert modes["heuristics"] == ["decompose", "work_backward"]
    for cov in modes["per_model"].values():
        assert 1.0 <= cov["effective_modes_mean"] <= 2.0
        assert set(cov["per_mode"]) <= {"decompose", "work_backward"}
    assert all(g["compared"] > 0 for g in modes["judge_agreement"].values())


def test_composition_parse_failures_are_counted(tmp_path: Path, stages: dict[str, Path]) -> None:
    got = run_analyze(tmp_path, stages, FakeBackend(model_id="fake-judge"))
    comp = got["analysis"]["composition"]["per_model"]
    for model, summary in comp.items():
        assert summary["traces"] == 5 and summary["parsed"] == 0
        assert summary["parse_failure_rate"] == 1.0 and summary["multi_heuristic_share"] is None
        assert got["manifest"]["counts"][f"parse_failures_{model}"] == 5


def test_same_problems_and_samples_for_every_model(tmp_path: Path, stages: dict[str, Path]) -> None:
    from manyways.analyses import eval_traces

    traces, left_out = eval_traces(stages["evaluate"], max_traces=100, seed=0)
    keys = {m: [(r["problem_id"], r["sample_idx"]) for r in rows] for m, rows in traces.items()}
    assert keys["base"] == keys["m2"] and len(keys["base"]) == 8  # empty completions included
    assert left_out == {"not_math": 4, "other_benchmark": 0, "benchmarks_without_problems": 0}
    only, _ = eval_traces(stages["evaluate"], max_traces=3, seed=0, benchmarks=["b"])
    assert [len(v) for v in only.values()] == [3, 3]
    with pytest.raises(ValueError, match="aime2024"):
        eval_traces(stages["evaluate"], max_traces=3, seed=0, benchmarks=["aime2024"])
    # evaluated, but every problem excluded (e.g. as contaminated): nothing to label, counted
    from manyways.data import write_problems

    write_problems([], stages["evaluate"] / "problems" / "aime2024.parquet")
    none, counts = eval_traces(stages["evaluate"], max_traces=3, seed=0, benchmarks=["aime2024"])
    assert all(not rows for rows in none.values()) and counts["benchmarks_without_problems"] == 1


def _judge_from_config(tmp_path: Path, stages: dict[str, Path], *extra: str) -> dict:
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            "run.name=run",
            "analyze.max_traces=5",
            "analyze.judge_backend.kind=fake",
            "analyze.judge_shard_size=2",
            *extra,
        ],
    )
    out = tmp_path / "run" / "analyze"
    analyze.run(
        cfg,
        out,
        inputs={"select": stages["select"], "evaluate": stages["evaluate"]},
        show_progress=False,
        overwrite=True,
    )
    return json.loads((out / "analysis.json").read_text())


def test_judge_runs_through_the_executor_from_config(tmp_path: Path, stages: dict[str, Path]) -> None:
    a = _judge_from_config(tmp_path, stages, "analyze.validity_per_heuristic=1")
    comp = a["composition"]
    assert comp["judge_model"] == "smollm2-135m-instruct"  # the configured base model
    assert all(s["traces"] == 5 for s in comp["per_model"].values())  # shards of 2 reassembled
    assert a["judge_validity"]["exemplars"] == 16  # one exemplar of each polya_v1 heuristic


@pytest.mark.slow
def test_judge_on_ray_matches_local(tmp_path: Path, stages: dict[str, Path]) -> None:
    local = _judge_from_config(tmp_path / "l", stages)
    ray = _judge_from_config(
        tmp_path / "r", stages, "analyze.executor=ray", "analyze.workers=2", "analyze.ray_num_cpus=2"
    )
    for key in ("composition", "judge_validity", "modes"):
        assert ray[key] == local[key]


def test_modes_of_a_run_without_mid_training_use_the_exemplars(
    tmp_path: Path, stages: dict[str, Path]
) -> None:
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=run", "analyze.max_traces=5"])
    out = tmp_path / "run" / "analyze"
    analyze.run(
        cfg,
        out,
        inputs={"evaluate": stages["evaluate"]},
        show_progress=False,
        judge=JsonJudge(),
        overwrite=True,
    )
    modes = json.loads((out / "analysis.json").read_text())["modes"]
    assert "exemplars" in modes["method"]
    assert set(modes["heuristics"]) == {
        "plan_and_carry_out",
        "work_backward",
        "decompose",
        "auxiliary_unknown",
    }
    assert set(modes["per_model"]) == {"base", "m2"}


def test_catalogue_taxonomy_map_names_only_taxonomy_ids(tmp_path: Path) -> None:
    from manyways.analyses import known_taxonomy_ids
    from manyways.heuristics import load_catalogue, load_taxonomy

    cfg = load_config(None, [])
    taxonomy = load_taxonomy()
    mapping = known_taxonomy_ids(cfg, taxonomy)
    assert all(h.id in mapping or h.id in taxonomy.ids for h in load_catalogue().heuristics)
    bad = tmp_path / "map.yaml"
    bad.write_text("map: {decompose: [no_such_id]}\n")
    with pytest.raises(ValueError, match="no_such_id"):
        known_taxonomy_ids(load_config(None, [f"analyze.catalogue_taxonomy_map={bad}"]), taxonomy)


def test_validity_stage_is_what_analyze_would_compute_and_analyze_reads_it(
    tmp_path: Path, stages: dict[str, Path]
) -> None:
    """The validity stage labels the exemplars once; an analyze given its output asks the judge
    nothing about exemplars and reports the same validity as one that labels them itself."""
    from manyways.stages import validity as validity_stage

    inline = run_analyze(tmp_path / "inline", stages, JsonJudge())["analysis"]["judge_validity"]
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=run", "analyze.max_traces=5"])
    vjudge = JsonJudge()
    vdir = tmp_path / "run" / "validity"
    manifest = validity_stage.run(cfg, vdir, show_progress=False, judge=vjudge)
    saved = json.loads((vdir / "validity.json").read_text())
    assert (
        len(saved["exemplars"])
        == len(vjudge.requests)
        == inline["exemplars"]
        == manifest["counts"]["exemplars"]
    )
    judge = JsonJudge()
    out = tmp_path / "run" / "analyze"
    analyze.run(cfg, out, inputs={**stages, "validity": vdir}, show_progress=False, judge=judge)
    got = json.loads((out / "analysis.json").read_text())["judge_validity"]
    assert got == {**inline, "stage_dir": "validity"}
    exemplar_solutions = {r.messages[-1]["content"] for r in vjudge.requests}
    assert not exemplar_solutions & {r.messages[-1]["content"] for r in judge.requests}
    # the stage's address depends on the judge, not on the arm's other settings
    other_arm = load_config(None, [f"run.root={tmp_path}", "run.name=run", "select.heuristics=1"])
    other_judge = load_config(None, [f"run.root={tmp_path}", "run.name=run", "analyze.judge_model=x"])
    assert validity_stage.stage_config(other_arm) == validity_stage.stage_config(cfg)
    assert validity_stage.stage_config(other_judge) != validity_stage.stage_config(cfg)


@pytest.mark.slow
def test_hf_judge_with_its_prefix_store_on_ray_matches_local(
    tmp_path: Path, stages: dict[str, Path], tiny_model_dir: Path
) -> None:
    """The real hf judge (tiny model): each Ray actor keeps its own prefix store and prefills the
    menu itself; the labels equal the in-process run's (declared-prefix path, both executors)."""
    hf = ("analyze.judge_backend.kind=hf", f"analyze.judge_model={tiny_model_dir}", "analyze.max_traces=3")
    local = _judge_from_config(tmp_path / "l", stages, *hf)
    ray = _judge_from_config(
        tmp_path / "r", stages, *hf, "analyze.executor=ray", "analyze.workers=2", "analyze.ray_num_cpus=2"
    )
    assert local["composition"]["per_model"] and local["judge_validity"]["parsed"] > 0
    for key in ("composition", "judge_validity", "modes"):
        assert ray[key] == local[key]
