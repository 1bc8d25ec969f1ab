"""Stage ``report``: one self-contained HTML page per run, plus a plain-text summary table.

Inputs: ``inputs["evaluate"]`` (``results.json``) and optionally ``inputs["analyze"]``
(``analysis.json``). Outputs: ``<run>/report.html`` (written atomically) and, under
``<run>/report/``, ``report_data.json`` (the :class:`~manyways.report_html.ReportData` it was
rendered from), ``summary.txt`` and ``manifest.json`` (whose ``summary`` the CLI prints).

``render(run_dir)`` renders any run directory holding ``evaluate/`` (and ``analyze/``); the
experiment runner passes its own ``ReportData`` (arms as rows) with ``render(dir, data)``.

CPU command: ``manyways report configs/tiny_cpu.yaml``
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from manyways.artifacts import StageDir, read_manifest, write_json_atomic, write_text_atomic
from manyways.config import Config
from manyways.report_html import ReportData, render_html, summary_text

log = logging.getLogger(__name__)

STAGE = "report"
HTML_NAME = "report.html"


def stage_config(cfg: Config) -> dict[str, Any]:
    """The report depends only on its inputs (and the run's name in the title)."""
    return {"run": {"name": cfg.run.name}}


def report_data(
    evaluate_dir: Path,
    analyze_dir: Path | None = None,
    *,
    title: str = "manyways report",
    row_kind: str = "model",
) -> ReportData:
    """A ReportData from a finished evaluate stage and, when given, a finished analyze stage."""
    results = json.loads((Path(evaluate_dir) / "results.json").read_text())
    notes = []
    analysis: dict[str, Any] = {}
    if analyze_dir is not None and (Path(analyze_dir) / "analysis.json").is_file():
        analysis = json.loads((Path(analyze_dir) / "analysis.json").read_text())
    else:
        notes.append("No analyze stage output: yield, Vendi, composition and traces are not shown.")
    yields = analysis.get("yield", {})
    if yields.get("note"):
        notes.append(f"Yield: {yields['note']}")
    return ReportData(
        title=title,
        results=results["results"],
        row_kind=row_kind,
        ci_level=results.get("ci_level", 0.95),
        samples_per_problem=results.get("samples_per_problem"),
        yields=yields.get("per_heuristic", {}),
        vendi=analysis.get("vendi", {}),
        composition=_with_reference(analysis.get("composition", {})),
        judge_validity={"this run": analysis["judge_validity"]} if "judge_validity" in analysis else {},
        modes=analysis.get("modes", {}),
        trace_samples=analysis.get("trace_samples", []),
        notes=notes,
        row_order=results.get("model_order") or list(results.get("models", {})),
        benchmark_order=list(results.get("benchmarks", [])),
    )


def _with_reference(composition: dict[str, Any]) -> dict[str, Any]:
    """The run's mid-training labels as the report's one reference row."""
    if not composition.get("mid_training"):
        return composition
    return {**composition, "mid_training": {"this run": composition["mid_training"]}}


def render(run_dir: Path, data: ReportData | None = None) -> Path:
    """Write ``<run_dir>/report.html`` (atomically) from ``data`` or from the run's stages."""
    run_dir = Path(run_dir)
    if data is None:
        analyze = run_dir / "analyze"
        data = report_data(
            run_dir / "evaluate",
            analyze if analyze.is_dir() else None,
            title=f"manyways report: {run_dir.name}",
        )
    path = run_dir / HTML_NAME
    write_text_atomic(path, render_html(data))
    log.info("report: %s", path)
    return path


def run(
    cfg: Config,
    out_dir: Path,
    *,
    inputs: dict[str, Path] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Render the run's report; returns the manifest (its ``summary`` is the terminal table)."""
    inputs = {k: Path(v) for k, v in (inputs or {}).items() if k in ("evaluate", "analyze")}
    if "evaluate" not in inputs:
        raise ValueError("the report needs a finished evaluate stage (inputs['evaluate'])")
    stage = StageDir(out_dir, STAGE, stage_config(cfg), inputs)
    if stage.open(overwrite):
        log.info("%s already finished: %s", STAGE, out_dir)
        return read_manifest(out_dir)
    data = report_data(inputs["evaluate"], inputs.get("analyze"), title=f"manyways report: {cfg.run.name}")
    html_path = render(Path(out_dir).parent, data)
    summary = summary_text(data)
    write_json_atomic(Path(out_dir) / "report_data.json", data.to_dict())
    write_text_atomic(Path(out_dir) / "summary.txt", summary + "\n")
    counts = {
        "rows": len(data.results),
        "benchmarks": len(data.benchmarks),
        "traces": len(data.trace_samples),
    }
    return stage.finish(counts, {"html": str(html_path), "summary": summary})
