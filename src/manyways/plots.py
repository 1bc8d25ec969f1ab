"""Figures for the HTML report, rendered with matplotlib's Agg/SVG back-end as inline SVG strings.

- ``pass_at_k_svg(curves, title)``: one line per label over k (log2 x-axis) with a shaded
  confidence band, from ``{label: {k: (value, ci_low, ci_high)}}``.
- ``bar_svg(values, title, ylabel)``: one bar per label (e.g. Vendi score per data source).

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot global state), text is
kept as SVG ``<text>`` (``svg.fonttype = none``) so labels stay searchable, ``$`` in a label is
literal (no mathtext), and the output is deterministic (fixed hash salt, no date), so a re-run
report is byte-identical. The returned string starts at ``<svg`` and can be pasted into HTML.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["bar_svg", "grouped_bar_svg", "pass_at_k_panels_svg", "pass_at_k_svg"]

_RC = {"svg.fonttype": "none", "svg.hashsalt": "manyways", "font.size": 10, "text.parse_math": False}


def _to_svg(fig: Figure) -> str:
    """Render ``fig`` to an SVG string without the XML prolog."""
    buffer = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buffer.getvalue()
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def pass_at_k_svg(curves: Mapping[str, Mapping[int, tuple[float, float, float]]], title: str) -> str:
    """Line plot of pass@k against k (log2 axis) with a confidence band per curve."""
    if not curves:
        raise ValueError("pass_at_k_svg needs at least one curve")
    with matplotlib.rc_context(_RC):
        many = len(curves) > 6  # a legend that would cover the curves goes beside them
        fig = Figure(figsize=(8.5 if many else 6.0, 4.0))
        ax = fig.add_subplot()
        all_ks: set[int] = set()
        for label, points in curves.items():
            ks = sorted(points)
            if not ks or ks[0] < 1:
                raise ValueError(f"curve {label!r} needs k values >= 1")
            all_ks.update(ks)
            values = [points[k][0] for k in ks]
            lows = [points[k][1] for k in ks]
            highs = [points[k][2] for k in ks]
            (line,) = ax.plot(ks, values, marker="o", markersize=3, label=label)
            ax.fill_between(ks, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xscale("log", base=2)
        ticks = sorted(all_ks)
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if many:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
            fig.subplots_adjust(right=0.7)
        else:
            ax.legend(loc="lower right")
        return _to_svg(fig)


def bar_svg(values: Mapping[str, float], title: str, ylabel: str) -> str:
    """Bar chart of one value per label, each bar annotated with its value."""
    if not values:
        raise ValueError("bar_svg needs at least one value")
    labels = list(values)
    heights = [float(values[label]) for label in labels]
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(max(4.0, 0.8 * len(labels) + 2.0), 4.0))
        ax = fig.add_subplot()
        bars = ax.bar(range(len(labels)), heights, color="tab:blue")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        rotate = len(labels) > 4 or max(len(label) for label in labels) > 12
        ax.set_xticks(
            range(len(labels)), labels, rotation=30 if rotate else 0, ha="right" if rotate else "center"
        )
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        return _to_svg(fig)


def grouped_bar_svg(
    groups: Mapping[str, Mapping[str, tuple[float, float | None, float | None]]], title: str, ylabel: str
) -> str:
    """One figure for one analysis: a cluster of bars per group (e.g. arm), one bar per series
    (e.g. kernel), each ``(value, ci_low, ci_high)`` with an error bar where the CI is known."""
    if not groups:
        raise ValueError("grouped_bar_svg needs at least one group")
    series: list[str] = []
    for by_series in groups.values():
        series += [s for s in by_series if s not in series]
    labels = list(groups)
    width = 0.8 / max(1, len(series))
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(max(5.0, 0.9 * len(labels) * max(1, len(series)) ** 0.5 + 2.5), 4.0))
        ax = fig.add_subplot()
        for j, name in enumerate(series):
            xs, heights, lows, highs = [], [], [], []
            for i, group in enumerate(labels):
                if name not in groups[group]:
                    continue
                value, low, high = groups[group][name]
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                heights.append(value)
                # a CI that misses its value (rounding, or a mean outside a percentile interval
                # of few values) is drawn one-sided, not refused by matplotlib
                lows.append(max(0.0, value - (value if low is None else low)))
                highs.append(max(0.0, (value if high is None else high) - value))
            bars = ax.bar(xs, heights, width, label=name, yerr=[lows, highs], capsize=3)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        rotate = len(labels) > 4 or max(len(label) for label in labels) > 12
        ax.set_xticks(
            range(len(labels)), labels, rotation=30 if rotate else 0, ha="right" if rotate else "center"
        )
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small", frameon=False)
        return _to_svg(fig)


def pass_at_k_panels_svg(
    panels: Mapping[str, Mapping[str, Mapping[int, tuple[float, float, float]]]], title: str, ncols: int = 3
) -> str:
    """Small multiples of pass@k curves (shared axes): one panel per arm family, few curves each,
    so a reader can tell them apart."""
    if not panels:
        raise ValueError("pass_at_k_panels_svg needs at least one panel")
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(3.6 * ncols, 3.0 * nrows + 0.4))
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
        all_ks: set[int] = set()
        for ax, (name, curves) in zip(axes.flat, panels.items(), strict=False):
            for label, points in curves.items():
                ks = sorted(points)
                all_ks.update(ks)
                style = {"color": "0.5", "linestyle": "--"} if label == "base" else {}
                (line,) = ax.plot(
                    ks, [points[k][0] for k in ks], marker="o", markersize=2.5, label=label, **style
                )
                lows, highs = [points[k][1] for k in ks], [points[k][2] for k in ks]
                ax.fill_between(ks, lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)
            ax.set_title(name, fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(loc="lower right", fontsize=7, frameon=False)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        ticks = sorted(all_ks)
        for ax in axes.flat:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(k) for k in ticks])
        for ax in axes[-1]:
            ax.set_xlabel("k")
        for ax in axes[:, 0]:
            ax.set_ylabel("pass@k")
        fig.suptitle(title)
        return _to_svg(fig)
