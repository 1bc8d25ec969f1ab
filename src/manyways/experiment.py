"""``manyways experiment``: the paper's arms as one command, shared work done once.

Arms (``experiment.arms``):

- ``vanilla_rl``: base -> GRPO;
- ``star_rl``: plain-mode self-generated correct rationales -> SFT -> GRPO;
- ``polya_n{N}``: heuristic-guided self-generated data with N heuristics -> SFT -> GRPO;
- ``distill_rl``: a teacher (``experiment.teacher_model``) generates the heuristic traces -> SFT -> GRPO;
  a reasoning teacher needs its own generation settings (``experiment.overrides.distill_rl``:
  ``generate.max_new_tokens``, ``generate.backend.vllm.max_model_len``, sampling) and
  ``select.think`` says what is trained on when it writes a ``<think>`` block (default: the
  solution after it);
- ``incorrect_n{N}``: heuristic-guided but incorrect traces under the first N heuristics -> SFT ->
  GRPO (the paper: the more of them, the worse); ``incorrect_rl`` is ``incorrect_n<heuristics.n>``;
- ``budget_{N}x{M}``: exactly N x M traces, N heuristics x M problems (N*M held constant across
  budget arms; see :mod:`manyways.stages.select`) -> SFT -> GRPO.

Per-arm overrides (``experiment.overrides``, dotted keys) apply to every stage of that arm and
recompute only the stages whose config they change.

Every stage run is content-addressed: its directory is ``<run>/stages/<stage>-<key>`` where the
key hashes the stage's own config section(s) and its inputs' fingerprints. Generation with the
largest N serves every smaller N as a subset, the base model is evaluated once, an interrupted
experiment resumes where it stopped, and changing one arm's setting recomputes only what depends
on it. Each arm's manifest (``<run>/arms/<arm>.json``) lists its stage directories and whether
each was reused. Every arm is evaluated after RL, and every mid-trained model before RL.

CPU command: ``manyways experiment configs/tiny_cpu.yaml`` (what ``make demo`` runs)
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manyways.artifacts import is_finished, read_manifest, stable_hash, write_json_atomic
from manyways.config import Config, config_from_dict
from manyways.pipeline import save_run_config, stage_module

log = logging.getLogger(__name__)

# groups: 2 polya N, 3-4 budget N x M, 5 incorrect N
ARM_PATTERN = re.compile(
    r"^(vanilla_rl|star_rl|distill_rl|incorrect_rl|polya_n(\d+)|budget_(\d+)x(\d+)|incorrect_n(\d+))$"
)


@dataclass(frozen=True)
class Step:
    """One stage run of an arm: the stage, the config it runs with, and which steps feed it."""

    name: str  # unique within the arm: generate, verify, ..., evaluate
    stage: str
    overrides: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> step name


# the judge's validity on the catalogue's exemplars depends on the judge alone: one run serves the
# base model and every arm (an arm that overrides a judge setting gets its own, by content address)
VALIDITY = Step("validity", "validity", {})
BASE_ANALYZE = Step("analyze", "analyze", {}, {"evaluate": "evaluate", "validity": "validity"})


def parse_arm(arm: str) -> re.Match[str]:
    match = ARM_PATTERN.match(arm)
    if not match:
        raise ValueError(
            f"unknown arm {arm!r}: use vanilla_rl, star_rl, distill_rl, polya_n<N>, incorrect_n<N> "
            "(incorrect_rl = incorrect_n<heuristics.n>) or budget_<N>x<M>"
        )
    return match


def max_heuristics(cfg: Config) -> int:
    """The largest heuristic count any arm needs: one generation serves them all."""
    ns = [cfg.heuristics.n or 1]
    for arm in cfg.experiment.arms:
        m = parse_arm(arm)
        ns.extend(int(g) for g in (m.group(2), m.group(3), m.group(5)) if g)
    return max(ns)


def incorrect_heuristics(arm: str, cfg: Config) -> int | None:
    """N of an incorrect-traces arm (``incorrect_rl`` means ``incorrect_n<heuristics.n>``)."""
    m = parse_arm(arm)
    if m.group(5):
        return int(m.group(5))
    return (cfg.heuristics.n or 1) if arm == "incorrect_rl" else None


def _data_steps(arm: str, cfg: Config) -> list[Step]:
    """generate -> verify -> score -> select for an arm that mid-trains."""
    m = parse_arm(arm)
    n_max = max_heuristics(cfg)
    gen: dict[str, Any] = {"generate.mode": "heuristic", "heuristics.n": n_max, "heuristics.ids": None}
    score: dict[str, Any] = {}
    select: dict[str, Any] = {
        "select.variant": "best",
        "select.heuristics": None,
        "select.budget_heuristics": None,
        "select.budget_problems": None,
    }
    if arm == "star_rl":
        gen = {"generate.mode": "plain"}
        score = {"score.scorer": "none"}
        select["select.variant"] = "star"
    elif arm == "distill_rl":
        if not cfg.experiment.teacher_model:
            raise ValueError("arm distill_rl needs experiment.teacher_model")
        # the teacher's traces under the run's heuristics.n heuristics: the arm compares with
        # polya_n<heuristics.n>, whatever larger n other arms generate for
        n_distill = cfg.heuristics.n or n_max
        select["select.heuristics"] = n_distill
        if cfg.experiment.teacher_model == cfg.model.name:
            # the same model with the same prompts and seeds: the heuristic generation already is
            # this arm's data, so reuse it instead of sampling it again
            log.warning("distill_rl: the teacher is the base model itself; its data equals polya's")
        else:
            gen = {
                **gen,
                "heuristics.n": n_distill,
                "generate.mode": "teacher",
                "generate.teacher_model": cfg.experiment.teacher_model,
            }
    elif incorrect_heuristics(arm, cfg) is not None:
        score = {"score.include_incorrect": True}
        select.update({"select.variant": "incorrect", "select.heuristics": incorrect_heuristics(arm, cfg)})
    elif m.group(2):
        select["select.heuristics"] = int(m.group(2))
    elif m.group(3):
        select.update(
            {"select.budget_heuristics": int(m.group(3)), "select.budget_problems": int(m.group(4))}
        )
    return [
        Step("generate", "generate", gen),
        Step("verify", "verify", gen, {"generate": "generate"}),
        Step("score", "score", {**gen, **score}, {"generate": "generate", "verify": "verify"}),
        Step(
            "select",
            "select",
            {**gen, **score, **select},
            {"generate": "generate", "verify": "verify", "score": "score"},
        ),
    ]


def arm_steps(arm: str, cfg: Config) -> list[Step]:
    """The ordered stage runs of one arm."""
    parse_arm(arm)
    if arm == "vanilla_rl":
        return [
            Step("rl", "rl", {}),
            Step("evaluate", "evaluate", {"evaluate.include_base": False}, {"rl": "rl"}),
            VALIDITY,
            Step("analyze", "analyze", {}, {"evaluate": "evaluate", "validity": "validity"}),
        ]
    return [
        *_data_steps(arm, cfg),
        Step("midtrain", "midtrain", {}, {"select": "select"}),
        Step("rl", "rl", {}, {"midtrain": "midtrain"}),
        # the mid-trained model before RL and the arm after RL, side by side
        Step("evaluate", "evaluate", {"evaluate.include_base": False}, {"midtrain": "midtrain", "rl": "rl"}),
        VALIDITY,
        Step("analyze", "analyze", {}, {"select": "select", "evaluate": "evaluate", "validity": "validity"}),
    ]


def derive_config(cfg: Config, overrides: dict[str, Any]) -> Config:
    """``cfg`` with dotted-key overrides applied (validated like a config file)."""
    data = cfg.to_dict()
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config_from_dict(data, origin=f"experiment arm overrides {sorted(overrides)}")


def stage_key(stage: str, cfg: Config, inputs: dict[str, Path]) -> str:
    """Content address of a stage run: its config section(s) and its inputs' fingerprints."""
    module = stage_module(stage)
    if stage == "evaluate":
        section = module.stage_config(cfg, module.models_to_evaluate(cfg, inputs))
    else:
        section = module.stage_config(cfg)
    fingerprints = {k: read_manifest(v)["fingerprint"] for k, v in inputs.items()}
    return stable_hash({"stage": stage, "config": section, "inputs": fingerprints}, 12)


