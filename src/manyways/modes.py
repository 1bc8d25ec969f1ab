"""Mode coverage: does a model answer one plain question in several of the taught ways?

The paper's mechanism is an N-modal model: after mid-training on n heuristic-guided traces per
question, the model's answers to the *plain* question (no heuristic in the prompt) should follow
several of the n generation heuristics. Given each evaluated sample's assigned heuristic (its
"mode"), this module measures, per model:

- the effective number of modes per question: ``exp`` of the Shannon entropy of the distribution
  of modes among that question's samples (1 when every sample follows one heuristic, m when m
  heuristics are equally used), its mean over questions and a 95% bootstrap interval;
- each mode's share of samples and the share of its samples that are correct.

Samples are assigned in two ways (``stages/analyze.py`` runs both and reports their agreement):
``centroid_assign`` (nearest centroid, by cosine of hashed n-gram features, of the mid-training
traces of each heuristic: cheap and deterministic, the primary figure) and the constrained judge
with the n generation heuristics as its menu (one id per answer).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from manyways.diversity import ngram_features
from manyways.metrics import bootstrap_ci

log = logging.getLogger(__name__)

UNASSIGNED = None


def effective_modes(modes: Sequence[Hashable]) -> float:
    """``exp`` of the entropy of the empirical distribution of ``modes`` (one per sample)."""
    if not modes:
        raise ValueError("effective_modes needs at least one assigned sample")
    counts = np.array(list(Counter(modes).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(math.exp(-np.sum(p * np.log(p))))


def mode_coverage(samples: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Per-question effective modes (mean, CI) and per-mode share / correct share.

    ``samples``: dicts with ``problem`` (any key), ``mode`` (a heuristic id, or None when it could
    not be assigned: counted, left out of the entropy) and ``correct`` (bool).
    """
    by_question: dict[Any, list[Any]] = defaultdict(list)
    per_mode: Counter[Any] = Counter()
    correct: Counter[Any] = Counter()
    unassigned = 0
    for s in samples:
        if s["mode"] is UNASSIGNED:
            unassigned += 1
            continue
        by_question[s["problem"]].append(s["mode"])
        per_mode[s["mode"]] += 1
        correct[s["mode"]] += int(bool(s["correct"]))
    values = [effective_modes(m) for m in by_question.values()]
    assigned = sum(per_mode.values())
    return {
        "samples": len(samples),
        "unassigned": unassigned,
        "questions": len(values),
        "effective_modes_mean": float(np.mean(values)) if values else None,
        "effective_modes_ci": list(bootstrap_ci(values, seed=seed)) if values else None,
        "max_samples_per_question": max((len(m) for m in by_question.values()), default=0),
        "per_mode": {
            str(m): {"samples": k, "share": k / assigned, "correct_share": correct[m] / k}
            for m, k in per_mode.most_common()
        },
    }


def centroid_assign(
    texts: Sequence[str],
    reference_texts: Sequence[str],
    reference_modes: Sequence[str],
    *,
    ngram_dim: int = 4096,
) -> list[str | None]:
    """The mode of the nearest centroid (cosine of hashed n-gram features) for each text.

    Centroids are the normalised means of each mode's reference traces. A text with no features
    (empty) or no similarity to any centroid is ``None`` (unassigned).
    """
    if len(reference_texts) != len(reference_modes):
        raise ValueError(f"{len(reference_texts)} reference texts but {len(reference_modes)} modes")
    names = sorted(set(reference_modes))
    if not names or not texts:
        return [UNASSIGNED] * len(texts)
    R = ngram_features(reference_texts, dim=ngram_dim)
    index = {m: i for i, m in enumerate(names)}
    member = np.zeros((len(names), len(reference_modes)))
    for j, m in enumerate(reference_modes):
        member[index[m], j] = 1.0
    centroids = np.asarray(R.T @ member.T).T  # modes x features
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids = centroids / np.where(norms > 0, norms, 1.0)
    sims = np.asarray(ngram_features(texts, dim=ngram_dim) @ centroids.T)
    best = sims.argmax(axis=1)
    return [names[b] if sims[i, b] > 0 else UNASSIGNED for i, b in enumerate(best)]


def agreement(a: Sequence[str | None], b: Sequence[str | None]) -> dict[str, Any]:
    """Share of samples on which two assignments agree, over samples both assigned."""
    if len(a) != len(b):
        raise ValueError(f"assignments of different lengths: {len(a)} and {len(b)}")
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return {"compared": len(both), "agreement": sum(x == y for x, y in both) / len(both) if both else None}
