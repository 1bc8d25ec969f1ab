"""``manyways experiment --plan``: the stage runs a run would make, their sizes and GPU-hours.

The plan's directories are checked against a real experiment run (fake back-ends; the two
trainers replaced by stand-ins that write their stage directory the way the real stages do), and
README's cost table against the plan of ``configs/paper_llama3b.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from manyways import cli, experiment, plan
from manyways.artifacts import StageDir, read_manifest
from manyways.backends import config as backend_config
from manyways.backends.fake import FakeBackend
from manyways.config import load_config
from manyways.data import load_problems
from manyways.plan_estimates import ASSUMPTIONS, model_params

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper_llama3b.yaml"


def _small_cfg(root: Path, *extra: str):
    return load_config(
        None,
        [
            f"run.root={root}",
            "run.name=planned",
            f"heuristics.catalogue={ROOT / 'configs/heuristics/polya_v1.yaml'}",
            f"heuristics.taxonomy={ROOT / 'configs/heuristics/taxonomy_v1.yaml'}",
            "data.train.size=5",
            "heuristics.n=1",
            "generate.samples=2",
            "generate.backend.kind=fake",
            "score.backend.kind=fake",
            "evaluate.backend.kind=fake",
            "analyze.judge_backend.kind=fake",
            "evaluate.samples=2",
            "analyze.max_traces=2",
            "analyze.kernels=[ngram]",
            "data.eval={arith: {kind: reasoning_gym, task: basic_arithmetic, size: 3, split: test}}",
            "experiment.arms=[vanilla_rl, star_rl, polya_n1, polya_n2, incorrect_rl, budget_2x3]",
            *extra,
        ],
    )


def _stand_in_trainer(stage: str):
    """A trainer that writes its stage directory as the real stage does (same StageDir, same
    stage_config, same inputs), without training: the plan's keys are checked, not the model."""
    module = experiment.stage_module(stage)

    def run(cfg, out_dir, inputs=None, overwrite=False, show_progress=True):
        inputs = {k: Path(v) for k, v in (inputs or {}).items() if k in ("select", "midtrain")}
        sd = StageDir(out_dir, stage, module.stage_config(cfg), inputs)
        if sd.open(overwrite):
            return read_manifest(out_dir)
        (Path(out_dir) / "model").mkdir(exist_ok=True)
        return sd.finish({"stand_in": 1})

    return run


def test_plan_names_the_stage_directories_a_run_creates(tmp_path, monkeypatch):
    cfg = _small_cfg(tmp_path)
    golds = {p.question: p.answer for p in load_problems(cfg.data.train).problems}
    golds.update({p.question: p.answer for p in load_problems(cfg.data.eval["arith"]).problems})
    monkeypatch.setattr(
        backend_config, "make_backend", lambda c, model: FakeBackend(golds, correct_rate=0.5, model_id=model)
    )
    for stage in ("midtrain", "rl"):
        monkeypatch.setattr(experiment.stage_module(stage), "run", _stand_in_trainer(stage))

    projected = plan.project(cfg)
    assert not (cfg.run_dir / "stages").exists()  # planning ran nothing
    result = experiment.run_experiment(cfg, show_progress=False)

    made = sorted(p.name for p in (cfg.run_dir / "stages").iterdir() if p.is_dir())
    assert sorted(projected.runs) == made == sorted(result["executed"])
    for arm in cfg.experiment.arms:
        record = json.loads((cfg.run_dir / "arms" / f"{arm}.json").read_text())
        assert {s.step: s.dir for s in projected.arms[arm]} == {
            k: Path(v["dir"]).name for k, v in record["stages"].items()
        }
    shared = {r.dir for r in projected.runs.values() if r.shared}
    assert {d.split("-")[0] for d in shared} == {"generate", "verify", "score", "validity"}
    gen = next(r for r in projected.runs.values() if r.stage == "generate" and "polya_n1" in r.arms)
    assert set(gen.arms) == {"polya_n1", "polya_n2", "incorrect_rl", "budget_2x3"}
    # the plan's count is the number the run generated: 5 questions x 2 heuristics (polya_n2) x 2 samples
    assert (
        gen.estimate.samples == 5 * 2 * 2 == read_manifest(cfg.run_dir / "stages" / gen.dir)["counts"]["rows"]
    )


