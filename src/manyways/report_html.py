"""Render a run's (or an experiment's) results as one self-contained HTML page and a text table.

The renderer's only input is :class:`ReportData`, a small JSON-able structure, so the
experiment runner can build one with arms as rows and the ``report`` stage one with models:

- ``results``: row (model or arm) -> benchmark -> the statistics of one evaluate unit, exactly as
  in ``evaluate/results.json`` (``pass_at_k: {"k": {value, ci_low, ci_high}}``, ``mean_at_n``,
  ``problems``, ``samples``, ``excluded``, ``n``);
- ``yields``: heuristic -> share of verified-correct samples;
- ``vendi``, ``composition``, ``judge_validity`` (label -> validity), ``modes``, ``trace_samples``:
  ``analyze/analysis.json``'s sections (rendered by :mod:`manyways.report_sections`);
- ``notes``: free text shown at the top (e.g. what was skipped).

The page has inline SVG figures (:mod:`manyways.plots`), the paper-style table (rows x
benchmarks, pass@1 and pass@k_max with CIs; every number carries ``data-value`` with its full
precision), yield, Vendi and composition tables, and a ``<details>`` browser of traces. All text
from data is HTML-escaped. A tiny inline script records JavaScript errors into
``<body data-js-errors>``, so a headless browser can check the page loads cleanly.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from manyways.plots import bar_svg, pass_at_k_panels_svg

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.label,th.label{text-align:left}.ci{color:#777;font-size:85%}
.note{background:#fff8e0;padding:.5em 1em;border-left:4px solid #e0b000}
details{margin:.3em 0}pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs svg{max-width:520px;height:auto}
"""
_ERROR_HOOK = (
    "<script>document.body.setAttribute('data-js-errors','0');"
    "window.addEventListener('error',function(e){var b=document.body;"
    "b.setAttribute('data-js-errors',String(Number(b.getAttribute('data-js-errors'))+1));"
    "b.setAttribute('data-js-last-error',String(e.message));});</script>"
)


@dataclass
class ReportData:
    """Everything the report shows; see the module docstring for each field's shape."""

    title: str
    results: dict[str, dict[str, dict[str, Any]]]
    row_kind: str = "model"  # "model" or "arm": what a row of the table is
    ci_level: float = 0.95
    samples_per_problem: int | None = None
    yields: dict[str, float] = field(default_factory=dict)
    vendi: dict[str, Any] = field(default_factory=dict)
    composition: dict[str, Any] = field(default_factory=dict)
    judge_validity: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> validity
    modes: dict[str, Any] = field(default_factory=dict)  # analysis.json's "modes", rows as labels
    trace_samples: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    row_order: list[str] | None = None  # display order of rows (JSON files may sort keys)
    benchmark_order: list[str] | None = None  # display order of benchmarks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReportData:
        return cls(**data)

    @property
    def rows(self) -> list[str]:
        """Rows in display order: ``row_order`` first, then any others in insertion order."""
        order = [r for r in self.row_order or [] if r in self.results]
        return order + [r for r in self.results if r not in order]

    @property
    def benchmarks(self) -> list[str]:
        """Benchmarks in display order: ``benchmark_order``, then others by first appearance."""
        seen: dict[str, None] = {}
        for by_bench in self.results.values():
            seen.update(dict.fromkeys(by_bench))
        order = [b for b in self.benchmark_order or [] if b in seen]
        return order + [b for b in seen if b not in order]

    def row_items(self) -> list[tuple[str, dict[str, dict[str, Any]]]]:
        return [(r, self.results[r]) for r in self.rows]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def k_max(data: ReportData, bench: str) -> int | None:
    """The largest k reported for ``bench`` by every row that has it (the table's column)."""
    sets = [{int(k) for k in r[bench]["pass_at_k"]} for r in data.results.values() if bench in r]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def _cell(stats: dict[str, Any] | None, k: int | None) -> str:
    point = (stats or {}).get("pass_at_k", {}).get(str(k)) if k else None
    if point is None:
        return "<td>–</td>"
    ci = ""
    if point.get("ci_low") is not None:
        ci = f' <span class="ci">[{_fmt(point["ci_low"])}, {_fmt(point["ci_high"])}]</span>'
    return (
        f'<td class="num" data-k="{k}" data-value="{point["value"]!r}">'
        f'<span class="v">{_fmt(point["value"])}</span>{ci}</td>'
    )


