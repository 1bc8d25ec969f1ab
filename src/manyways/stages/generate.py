"""Stage ``generate``: sample solutions to every question under each Pólya heuristic.

For each problem x each heuristic of the chosen subset x k samples, render the heuristic's
prompt with its few-shot exemplars and sample from the base model (``mode: heuristic``), from the
question alone (``plain``: STaR and vanilla baselines), or from a teacher model with heuristic
prompts (``teacher``: the distillation baseline). Optional adaptive sampling samples each pair in
rounds and stops once ``accept_target`` samples verify as correct.

Inputs: the config's ``data.train`` source. Outputs under ``<run>/generate/``:
``problems.parquet`` (the questions and golds, for later stages), ``shards/part-*.parquet``
(:class:`~manyways.schema.Attempt` rows), ``manifest.json``.

CPU command: ``manyways generate configs/tiny_cpu.yaml``
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from manyways.artifacts import StageDir, append_metrics, chunks, unit_seed
from manyways.backends.protocol import GenRequest, GenSample
from manyways.config import Config
from manyways.executor import backend_gpus, map_shards
from manyways.heuristics import (
    Heuristic,
    load_catalogue,
    prompt_hash,
    render_heuristic_messages,
    render_plain_messages,
)
from manyways.progress import Progress
from manyways.schema import ATTEMPT_SCHEMA, Attempt, Problem, rows_to_table

log = logging.getLogger(__name__)

STAGE = "generate"
CONFIG_SECTIONS = ("run", "model", "data", "heuristics", "generate")


def stage_config(cfg: Config) -> dict[str, Any]:
    """The part of the config this stage's output depends on."""
    data = cfg.to_dict()
    out = {k: data[k] for k in CONFIG_SECTIONS}
    out["data"] = {"train": data["data"]["train"], "skip_bad": data["data"]["skip_bad"]}
    out["run"] = {"seed": data["run"]["seed"]}
    return out


def selected_heuristics(cfg: Config) -> tuple[list[Heuristic | None], dict[str, str]]:
    """The heuristics to prompt with ([None] in plain mode) and the catalogue's identity."""
    catalogue = load_catalogue(cfg.heuristics.catalogue)
    ident = {"catalogue_version": catalogue.version, "catalogue_hash": catalogue.content_hash}
    if cfg.generate.mode == "plain":
        return [None], ident
    chosen = (
        catalogue.select(ids=cfg.heuristics.ids) if cfg.heuristics.ids else catalogue.select(cfg.heuristics.n)
    )
    return list(chosen), ident


def render_messages(question: str, heuristic: Heuristic | None, n_exemplars: int) -> list[dict[str, str]]:
    if heuristic is None:
        return render_plain_messages(question)
    return render_heuristic_messages(question, heuristic, n_exemplars=n_exemplars)


def generator_model(cfg: Config) -> str:
    """The model that samples: the teacher in teacher mode, else the base model."""
    if cfg.generate.mode == "teacher":
        if not cfg.generate.teacher_model:
            raise ValueError("generate.mode=teacher needs generate.teacher_model")
        return cfg.generate.teacher_model
    return cfg.generate.backend.model or cfg.model.name


class GenerateWorker:
    """Generates one shard of problems; holds the back-end (one model load per worker)."""

    def __init__(self, cfg_dict: dict[str, Any], heuristic_ids: list[str | None]):
        from manyways.config import config_from_dict

        self.cfg = config_from_dict(cfg_dict)
        catalogue = load_catalogue(self.cfg.heuristics.catalogue)
        self.heuristics = [catalogue.get(h) if h else None for h in heuristic_ids]
        self.backend: Any = None

    def _backend(self) -> Any:
        if self.backend is None:
            from manyways.backends.config import make_backend

            self.backend = make_backend(
                self.cfg.generate.backend.model_copy(update={"model": None}), generator_model(self.cfg)
            )
        return self.backend

    def __call__(self, shard: dict[str, Any]) -> dict[str, Any]:
        problems = [Problem(**p) for p in shard["problems"]]
        progress = shard.get("progress")
        if self.cfg.generate.adaptive.enabled:
            from manyways.stages.adaptive import generate_adaptive

            rows, extra = generate_adaptive(self, problems)
        else:
            pairs = [
                (p, h, list(range(self.cfg.generate.samples))) for p in problems for h in self.heuristics
            ]
            rows, extra = self.sample_pairs(pairs, progress), {}
        return {"rows": rows, "counters": {**count_rows(rows), **extra}}

    def sample_pairs(
        self, pairs: list[tuple[Problem, Heuristic | None, list[int]]], progress: Any = None
    ) -> list[Attempt]:
        """Sample the given sample indices of each (problem, heuristic) pair, with retries."""
        g = self.cfg.generate
        requests, metas = [], []
        for problem, heuristic, sample_idxs in pairs:
            hid = heuristic.id if heuristic else None
            messages = render_messages(problem.question, heuristic, self.cfg.heuristics.exemplars)
            seeds = tuple(unit_seed(self.cfg.run.seed, problem.problem_id, hid, i) for i in sample_idxs)
            requests.append(
                GenRequest(
                    f"{problem.problem_id}|{hid}",
                    messages,
                    seeds,
                    g.max_new_tokens,
                    g.temperature,
                    g.top_p,
                    tuple(g.stop),
                )
            )
            metas.append((problem, hid, sample_idxs, messages))
        results = self._generate_with_retries(requests, progress)
        return [
            self._attempt(problem, hid, idx, req.seeds[j], messages, sample)
            for (problem, hid, idxs, messages), req, samples in zip(metas, requests, results, strict=True)
            for j, (idx, sample) in enumerate(zip(idxs, samples, strict=True))
        ]

    def _generate_with_retries(self, requests: list[GenRequest], progress: Any) -> list[list[GenSample]]:
        attempts = self.cfg.generate.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._backend().generate(requests, progress=progress)
            except Exception as exc:  # a back-end error: retry a bounded number of times
                if attempt == attempts:
                    raise RuntimeError(
                        f"back-end failed {attempts} times: {type(exc).__name__}: {exc}"
                    ) from exc
                log.warning("back-end error (attempt %d/%d): %s; retrying", attempt, attempts, exc)
        raise AssertionError("unreachable")

    def _attempt(
        self,
        problem: Problem,
        hid: str | None,
        idx: int,
        seed: int,
        messages: list[dict[str, str]],
        sample: GenSample,
    ) -> Attempt:
        backend = self._backend()
        return Attempt(
            problem_id=problem.problem_id,
            heuristic_id=hid,
            sample_idx=idx,
            seed=seed,
            model=backend.model_id,
            backend=backend.name,
            mode=self.cfg.generate.mode,
            prompt_hash=prompt_hash(messages),
            prompt=json.dumps(messages, ensure_ascii=False),
            completion=sample.text,
            finish_reason=sample.finish_reason,
            prompt_tokens=sample.prompt_tokens,
            completion_tokens=sample.completion_tokens,
        )


