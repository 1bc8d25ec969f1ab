"""Hand-run: bf16 linear layers with weights packed once for oneDNN against torch's own linear.

``manyways.backends.packed_linear`` (the hf back-end's bf16 linears on CPU, GRPO's generation
under autocast). The workload is decode's: ``rows`` activations through a stack of the 135M
default's attention-output and MLP shapes (576x576, 1536x576, 576x1536) for 60 layers, ~210 MB
of bf16 weights, more than the caches, so they stream from memory as in a decode step. Reported
per row count: plain / packed time, median and range of interleaved pairs (plain, packed, plain,
...), one torch thread. Usage: ``.venv/bin/python benchmarks/bench_packed_linear.py [--pairs 7]``.
Not part of ``make bench``: the figures it supports are 1, 3 and 3b; the result is in
BENCHMARKS.md ("Hand-run micro benchmarks").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

from manyways.backends import packed_linear  # noqa: E402

SHAPES = ((576, 576), (1536, 576), (576, 1536))  # (out, in): o_proj, up_proj, down_proj
LAYERS = 60


def stack_ratios(rows: int, pairs: int) -> list[float]:
    """Per interleaved pair: plain stack time / packed stack time at ``rows`` rows."""
    gen = torch.Generator().manual_seed(0)
    weights = [
        [torch.randn(shape, generator=gen).to(torch.bfloat16) for shape in SHAPES] for _ in range(LAYERS)
    ]
    packed = [[packed_linear.pack(w) for w in layer] for layer in weights]
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)

    def plain_stack() -> None:
        for o, up, down in weights:
            torch.nn.functional.linear(torch.nn.functional.linear(torch.nn.functional.linear(x, o), up), down)

    def packed_stack() -> None:
        for o, up, down in packed:
            packed_linear.linear(packed_linear.linear(packed_linear.linear(x, o), up), down)

    ratios = []
    with torch.inference_mode():
        plain_stack(), packed_stack()  # warm-up
        for _ in range(pairs):
            start = time.perf_counter()
            plain_stack()
            plain_s = time.perf_counter() - start
            start = time.perf_counter()
            packed_stack()
            ratios.append(plain_s / (time.perf_counter() - start))
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 20, 40, 80])
    args = parser.parse_args(argv)
    if not packed_linear.available():
        print("this torch build or CPU has no oneDNN bf16 linear: nothing to compare")
        return 1
    torch.set_num_threads(1)
    print("rows  plain/packed median  range")
    for rows in args.rows:
        ratios = stack_ratios(rows, args.pairs)
        print(f"{rows:4d}  {statistics.median(ratios):19.2f}  {min(ratios):.2f}-{max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
