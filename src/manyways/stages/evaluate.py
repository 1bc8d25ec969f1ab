"""Stage ``evaluate``: pass@k of each model on each benchmark, with bootstrap intervals.

Models: the base model (label ``base``, ``cfg.model.name``), the mid-trained model
(``midtrain``: ``inputs["midtrain"]/model``) and the RL-trained model (``rl``:
``inputs["rl"]/model``) when those inputs are given, plus ``cfg.evaluate.models`` (label ->
path; the experiment runner evaluates each arm this way). Benchmarks: ``cfg.data.eval``, or when
that is empty the offline defaults (held-out reasoning-gym math, HumanEval through the sandbox,
reasoning-gym ``aiw`` as the out-of-domain slot).

For every (model, benchmark) unit, ``n = cfg.evaluate.samples`` completions per problem are
sampled from plain prompts (code problems: a "complete this function" system line) with seeds ``unit_seed(seed, problem_id, "eval", i)``: the seed does
not depend on the model, so models are compared on common random numbers. Each completion is
judged by :func:`manyways.verify.registry.verify_many` (the function the verify stage and the
GRPO reward use). Problems whose gold cannot be parsed (``bad_gold``) are excluded from the
statistics but counted; so are training and RL questions found in a benchmark
(:mod:`manyways.data.contamination`, ``contamination.json``), which are never sampled. Units run
over ``evaluate.executor`` (local, or Ray actors with one engine and its GPUs each:
:func:`manyways.executor.map_shards`); the output does not depend on it.

Outputs under ``<run>/evaluate/``: ``problems/<benchmark>.parquet``; ``shards/part-*.parquet``
(one per (model, benchmark) unit, the unit of resume; :data:`EVAL_SAMPLE_SCHEMA` rows);
``counts.parquet`` (model, benchmark, problem_id, n, c, bad_gold); ``results.json`` (pass@k with
95% bootstrap CIs over problems, mean@n, sizes); ``manifest.json``. Other k values later, with no
sampling: :func:`recompute`.

CPU command: ``manyways evaluate configs/tiny_cpu.yaml``
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from manyways.artifacts import (
    StageDir,
    append_metrics,
    read_manifest,
    read_table,
    unit_seed,
    write_json_atomic,
    write_parquet_atomic,
)
from manyways.backends import config as backend_config
from manyways.backends.config import BackendConfig
from manyways.backends.protocol import GenerationBackend, GenRequest, GenSample
from manyways.config import EXECUTOR_KEYS, Config
from manyways.data.contamination import contamination_counts, count_excluded, decontaminate_into
from manyways.data.sources import GymSource, HumanEvalSource, ProblemSource
from manyways.heuristics import render_plain_messages
from manyways.metrics import bootstrap_ci, default_ks, mean_at_n, pass_at_k_per_problem
from manyways.progress import Progress
from manyways.schema import COUNTS_SCHEMA, EVAL_SAMPLE_SCHEMA, Problem

log = logging.getLogger(__name__)

STAGE = "evaluate"
SEED_KEY = "eval"  # heuristic_id of unit_seed: the same for every model (common random numbers)
RESERVED_LABELS = ("base", "midtrain", "rl")
CI_ALPHA = 0.05
CODE_SYSTEM = "Complete the following Python function. Answer with the whole function in a ```python block."
CHOICE_INSTRUCTION = "Think it through, then give the letter of the right option as \\boxed{LETTER}."
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

BackendFactory = Callable[[BackendConfig, str], GenerationBackend]


def default_benchmarks(cfg: Config) -> dict[str, ProblemSource]:
    """Offline benchmarks: held-out gym math (test split), HumanEval, and gym ``aiw`` (OOD)."""
    size = cfg.evaluate.default_size
    train = cfg.data.train
    if isinstance(train, GymSource):
        math: ProblemSource = train.model_copy(update={"split": "test", "size": size})
    else:
        math = GymSource(task="basic_arithmetic", size=size, split="test")
    return {
        "math_heldout": math,
        "humaneval": HumanEvalSource(limit=size),
        "ood_aiw": GymSource(task="aiw", size=size, split="test"),
    }


def benchmarks(cfg: Config) -> dict[str, ProblemSource]:
    """The benchmarks to evaluate on, by name (names are file-name safe)."""
    chosen = dict(cfg.data.eval) or default_benchmarks(cfg)
    for name in chosen:
        if not _NAME_RE.match(name):
            raise ValueError(f"benchmark name {name!r} must match {_NAME_RE.pattern}")
    return chosen


def models_to_evaluate(cfg: Config, inputs: dict[str, Path] | None) -> dict[str, str]:
    """label -> model name or path, in evaluation order."""
    inputs = inputs or {}
    models: dict[str, str] = {}
    if cfg.evaluate.include_base:
        models["base"] = cfg.model.name
    for label in ("midtrain", "rl"):
        if label in inputs:
            models[label] = str(Path(inputs[label]) / "model")
    for label, path in cfg.evaluate.models.items():
        if label in RESERVED_LABELS or not _NAME_RE.match(label):
            raise ValueError(f"evaluate.models label {label!r} is reserved or not a plain name")
        models[label] = path
    if not models:
        raise ValueError("nothing to evaluate: evaluate.include_base is off and no other model is given")
    return models


def stage_config(cfg: Config, models: dict[str, str] | None = None) -> dict[str, Any]:
    """The part of the config this stage's output depends on (plus the model paths)."""
    data = cfg.to_dict()
    return {
        "run": {"seed": cfg.run.seed},
        "model": {"name": cfg.model.name},
        "benchmarks": {k: v.model_dump(mode="json") for k, v in benchmarks(cfg).items()},
        "training_sets": {"train": data["data"]["train"], "rl": data["data"]["rl"]},  # decontamination
        "evaluate": {k: v for k, v in data["evaluate"].items() if k not in EXECUTOR_KEYS},
        "verify": {"timeout_s": cfg.verify.timeout_s},
        "models": models or {},
    }


