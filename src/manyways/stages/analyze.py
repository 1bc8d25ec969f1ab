"""Stage ``analyze``: diversity of the mid-training data, yield per heuristic, heuristic composition.

Inputs: ``inputs["select"]`` (the mid-training rows ``train.parquet``, ``schema.SFT_SCHEMA``),
``inputs["evaluate"]`` (the evaluated traces of each model) and ``inputs["validity"]`` (the
judge's validity on the catalogue's exemplars, :mod:`manyways.stages.validity`, computed once
per judge for every arm); either of the first two may be absent, and the part that needs it is
then skipped with a note; without the third, the exemplars are labelled here.

- Vendi scores of the mid-training traces, for each kernel in ``cfg.analyze.kernels``: overall,
  per problem (mean over problems with >= 2 traces) and per heuristic; the kernel is recorded.
- Yield per heuristic: verify's ``yield.json`` found through the select manifest's inputs, or
  else computed from verify's verdict shards; skipped with a note when neither is reachable.
- Judged analyses (:mod:`manyways.analyses`): heuristic composition of the math benchmarks'
  traces (same problems and samples for every model) and of the mid-training traces, with new
  combinations after RL; judge validity on the catalogue's exemplars; mode coverage of each model.
  The judge (``cfg.analyze.judge_model``, default the base model) answers in a JSON schema
  (constrained decoding) and runs through ``manyways.executor`` (``analyze.executor``).
- A few mid-training traces per heuristic, for the report's trace browser.

Outputs under ``<run>/analyze/``: ``analysis.json``, ``manifest.json``.

CPU command: ``manyways analyze configs/tiny_cpu.yaml``
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from manyways.analyses import run_judged
from manyways.artifacts import (
    StageDir,
    append_metrics,
    read_manifest,
    read_table,
    unit_seed,
    write_json_atomic,
)
from manyways.backends.protocol import GenerationBackend
from manyways.config import Config
from manyways.diversity import kernel_label, vendi_by_group, vendi_of_texts
from manyways.metrics import bootstrap_ci

log = logging.getLogger(__name__)

STAGE = "analyze"
PLAIN = "(plain)"  # heuristic label of rows without a heuristic


def stage_config(cfg: Config) -> dict[str, Any]:
    """The part of the config this stage's output depends on."""
    return {
        "run": {"seed": cfg.run.seed},
        "model": {"name": cfg.model.name},
        "heuristics": {"taxonomy": cfg.heuristics.taxonomy},
        "analyze": cfg.to_dict()["analyze"],
    }


def mid_training_traces(select_dir: Path) -> list[dict[str, Any]]:
    """question, trace, heuristic, problem_id, correct of each mid-training row."""
    read_manifest(select_dir)
    train = Path(select_dir) / "train.parquet"
    table = pq.read_table(train) if train.is_file() else read_table(select_dir)
    out = []
    for r in table.to_pylist():
        msgs = r["messages"] or []
        trace = next((m["content"] for m in reversed(msgs) if m["role"] == "assistant"), "")
        question = next((m["content"] for m in msgs if m["role"] == "user"), "")
        out.append(
            {
                "problem_id": r["problem_id"],
                "heuristic": r["heuristic_id"] or PLAIN,
                "sample_idx": r["sample_idx"],
                "question": question,
                "trace": trace,
                "correct": r["correct"],
                "score": r["score"],
            }
        )
    return out


def vendi_section(
    traces: list[dict[str, Any]], kernels: list[str], ngram_dim: int | None, seed: int = 0
) -> dict[str, Any]:
    """Vendi per kernel (named): the whole set, per question (mean and 95% CI), per heuristic.

    The whole set and the per-heuristic groups use hashed n-grams (``ngram_dim`` features) so the
    eigenproblem stays d x d; per question (a handful of traces) uses the exact n-gram vocabulary.
    """
    texts = [t["trace"] for t in traces]
    out: dict[str, Any] = {"traces": len(texts), "kernels": {}}
    if not texts:
        out["note"] = "no mid-training traces"
        return out
    problems = [t["problem_id"] for t in traces]
    for kernel in kernels:
        k: Any = kernel
        per_q = vendi_by_group(texts, problems, k, ngram_dim=None, min_size=2)
        values = list(per_q.values())
        ci = bootstrap_ci(values, seed=seed) if values else None
        out["kernels"][kernel] = {
            "kernel": kernel,
            "kernel_label": kernel_label(k, ngram_dim),
            "per_question_kernel_label": kernel_label(k, None),
            "overall": vendi_of_texts(texts, k, ngram_dim=ngram_dim),
            "per_problem_mean": sum(values) / len(values) if values else None,
            "per_problem_ci": list(ci) if ci else None,
            "per_problem_max_traces": max(Counter(problems).values()),
            "problems_with_2plus": len(values),
            "per_heuristic": {
                str(h): v
                for h, v in vendi_by_group(
                    texts, [t["heuristic"] for t in traces], k, ngram_dim=ngram_dim
                ).items()
            },
        }
    return out


