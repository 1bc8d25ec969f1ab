"""The judged analyses of the analyze stage: composition, judge validity, mode coverage.

- Which traces: only evaluated traces of *math* problems (``answer_type == "math"``; code and
  narrative traces against a math taxonomy mean nothing), of ``analyze.benchmarks`` when set (the
  recipe: ``[aime2024]``, the paper's choice); the same (benchmark, problem, sample) keys for every
  model, chosen by a seeded hash, so before-RL and after-RL models are compared on the same
  problems and samples. An empty completion is an ``empty_trace`` failure, counted.
- Composition (:func:`composition_section`): the judge labels those traces and up to
  ``analyze.max_traces`` mid-training traces; per model: multi-heuristic share with a bootstrap
  CI, and the combinations never labelled together in mid-training.
- Judge validity (:func:`validity_section`): the judge labels the catalogue's exemplars, whose
  heuristic we know (mapped to taxonomy ids by ``analyze.catalogue_taxonomy_map``); recall of the
  known heuristic and the share labelled with >= 2 heuristics.
- Mode coverage (:func:`modes_section`): every math sample of each model is assigned to a
  generation heuristic by nearest centroid of the mid-training traces (primary; the catalogue's
  exemplars when there are none, e.g. for the base model), and the
  composed-sampled ones also by the judge with the generation heuristics as its menu; per model
  the effective number of modes per question and the agreement of the two assignments.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from manyways.artifacts import read_table, unit_seed
from manyways.backends.protocol import GenerationBackend
from manyways.composition import (
    ParsedLabels,
    judge_validity,
    multi_share_ci,
    new_combinations,
    summarize_labels,
)
from manyways.heuristics import Taxonomy, TaxonomyEntry, load_catalogue, load_taxonomy, resolve_catalogue_path
from manyways.judging import JudgeJob, run_jobs
from manyways.modes import agreement, centroid_assign, mode_coverage

log = logging.getLogger(__name__)

EMPTY = ParsedLabels(None, "empty_trace")


def _eval_problems(eval_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for f in sorted((eval_dir / "problems").glob("*.parquet")):
        for r in pq.read_table(f, columns=["problem_id", "question", "answer_type"]).to_pylist():
            out[(f.stem, r["problem_id"])] = r
    return out


def eval_traces(
    eval_dir: Path, max_traces: int | None, seed: int, benchmarks: list[str] | None = None
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """Math traces per model on the same seeded keys, and counts of what was left out."""
    cols = ["model", "benchmark", "problem_id", "sample_idx", "completion", "correct"]
    rows = read_table(eval_dir).select(cols).to_pylist()
    problems = _eval_problems(eval_dir)
    present = {r["benchmark"] for r in rows}
    missing = sorted(set(benchmarks or ()) - present)
    # a benchmark evaluated with no problem left (every one excluded, e.g. as contaminated) has
    # nothing to label: counted and logged; one that was never evaluated is a config error
    emptied = [b for b in missing if (eval_dir / "problems" / f"{b}.parquet").exists()]
    if set(missing) - set(emptied):
        raise ValueError(
            f"analyze.benchmarks names {sorted(set(missing) - set(emptied))}, not evaluated "
            f"(have {sorted(present)})"
        )
    if emptied:
        log.warning("analyze.benchmarks %s: evaluated with no problem left, nothing to label", emptied)
    kept, left_out = [], {"not_math": 0, "other_benchmark": 0, "benchmarks_without_problems": len(emptied)}
    for r in rows:
        problem = problems.get((r["benchmark"], r["problem_id"]), {})
        if problem.get("answer_type", "math") != "math":
            left_out["not_math"] += 1
        elif benchmarks is not None and r["benchmark"] not in benchmarks:
            left_out["other_benchmark"] += 1
        else:
            kept.append({**r, "question": problem.get("question")})
    key = lambda r: unit_seed(seed, f"{r['benchmark']}/{r['problem_id']}", "composition", r["sample_idx"])  # noqa: E731
    keys = sorted(
        {(r["benchmark"], r["problem_id"], r["sample_idx"]) for r in kept},
        key=lambda k: key({"benchmark": k[0], "problem_id": k[1], "sample_idx": k[2]}),
    )
    chosen = set(keys[:max_traces] if max_traces is not None else keys)
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in sorted(kept, key=key):
        if (r["benchmark"], r["problem_id"], r["sample_idx"]) in chosen:
            by_model[r["model"]].append(r)
    return dict(by_model), left_out


def _label(cfg: Any, jobs: list[JudgeJob], judge: GenerationBackend | None) -> dict[str, list[ParsedLabels]]:
    """Run the jobs, skipping empty traces (labelled ``empty_trace`` without asking the judge)."""
    live = []
    for job in jobs:
        keep = [i for i, t in enumerate(job.traces) if t.strip()]
        live.append((job, keep))
    sent = [
        JudgeJob(
            job.name,
            job.menu,
            [job.traces[i] for i in keep],
            [job.questions[i] for i in keep],
            job.max_labels,
        )
        for job, keep in live
    ]
    got = run_jobs(cfg, sent, judge)
    out = {}
    for job, keep in live:
        labels = [EMPTY] * len(job.traces)
        for i, lab in zip(keep, got[job.name], strict=True):
            labels[i] = lab
        out[job.name] = labels
    return out


def known_taxonomy_ids(cfg: Any, taxonomy: Taxonomy) -> dict[str, list[str]]:
    """Generation heuristic id -> the taxonomy ids that count as recognising it."""
    mapping: dict[str, list[str]] = {}
    if cfg.analyze.catalogue_taxonomy_map:
        path = resolve_catalogue_path(cfg.analyze.catalogue_taxonomy_map)
        raw = yaml.safe_load(path.read_text()) or {}
        for hid, ids in (raw.get("map") or {}).items():
            unknown = [i for i in ids if i not in taxonomy.ids]
            if unknown:
                raise ValueError(f"{path}: map.{hid} names ids not in the taxonomy: {unknown}")
            mapping[str(hid)] = list(ids)
    return mapping


def generation_menu(cfg: Any) -> Taxonomy:
    """The generation heuristics in use, as a judge menu (id: instruction)."""
    catalogue = load_catalogue(cfg.heuristics.catalogue)
    chosen = catalogue.select(cfg.heuristics.n)
    entries = tuple(TaxonomyEntry(h.id, h.name, " ".join(h.instruction.split())) for h in chosen)
    return Taxonomy(catalogue.version, "generation heuristics", entries)


def validity_job(cfg: Any, taxonomy: Taxonomy) -> tuple[JudgeJob, list[list[str]], list[str]]:
    """The judge-validity job: the catalogue's exemplars (``analyze.validity_per_heuristic`` per
    heuristic), the taxonomy ids that count as a hit for each, and the heuristics left out (no
    taxonomy id known for them)."""
    catalogue = load_catalogue(cfg.heuristics.catalogue)
    mapping = known_taxonomy_ids(cfg, taxonomy)
    per = cfg.analyze.validity_per_heuristic
    exemplars = [
        (h, ex)
        for h in catalogue.heuristics
        for ex in h.exemplars[:per]
        if h.id in mapping or h.id in taxonomy.ids
    ]
    skipped = [h.id for h in catalogue.heuristics if h.id not in mapping and h.id not in taxonomy.ids]
    job = JudgeJob(
        "validity", taxonomy, [ex.solution for _, ex in exemplars], [ex.question for _, ex in exemplars]
    )
    return job, [mapping.get(h.id, [h.id]) for h, _ in exemplars], skipped


def validity_summary(
    labels: list[ParsedLabels], known: list[list[str]], skipped: list[str]
) -> dict[str, Any]:
    return {**judge_validity(labels, known), "skipped_heuristics": skipped}


def run_judged(
    cfg: Any,
    eval_dir: Path,
    mid_traces: list[dict[str, Any]],
    judge: GenerationBackend | None,
    validity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Composition, judge validity and mode coverage, with one pass of the judge over all jobs.
    ``validity``: the summary of a finished ``validity`` stage (else the exemplars are labelled
    here, in the same pass)."""
    a = cfg.analyze
    taxonomy = load_taxonomy(cfg.heuristics.taxonomy)
    per_model, left_out = eval_traces(eval_dir, a.max_traces, cfg.run.seed, a.benchmarks)
    ranked = sorted(
        mid_traces, key=lambda t: unit_seed(cfg.run.seed, t["problem_id"], "composition", t["sample_idx"])
    )
    mid = ranked[: a.max_traces]
    jobs = [JudgeJob("mid_training", taxonomy, [t["trace"] for t in mid], [t["question"] for t in mid])]
    if validity is None:
        vjob, known, skipped = validity_job(cfg, taxonomy)
        jobs.append(vjob)
    for model, rows in per_model.items():
        texts, qs = [r["completion"] for r in rows], [r["question"] for r in rows]
        jobs.append(JudgeJob(f"model:{model}", taxonomy, texts, qs))
    menu = generation_menu(cfg) if a.modes else None
    if menu is not None:
        for model, rows in per_model.items():
            texts, qs = [r["completion"] for r in rows], [r["question"] for r in rows]
            jobs.append(JudgeJob(f"modes:{model}", menu, texts, qs, max_labels=1))
    labels = _label(cfg, jobs, judge)
    if validity is None:
        validity = validity_summary(labels["validity"], known, skipped)
    reference = labels["mid_training"]
    composition: dict[str, Any] = {
        "judge_model": judge.model_id if judge is not None else (a.judge_model or cfg.model.name),
        "taxonomy_version": taxonomy.version,
        "taxonomy_size": len(taxonomy.entries),
        "benchmarks": a.benchmarks or "every math benchmark",
        "left_out": left_out,
        "mid_training": summarize_labels(reference, top=a.top_combinations),
        "per_model": {},
    }
    for model in per_model:
        got = labels[f"model:{model}"]
        composition["per_model"][model] = {
            **summarize_labels(got, top=a.top_combinations),
            "multi_heuristic_share_ci": multi_share_ci(got, cfg.run.seed),
            "new_combinations": new_combinations(got, reference, a.top_combinations),
        }
    out = {"composition": composition, "judge_validity": validity}
    if menu is not None:
        out["modes"] = modes_section(cfg, eval_dir, mid_traces, per_model, labels)
    else:
        out["modes"] = {"per_model": {}, "note": "analyze.modes is off"}
    return out