def load_benchmark(source: ProblemSource, skip_bad: bool) -> list[Problem]:
    from manyways.data import load_problems

    result = load_problems(source, skip_bad=skip_bad)
    for bad in result.set_aside:
        log.warning("set aside: %s", bad)
    return list(result.problems)


def eval_messages(problem: Problem) -> list[dict[str, str]]:
    """The plain prompt for math; code asks for the function in a code block; multiple choice
    lists the lettered options (generative: the answer is read from the text, not log-likelihood)."""
    if problem.answer_type == "code":
        return [{"role": "system", "content": CODE_SYSTEM}, {"role": "user", "content": problem.question}]
    if problem.answer_type == "choice" and problem.choices:
        options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(problem.choices))
        question = f"{problem.question}\n\nOptions:\n{options}\n\n{CHOICE_INSTRUCTION}"
        return render_plain_messages(question)
    return render_plain_messages(problem.question)


def sample_unit(
    backend: GenerationBackend, cfg: Config, problems: Sequence[Problem], progress: Any = None
) -> list[tuple[Problem, int, int, GenSample]]:
    """n samples per problem: (problem, sample_idx, seed, sample) in problem then index order."""
    e = cfg.evaluate
    requests = [
        GenRequest(
            p.problem_id,
            eval_messages(p),
            tuple(unit_seed(cfg.run.seed, p.problem_id, SEED_KEY, i) for i in range(e.samples)),
            e.max_new_tokens,
            e.temperature,
            e.top_p,
        )
        for p in problems
    ]
    results = backend.generate(requests, progress=progress)
    return [
        (p, i, req.seeds[i], s)
        for p, req, samples in zip(problems, requests, results, strict=True)
        for i, s in enumerate(samples)
    ]