def test_paper_plan_counts_follow_the_config():
    cfg = load_config(PAPER)
    p = plan.project(cfg)
    runs = list(p.runs.values())
    polya_gen = p.runs[p.arms["polya_n16"][0].dir]
    # one generation at the largest n any arm needs (polya_n64) serves every smaller n
    assert polya_gen.estimate.samples == 7473 * 64 * 4
    assert {"polya_n1", "polya_n16", "polya_n64", "budget_1x7408", "incorrect_n1"} <= set(polya_gen.arms)
    distill_gen = p.runs[p.arms["distill_rl"][0].dir]
    assert not distill_gen.shared and "QwQ-32B" in distill_gen.estimate.what
    assert distill_gen.estimate.samples == 7473 * cfg.heuristics.n * 4  # the teacher: heuristics.n
    assert p.steps("incorrect_n4")["select"].estimate.what.startswith(
        "one incorrect trace per (question, heuristic), 4 "
    )
    assert distill_gen.gpu_hours > 5 * polya_gen.gpu_hours  # a 32B teacher decodes ~10x slower
    star_gen = p.runs[p.arms["star_rl"][0].dir]
    assert star_gen.estimate.samples == 7473 * 4
    base_eval = p.runs[p.arms["base"][0].dir]
    # MATH-500 500, AIME 30 + 30, AMC23 40, HMMT 30, OlympiadBench 675, HumanEval 164, MuSR 250 + 250
    assert base_eval.estimate.samples == 1969 * 64
    arm_eval = p.steps("polya_n4")["evaluate"]
    assert arm_eval.estimate.samples == 2 * 1969 * 64  # mid-trained and RL models
    budget_select = p.steps("budget_16x463")["select"]
    assert budget_select.estimate.count == 16 * 463
    rl = p.steps("vanilla_rl")["rl"]
    assert rl.estimate.samples == plan.KNOWN_SIZES[("BytedTsinghua-SIA/DAPO-Math-17k", None, "train")] * 16
    assert p.total_gpu_hours == pytest.approx(sum(r.gpu_hours for r in runs))
    assert len({r.dir for r in runs}) == len(runs)
    assert p.arm_gpu_hours("polya_n1") > p.arm_gpu_hours("polya_n1", own_only=True)
    assert p.table() == plan.format_plan(p) and "distill_rl" in p.table()


def test_every_estimate_comes_from_the_assumptions():
    cfg = load_config(PAPER)
    slow = dataclasses.replace(ASSUMPTIONS, decode_tok_s=ASSUMPTIONS.decode_tok_s / 2)
    fast_plan, slow_plan = plan.project(cfg), plan.project(cfg, slow)
    gen = fast_plan.arms["star_rl"][0].dir
    assert slow_plan.runs[gen].gpu_hours == pytest.approx(2 * fast_plan.runs[gen].gpu_hours)
    capped = plan.project(load_config(PAPER, ["generate.max_new_tokens=100"]))
    assert capped.runs[capped.arms["star_rl"][0].dir].estimate.tokens_out == 7473 * 4 * 100


def test_readme_cost_table_is_the_plan_of_the_paper_config():
    text = (ROOT / "README.md").read_text()
    block = plan.readme_block(text)
    assert block is not None, "README lost its generated cost table markers"
    expected = plan.format_cost_markdown(plan.project(load_config(PAPER)))
    assert block == expected, (
        "README's cost table is stale: run `python -c 'from manyways.plan import update_readme; update_readme()'`"
    )


def test_plan_command_prints_without_running_or_loading(tmp_path, monkeypatch, capsys):
    def refuse(*a, **kw):
        raise AssertionError("--plan must not build a back-end or run a stage")

    monkeypatch.setattr(backend_config, "make_backend", refuse)
    monkeypatch.setattr(experiment, "run_experiment", refuse)
    code = cli.main(["experiment", str(PAPER), "--plan", f"run.root={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0 and not any(tmp_path.iterdir())
    assert (
        "polya_n16: generate -> verify -> score -> select -> midtrain -> rl -> evaluate -> validity -> analyze"
        in out
    )
    assert "shared with" in out and "H100-hours" in out


def test_sizes_come_from_files_presets_and_limits(tmp_path):
    rows = tmp_path / "q.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}", "answer": "1"}) + "\n" for i in range(7)))
    cfg = load_config(None, [f"data.train={{kind: local, path: {rows}}}"])
    assert plan.source_size(cfg.data.train) == 7
    limited = load_config(None, [f"data.train={{kind: local, path: {rows}, limit: 3}}"])
    assert plan.source_size(limited.data.train) == 3
    hub = load_config(None, ["data.train={kind: hub, preset: gsm8k}"])
    assert plan.source_size(hub.data.train) == 7473
    files = load_config(None, [f"data.train={{kind: hub, preset: gsm8k, data_files: {rows}}}"])
    assert plan.source_size(files.data.train) == 7
    unknown = load_config(None, ["data.train={kind: hub, name: me/x, fields: {question: q, answer: a}}"])
    with pytest.raises(plan.PlanError, match="me/x.*limit"):
        plan.source_size(unknown.data.train)
    assert model_params("meta-llama/Llama-3.1-8B", 1.0) == 8e9
    assert model_params("smollm2-135m-instruct", 1.0) == 135e6
    assert model_params("runs/x/stages/midtrain-abc/model", 3.0) == 3.0


def test_a_stage_without_an_estimator_is_shown_not_costed(caplog):
    from manyways.plan_estimates import estimate_stage

    cfg = load_config(None)
    est = estimate_stage("contamination", cfg, "polya_n4", {}, plan.source_size)
    assert est.gpu_hours == 0 and "no estimate" in est.what and "contamination" in caplog.text