def modes_section(
    cfg: Any,
    eval_dir: Path,
    mid_traces: list[dict[str, Any]],
    judged: dict[str, list[dict[str, Any]]],
    labels: dict[str, list[ParsedLabels]],
) -> dict[str, Any]:
    """Mode coverage per model (nearest centroid on every math sample) and judge agreement."""
    ref = [t for t in mid_traces if t["heuristic"] != "(plain)"]
    ref_texts, ref_modes = [t["trace"] for t in ref], [t["heuristic"] for t in ref]
    method = "nearest centroid of the mid-training traces (hashed n-grams, cosine)"
    if not ref:  # the base model (or a plain arm): the catalogue's exemplars stand for each heuristic
        catalogue = load_catalogue(cfg.heuristics.catalogue)
        chosen = catalogue.select(cfg.heuristics.n)
        ref_texts = [ex.solution for h in chosen for ex in h.exemplars]
        ref_modes = [h.id for h in chosen for ex in h.exemplars]
        method = "nearest centroid of the catalogue's exemplars (no heuristic mid-training traces; hashed n-grams, cosine)"
    dim = cfg.analyze.ngram_dim or 4096
    every, _ = eval_traces(eval_dir, None, cfg.run.seed, cfg.analyze.benchmarks)
    per_model, agree = {}, {}
    for model, rows in every.items():
        assigned = centroid_assign([r["completion"] for r in rows], ref_texts, ref_modes, ngram_dim=dim)
        samples = [
            {"problem": (r["benchmark"], r["problem_id"]), "mode": m, "correct": r["correct"]}
            for r, m in zip(rows, assigned, strict=True)
        ]
        per_model[model] = mode_coverage(samples, cfg.run.seed)
        by_key = {
            (r["benchmark"], r["problem_id"], r["sample_idx"]): m for r, m in zip(rows, assigned, strict=True)
        }
        judged_rows = judged.get(model, [])
        centroid = [by_key.get((r["benchmark"], r["problem_id"], r["sample_idx"])) for r in judged_rows]
        judge = [lab.ids[0] if lab.ids else None for lab in labels.get(f"modes:{model}", [])]
        agree[model] = agreement(centroid, judge) if judge else {"compared": 0, "agreement": None}
    return {
        "method": method,
        "heuristics": sorted(set(ref_modes)),
        "per_model": per_model,
        "judge_agreement": agree,
    }
