"""Vendi at the recipe's size: time and peak memory of the whole-set Vendi of N synthetic traces.

The dense route would build an N x N similarity matrix (120K traces: 115 GB in float64); the
covariance route (``manyways.diversity.vendi_of_features``) solves a d x d eigenproblem instead.
This script times both kernels' feature routes on synthetic math-like traces (seeded) and reports
peak traced memory (``tracemalloc``, which sees numpy and scipy buffers) and the process's peak
RSS. Not part of ``make bench`` (it is a size check, not a ratio).

Usage: ``.venv/bin/python benchmarks/bench_vendi.py [--traces 120000] [--ngram-dim 4096]``
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from manyways.diversity import vendi_of_features, vendi_of_texts  # noqa: E402

WORDS = (
    "let x be the number of apples so we add subtract multiply divide total each step answer is "
    "first second then therefore check result equation solve for unknown sum product half twice"
).split()


def synthetic_traces(count: int, seed: int = 0, length: int = 120) -> list[str]:
    """Seeded word salads with numbers, ``length`` tokens each: the vocabulary of a math trace."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS + [str(i) for i in range(200)])
    picks = rng.integers(0, len(words), size=(count, length))
    return [" ".join(words[row]) for row in picks]


def measure(label: str, fn) -> dict:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    row = {
        "what": label,
        "vendi": value,
        "seconds": round(seconds, 2),
        "peak_traced_mib": round(peak / 2**20, 1),
    }
    print(json.dumps(row), file=sys.stderr, flush=True)  # partial results survive a timeout
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=120_000)
    parser.add_argument("--ngram-dim", type=int, default=4096)
    parser.add_argument("--embed-dim", type=int, default=384)
    args = parser.parse_args(argv)
    texts = synthetic_traces(args.traces)
    rows = [
        measure(
            f"ngram hashed to {args.ngram_dim}: streamed features + covariance eigenproblem",
            lambda: vendi_of_texts(texts, "ngram", ngram_dim=args.ngram_dim),
        ),
        measure(
            f"dense {args.embed_dim}-d rows (MiniLM-sized embeddings, given): covariance eigenproblem",
            lambda: vendi_of_features(np.random.default_rng(1).normal(size=(args.traces, args.embed_dim))),
        ),
    ]
    report = {
        "traces": args.traces,
        "dense_route_would_need_gib": round(args.traces**2 * 8 / 2**30, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "results": rows,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