def results_table(data: ReportData) -> str:
    """The paper's layout: rows = models/arms, columns = benchmark x (pass@1, pass@k_max)."""
    benches = data.benchmarks
    kmaxes = {b: k_max(data, b) for b in benches}
    head1 = "".join(f'<th colspan="2">{_e(b)}</th>' for b in benches)
    head2 = "".join(f"<th>pass@1</th><th>pass@{kmaxes[b]}</th>" for b in benches)
    body = []
    for row, by_bench in data.row_items():
        cells = "".join(_cell(by_bench.get(b), 1) + _cell(by_bench.get(b), kmaxes[b]) for b in benches)
        body.append(f'<tr data-row="{_e(row)}"><td class="label">{_e(row)}</td>{cells}</tr>')
    return (
        f'<table id="results"><tr><th class="label" rowspan="2">{_e(data.row_kind)}</th>{head1}</tr>'
        f"<tr>{head2}</tr>{''.join(body)}</table>"
    )


def sizes_table(data: ReportData) -> str:
    """Problems, samples and excluded (bad gold) per row and benchmark: how much to trust it."""
    rows = []
    for row, by_bench in data.row_items():
        for b, s in by_bench.items():
            rows.append(
                f'<tr><td class="label">{_e(row)}</td><td class="label">{_e(b)}</td>'
                f"<td>{s.get('problems', 0)}</td><td>{s.get('n', '–')}</td><td>{s.get('samples', 0)}</td>"
                f"<td>{s.get('excluded', 0)}</td><td>{_fmt(s.get('mean_at_n'))}</td></tr>"
            )
    return (
        '<table id="sizes"><tr><th class="label">row</th><th class="label">benchmark</th><th>problems</th>'
        f"<th>n per problem</th><th>samples</th><th>excluded</th><th>mean@n</th></tr>{''.join(rows)}</table>"
    )


def row_families(rows: list[str]) -> dict[str, list[str]]:
    """Panels of the pass@k figure: each arm with its mid-trained model (``<arm> (mid)``), plus
    ``base`` in every panel as the reference; rows without such pairs go in panels of <= 6."""
    families: dict[str, list[str]] = {}
    for row in rows:
        if row != "base":
            families.setdefault(row.removesuffix(" (mid)"), []).append(row)
    base = ["base"] if "base" in rows else []
    if families and any(len(members) > 1 for members in families.values()):
        return {name: base + members for name, members in families.items()}
    return {f"rows {i + 1}-{min(i + 6, len(rows))}": rows[i : i + 6] for i in range(0, len(rows), 6)}


def pass_at_k_figures(data: ReportData) -> str:
    """One figure per benchmark, one panel per arm family (readable, not 16 overlapping bands)."""
    figs = []
    for b in data.benchmarks:
        curves = {}
        for row, by_bench in data.row_items():
            points = by_bench.get(b, {}).get("pass_at_k", {})
            if points:
                curves[row] = {
                    int(k): (p["value"], _or(p["ci_low"], p["value"]), _or(p["ci_high"], p["value"]))
                    for k, p in points.items()
                }
        panels = {
            name: {r: curves[r] for r in members if r in curves}
            for name, members in row_families(list(curves)).items()
        }
        panels = {name: c for name, c in panels.items() if c}
        if panels:
            figs.append(
                f'<figure data-benchmark="{_e(b)}">{pass_at_k_panels_svg(panels, f"pass@k: {b}")}</figure>'
            )
    return f'<div class="figs">{"".join(figs)}</div>'


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def yield_html(data: ReportData) -> str:
    if not data.yields:
        return "<p>No yield data (the verify stage was not reachable).</p>"
    rows = "".join(
        f'<tr><td class="label">{_e(h)}</td><td>{_fmt(v)}</td></tr>' for h, v in data.yields.items()
    )
    fig = bar_svg(data.yields, "Yield per heuristic", "share verified correct")
    return (
        f'<div class="figs"><figure>{fig}</figure></div><table id="yield">'
        f'<tr><th class="label">heuristic</th><th>yield</th></tr>{rows}</table>'
    )


