"""Training questions in evaluation sets: found, excluded and counted before evaluating.

:func:`normalise` is the question identity used everywhere (also by the reasoning-gym split):
NFKC, lower case, no whitespace at all, no ``$``, ``\\left``/``\\right`` dropped, ``\\dfrac`` and
``\\tfrac`` read as ``\\frac``, trailing ``.?!:`` dropped. Two questions are the same question
when their normalised texts are equal.

:func:`check_benchmark` compares one evaluation set with the configured training sets (the
mid-training questions ``data.train`` and the RL problems ``data.rl``):

- **exact**: the normalised question occurs in a training set -> always excluded;
- **ngram**: the evaluation question shares a word n-gram (``n = 13`` by default, the usual
  contamination window; words are runs of letters and digits, lower-cased) with a training
  question -> reported with the matching ids; excluded too when ``exclude_ngram`` is set (the
  recipe does: DAPO-Math-17K and AIME/AMC/HMMT/OlympiadBench are competition problems, where a
  shared 13-gram is a reused problem; templated procedural sets share long n-grams by design,
  so it is off by default).

The evaluate stage writes the report to ``<evaluate>/contamination.json`` and the counts into
``results.json`` and its manifest.

CPU command: ``manyways evaluate configs/tiny_cpu.yaml`` (the check runs before sampling)
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manyways.schema import Problem

log = logging.getLogger(__name__)

NGRAM = 13
_WORD_RE = re.compile(r"[^\W_]+")
_SPACE_RE = re.compile(r"\s+")
_LATEX_SIZING_RE = re.compile(r"\\(?:left|right)\b")
_FRAC_RE = re.compile(r"\\[dt]frac\b")


def normalise(text: str) -> str:
    """The question identity (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _LATEX_SIZING_RE.sub("", _FRAC_RE.sub(r"\\frac", text)).replace("$", "")
    return _SPACE_RE.sub("", text).rstrip(".?!:")


def ngrams(text: str, n: int = NGRAM) -> set[str]:
    """The word n-grams of ``text``, each as its words joined by a space (none under n words)."""
    words = _WORD_RE.findall(unicodedata.normalize("NFKC", text).lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass
class TrainingIndex:
    """The training questions, by normalised text and by n-gram, with where each comes from."""

    n: int = NGRAM
    exact: dict[str, str] = field(default_factory=dict)  # normalised -> "<set>:<problem_id>"
    grams: dict[int, str] = field(default_factory=dict)  # hash of an n-gram (in-process) -> ref

    def add(self, name: str, problems: Iterable[Problem]) -> None:
        for p in problems:
            ref = f"{name}:{p.problem_id}"
            self.exact.setdefault(normalise(p.question), ref)
            for g in ngrams(p.question, self.n):
                self.grams.setdefault(hash(g), ref)

    def match(self, question: str) -> tuple[str | None, str | None]:
        """(the training problem with the same question, one sharing an n-gram), None if none."""
        exact = self.exact.get(normalise(question))
        hits = (self.grams.get(hash(g)) for g in sorted(ngrams(question, self.n)))
        gram = next((ref for ref in hits if ref is not None), None)
        return exact, gram


def build_index(training: dict[str, Sequence[Problem]], n: int = NGRAM) -> TrainingIndex:
    index = TrainingIndex(n=n)
    for name, problems in training.items():
        index.add(name, problems)
    return index


def check_benchmark(
    problems: Sequence[Problem], index: TrainingIndex, *, exclude_ngram: bool = False
) -> tuple[list[Problem], dict[str, Any]]:
    """The problems to evaluate (overlaps removed) and the benchmark's contamination report."""
    kept: list[Problem] = []
    exact: dict[str, str] = {}
    ngram: dict[str, str] = {}
    for p in problems:
        same, shared = index.match(p.question)
        if same:
            exact[p.problem_id] = same
        elif shared:
            ngram[p.problem_id] = shared
        if not (same or (shared and exclude_ngram)):
            kept.append(p)
    report = {
        "problems": len(problems),
        "exact_overlap": len(exact),
        "ngram_overlap": len(ngram),
        "excluded": len(problems) - len(kept),
        "kept": len(kept),
        "exact": exact,
        "ngram": ngram,
    }
    return kept, report


def training_sets(cfg: Any) -> dict[str, Sequence[Problem]]:
    """The configured training questions: ``data.train`` and ``data.rl`` (when set)."""
    from manyways.data import load_problems

    sources = {"train": cfg.data.train, "rl": cfg.data.rl}
    return {
        name: load_problems(src, skip_bad=True).problems for name, src in sources.items() if src is not None
    }


def decontaminate(
    cfg: Any, benchmarks: dict[str, list[Problem]]
) -> tuple[dict[str, list[Problem]], dict[str, Any]]:
    """Every benchmark with the training questions removed, and the report (see the module)."""
    e = cfg.evaluate
    index = build_index(training_sets(cfg), e.contamination_ngram)
    kept: dict[str, list[Problem]] = {}
    report: dict[str, Any] = {
        "ngram": e.contamination_ngram,
        "exclude_ngram": e.exclude_ngram_overlaps,
        "benchmarks": {},
    }
    for name, problems in benchmarks.items():
        kept[name], report["benchmarks"][name] = check_benchmark(
            problems, index, exclude_ngram=e.exclude_ngram_overlaps
        )
    return kept, report


def decontaminate_into(
    cfg: Any, benchmarks: dict[str, list[Problem]], out_dir: Path
) -> dict[str, list[Problem]]:
    """:func:`decontaminate`, with the report written to ``out_dir/contamination.json``."""
    from manyways.artifacts import write_json_atomic

    kept, report = decontaminate(cfg, benchmarks)
    write_json_atomic(Path(out_dir) / "contamination.json", report)
    for name, r in report["benchmarks"].items():
        if r["exact_overlap"] or r["ngram_overlap"]:
            log.warning(
                "%s: %d exact / %d %d-gram overlaps with the training sets, %d excluded",
                name,
                r["exact_overlap"],
                r["ngram_overlap"],
                report["ngram"],
                r["excluded"],
            )
    return kept


def contamination_counts(out_dir: Path) -> dict[str, dict[str, int]]:
    """benchmark -> the report's counts (no ids), from ``out_dir/contamination.json``."""
    report = json.loads((Path(out_dir) / "contamination.json").read_text())
    return {b: {k: v for k, v in r.items() if isinstance(v, int)} for b, r in report["benchmarks"].items()}


def count_excluded(results: dict[str, Any], counts: dict[str, dict[str, int]]) -> None:
    """Each (model, benchmark) statistic's ``excluded`` also counts its removed training
    questions (``excluded_contaminated``), so every report's sizes table shows them."""
    for by_bench in results.values():
        for bench, stats in by_bench.items():
            stats["excluded_contaminated"] = counts.get(bench, {}).get("excluded", 0)
            stats["excluded"] += stats["excluded_contaminated"]
