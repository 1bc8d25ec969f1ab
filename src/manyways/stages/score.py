"""Stage ``score``: how well each correct attempt follows the heuristic it was prompted with.

For every attempt the verify stage judged correct (and, with ``score.include_incorrect``, every
attempt judged ``incorrect``), ``score.scorer`` gives an adherence score (see
:mod:`manyways.scorers`): ``judge`` (P(Yes) of an LLM judge), ``reward_model`` (the logit of a
sequence-classification reward model) or ``none`` (0 for all). Scores are cached by content hash
under ``<MANYWAYS_CACHE>/scores/`` (or ``score.cache_dir``), so re-scoring the same text costs
nothing; hits are counted in the manifest. Shards run over ``score.executor`` (local, or Ray actors
with a scorer and the GPUs it needs each: :func:`manyways.executor.map_shards`), output identical.

Inputs: ``generate`` (``problems.parquet`` + attempt shards) and ``verify`` (verdict shards).
Outputs under ``<run>/score/``: ``shards/part-*.parquet`` (:class:`~manyways.schema.ScoreRow`
rows; shard i scores generate's shard i; resumable), ``manifest.json``.

CPU command: ``manyways score configs/tiny_cpu.yaml``
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from manyways.artifacts import StageDir, append_metrics, read_manifest
from manyways.config import EXECUTOR_KEYS, Config
from manyways.heuristics import Heuristic, load_catalogue
from manyways.progress import Progress
from manyways.schema import SCORE_SCHEMA, ScoreRow, rows_to_table
from manyways.scorers import LazyScorer, ScoreCache, ScoreItem, Scorer, score_with_cache

log = logging.getLogger(__name__)

STAGE = "score"


def stage_config(cfg: Config) -> dict[str, Any]:
    """The part of the config the scores depend on (the cache location is not part of it)."""
    section = cfg.score.model_dump(mode="json")
    for key in ("cache_dir", *EXECUTOR_KEYS):  # where scores are cached or computed changes no score
        section.pop(key)
    if cfg.score.scorer == "none":
        return {"score": {"scorer": "none", "include_incorrect": cfg.score.include_incorrect}}
    return {"score": section, "model": cfg.model.name, "catalogue": cfg.heuristics.catalogue}


def shard_indices(stage_dir: Path) -> list[int]:
    """Indices of the ``shards/part-*.parquet`` files of a finished stage."""
    return sorted(int(p.stem.split("-")[1]) for p in (Path(stage_dir) / "shards").glob("part-*.parquet"))


def read_shard(stage_dir: Path, index: int) -> list[dict[str, Any]]:
    return pq.read_table(Path(stage_dir) / "shards" / f"part-{index:05d}.parquet").to_pylist()


def wanted_statuses(cfg: Config) -> set[str]:
    return {"correct", "incorrect"} if cfg.score.include_incorrect else {"correct"}


def _key(row: dict[str, Any]) -> tuple[str, str | None, int]:
    return row["problem_id"], row["heuristic_id"], int(row["sample_idx"])


def shard_items(
    attempts: list[dict[str, Any]],
    verdicts: list[dict[str, Any]],
    statuses: set[str],
    questions: dict[str, str],
    heuristics: dict[str, Heuristic],
) -> tuple[list[dict[str, Any]], list[ScoreItem]]:
    """The attempts of one shard to score, with their score items."""
    status = {_key(v): v["status"] for v in verdicts}
    rows, items = [], []
    for a in attempts:
        if status.get(_key(a)) not in statuses or not a["completion"].strip():
            continue
        heuristic = heuristics[a["heuristic_id"]] if a["heuristic_id"] else None
        rows.append(a)
        items.append(ScoreItem(heuristic, questions[a["problem_id"]], a["completion"]))
    return rows, items


def score_shard(
    scorer: Scorer, cache: ScoreCache | None, rows: list[dict[str, Any]], items: list[ScoreItem]
) -> tuple[list[ScoreRow], dict[str, int]]:
    scores, hits = score_with_cache(scorer, cache, items)
    out = [
        ScoreRow(r["problem_id"], r["heuristic_id"], int(r["sample_idx"]), scorer.name, s)
        for r, s in zip(rows, scores, strict=True)
    ]
    counters = {
        "rows": len(out),
        "cache_hits": hits,
        "computed": len(out) - hits,
        "plain_unjudged": sum(1 for it in items if it.heuristic is None) if scorer.name == "judge" else 0,
    }
    return out, counters


def open_cache(cfg: Config) -> ScoreCache | None:
    if cfg.score.scorer == "none":
        return None
    from manyways.models import cache_dir

    root = Path(cfg.score.cache_dir) if cfg.score.cache_dir else cache_dir() / "scores"
    return ScoreCache(root / "scores.sqlite")


def scorer_gpus(section: Any) -> float | str:
    """GPUs one scoring worker needs: the judge's back-end's (:func:`~manyways.executor.backend_gpus`);
    a reward model 1 on cuda, "auto" (1 where the cluster has GPUs) when the device is left open."""
    from manyways.executor import backend_gpus

    if section.scorer == "judge":
        return backend_gpus(section.backend)
    if section.scorer == "reward_model":
        if section.device is None:
            return "auto"
        return 1 if str(section.device).startswith("cuda") else 0
    return 0


class ScoreWorker:
    """Scores whole shards (read from the generate and verify directories, which Ray workers on
    other machines must see on a shared file system, as they see the models); holds the scorer,
    whose model is loaded on the first cache miss, and a connection to the shared score cache."""

    def __init__(self, cfg_dict: dict[str, Any], generate_dir: str, verify_dir: str) -> None:
        from manyways.config import config_from_dict
        from manyways.data import read_problems

        self.cfg = config_from_dict(cfg_dict)
        self.gen, self.ver = Path(generate_dir), Path(verify_dir)
        self.questions = {p.problem_id: p.question for p in read_problems(self.gen / "problems.parquet")}
        self.heuristics = {h.id: h for h in load_catalogue(self.cfg.heuristics.catalogue).heuristics}
        self.scorer = LazyScorer(self.cfg.score, self.cfg.model.name)
        self.cache = open_cache(self.cfg)

    def __call__(self, index: int) -> dict[str, Any]:
        attempts, verdicts = read_shard(self.gen, index), read_shard(self.ver, index)
        rows, items = shard_items(
            attempts, verdicts, wanted_statuses(self.cfg), self.questions, self.heuristics
        )
        out, counters = score_shard(self.scorer, self.cache, rows, items) if items else ([], {"rows": 0})
        return {"rows": out, "counters": {**counters, "attempts": len(attempts)}}

    def close(self) -> None:
        self.scorer.close()
        if self.cache is not None:
            self.cache.close()


def score_shards(
    cfg: Config, stage: StageDir, inputs: dict[str, Path], todo: list[int], bar: Progress
) -> None:
    """Score and write the given shards over ``score.executor`` (local or Ray actors, one scorer
    each, each with the GPUs its back-end needs); the driver alone writes shards."""
    import functools

    from manyways.executor import map_shards

    def on_result(index: int, result: dict[str, Any]) -> None:
        stage.write_shard(index, rows_to_table(result["rows"], SCORE_SCHEMA), result["counters"])
        bar.update(result["counters"]["attempts"])

    s = cfg.score
    map_shards(
        functools.partial(ScoreWorker, cfg.to_dict(), str(inputs["generate"]), str(inputs["verify"])),
        [(i, i) for i in todo],
        on_result,
        executor=s.executor,
        workers=s.workers,
        ray_address=s.ray_address,
        ray_num_cpus=s.ray_num_cpus,
        num_gpus=scorer_gpus(s),
    )


def run(
    cfg: Config,
    out_dir: Path,
    *,
    inputs: dict[str, Path] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the stage into ``out_dir``; returns the manifest (existing one when already done)."""
    inputs = {k: Path(v) for k, v in (inputs or {}).items()}
    for need in ("generate", "verify"):
        if need not in inputs:
            raise ValueError(f"stage {STAGE} needs the {need} stage's output (inputs[{need!r}])")
    stage = StageDir(out_dir, STAGE, stage_config(cfg), inputs={k: inputs[k] for k in ("generate", "verify")})
    if stage.open(overwrite):
        log.info("%s already finished: %s", STAGE, out_dir)
        return read_manifest(out_dir)
    indices = shard_indices(inputs["generate"])
    todo = [i for i in indices if not stage.shard_done(i)]
    done = sum(stage.shard_counters(i).get("attempts", 0) for i in indices if i not in todo)
    total = int(read_manifest(inputs["verify"])["counts"].get("rows", 0))
    bar = Progress(total=total, initial=done, desc=STAGE, enabled=show_progress)
    try:
        score_shards(cfg, stage, inputs, todo, bar)
    finally:
        bar.close()
    counts: Counter[str] = Counter()
    for i in indices:
        counts.update(stage.shard_counters(i))
    manifest = stage.finish(dict(counts), {"scorer": cfg.score.scorer, "shards": len(indices)})
    append_metrics(out_dir.parent, STAGE, {**dict(counts), "wall_s": manifest["wall_s"]})
    log.info(
        "%s: %d scored (%d cache hits) with %s in %.1fs -> %s",
        STAGE,
        counts["rows"],
        counts["cache_hits"],
        cfg.score.scorer,
        manifest["wall_s"],
        out_dir,
    )
    return manifest