def _rate(value: Any) -> float | None:
    """A yield value from verify's yield.json: a number, or a dict with a rate or counts."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        for key in ("yield", "rate", "correct_rate", "accuracy"):
            if isinstance(value.get(key), (int, float)):
                return float(value[key])
        total = value.get("total", value.get("samples", value.get("attempts")))
        if isinstance(value.get("correct"), int) and isinstance(total, int) and total:
            return value["correct"] / total
    return None


def _verify_dir(select_dir: Path) -> Path | None:
    inputs = read_manifest(select_dir).get("inputs", {})
    path = inputs.get("verify", {}).get("path")
    return Path(path) if path and Path(path).is_dir() else None


def yield_section(select_dir: Path | None) -> dict[str, Any]:
    """Share of verified-correct samples per heuristic, from the verify stage if reachable."""
    verify_dir = _verify_dir(select_dir) if select_dir else None
    if verify_dir is None:
        return {"per_heuristic": {}, "note": "verify stage not reachable from the select manifest; skipped"}
    yfile = verify_dir / "yield.json"
    if yfile.is_file():
        raw = json.loads(yfile.read_text())
        table = raw.get("per_heuristic", raw) if isinstance(raw, dict) else {}
        rates = {str(k): _rate(v) for k, v in table.items()}
        return {"per_heuristic": {k: v for k, v in rates.items() if v is not None}, "source": str(yfile)}
    try:
        rows = read_table(verify_dir).select(["heuristic_id", "correct"]).to_pylist()
    except Exception as exc:  # an unreadable verify dir is a note, not a failure of analysis
        return {"per_heuristic": {}, "note": f"no yield.json and verdicts unreadable: {exc}"}
    totals, correct = Counter(), Counter()
    for r in rows:
        h = r["heuristic_id"] or PLAIN
        totals[h] += 1
        correct[h] += int(bool(r["correct"]))
    return {
        "per_heuristic": {h: correct[h] / totals[h] for h in totals},
        "source": f"{verify_dir} verdicts",
        "samples": dict(totals),
    }


def trace_samples(traces: list[dict[str, Any]], per_heuristic: int, seed: int) -> list[dict[str, Any]]:
    """A few mid-training traces per heuristic (seeded choice) for the report."""
    by_h: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in traces:
        by_h[t["heuristic"]].append(t)
    out = []
    for h in sorted(by_h):
        ranked = sorted(
            by_h[h], key=lambda t: unit_seed(seed, t["problem_id"], "trace_sample", t["sample_idx"])
        )
        out += [
            {k: t[k] for k in ("heuristic", "problem_id", "question", "trace", "correct", "score")}
            for t in ranked[:per_heuristic]
        ]
    return out


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
    inputs = {k: Path(v) for k, v in (inputs or {}).items() if k in ("select", "evaluate", "validity")}
    stage = StageDir(out_dir, STAGE, stage_config(cfg), inputs)
    if stage.open(overwrite):
        log.info("%s already finished: %s", STAGE, out_dir)
        return read_manifest(out_dir)
    select_dir, eval_dir = inputs.get("select"), inputs.get("evaluate")
    traces = mid_training_traces(select_dir) if select_dir else []
    analysis: dict[str, Any] = {
        "vendi": vendi_section(traces, list(cfg.analyze.kernels), cfg.analyze.ngram_dim, cfg.run.seed),
        "yield": yield_section(select_dir),
        "trace_samples": trace_samples(traces, cfg.analyze.trace_samples, cfg.run.seed),
        "mid_training_rows": len(traces),
    }
    if eval_dir is None or cfg.analyze.max_traces == 0:
        note = "no evaluate input or max_traces=0; skipped"
        analysis["composition"] = {"per_model": {}, "note": note}
        analysis["judge_validity"] = {"note": note}
        analysis["modes"] = {"per_model": {}, "note": note}
    else:
        started = time.perf_counter()
        validity = _validity(inputs.get("validity"))
        analysis.update(run_judged(cfg, eval_dir, traces, judge, validity))
        analysis["judge_wall_s"] = round(time.perf_counter() - started, 3)
    write_json_atomic(out_dir / "analysis.json", analysis)
    counts = _counts(analysis)
    manifest = stage.finish(counts)
    append_metrics(out_dir.parent, STAGE, {**counts, "wall_s": manifest["wall_s"]})
    return manifest


def _validity(validity_dir: Path | None) -> dict[str, Any] | None:
    """The judge-validity summary of a finished ``validity`` stage (None: label here)."""
    if validity_dir is None:
        return None
    read_manifest(validity_dir)  # refuses an unfinished stage
    summary = json.loads((validity_dir / "validity.json").read_text())["summary"]
    return {**summary, "stage_dir": validity_dir.name}


def _counts(analysis: dict[str, Any]) -> dict[str, Any]:
    comp = analysis["composition"].get("per_model", {})
    counts: dict[str, Any] = {
        "mid_training_rows": analysis["mid_training_rows"],
        "trace_samples": len(analysis["trace_samples"]),
    }
    for model, s in comp.items():
        counts[f"judged_{model}"] = s["traces"]
        counts[f"parse_failures_{model}"] = s["parse_failures"]
    for key, n in analysis["composition"].get("left_out", {}).items():
        counts[f"composition_left_out_{key}"] = n
    for kernel, v in analysis["vendi"]["kernels"].items():
        counts[f"vendi_{kernel}"] = v["overall"]
    return counts
