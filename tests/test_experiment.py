"""The experiment grid: shared work computed once, resume, and per-arm invalidation.

Generation, judging and evaluation use the fake back-end (which knows the golds); mid-training
and GRPO run for real on the tiny random model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from manyways import experiment
from manyways.backends import config as backend_config
from manyways.backends.fake import FakeBackend
from manyways.config import load_config
from manyways.data import load_problems

ROOT = Path(__file__).resolve().parents[1]
ARMS = "[vanilla_rl, polya_n1, polya_n2, budget_2x3]"


def _cfg(root: Path, tiny: Path, *extra: str):
    return load_config(
        None,
        [
            f"run.root={root}",
            "run.name=exp",
            f"model.name={tiny}",
            f"heuristics.catalogue={ROOT / 'configs/heuristics/polya_v1.yaml'}",
            f"heuristics.taxonomy={ROOT / 'configs/heuristics/taxonomy_v1.yaml'}",
            "data.train.size=6",
            "generate.samples=2",
            "generate.backend.kind=fake",
            "score.backend.kind=fake",
            "evaluate.backend.kind=fake",
            "analyze.judge_backend.kind=fake",
            "evaluate.samples=4",
            "analyze.max_traces=4",
            "data.eval={arith: {kind: reasoning_gym, task: basic_arithmetic, size: 4, split: test}}",
            f"experiment.arms={ARMS}",
            "midtrain.max_steps=2",
            "rl.max_steps=1",
            "rl.num_generations=2",
            "rl.batch_size=2",
            "rl.max_completion_length=8",
            *extra,
        ],
    )


@pytest.fixture
def fake_backends(monkeypatch):
    def install(cfg):
        golds = {p.question: p.answer for p in load_problems(cfg.data.train).problems}
        golds.update({p.question: p.answer for p in load_problems(cfg.data.eval["arith"]).problems})
        monkeypatch.setattr(
            backend_config,
            "make_backend",
            lambda c, model: FakeBackend(golds, correct_rate=0.5, model_id=model),
        )

    return install


def _stages(names: list[str], stage: str) -> list[str]:
    return [n for n in names if n.startswith(stage + "-")]


@pytest.mark.slow
def test_grid_shares_work_resumes_and_invalidates_only_dependents(
    tmp_path, tiny_model_dir, fake_backends, monkeypatch
):
    cfg = _cfg(tmp_path, tiny_model_dir)
    fake_backends(cfg)

    # an interruption: the second mid-training run dies
    real_midtrain = experiment.stage_module("midtrain").run
    calls = {"n": 0}

    def dying_midtrain(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real_midtrain(*a, **kw)

    monkeypatch.setattr(experiment.stage_module("midtrain"), "run", dying_midtrain)
    with pytest.raises(RuntimeError, match="killed"):
        experiment.run_experiment(cfg, show_progress=False)
    monkeypatch.setattr(experiment.stage_module("midtrain"), "run", real_midtrain)

    first = experiment.run_experiment(cfg, show_progress=False)
    # resumed: the heuristic generation, its verify/score, the base evaluation and the first
    # arm's stages were finished before the interruption and are not run again
    assert _stages(first["executed"], "generate") == []
    assert _stages(first["executed"], "midtrain") and len(_stages(first["executed"], "midtrain")) == 2
    # shared work exists once: one generation serves n=1, n=2 and the budget arm
    store = sorted(p.name for p in (cfg.run_dir / "stages").iterdir())
    assert len(_stages(store, "generate")) == 1 and len(_stages(store, "verify")) == 1
    assert len(_stages(store, "select")) == 3  # n1, n2, budget
    assert len(_stages(store, "midtrain")) == 3 and len(_stages(store, "rl")) == 4
    assert len(_stages(store, "evaluate")) == 5  # base once + one per arm
    # the judge's validity depends on the judge alone: labelled once, read by every analyze
    assert len(_stages(store, "validity")) == 1 and len(_stages(store, "analyze")) == 5
    validity = next(n for n in store if n.startswith("validity-"))
    for name in _stages(store, "analyze"):
        analysis = json.loads((cfg.run_dir / "stages" / name / "analysis.json").read_text())
        assert analysis["judge_validity"]["stage_dir"] == validity
    assert (cfg.run_dir / "report.html").is_file() and "polya_n2 (mid)" in first["summary"]
    for arm in ("vanilla_rl", "polya_n1", "polya_n2", "budget_2x3"):
        assert (cfg.run_dir / "arms" / f"{arm}.json").is_file()

    again = experiment.run_experiment(cfg, show_progress=False)
    assert again["executed"] == []

    changed = _cfg(tmp_path, tiny_model_dir, "experiment.overrides={polya_n2: {midtrain.max_steps: 3}}")
    third = experiment.run_experiment(changed, overwrite=True, show_progress=False)
    assert sorted(n.split("-")[0] for n in third["executed"]) == ["analyze", "evaluate", "midtrain", "rl"]


def test_unknown_arm_and_override_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown arm"):
        experiment.parse_arm("polya")
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            "experiment.arms=[polya_n2]",
            "experiment.overrides={star_rl: {midtrain.max_steps: 1}}",
        ],
    )
    with pytest.raises(ValueError, match="star_rl"):
        experiment.run_experiment(cfg, show_progress=False)


def test_arm_plans_follow_the_paper():
    cfg = load_config(
        None, ["experiment.arms=[polya_n2, polya_n8, budget_4x5]", "experiment.teacher_model=t"]
    )
    assert experiment.max_heuristics(cfg) == 8
    assert [s.stage for s in experiment.arm_steps("vanilla_rl", cfg)] == [
        "rl",
        "evaluate",
        "validity",
        "analyze",
    ]
    polya = {s.name: s for s in experiment.arm_steps("polya_n2", cfg)}
    assert polya["generate"].overrides["heuristics.n"] == 8  # shared generation, used as a subset
    assert polya["select"].overrides["select.heuristics"] == 2
    assert polya["evaluate"].inputs == {"midtrain": "midtrain", "rl": "rl"}  # before and after RL
    star = {s.name: s for s in experiment.arm_steps("star_rl", cfg)}
    assert (
        star["generate"].overrides["generate.mode"] == "plain"
        and star["select"].overrides["select.variant"] == "star"
    )
    distill = {s.name: s for s in experiment.arm_steps("distill_rl", cfg)}
    assert distill["generate"].overrides["generate.teacher_model"] == "t"
    # the teacher generates (and the arm trains on) heuristics.n heuristics, like polya_n<heuristics.n>,
    # not the largest n another arm needs
    assert distill["generate"].overrides["heuristics.n"] == cfg.heuristics.n == 4
    assert distill["select"].overrides["select.heuristics"] == cfg.heuristics.n
    budget = {s.name: s for s in experiment.arm_steps("budget_4x5", cfg)}
    assert budget["select"].overrides["select.budget_heuristics"] == 4
    assert budget["select"].overrides["select.budget_problems"] == 5


def test_incorrect_arms_at_several_n():
    cfg = load_config(
        None, ["heuristics.n=16", "experiment.arms=[incorrect_n1, incorrect_n4, incorrect_n16, incorrect_rl]"]
    )
    assert experiment.max_heuristics(cfg) == 16
    selects = {
        arm: {s.name: s for s in experiment.arm_steps(arm, cfg)}["select"] for arm in cfg.experiment.arms
    }
    for arm, n in (("incorrect_n1", 1), ("incorrect_n4", 4), ("incorrect_n16", 16)):
        o = selects[arm].overrides
        assert o["select.variant"] == "incorrect" and o["select.heuristics"] == n
        assert o["score.include_incorrect"] is True and o["heuristics.n"] == 16  # one shared generation
    assert selects["incorrect_rl"].overrides == selects["incorrect_n16"].overrides  # the alias
    big = load_config(None, ["heuristics.n=4", "experiment.arms=[incorrect_n32]"])
    assert experiment.max_heuristics(big) == 32


def _arm_config(cfg, arm: str, step: str):
    steps = {s.name: s for s in experiment.arm_steps(arm, cfg)}
    return experiment.derive_config(cfg, {**steps[step].overrides, **cfg.experiment.overrides.get(arm, {})})


def test_recipe_runs_the_papers_arms_with_a_reasoning_teachers_budget():
    cfg = load_config(ROOT / "configs/paper_llama3b.yaml")
    arms = cfg.experiment.arms
    assert {int(a.removeprefix("polya_n")) for a in arms if a.startswith("polya_n")} == {
        1,
        2,
        4,
        8,
        16,
        32,
        64,
    }
    assert len([a for a in arms if a.startswith("incorrect_n")]) >= 3
    budgets = [experiment.parse_arm(a) for a in arms if a.startswith("budget_")]
    assert {int(b.group(3)) * int(b.group(4)) for b in budgets} == {7408} and len(budgets) == 2
    assert experiment.max_heuristics(cfg) == 64
    polya = _arm_config(cfg, "polya_n16", "generate").generate
    teacher = _arm_config(cfg, "distill_rl", "generate")
    g = teacher.generate
    assert g.mode == "teacher" and g.teacher_model == "Qwen/QwQ-32B"
    assert g.max_new_tokens >= 8192 > polya.max_new_tokens  # room to think before \boxed{}
    assert g.backend.vllm["max_model_len"] >= g.max_new_tokens + 2048  # prompt with exemplars fits
    assert (g.temperature, g.top_p) == (0.6, 0.95)
    assert _arm_config(cfg, "distill_rl", "select").select.think == "strip"
    # the teacher's settings are its own: the other arms share one generation with the recipe's
    assert polya.max_new_tokens == cfg.generate.max_new_tokens
    key = experiment.stage_key
    assert key("generate", _arm_config(cfg, "polya_n16", "generate"), {}) == key(
        "generate", _arm_config(cfg, "incorrect_n4", "generate"), {}
    )
