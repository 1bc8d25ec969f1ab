"""The analyses' sections of the HTML report: Vendi, composition, judge validity, mode coverage.

Each takes the :class:`~manyways.report_html.ReportData` and returns an HTML fragment with one
grouped figure for the analysis (arms or models as groups, CIs as error bars) and a table whose
numbers carry ``data-value``. A judge whose recall on known heuristics is low is said to make the
composition numbers noise, in those words.
"""

from __future__ import annotations

from manyways.plots import grouped_bar_svg
from manyways.report_html import ReportData, _e, _fmt


def _split_label(name: str) -> tuple[str, str]:
    """("arm", "kernel") from an experiment's "arm / kernel" key; a run's key is just the kernel."""
    arm, _, kernel = name.rpartition(" / ")
    return (arm or "mid-training data", kernel)


def vendi_html(data: ReportData) -> str:
    kernels = data.vendi.get("kernels", {})
    if not kernels:
        return f"<p>No Vendi scores ({_e(data.vendi.get('note', 'no mid-training data'))}).</p>"
    rows, groups = [], {}
    for name, v in kernels.items():
        arm, kernel = _split_label(name)
        ci = v.get("per_problem_ci") or [None, None]
        rows.append(
            f'<tr><td class="label">{_e(arm)}</td><td class="label">{_e(v.get("per_question_kernel_label", kernel))}</td>'
            f'<td data-value="{v.get("per_problem_mean")!r}">{_fmt(v.get("per_problem_mean"), 2)} '
            f'<span class="ci">[{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]</span></td>'
            f"<td>{v.get('problems_with_2plus', 0)}</td><td>{v.get('per_problem_max_traces', '–')}</td>"
            f'<td>{_fmt(v["overall"], 2)}</td><td class="label">{_e(v.get("kernel_label", kernel))}</td></tr>'
        )
        if v.get("per_problem_mean") is not None:
            groups.setdefault(arm, {})[kernel] = (v["per_problem_mean"], ci[0], ci[1])
    fig = (
        grouped_bar_svg(groups, "Per-question Vendi of the mid-training traces", "Vendi (mean, 95% CI)")
        if groups
        else ""
    )
    return (
        "<p>Per-question Vendi: the Vendi score of one question's traces (at most the number of traces "
        "per question), averaged over questions with a bootstrap CI: the paper's figure. Whole set: the "
        "Vendi score of all mid-training traces at once. Each number names its kernel.</p>"
        f'<div class="figs"><figure id="vendi-figure">{fig}</figure></div>'
        '<table id="vendi"><tr><th class="label">arm</th><th class="label">per-question kernel</th>'
        "<th>per-question Vendi [CI]</th><th>questions (≥2 traces)</th><th>max traces per question</th>"
        f'<th>whole-set Vendi</th><th class="label">whole-set kernel</th></tr>{"".join(rows)}</table>'
    )


def _ci_text(ci: list[float] | None) -> str:
    return f' <span class="ci">[{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]</span>' if ci else ""


def composition_html(data: ReportData) -> str:
    per_model = data.composition.get("per_model", {})
    if not per_model:
        return f"<p>No composition analysis ({_e(data.composition.get('note', 'skipped'))}).</p>"
    rows, groups = [], {}
    reference = {f"{arm} mid-training data": s for arm, s in data.composition.get("mid_training", {}).items()}
    for model, s in {**reference, **per_model}.items():
        combos = "; ".join(
            f"{_e(c['combination'])} ({c['count']})" for c in s.get("top_combinations", [])[:5]
        )
        new = "; ".join(f"{_e(c['combination'])} ({c['count']})" for c in s.get("new_combinations", [])[:5])
        reasons = ", ".join(f"{_e(k)}: {v}" for k, v in s.get("failure_reasons", {}).items())
        share, ci = s.get("multi_heuristic_share"), s.get("multi_heuristic_share_ci")
        rows.append(
            f'<tr data-row="{_e(model)}"><td class="label">{_e(model)}</td><td>{s["traces"]}</td><td>{s["parsed"]}</td>'
            f"<td>{_fmt(s.get('parse_failure_rate'), 2)}</td><td>{_fmt(share, 2)}{_ci_text(ci)}</td>"
            f'<td class="label">{combos or "–"}</td><td class="label new">{new or "–"}</td>'
            f'<td class="label">{reasons or "–"}</td></tr>'
        )
        if share is not None:
            low, high = ci or (None, None)
            groups[model] = {"share with ≥2 heuristics": (share, low, high)}
    examples = "".join(
        f"<details><summary>Unparsed judge answers: {_e(model)}</summary>"
        + "".join(f"<pre>{_e(x)}</pre>" for x in s["failure_examples"])
        + "</details>"
        for model, s in per_model.items()
        if s.get("failure_examples")
    )
    fig = grouped_bar_svg(groups, "Traces combining several heuristics", "share (95% CI)") if groups else ""
    judge = _e(data.composition.get("judge_model", "?"))
    benches = data.composition.get("benchmarks", "every math benchmark")
    return (
        f"<p>Judge: {judge}. Traces of {_e(benches)} only; the same problems and samples for every model; "
        "the share is over parsed traces. New combinations: heuristics labelled together after training "
        "that the judge never labelled together in the mid-training traces.</p>"
        f'<div class="figs"><figure id="composition-figure">{fig}</figure></div>'
        '<table id="composition"><tr><th class="label">model</th><th>traces</th><th>parsed</th>'
        "<th>parse-failure rate</th><th>share with ≥2 heuristics [CI]</th>"
        '<th class="label">top combinations</th><th class="label">new combinations</th>'
        f'<th class="label">failure reasons</th></tr>{"".join(rows)}</table>{examples}'
    )


