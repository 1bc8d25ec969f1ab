"""``manyways experiment CONFIG --plan``: what an experiment will run and cost, without running it.

:func:`project` walks the same steps as :func:`manyways.experiment.experiment_chains` (the base
evaluation, then each arm's :func:`~manyways.experiment.arm_steps` with the same derived configs)
and predicts each stage run's content address exactly as a run computes it, so the plan names
the ``<run>/stages/<stage>-<key>`` directories a run would create, and shows which of them arms
share. Nothing is loaded: question counts come from the config (``size``, ``limit``), the known
sizes of hub presets (:data:`KNOWN_SIZES`), and local files (their rows are counted).

Every throughput and length assumption lives in :data:`ASSUMPTIONS` (one place); README's cost
table is this module's output for ``configs/paper_llama3b.yaml`` (``tests/test_plan.py`` compares
them; :func:`update_readme` rewrites it). The estimates are token counts divided by assumed
rates, not measurements.

API (used by ``--rehearse`` to print the real run's projection)::

    plan = project(load_config("configs/paper_llama3b.yaml"))
    plan.arms["polya_n16"]        # [ArmStep(step, dir), ...] in run order
    plan.runs[dir]                # StageRun: stage, arms, items, samples, tokens, gpu_hours, ...
    print(format_plan(plan))

CPU command: ``manyways experiment configs/paper_llama3b.yaml --plan``
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manyways.artifacts import stable_hash
from manyways.config import Config, load_config
from manyways.data.sources import GymSource, HubSource, HumanEvalSource, LocalSource, ProblemSource
from manyways.experiment import BASE_ANALYZE, VALIDITY, Step, arm_steps, derive_config, parse_arm
from manyways.pipeline import stage_module
from manyways.plan_estimates import ASSUMPTIONS, Assumptions, Estimate, estimate_stage

log = logging.getLogger(__name__)

# (dataset id, config, split) -> rows, for hub datasets we cannot count offline. Sources: the
# datasets' cards; DAPO-Math-17k is ~1.79M rows of ~17.4K distinct prompts (our loader dedupes).
KNOWN_SIZES: dict[tuple[str, str | None, str], int] = {
    ("openai/gsm8k", "main", "train"): 7473,
    ("openai/gsm8k", "main", "test"): 1319,
    ("DigitalLearningGmbH/MATH-lighteval", None, "train"): 7500,
    ("DigitalLearningGmbH/MATH-lighteval", None, "test"): 5000,
    ("HuggingFaceH4/MATH-500", None, "test"): 500,
    ("Maxwell-Jia/AIME_2024", None, "train"): 30,
    ("yentinglin/aime_2025", None, "train"): 30,
    ("math-ai/amc23", None, "test"): 40,
    ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"): 675,
    ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train"): 17398,
    ("openai/openai_humaneval", None, "test"): 164,
    ("TAUR-Lab/MuSR", None, "murder_mysteries"): 250,
    ("TAUR-Lab/MuSR", None, "object_placements"): 256,
    ("TAUR-Lab/MuSR", None, "team_allocation"): 250,
    ("MathArena/hmmt_feb_2025", None, "train"): 30,
}
HUMANEVAL_SIZE = 164


class PlanError(ValueError):
    """The plan cannot be computed (e.g. a dataset of unknown size); the message says what to set."""


@dataclass(frozen=True)
class ArmStep:
    """One step of an arm (or of the shared base evaluation) and the stage directory it uses."""

    step: str
    dir: str  # <stage>-<key>, as under <run>/stages/


@dataclass
class StageRun:
    """One content-addressed stage run: computed once, used by every arm listed."""

    dir: str
    stage: str
    arms: list[str]
    estimate: Estimate

    @property
    def shared(self) -> bool:
        return len(self.arms) > 1

    @property
    def gpu_hours(self) -> float:
        return self.estimate.gpu_hours


@dataclass
class Plan:
    """The projection of one experiment config: stage runs (unique) and each arm's steps."""

    run_name: str
    runs: dict[str, StageRun] = field(default_factory=dict)  # dir -> run, in first-use order
    arms: dict[str, list[ArmStep]] = field(default_factory=dict)  # "base" + each arm
    assumptions: Assumptions = ASSUMPTIONS

    @property
    def total_gpu_hours(self) -> float:
        """Every stage run once (shared runs counted once)."""
        return sum(r.gpu_hours for r in self.runs.values())

    def arm_runs(self, arm: str) -> list[StageRun]:
        return [self.runs[s.dir] for s in self.arms[arm]]

    def steps(self, arm: str) -> dict[str, StageRun]:
        """An arm's step name (generate, ..., analyze) -> its stage run: what a rehearsal's
        ``<run>/arms/<arm>.json`` lists, projected for the real run."""
        return {s.step: self.runs[s.dir] for s in self.arms[arm]}

    def table(self) -> str:
        """The text ``--plan`` prints (:func:`format_plan`)."""
        return format_plan(self)

    def arm_gpu_hours(self, arm: str, *, own_only: bool = False) -> float:
        """GPU-hours of an arm's stage runs (all of them, or only those no other arm uses)."""
        return sum(r.gpu_hours for r in self.arm_runs(arm) if not (own_only and r.shared))

    def stage_totals(self) -> dict[str, tuple[int, float]]:
        """stage -> (number of runs, GPU-hours), over unique runs."""
        out: dict[str, tuple[int, float]] = {}
        for r in self.runs.values():
            n, h = out.get(r.stage, (0, 0.0))
            out[r.stage] = (n + 1, h + r.gpu_hours)
        return out