def verify_samples(samples: list[tuple[Problem, int, int, GenSample]], timeout_s: float) -> list[Any]:
    """Verdicts of each sample, through the one verification function of the project."""
    from manyways.verify.registry import verify_many

    return list(verify_many([(p, s.text) for p, _, _, s in samples], timeout_s=timeout_s))


def unit_rows(
    label: str, bench: str, samples: list[tuple[Problem, int, int, GenSample]], verdicts: Sequence[Any]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Sample rows of one unit and its counters."""
    rows, c = [], Counter()
    for (p, idx, seed, s), v in zip(samples, verdicts, strict=True):
        rows.append(
            {
                "model": label,
                "benchmark": bench,
                "problem_id": p.problem_id,
                "sample_idx": idx,
                "seed": seed,
                "completion": s.text,
                "finish_reason": s.finish_reason,
                "completion_tokens": s.completion_tokens,
                "status": v.status,
                "correct": bool(v.correct),
                "extracted": v.extracted,
            }
        )
        c["samples"] += 1
        c["correct"] += int(v.correct is True)
        c[f"status_{v.status}"] += 1
        c[f"finish_{s.finish_reason}"] += 1
        c["empty_completions"] += int(not s.text.strip())
        c["completion_tokens"] += s.completion_tokens
    return rows, dict(c)


def counts_table(samples: pa.Table) -> pa.Table:
    """Per (model, benchmark, problem): n samples, c correct, bad_gold (any sample said so)."""
    acc: dict[tuple[str, str, str], list[int]] = {}
    for r in samples.select(["model", "benchmark", "problem_id", "status", "correct"]).to_pylist():
        entry = acc.setdefault((r["model"], r["benchmark"], r["problem_id"]), [0, 0, 0])
        entry[0] += 1
        entry[1] += int(bool(r["correct"]))
        entry[2] |= int(r["status"] == "bad_gold")
    rows = [
        {"model": m, "benchmark": b, "problem_id": p, "n": n, "c": c, "bad_gold": bool(bad)}
        for (m, b, p), (n, c, bad) in acc.items()
    ]
    return pa.Table.from_pylist(rows, schema=COUNTS_SCHEMA)


def _ci(values: Any, n_resamples: int, seed: int) -> tuple[float | None, float | None]:
    if n_resamples < 1:
        return None, None
    return bootstrap_ci(values, n_resamples=n_resamples, alpha=CI_ALPHA, seed=seed)


def unit_results(
    rows: list[dict[str, Any]], ks: Sequence[int] | None, n_resamples: int, seed: int
) -> dict[str, Any]:
    """Statistics of one (model, benchmark) from its count rows; bad-gold problems excluded."""
    kept = [r for r in rows if not r["bad_gold"]]
    out: dict[str, Any] = {
        "problems": len(kept),
        "excluded": len(rows) - len(kept),
        "samples": sum(r["n"] for r in kept),
        "pass_at_k": {},
        "mean_at_n": None,
    }
    if not kept:
        return out
    cs, ns, ids = [r["c"] for r in kept], [r["n"] for r in kept], [r["problem_id"] for r in kept]
    n_min = min(ns)
    wanted = list(ks) if ks else default_ks(n_min)
    out["n"] = n_min
    out["ks_dropped"] = [k for k in wanted if k > n_min]
    for k in (k for k in wanted if k <= n_min):
        values = pass_at_k_per_problem(cs, ns, int(k), problem_ids=ids)
        low, high = _ci(values, n_resamples, seed)
        out["pass_at_k"][str(k)] = {"value": float(values.mean()), "ci_low": low, "ci_high": high}
    out["mean_at_n"] = mean_at_n(cs, ns)
    return out


def results_from_counts(
    rows: list[dict[str, Any]], ks: Sequence[int] | None, *, n_resamples: int, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """model -> benchmark -> statistics, a pure function of the count rows."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault(r["model"], {}).setdefault(r["benchmark"], []).append(r)
    return {
        m: {b: unit_results(rs, ks, n_resamples, seed) for b, rs in by_bench.items()}
        for m, by_bench in groups.items()
    }


def recompute(stage_dir: Path, ks: Sequence[int], *, n_resamples: int | None = None) -> dict[str, Any]:
    """Results for other k values from the stored counts (no sampling); same shape as results.json."""
    stage_dir = Path(stage_dir)
    stored = json.loads((stage_dir / "results.json").read_text())
    rows = pq.read_table(stage_dir / "counts.parquet").to_pylist()
    b = stored["bootstrap"] if n_resamples is None else n_resamples
    results = results_from_counts(rows, list(ks), n_resamples=b, seed=stored["bootstrap_seed"])
    count_excluded(results, stored.get("contamination", {}))
    return {**stored, "ks": list(ks), "bootstrap": b, "results": results}


def _units(models: dict[str, str], benches: dict[str, Any]) -> list[tuple[int, str, str]]:
    return [(i, label, bench) for i, (label, bench) in enumerate((m, b) for m in models for b in benches)]


class EvaluateWorker:
    """Samples and verifies whole (model, benchmark) units; keeps one back-end, the model of its
    last unit (units of one model go to the same worker where possible: the executor's affinity)."""

    def __init__(self, cfg_dict: dict[str, Any], factory: BackendFactory | None = None) -> None:
        from manyways.config import config_from_dict

        self.cfg = config_from_dict(cfg_dict)
        # looked up at call time: a name bound at import would keep whatever was patched then
        self.factory = factory or backend_config.make_backend
        self.path: str | None = None
        self.backend: GenerationBackend | None = None

    def _backend(self, path: str) -> GenerationBackend:
        if self.backend is None or path != self.path:
            self.close()
            self.backend = self.factory(self.cfg.evaluate.backend.model_copy(update={"model": None}), path)
            self.path = path
        return self.backend

    def __call__(self, unit: dict[str, Any]) -> dict[str, Any]:
        problems = [Problem(**p) for p in unit["problems"]]
        samples = sample_unit(self._backend(unit["path"]), self.cfg, problems, unit.get("progress"))
        verdicts = verify_samples(samples, self.cfg.verify.timeout_s)
        rows, counters = unit_rows(unit["label"], unit["bench"], samples, verdicts)
        return {"rows": rows, "counters": counters}

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend, self.path = None, None


def _evaluate_units(
    stage: StageDir, cfg: Config, units: list[tuple[int, Any]], factory: BackendFactory | None, bar: Progress
) -> None:
    """Run the units over ``evaluate.executor`` (local, or Ray actors with a GPU share each);
    the driver alone writes the unit shards, so the output does not depend on the executor."""
    import functools

    from manyways.executor import backend_gpus, map_shards

    e = cfg.evaluate

    def on_result(index: int, result: dict[str, Any]) -> None:
        rows, counters = result["rows"], result["counters"]
        stage.write_shard(index, pa.Table.from_pylist(rows, schema=EVAL_SAMPLE_SCHEMA), counters)
        log.info("unit %d: %d/%d samples correct", index, counters.get("correct", 0), len(rows))
        if e.executor != "local":
            bar.update(len(rows))

    if e.executor == "local":
        units = [(i, {**unit, "progress": bar.update}) for i, unit in units]
    map_shards(
        functools.partial(EvaluateWorker, cfg.to_dict(), factory),
        units,
        on_result,
        executor=e.executor,
        workers=e.workers,
        ray_address=e.ray_address,
        ray_num_cpus=e.ray_num_cpus,
        num_gpus=backend_gpus(e.backend),
        affinity=lambda unit: unit["path"],
    )


def run(
    cfg: Config,
    out_dir: Path,
    *,
    inputs: dict[str, Path] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    backend_factory: BackendFactory | None = None,
) -> dict[str, Any]:
    """Run the stage into ``out_dir``; returns the manifest (existing one when already done).

    ``backend_factory(backend_config, model_path)`` builds each model's back-end (default
    :func:`manyways.backends.config.make_backend`); tests inject fakes that know the golds.
    """
    from manyways.data import write_problems

    models = models_to_evaluate(cfg, inputs)
    stage = StageDir(out_dir, STAGE, stage_config(cfg, models), inputs)
    if stage.open(overwrite):
        log.info("%s already finished: %s", STAGE, out_dir)
        return read_manifest(out_dir)
    benches = benchmarks(cfg)
    problems = {name: load_benchmark(src, cfg.data.skip_bad) for name, src in benches.items()}
    problems = decontaminate_into(cfg, problems, out_dir)  # training questions out, counted
    for name, ps in problems.items():
        write_problems(ps, out_dir / "problems" / f"{name}.parquet")
    units = _units(models, benches)
    todo = [(i, m, b) for i, m, b in units if not stage.shard_done(i)]
    total = sum(len(problems[b]) for _, _, b in todo) * cfg.evaluate.samples
    log.info(
        "%s: %d models x %d benchmarks x n=%d; %d/%d units to do",
        STAGE,
        len(models),
        len(benches),
        cfg.evaluate.samples,
        len(todo),
        len(units),
    )
    bar = Progress(total=total, desc=STAGE, enabled=show_progress)
    work = [
        (i, {"label": m, "path": models[m], "bench": b, "problems": [p.__dict__ for p in problems[b]]})
        for i, m, b in todo
    ]
    _evaluate_units(stage, cfg, work, backend_factory, bar)
    bar.close()
    return _finish(stage, cfg, models, out_dir)


def _finish(stage: StageDir, cfg: Config, models: dict[str, str], out_dir: Path) -> dict[str, Any]:
    samples = read_table_unfinished(out_dir)
    counts = counts_table(samples)
    write_parquet_atomic(out_dir / "counts.parquet", counts)
    results = {
        "ks": cfg.evaluate.ks or default_ks(cfg.evaluate.samples),
        "samples_per_problem": cfg.evaluate.samples,
        "bootstrap": cfg.evaluate.bootstrap,
        "bootstrap_seed": cfg.run.seed,
        "ci_level": 1 - CI_ALPHA,
        "models": models,
        "model_order": list(models),
        "benchmarks": list(benchmarks(cfg)),
        "results": results_from_counts(
            counts.to_pylist(), cfg.evaluate.ks, n_resamples=cfg.evaluate.bootstrap, seed=cfg.run.seed
        ),
    }
    results["contamination"] = contamination_counts(out_dir)
    count_excluded(results["results"], results["contamination"])
    write_json_atomic(out_dir / "results.json", results)
    totals: Counter[str] = Counter()
    for i in range(len(models) * len(results["benchmarks"])):
        totals.update(stage.shard_counters(i))
    totals["excluded_problems"] = sum(int(r["bad_gold"]) for r in counts.to_pylist())
    totals["contaminated_excluded"] = sum(r["excluded"] for r in results["contamination"].values())
    manifest = stage.finish(dict(totals), {"models": models, "seed": cfg.run.seed})
    metrics = {
        f"{m}/{b}/pass@{k}": v["value"]
        for m, bs in results["results"].items()
        for b, r in bs.items()
        for k, v in r["pass_at_k"].items()
    }
    append_metrics(out_dir.parent, STAGE, {**metrics, "wall_s": manifest["wall_s"]})
    return manifest


def read_table_unfinished(out_dir: Path) -> pa.Table:
    """All sample shards written so far (the stage may not have its manifest yet)."""
    files = sorted((Path(out_dir) / "shards").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else EVAL_SAMPLE_SCHEMA.empty_table()


def read_samples(stage_dir: Path) -> pa.Table:
    """The per-sample rows of a finished evaluate stage."""
    return read_table(stage_dir)