def traces_html(data: ReportData) -> str:
    if not data.trace_samples:
        return "<p>No traces to show.</p>"
    items = []
    for t in data.trace_samples:
        verdict = "correct" if t.get("correct") else "not correct"
        items.append(
            f"<details><summary>{_e(t.get('heuristic'))} · {_e(t.get('problem_id'))} · {verdict}"
            f"</summary><p><b>Question</b></p><pre>{_e(t.get('question', ''))}</pre>"
            f"<p><b>Trace</b></p><pre>{_e(t.get('trace', ''))}</pre></details>"
        )
    return "".join(items)


def render_html(data: ReportData) -> str:
    """The whole page as one string (inline CSS and SVG; no external resources)."""
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in data.notes)
    caveat = (
        f"Intervals are {round(data.ci_level * 100)}% percentile-bootstrap intervals over problems; "
        "with few problems they are wide, so read small differences as noise."
    )
    from manyways.report_sections import composition_html, modes_html, validity_html, vendi_html

    sections = [
        ("Results", f"<p>{_e(caveat)}</p>{results_table(data)}{sizes_table(data)}"),
        ("pass@k curves", pass_at_k_figures(data)),
        ("Yield per heuristic", yield_html(data)),
        ("Diversity of the mid-training data (Vendi)", vendi_html(data)),
        ("Heuristic composition", composition_html(data)),
        ("Is the judge any good?", validity_html(data)),
        ("Mode coverage: how many ways each model answers", modes_html(data)),
        ("Traces", traces_html(data)),
    ]
    body = "".join(f"<h2>{_e(title)}</h2>{content}" for title, content in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(data.title)}</title>'
        f"<style>{_CSS}</style></head><body>{_ERROR_HOOK}<h1>{_e(data.title)}</h1>{notes}{body}"
        f'<script type="application/json" id="report-data">{_json_for_script(data)}</script></body></html>'
    )


def _json_for_script(data: ReportData) -> str:
    """The results as JSON inside a script tag ("<" escaped so no tag can close early)."""
    payload = {"results": data.results, "row_kind": data.row_kind}
    return json.dumps(payload, sort_keys=True).replace("<", "\\u003c").replace(">", "\\u003e")


def summary_text(data: ReportData) -> str:
    """A plain-text table for the terminal: pass@1 and pass@k_max [CI] per row and benchmark."""
    lines = [f"{data.title}  ({round(data.ci_level * 100)}% bootstrap CIs over problems)"]
    w = max([16, len(data.row_kind)] + [len(row) for row, _ in data.row_items()])
    for b in data.benchmarks:
        km = k_max(data, b)
        lines.append(f"\n{b}:")
        lines.append(f"  {data.row_kind:<{w}} {'pass@1':>22} {f'pass@{km}':>22} {'problems':>9} {'excl':>5}")
        for row, by_bench in data.row_items():
            s = by_bench.get(b)
            if s is None:
                continue
            lines.append(
                f"  {row:<{w}} {_point_text(s, 1):>22} {_point_text(s, km):>22} "
                f"{s.get('problems', 0):>9} {s.get('excluded', 0):>5}"
            )
    return "\n".join(lines)


def _point_text(stats: dict[str, Any], k: int | None) -> str:
    p = stats.get("pass_at_k", {}).get(str(k)) if k else None
    if p is None:
        return "–"
    ci = f" [{_fmt(p['ci_low'])},{_fmt(p['ci_high'])}]" if p.get("ci_low") is not None else ""
    return f"{_fmt(p['value'])}{ci}"
