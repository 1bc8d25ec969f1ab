"""Tests that the report figures render to self-contained, deterministic inline SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from manyways.plots import bar_svg, pass_at_k_svg

CURVES = {
    "vanilla RL": {
        1: (0.30, 0.25, 0.35),
        2: (0.38, 0.33, 0.43),
        4: (0.45, 0.40, 0.50),
        64: (0.60, 0.55, 0.65),
    },
    "heuristic mid-training": {1: (0.31, 0.26, 0.36), 4: (0.50, 0.45, 0.55), 64: (0.70, 0.66, 0.74)},
}


def _text_of(svg: str) -> str:
    root = ET.fromstring(svg)  # well-formed XML, no prolog needed
    assert root.tag.endswith("svg")
    return " ".join(t for t in root.itertext() if t.strip())


def test_pass_at_k_svg_contains_labels_and_ticks() -> None:
    svg = pass_at_k_svg(CURVES, "pass@k on MATH-500")
    assert svg.startswith("<svg")
    text = _text_of(svg)
    for needle in ("vanilla RL", "heuristic mid-training", "pass@k on MATH-500", "64"):
        assert needle in text
    assert svg.count("<path") >= 4  # two lines and two confidence bands at least
    assert svg == pass_at_k_svg(CURVES, "pass@k on MATH-500")  # deterministic


def test_bar_svg_contains_labels_and_values() -> None:
    values = {"self-generated": 13.81, "QwQ-32B distill": 10.95}
    svg = bar_svg(values, "Vendi score of mid-training data", "Vendi")
    text = _text_of(svg)
    for needle in ("self-generated", "QwQ-32B distill", "Vendi score of mid-training data", "13.81", "10.95"):
        assert needle in text
    assert svg == bar_svg(values, "Vendi score of mid-training data", "Vendi")


def test_labels_are_literal_text() -> None:
    # "$...$" must not be parsed as mathtext, and "&", "<" must come out XML-escaped.
    text = _text_of(bar_svg({"a $x_1$ & <b>": 1.0}, "t", "y"))
    assert "a $x_1$ & <b>" in text


def test_plots_reject_empty_input() -> None:
    with pytest.raises(ValueError):
        pass_at_k_svg({}, "empty")
    with pytest.raises(ValueError):
        bar_svg({}, "empty", "y")
    with pytest.raises(ValueError, match="k values >= 1"):
        pass_at_k_svg({"bad": {0: (0.1, 0.0, 0.2)}}, "bad k")


def test_grouped_bars_draw_a_ci_that_misses_its_value_one_sided() -> None:
    """A per-question mean can fall outside its percentile CI by rounding (or with few values):
    the figure is drawn (the rehearsal's report once died on matplotlib's negative yerr)."""
    from manyways.plots import grouped_bar_svg

    svg = grouped_bar_svg(
        {"polya_n2": {"ngram": (1.5, 1.5000000000000002, 1.7)}, "budget": {"ngram": (2.0, 1.0, 1.9)}},
        "per-question Vendi",
        "Vendi",
    )
    ET.fromstring(svg)
    assert "polya_n2" in svg and "budget" in svg