# ---------------------------------------------------------------- sizes


def source_size(source: ProblemSource) -> int:
    """Problems a source yields at most, without loading it (rows before validation)."""
    if isinstance(source, GymSource):
        return source.size
    if isinstance(source, HumanEvalSource):
        return min(HUMANEVAL_SIZE, source.limit or HUMANEVAL_SIZE)
    if isinstance(source, LocalSource):
        rows = _count_rows([source.path])
    elif isinstance(source, HubSource):
        rows = _hub_size(source)
    else:  # pragma: no cover - the union is closed
        raise TypeError(f"not a problem source: {type(source).__name__}")
    return min(rows, source.limit) if source.limit else rows


def _count_rows(paths: list[Path]) -> int:
    from manyways.data.local import iter_rows

    return sum(1 for p in paths for _ in iter_rows(Path(p)))


def _hub_size(source: HubSource) -> int:
    from manyways.data.hub import PRESETS

    if source.data_files is not None:
        return _count_rows(source.data_file_list)
    spec = PRESETS.get(source.preset) if source.preset else None
    name = source.name or (spec.name if spec else "")
    config = source.config or (spec.config if spec else None)
    split = source.split or (spec.split if spec else "train")
    size = KNOWN_SIZES.get((name, config, split))
    if size is not None:
        return size
    if source.limit:
        return source.limit
    raise PlanError(
        f"the size of hub dataset {name!r} (config={config!r}, split={split!r}) is unknown to --plan: "
        "set limit: N on that source, or point data_files at a local copy"
    )


# ---------------------------------------------------------------- steps and keys


def stage_section(stage: str, cfg: Config, inputs: dict[str, Path]) -> dict[str, Any]:
    """The config part a stage run hashes (what :func:`manyways.experiment.stage_key` hashes)."""
    module = stage_module(stage)
    if stage == "evaluate":
        return module.stage_config(cfg, module.models_to_evaluate(cfg, inputs))
    return module.stage_config(cfg)


def predicted_fingerprint(
    stage: str, cfg: Config, inputs: dict[str, Path], fingerprints: dict[str, str]
) -> str:
    """The fingerprint a run of ``stage`` will write to its manifest (its directory key is the
    first 12 characters), from the inputs' predicted fingerprints instead of their manifests."""
    section = stage_section(stage, cfg, inputs)
    hashes = {k: fingerprints[Path(v).name] for k, v in inputs.items()}
    return stable_hash({"stage": stage, "config": section, "inputs": hashes})