def validity_html(data: ReportData) -> str:
    """Recall of the known heuristic on the catalogue's exemplars, in words when it is low."""
    if not data.judge_validity or all("recall" not in v for v in data.judge_validity.values()):
        return "<p>No judge-validity check (no judged analyses in this run).</p>"
    rows, warnings = [], []
    for label, v in data.judge_validity.items():
        if "recall" not in v:
            continue
        rows.append(
            f'<tr><td class="label">{_e(label)}</td><td>{v["exemplars"]}</td><td>{v["parsed"]}</td>'
            f'<td data-value="{v["recall"]!r}">{_fmt(v["recall"], 2)}</td><td>{_fmt(v.get("multi_label_share"), 2)}</td></tr>'
        )
        if v.get("low_recall"):
            warnings.append(
                f'<p class="note low-recall">{_e(label)}: the judge recognises the known heuristic in only '
                f"{round(100 * v['recall'])}% of the catalogue's exemplars. A judge that cannot recognise a "
                "known heuristic makes the composition numbers above noise, not measurements.</p>"
            )
    return (
        "<p>Before labelling, the judge labels the catalogue's exemplars, whose heuristic is known.</p>"
        + "".join(warnings)
        + '<table id="judge-validity"><tr><th class="label">run</th><th>exemplars</th><th>parsed</th>'
        f"<th>recall of the known heuristic</th><th>share labelled with ≥2</th></tr>{''.join(rows)}</table>"
    )


def modes_html(data: ReportData) -> str:
    """Effective number of modes per question for each model (a figure and a table)."""
    per_model = data.modes.get("per_model", {})
    if not per_model:
        return f"<p>No mode coverage ({_e(data.modes.get('note', 'skipped'))}).</p>"
    agree = data.modes.get("judge_agreement", {})
    rows, groups = [], {}
    for model, c in per_model.items():
        if c.get("effective_modes_mean") is None:
            continue
        ci = c.get("effective_modes_ci") or [None, None]
        groups[model] = {"effective modes": (c["effective_modes_mean"], ci[0], ci[1])}
        modes = "; ".join(
            f"{_e(m)}: {_fmt(v['share'], 2)} of samples, {_fmt(v['correct_share'], 2)} correct"
            for m, v in list(c.get("per_mode", {}).items())[:4]
        )
        a = agree.get(model, {})
        rows.append(
            f'<tr data-row="{_e(model)}"><td class="label">{_e(model)}</td><td>{c["questions"]}</td>'
            f'<td data-value="{c["effective_modes_mean"]!r}">{_fmt(c["effective_modes_mean"], 2)}{_ci_text(ci)}</td>'
            f"<td>{c['unassigned']}</td><td>{_fmt(a.get('agreement'), 2)} ({a.get('compared', 0)})</td>"
            f'<td class="label">{modes}</td></tr>'
        )
    fig = (
        grouped_bar_svg(groups, "Effective number of modes per question", "exp(entropy), 95% CI")
        if groups
        else ""
    )
    return (
        "<p>Each model's answers to the plain question are assigned to the generation heuristic they "
        f"follow ({_e(data.modes.get('method', '?'))}); per question, the effective number of modes is "
        "exp of the entropy of that distribution (1 = one way, n = n ways equally). Agreement: share of "
        "judged samples where the constrained judge picks the same heuristic.</p>"
        f'<div class="figs"><figure id="modes-figure">{fig}</figure></div>'
        '<table id="modes"><tr><th class="label">model</th><th>questions</th><th>effective modes [CI]</th>'
        '<th>unassigned</th><th>judge agreement (n)</th><th class="label">modes: share, correct</th></tr>'
        f"{''.join(rows)}</table>"
    )
