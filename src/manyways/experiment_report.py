"""The experiment's comparison report: arms as rows, built from each arm's stage outputs.

Rows: ``base`` (evaluated once), ``<arm> (mid)`` (the mid-trained model before RL) and
``<arm>`` (after RL). Vendi scores are shown per arm and kernel; composition, mode coverage per
row (with each arm's mid-training traces as the composition reference); judge validity per arm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from manyways.config import Config
from manyways.report_html import ReportData, summary_text

LABELS = {"base": "{arm}", "midtrain": "{arm} (mid)", "rl": "{arm}"}


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _rows(evaluate_dir: Path, arm: str) -> dict[str, dict[str, Any]]:
    results = _json(evaluate_dir / "results.json").get("results", {})
    return {
        LABELS.get(label, "{arm} " + label).format(arm=arm): by_bench for label, by_bench in results.items()
    }


def _merge_analysis(data: ReportData, analysis: dict[str, Any], arm: str) -> None:
    for label, stats in analysis.get("composition", {}).get("per_model", {}).items():
        data.composition.setdefault("per_model", {})[LABELS.get(label, label).format(arm=arm)] = stats
    for key in ("judge_model", "taxonomy_version", "benchmarks"):
        if key in analysis.get("composition", {}):
            data.composition[key] = analysis["composition"][key]
    if analysis.get("composition", {}).get("mid_training", {}).get("traces"):
        data.composition.setdefault("mid_training", {})[arm] = analysis["composition"]["mid_training"]
    if "recall" in analysis.get("judge_validity", {}):
        data.judge_validity[arm] = analysis["judge_validity"]
    modes = analysis.get("modes", {})
    for label, coverage in modes.get("per_model", {}).items():
        row = LABELS.get(label, label).format(arm=arm)
        data.modes.setdefault("per_model", {})[row] = coverage
        data.modes.setdefault("judge_agreement", {})[row] = modes.get("judge_agreement", {}).get(label, {})
        data.modes["method"] = modes.get("method")
    vendi = analysis.get("vendi", {})
    for kernel, scores in vendi.get("kernels", {}).items():
        data.vendi.setdefault("kernels", {})[f"{arm} / {kernel}"] = scores
    if vendi.get("traces"):
        data.vendi["traces"] = data.vendi.get("traces", 0) + vendi["traces"]
    per_heuristic = analysis.get("yield", {}).get("per_heuristic", {})
    if len(per_heuristic) > len(data.yields):  # the widest generation's yield
        data.yields = per_heuristic
        data.trace_samples = analysis.get("trace_samples", [])


def build_report_data(cfg: Config, base: dict[str, Path], arms: dict[str, dict[str, Any]]) -> ReportData:
    base_results = _json(base["evaluate"] / "results.json")
    data = ReportData(
        title=f"manyways experiment: {cfg.run.name}",
        results={},
        row_kind="arm",
        samples_per_problem=base_results.get("samples_per_problem"),
        benchmark_order=list(base_results.get("benchmarks", [])),
    )
    data.results.update(_rows(base["evaluate"], "base"))
    _merge_analysis(data, _json(base["analyze"] / "analysis.json"), "base")
    for arm, record in arms.items():
        stages = record["stages"]
        data.results.update(_rows(Path(stages["evaluate"]["dir"]), arm))
        if "analyze" in stages:
            _merge_analysis(data, _json(Path(stages["analyze"]["dir"]) / "analysis.json"), arm)
    data.row_order = list(data.results)
    first_row = next(iter(data.results.values()), {})
    sizes = ", ".join(f"{bench}: {stats.get('problems')} problems" for bench, stats in first_row.items())
    data.notes.append(
        f"Sample sizes: {sizes}; n={data.samples_per_problem} samples per problem. "
        "Confidence intervals are bootstrap over problems; on a run this small, differences inside "
        "them are noise, not findings."
    )
    return data


def write_experiment_report(
    cfg: Config, base: dict[str, Path], arms: dict[str, dict[str, Any]]
) -> tuple[Path, str]:
    """Write ``<run>/report.html`` and ``<run>/summary.txt``; return (html path, summary)."""
    from manyways.artifacts import write_json_atomic, write_text_atomic
    from manyways.report_html import render_html

    data = build_report_data(cfg, base, arms)
    html_path = cfg.run_dir / "report.html"
    write_text_atomic(html_path, render_html(data))
    write_json_atomic(cfg.run_dir / "report_data.json", data.to_dict())
    summary = summary_text(data)
    write_text_atomic(cfg.run_dir / "summary.txt", summary + "\n")
    return html_path, summary