class _Walker:
    """Replays the experiment chains' steps, predicting directories instead of running stages."""

    def __init__(self, cfg: Config, assumptions: Assumptions):
        self.cfg, self.assumptions = cfg, assumptions
        self.store = cfg.run_dir / "stages"
        self.fingerprints: dict[str, str] = {}
        self.plan = Plan(run_name=cfg.run.name, assumptions=assumptions)

    def step(self, arm: str, step: Step, cfg: Config, done: dict[str, Path]) -> Path:
        inputs = {name: done[src] for name, src in step.inputs.items()}
        fp = predicted_fingerprint(step.stage, cfg, inputs, self.fingerprints)
        name = f"{step.stage}-{fp[:12]}"
        self.fingerprints[name] = fp
        run = self.plan.runs.get(name)
        if run is None:
            upstream = {k: self.plan.runs[Path(v).name].estimate for k, v in inputs.items()}
            est = estimate_stage(step.stage, cfg, arm, upstream, source_size, self.assumptions)
            run = self.plan.runs[name] = StageRun(name, step.stage, [], est)
        if arm not in run.arms:
            run.arms.append(arm)
        self.plan.arms.setdefault(arm, []).append(ArmStep(step.name, name))
        return self.store / name

    def base(self) -> None:
        done: dict[str, Path] = {}
        evaluate = Step("evaluate", "evaluate", {"evaluate.include_base": True})
        done["evaluate"] = self.step(
            "base", evaluate, derive_config(self.cfg, {"evaluate.include_base": True}), done
        )
        done["validity"] = self.step("base", VALIDITY, self.cfg, done)
        done["analyze"] = self.step("base", BASE_ANALYZE, self.cfg, done)

    def arm(self, arm: str) -> None:
        done: dict[str, Path] = {}
        arm_overrides = self.cfg.experiment.overrides.get(arm, {})
        for step in arm_steps(arm, self.cfg):
            cfg = derive_config(self.cfg, {**step.overrides, **arm_overrides})
            done[step.name] = self.step(arm, step, cfg, done)


def project(cfg: Config, assumptions: Assumptions = ASSUMPTIONS) -> Plan:
    """The experiment ``cfg`` would run, stage by stage, with counts, tokens and GPU-hours.

    Runs nothing and loads no model or dataset; raises :class:`PlanError` when a size cannot be
    known offline, and ValueError for an unknown arm (as a run would)."""
    for arm in cfg.experiment.arms:
        parse_arm(arm)
    walker = _Walker(cfg, assumptions)
    walker.base()
    for arm in cfg.experiment.arms:
        walker.arm(arm)
    return walker.plan


def project_file(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    return project(load_config(path, overrides))


# ---------------------------------------------------------------- formatting


def _num(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div * 10:
            return f"{n / div:,.0f}{unit}"
    return f"{n:,.0f}"


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h < 10 else f"{h:,.0f}"


def format_plan(plan: Plan) -> str:
    """The text ``--plan`` prints: each arm's steps, then every stage run once with its cost."""
    lines = [f"plan of experiment {plan.run_name!r} (nothing was run; estimates, not measurements)", ""]
    for arm, steps in plan.arms.items():
        own = plan.arm_gpu_hours(arm, own_only=True)
        lines.append(
            f"{arm}: {' -> '.join(s.step for s in steps)}  "
            f"({_hours(plan.arm_gpu_hours(arm))} GPU-h with shared stages, {_hours(own)} its own)"
        )
        for s in steps:
            run = plan.runs[s.dir]
            shared = f"  shared with {', '.join(a for a in run.arms if a != arm)}" if run.shared else ""
            lines.append(f"  {s.step:<9} {s.dir}{shared}")
    lines += ["", "stage runs (each computed once):", _table(plan, markdown=False)]
    a = plan.assumptions
    lines += ["", f"total: {_hours(plan.total_gpu_hours)} {a.gpu}-hours. Assumptions: {a.describe()}"]
    return "\n".join(lines)


def _table(plan: Plan, *, markdown: bool) -> str:
    head = ["stage run", "arms", "count", "tokens in / out", f"{plan.assumptions.gpu}-h"]
    rows = []
    for run in plan.runs.values():
        e = run.estimate
        arms = ", ".join(run.arms) if len(run.arms) <= 3 else f"{len(run.arms)} arms"
        tokens = f"{_num(e.tokens_in)} / {_num(e.tokens_out)}" if e.tokens_in or e.tokens_out else "-"
        rows.append([run.dir if not markdown else run.stage, arms, e.what, tokens, _hours(e.gpu_hours)])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]
    )