def count_rows(rows: list[Attempt]) -> dict[str, int]:
    """Counters of a shard: rows, finish reasons, empty completions, tokens."""
    c: Counter[str] = Counter()
    for r in rows:
        c["rows"] += 1
        c[f"finish_{r.finish_reason}"] += 1
        c["empty_completions"] += int(not r.completion.strip())
        c["prompt_tokens"] += r.prompt_tokens
        c["completion_tokens"] += r.completion_tokens
    return dict(c)


def load_train_problems(cfg: Config) -> tuple[list[Problem], dict[str, int]]:
    from manyways.data import load_problems

    result = load_problems(cfg.data.train, skip_bad=cfg.data.skip_bad)
    for bad in result.set_aside:
        log.warning("set aside: %s", bad)
    return list(result.problems), dict(result.counts)


def run(
    cfg: Config,
    out_dir: Path,
    *,
    inputs: dict[str, Path] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the stage into ``out_dir``; returns the manifest (existing one when already done)."""
    from manyways.artifacts import read_manifest
    from manyways.data import write_problems

    stage = StageDir(out_dir, STAGE, stage_config(cfg))
    if stage.open(overwrite):
        log.info("%s already finished: %s", STAGE, out_dir)
        return read_manifest(out_dir)
    problems, load_counts = load_train_problems(cfg)
    heuristics, ident = selected_heuristics(cfg)
    write_problems(problems, out_dir / "problems.parquet")
    shards = list(chunks(problems, cfg.generate.shard_size))
    todo = [(i, {"problems": [p.__dict__ for p in ps]}) for i, ps in shards if not stage.shard_done(i)]
    per_pair = cfg.generate.adaptive.max_samples if cfg.generate.adaptive.enabled else cfg.generate.samples
    total = len(problems) * len(heuristics) * per_pair
    done_rows = sum(stage.shard_counters(i).get("rows", 0) for i, _ in shards if stage.shard_done(i))
    log.info(
        "%s: %d problems x %d heuristics x %d samples; %d/%d shards to do",
        STAGE,
        len(problems),
        len(heuristics),
        per_pair,
        len(todo),
        len(shards),
    )
    bar = Progress(total=total, initial=done_rows, desc=STAGE, enabled=show_progress)

    def on_result(index: int, result: dict[str, Any]) -> None:
        stage.write_shard(index, rows_to_table(result["rows"], ATTEMPT_SCHEMA), result["counters"])
        bar.shard_done(result["counters"].get("rows", 0), result["counters"].get("completion_tokens", 0))

    ids = [h.id if h else None for h in heuristics]
    local = cfg.generate.executor == "local"
    if local:
        todo = [(i, {**item, "progress": bar.update}) for i, item in todo]
    map_shards(
        _factory(cfg.to_dict(), ids),
        todo,
        on_result,
        executor=cfg.generate.executor,
        workers=cfg.generate.workers,
        ray_address=cfg.generate.ray_address,
        ray_num_cpus=cfg.generate.ray_num_cpus,
        num_gpus=backend_gpus(cfg.generate.backend),
    )
    bar.close()
    counts: Counter[str] = Counter()
    for i, _ in shards:
        counts.update(stage.shard_counters(i))
    counts.update({f"load_{k}": v for k, v in load_counts.items()})
    counts["problems"] = len(problems)
    extra: dict[str, Any] = {}
    if cfg.generate.adaptive.enabled:
        from manyways.stages.adaptive import adaptive_summary

        extra["adaptive"] = adaptive_summary(counts)
    manifest = stage.finish(
        dict(counts),
        {
            **ident,
            "heuristic_ids": ids,
            "seed": cfg.run.seed,
            "model": generator_model(cfg),
            "shards": len(shards),
            **extra,
        },
    )
    append_metrics(
        out_dir.parent, STAGE, {**dict(counts), **extra.get("adaptive", {}), "wall_s": manifest["wall_s"]}
    )
    log.info(
        "%s: %d rows (%s) in %.1fs -> %s",
        STAGE,
        counts["rows"],
        ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k.startswith("finish_")),
        manifest["wall_s"],
        out_dir,
    )
    return manifest


def _factory(cfg_dict: dict[str, Any], ids: list[str | None]) -> Any:
    import functools

    return functools.partial(GenerateWorker, cfg_dict, ids)