@dataclass
class ExperimentRun:
    """Executes arms over a shared, content-addressed stage store."""

    cfg: Config
    overwrite: bool = False
    show_progress: bool = True
    executed: list[str] = field(default_factory=list)  # stage dirs computed in this call
    reused: list[str] = field(default_factory=list)  # stage dirs found finished
    # how a stage is run: (stage, cfg, out, inputs, overwrite, show_progress); None = in-process.
    # The rehearsal (manyways.rehearsal) runs midtrain and rl under `accelerate launch` with it.
    stage_runner: Callable[..., Any] | None = None

    @property
    def store(self) -> Path:
        return self.cfg.run_dir / "stages"

    def run_step(self, step: Step, cfg: Config, done: dict[str, Path]) -> Path:
        inputs = {name: done[src] for name, src in step.inputs.items()}
        out = self.store / f"{step.stage}-{stage_key(step.stage, cfg, inputs)}"
        if is_finished(out):
            self.reused.append(out.name)
            return out
        log.info("== %s -> %s", step.stage, out.name)
        if self.stage_runner is not None:
            self.stage_runner(step.stage, cfg, out, inputs, self.overwrite, self.show_progress)
        else:
            stage_module(step.stage).run(
                cfg, out, inputs=inputs, overwrite=self.overwrite, show_progress=self.show_progress
            )
        self.executed.append(out.name)
        return out

    def run_arm(self, arm: str) -> dict[str, Any]:
        started = time.time()
        done: dict[str, Path] = {}
        record: dict[str, Any] = {"arm": arm, "stages": {}}
        arm_overrides = self.cfg.experiment.overrides.get(arm, {})
        for step in arm_steps(arm, self.cfg):
            before = len(self.executed)
            cfg = derive_config(self.cfg, {**step.overrides, **arm_overrides})
            done[step.name] = self.run_step(step, cfg, done)
            record["stages"][step.name] = {
                "dir": str(done[step.name]),
                "reused": len(self.executed) == before,
            }
        record["wall_s"] = round(time.time() - started, 1)
        write_json_atomic(self.cfg.run_dir / "arms" / f"{arm}.json", record)
        return record

    def evaluate_base(self) -> dict[str, Path]:
        """The base model, evaluated and analyzed once for every arm."""
        done: dict[str, Path] = {}
        done["evaluate"] = self.run_step(
            Step("evaluate", "evaluate", {"evaluate.include_base": True}),
            derive_config(self.cfg, {"evaluate.include_base": True}),
            done,
        )
        done["validity"] = self.run_step(VALIDITY, self.cfg, done)
        done["analyze"] = self.run_step(BASE_ANALYZE, self.cfg, done)
        return done


def run_experiment(
    cfg: Config,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    stage_runner: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Run every arm, evaluate, analyze, and write one comparison report; returns a summary."""
    from manyways.experiment_report import write_experiment_report

    for arm in cfg.experiment.arms:
        parse_arm(arm)
    unknown = sorted(set(cfg.experiment.overrides) - set(cfg.experiment.arms))
    if unknown:
        raise ValueError(f"experiment.overrides names arms that are not in experiment.arms: {unknown}")
    save_run_config(cfg, overwrite=overwrite)
    runner = ExperimentRun(cfg, overwrite=overwrite, show_progress=show_progress, stage_runner=stage_runner)
    base = runner.evaluate_base()
    arms = {}
    for arm in cfg.experiment.arms:
        log.info("==== arm %s", arm)
        arms[arm] = runner.run_arm(arm)
    html, summary = write_experiment_report(cfg, base, arms)
    result = {"executed": runner.executed, "reused": runner.reused, "report": str(html), "summary": summary}
    write_json_atomic(cfg.run_dir / "experiment.json", result)
    return result
