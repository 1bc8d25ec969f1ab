"""Figure 6: adaptive sampling against fixed k samples per (problem, heuristic) pair.

Both runs are the real generate stage (``manyways.stages.generate.run``) on the same problems,
heuristics and model: fixed ``generate.samples=k``, and ``generate.adaptive.enabled`` (rounds of
``round_size``, stop at ``accept_target`` correct, at most ``max_samples``). Reported: distinct
accepted (problem, heuristic) pairs per generated completion token, adaptive / fixed, and the
coverage of hard problems (those whose fixed-k samples are at most 25% correct): the share of
their pairs with an accepted trace, adaptive / fixed, with the two runs' token totals alongside.
These are counts, not times, so one run of each suffices; what they vary with is which pairs
were drawn, so the figure's spread is the width of a 90% paired bootstrap interval over the pairs
(:func:`bootstrap_ratio`), relative to the ratio: with the default's 16 pairs one pair moves the
ratio by ~20%, and the interval says how far that carries.
"""

from __future__ import annotations

import random
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import Figure

from manyways.artifacts import read_table
from manyways.config import load_config
from manyways.data import read_problems

CONFIG = "configs/tiny_cpu.yaml"


def run_generate(work: Path, overrides: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate into ``work`` and return the rows with a ``correct`` flag, and the problems."""
    from manyways.stages import generate
    from manyways.verify.registry import verify_many

    cfg = load_config(CONFIG, [f"run.root={work}", *overrides])
    generate.run(cfg, work / "generate", show_progress=False)
    problems = {p.problem_id: p for p in read_problems(work / "generate" / "problems.parquet")}
    rows = read_table(work / "generate").to_pylist()
    verdicts = verify_many([(problems[r["problem_id"]], r["completion"]) for r in rows])
    for row, verdict in zip(rows, verdicts, strict=True):
        row["correct"] = verdict.status == "correct"
    return rows, problems


def pair_stats(rows: list[dict[str, Any]]) -> dict[tuple[str, str | None], list[bool]]:
    """Correctness of each pair's samples."""
    out: dict[tuple[str, str | None], list[bool]] = defaultdict(list)
    for row in rows:
        out[(row["problem_id"], row["heuristic_id"])].append(row["correct"])
    return out


def hard_problems(rows: list[dict[str, Any]], threshold: float = 0.25) -> set[str]:
    """Problems whose samples are at most ``threshold`` correct."""
    by_problem: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_problem[row["problem_id"]].append(row["correct"])
    return {p for p, ok in by_problem.items() if sum(ok) / len(ok) <= threshold}


def summarize(rows: list[dict[str, Any]], hard: set[str]) -> dict[str, float]:
    """Accepted pairs, tokens, accepted pairs per token, coverage of hard problems' pairs."""
    pairs = pair_stats(rows)
    accepted = sum(any(ok) for ok in pairs.values())
    tokens = sum(r["completion_tokens"] for r in rows)
    hard_pairs = [ok for (pid, _), ok in pairs.items() if pid in hard]
    coverage = sum(any(ok) for ok in hard_pairs) / len(hard_pairs) if hard_pairs else 0.0
    return {
        "accepted_pairs": accepted,
        "tokens": tokens,
        "accepted_per_token": accepted / tokens if tokens else 0.0,
        "hard_pairs": len(hard_pairs),
        "hard_coverage": coverage,
        "samples": len(rows),
    }


def pair_totals(rows: list[dict[str, Any]]) -> dict[tuple[str, str | None], tuple[int, int]]:
    """Each pair's (accepted: 0 or 1, completion tokens)."""
    out: dict[tuple[str, str | None], list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        totals = out[(row["problem_id"], row["heuristic_id"])]
        totals[0] = max(totals[0], int(row["correct"]))
        totals[1] += row["completion_tokens"]
    return {pair: (acc, tokens) for pair, (acc, tokens) in out.items()}


def bootstrap_ratio(
    fixed_rows: list[dict[str, Any]],
    adaptive_rows: list[dict[str, Any]],
    resamples: int = 2000,
    level: float = 0.9,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired bootstrap of accepted pairs per token, adaptive / fixed: the same pairs, drawn with
    replacement, for both runs. Returns the interval (None when fewer than half the resamples
    define the ratio) and how many resamples had no accepted fixed pair (ratio undefined, left
    out)."""
    fixed, adaptive = pair_totals(fixed_rows), pair_totals(adaptive_rows)
    pairs = sorted(set(fixed) | set(adaptive), key=str)
    rng = random.Random(seed)
    ratios: list[float] = []
    undefined = 0
    for _ in range(resamples):
        drawn = [pairs[rng.randrange(len(pairs))] for _ in pairs] if pairs else []
        f_acc = sum(fixed.get(p, (0, 0))[0] for p in drawn)
        f_tok = sum(fixed.get(p, (0, 0))[1] for p in drawn)
        a_acc = sum(adaptive.get(p, (0, 0))[0] for p in drawn)
        a_tok = sum(adaptive.get(p, (0, 0))[1] for p in drawn)
        if not (f_acc and f_tok and a_tok):
            undefined += 1
            continue
        ratios.append((a_acc / a_tok) / (f_acc / f_tok))
    interval = None
    if len(ratios) * 2 >= resamples:
        ratios.sort()
        tail = (1 - level) / 2
        interval = [ratios[int(tail * (len(ratios) - 1))], ratios[int((1 - tail) * (len(ratios) - 1))]]
    return {
        "interval": interval,
        "level": level,
        "resamples": resamples,
        "undefined": undefined,
        "pairs": len(pairs),
    }


def safe_ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def figure_6(sizes: dict[str, int]) -> Figure:
    common = [
        f"data.train.size={sizes['fig6_problems']}",
        f"heuristics.n={sizes['fig6_heuristics']}",
        f"generate.max_new_tokens={sizes['fig6_new_tokens']}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        fixed_rows, _ = run_generate(Path(tmp) / "fixed", [*common, f"generate.samples={sizes['fig6_k']}"])
        adaptive_rows, _ = run_generate(
            Path(tmp) / "adaptive",
            [
                *common,
                "generate.adaptive.enabled=true",
                "generate.adaptive.accept_target=1",
                f"generate.adaptive.round_size={sizes['fig6_round']}",
                f"generate.adaptive.max_samples={sizes['fig6_max']}",
            ],
        )
    hard = hard_problems(fixed_rows)
    fixed, adaptive = summarize(fixed_rows, hard), summarize(adaptive_rows, hard)
    per_token = safe_ratio(adaptive["accepted_per_token"], fixed["accepted_per_token"])
    coverage = safe_ratio(adaptive["hard_coverage"], fixed["hard_coverage"])
    met = per_token is not None and per_token >= 2 and coverage is not None and coverage >= 1.3
    boot = bootstrap_ratio(fixed_rows, adaptive_rows)
    spread = None
    if per_token and boot["interval"] is not None:
        spread = (boot["interval"][1] - boot["interval"][0]) / per_token
    return Figure(
        6,
        "adaptive: accepted pairs per token / fixed k",
        per_token,
        ">= 2x; hard coverage >= 1.3x",
        met,
        spread,
        f"fixed k={sizes['fig6_k']} per pair",
        {
            "fixed": fixed,
            "adaptive": adaptive,
            "coverage_ratio": coverage,
            "token_ratio_adaptive_over_fixed": safe_ratio(adaptive["tokens"], fixed["tokens"]),
            "hard_problems": len(hard),
            "bootstrap": boot,
            "adaptive_config": f"round_size={sizes['fig6_round']}, accept_target=1, max_samples={sizes['fig6_max']}",
        },
    )
