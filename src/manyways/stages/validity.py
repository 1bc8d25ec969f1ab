"""Stage ``validity``: is the composition judge any good? It labels the catalogue's exemplars.

The catalogue's exemplars are traces whose heuristic we know. The judge (``analyze.judge_model``,
default the base model, with the ``analyze`` section's judge settings) labels each of them
against the taxonomy, in the same JSON schema as composition labels; the known heuristic counts
as recognised when a label names one of its taxonomy ids (``analyze.catalogue_taxonomy_map``).
Reported: recall of the known heuristic, the share of exemplars labelled with >= 2 heuristics,
and ``low_recall`` when recall is too low for composition numbers to mean anything.

The result depends only on the judge and the catalogue, not on any arm, so an experiment runs
this stage once and every arm's ``analyze`` reads it (content addressing reuses it; an arm that
overrides a judge setting gets its own). ``manyways analyze`` without this stage's output labels
the exemplars itself.

Outputs under ``<run>/validity/``: ``validity.json`` (the summary and one label per exemplar),
``manifest.json``.

CPU command: ``manyways validity configs/tiny_cpu.yaml``
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from manyways.analyses import validity_job, validity_summary
from manyways.artifacts import StageDir, append_metrics, read_manifest, write_json_atomic
from manyways.backends.protocol import GenerationBackend
from manyways.config import Config
from manyways.heuristics import load_taxonomy
from manyways.judging import run_jobs

log = logging.getLogger(__name__)

STAGE = "validity"
OUTPUT = "validity.json"
# what the labels depend on (the executor settings only decide where the judge runs)
JUDGE_KEYS = (
    "judge_backend",
    "judge_model",
    "judge_max_new_tokens",
    "judge_constrain",
    "judge_context_tokens",
    "judge_temperature",
    "judge_shard_size",
    "catalogue_taxonomy_map",
    "validity_per_heuristic",
)


def stage_config(cfg: Config) -> dict[str, Any]:
    """The part of the config this stage's output depends on."""
    analyze = cfg.to_dict()["analyze"]
    return {
        "run": {"seed": cfg.run.seed},
        "model": {"name": cfg.model.name},
        "heuristics": {"catalogue": cfg.heuristics.catalogue, "taxonomy": cfg.heuristics.taxonomy},
        "analyze": {k: analyze[k] for k in JUDGE_KEYS},
    }


def run(
    cfg: Config,
    out_dir: Path,
    *,
    inputs: dict[str, Path] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    judge: GenerationBackend | None = None,
) -> dict[str, Any]:
    """Run the stage into ``out_dir``; ``judge`` replaces the configured judge back-end (tests)."""
    stage = StageDir(out_dir, STAGE, stage_config(cfg), {})
    if stage.open(overwrite):
        log.info("%s already finished: %s", STAGE, out_dir)
        return read_manifest(out_dir)
    taxonomy = load_taxonomy(cfg.heuristics.taxonomy)
    job, known, skipped = validity_job(cfg, taxonomy)
    labels = run_jobs(cfg, [job], judge)[job.name]
    summary = validity_summary(labels, known, skipped)
    rows = [{"known": k, "labels": lab.ids, "error": lab.error} for k, lab in zip(known, labels, strict=True)]
    write_json_atomic(out_dir / OUTPUT, {"summary": summary, "exemplars": rows})
    counts = {k: summary[k] for k in ("exemplars", "parsed")}
    counts["recall"] = summary["recall"]
    manifest = stage.finish(counts)
    append_metrics(out_dir.parent, STAGE, {**counts, "wall_s": manifest["wall_s"]})
    log.info(
        "judge validity: recall %s on %d exemplars (%d parsed)",
        summary["recall"],
        summary["exemplars"],
        summary["parsed"],
    )
    return manifest
