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

The arms and the base model are chains of steps (:func:`experiment_chains`) that
:class:`manyways.schedule.Scheduler` runs: one stage at a time in this process, or
``experiment.jobs`` at once in worker processes (the artifacts are the same either way).

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

from manyways.artifacts import read_manifest, stable_hash, write_json_atomic
from manyways.config import Config, config_from_dict
from manyways.pipeline import save_run_config, stage_module
from manyways.schedule import Chain, InProcessLauncher, PoolLauncher, Scheduler, threads_per_job

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


BASE_STEPS = [
    Step("evaluate", "evaluate", {"evaluate.include_base": True}),
    VALIDITY,
    BASE_ANALYZE,
]
BASE_CHAIN = "base"  # the base model, evaluated and analyzed once for every arm


def experiment_chains(cfg: Config) -> list[Chain]:
    """The base model's chain, then one chain per arm: each a list of (step, its config)."""
    chains = [Chain(BASE_CHAIN, [(step, derive_config(cfg, step.overrides)) for step in BASE_STEPS])]
    for arm in cfg.experiment.arms:
        arm_overrides = cfg.experiment.overrides.get(arm, {})
        steps = [
            (step, derive_config(cfg, {**step.overrides, **arm_overrides})) for step in arm_steps(arm, cfg)
        ]
        chains.append(Chain(arm, steps))
    return chains


def _launcher(cfg: Config, jobs: int, overwrite: bool, show_progress: bool, stage_runner: Any) -> Any:
    if stage_runner is not None or jobs <= 1:
        if stage_runner is not None and jobs > 1:
            log.info("experiment.jobs=%d ignored: the stage runner runs one stage at a time", jobs)
        return InProcessLauncher(overwrite, show_progress, stage_runner)
    threads = threads_per_job(jobs)
    _decide_auto_dtypes(cfg)
    log.info("running up to %d stages at once, %d torch thread(s) each", jobs, threads)
    return PoolLauncher(jobs, threads, overwrite)


def _decide_auto_dtypes(cfg: Config) -> None:
    """Measure ``dtype: auto`` here, before the workers start, so that no measurement runs next to
    a busy worker (each worker then reads the cached decision)."""
    backends = [cfg.generate.backend, cfg.score.backend, cfg.evaluate.backend, cfg.analyze.judge_backend]
    auto = cfg.model.dtype == "auto" or any(b.kind == "hf" and b.dtype == "auto" for b in backends)
    if not auto:
        return
    try:
        import torch

        if torch.cuda.is_available():
            return
        from manyways.dtype_auto import WORKLOADS, resolve_auto_dtype
        from manyways.models import resolve_model_path

        for name in {cfg.model.name, cfg.experiment.teacher_model} - {None}:
            for workload in WORKLOADS:
                resolve_auto_dtype(workload, resolve_model_path(name))
    except (OSError, ValueError, ImportError) as exc:  # the workers decide then, as one job would
        log.warning("dtype auto not decided before the workers start: %s", exc)


def _arm_record(chain: Chain) -> dict[str, Any]:
    """``<run>/arms/<arm>.json``: the arm's stage directories (each reused or run by this arm) and
    ``wall_s``, seconds from the experiment's start until the arm's last stage finished."""
    return {"arm": chain.label, "stages": chain.stages, "wall_s": chain.wall_s}


def run_experiment(
    cfg: Config,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    stage_runner: Callable[..., Any] | None = None,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Run every arm, evaluate, analyze, and write one comparison report; returns a summary.

    ``jobs`` (default ``experiment.jobs``) stage runs at once, in worker processes when > 1
    (:mod:`manyways.schedule`); ``stage_runner`` (the rehearsal's) runs one at a time."""
    from manyways.experiment_report import write_experiment_report

    for arm in cfg.experiment.arms:
        parse_arm(arm)
    unknown = sorted(set(cfg.experiment.overrides) - set(cfg.experiment.arms))
    if unknown:
        raise ValueError(f"experiment.overrides names arms that are not in experiment.arms: {unknown}")
    jobs = cfg.experiment.jobs if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    save_run_config(cfg, overwrite=overwrite)
    started = time.time()
    chains = experiment_chains(cfg)

    def arm_done(chain: Chain) -> None:
        if chain.label != BASE_CHAIN:
            write_json_atomic(cfg.run_dir / "arms" / f"{chain.label}.json", _arm_record(chain))

    launcher = _launcher(cfg, jobs, overwrite, show_progress, stage_runner)
    scheduler = Scheduler(
        cfg.run_dir / "stages", launcher, stage_key, show_progress=show_progress, on_chain_done=arm_done
    )
    try:
        scheduler.run(chains)
    finally:
        launcher.close()
    base = chains[0].done
    arms = {c.label: _arm_record(c) for c in chains[1:]}
    html, summary = write_experiment_report(cfg, base, arms)
    result = {
        "executed": scheduler.executed,
        "reused": scheduler.reused,
        "report": str(html),
        "summary": summary,
        "jobs": launcher.slots,
        "wall_s": round(time.time() - started, 1),
    }
    write_json_atomic(cfg.run_dir / "experiment.json", result)
    return result