def _grouped_rows(plan: Plan) -> list[list[str]]:
    """Stage runs with identical estimates merged into one row (e.g. the same GRPO run per arm)."""
    groups: dict[tuple[Any, ...], list[StageRun]] = {}
    for run in plan.runs.values():
        e = run.estimate
        groups.setdefault((run.stage, e.what, e.tokens_in, e.tokens_out, round(e.gpu_hours, 6)), []).append(
            run
        )
    from manyways.pipeline import ORDER

    rows = []
    for (stage, what, tin, tout, hours), runs in sorted(groups.items(), key=lambda kv: ORDER.index(kv[0][0])):
        arms = [a for r in runs for a in r.arms]
        arms_text = ", ".join(dict.fromkeys(arms)) if len(arms) <= 4 else f"{len(set(arms))} arms"
        tokens = f"{_num(tin)} / {_num(tout)}" if tin or tout else "-"
        each = f"{_hours(hours)} x {len(runs)}" if len(runs) > 1 else _hours(hours)
        rows.append([f"{stage} ({arms_text})", what, tokens, each, _hours(hours * len(runs))])
    return rows


def format_cost_markdown(plan: Plan) -> str:
    """README's cost table: stage runs (identical ones merged), then per-arm totals."""
    a = plan.assumptions
    head = ["stage run (used by)", "count", "tokens in / out", f"{a.gpu}-h each", f"{a.gpu}-h"]
    rows = _grouped_rows(plan)
    arms = [arm for arm in plan.arms if arm != "base"]
    parts = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *["| " + " | ".join(r) + " |" for r in rows],
        f"| **all {len(plan.runs)} stage runs** | | | | **{_hours(plan.total_gpu_hours)}** |",
        "",
        f"| arm | {a.gpu}-h with the stages it shares | {a.gpu}-h of its own stages |",
        "|---|---|---|",
        *[
            f"| {arm} | {_hours(plan.arm_gpu_hours(arm))} | {_hours(plan.arm_gpu_hours(arm, own_only=True))} |"
            for arm in arms
        ],
        "",
        f"Assumptions: {a.describe()}",
    ]
    return "\n".join(parts)


README_BEGIN = (
    "<!-- plan:configs/paper_llama3b.yaml (generated by manyways.plan.update_readme; do not edit) -->"
)
README_END = "<!-- /plan -->"


def readme_block(readme_text: str) -> str | None:
    """The generated cost table between README's markers (None when the markers are missing)."""
    match = re.search(re.escape(README_BEGIN) + "(.*?)" + re.escape(README_END), readme_text, flags=re.S)
    return match.group(1).strip("\n") if match else None


def update_readme(
    readme: str | Path = "README.md", config: str | Path = "configs/paper_llama3b.yaml"
) -> bool:
    """Rewrite README's generated cost table from ``config``; True when it changed."""
    path = Path(readme)
    text = path.read_text()
    if readme_block(text) is None:
        raise PlanError(f"{path} has no {README_BEGIN!r} ... {README_END!r} block")
    table = format_cost_markdown(project_file(config))
    pattern = re.escape(README_BEGIN) + ".*?" + re.escape(README_END)
    new = re.sub(pattern, lambda _: f"{README_BEGIN}\n{table}\n{README_END}", text, flags=re.S)
    if new != text:
        path.write_text(new)
    return new != text
