"""Profile a benchmark figure's workload with the torch profiler (the source of BENCHMARKS.md's
"what limits it" paragraphs).

Usage: ``.venv/bin/python benchmarks/profile_figure.py FIGURE [--top 12]`` with FIGURE one of
- ``1``: the ``hf`` back-end on figure 1's heuristic prompts (4 prompts x 4 samples, 48 tokens);
- ``3``: the ``hf`` back-end decoding figure 3's long-context prompt (8 samples x 32 tokens);
- ``7``: the midtrain trainer on figure 7's examples (steps 2-4; step 1 is warm-up);
- ``8``: the rl trainer on the demo config (steps 2-3, generation included).
Prints the ops by self CPU time (share, total, calls, per call) and writes the whole table to
``bench_out/profile_<figure>.txt``. One torch thread, as in ``make bench``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
# this checkout's package, not whichever one the venv's editable install points at (as run.py)
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "src"))

from common import REPO_ROOT, set_threads  # noqa: E402

PROFILED_FIGURES = (1, 3, 7, 8)


def summarize(prof: Any, top: int) -> str:
    """The ``top`` ops by self CPU time, with each one's share of the total."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    lines = [f"self CPU total: {total / 1e6:.2f} s", "share  self_s  calls  ms/call  op"]
    for e in events[:top]:
        per_call = e.self_cpu_time_total / max(e.count, 1) / 1e3
        lines.append(
            f"{100 * e.self_cpu_time_total / total:4.0f}%  {e.self_cpu_time_total / 1e6:6.2f}  "
            f"{e.count:5d}  {per_call:7.2f}  {e.key}"
        )
    return "\n".join(lines)


def profiled(fn: Callable[[], Any]) -> Any:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof


def generation_workload(figure: int) -> Callable[[], Any]:
    from bench_generation import backend_generate
    from run import SIZES
    from workloads import heuristic_prompts, long_context_messages

    from manyways.backends.hf import HFBackend
    from manyways.config import load_config
    from manyways.models import DEFAULT_MODEL

    backend = HFBackend.from_config(load_config("configs/tiny_cpu.yaml").generate.backend, DEFAULT_MODEL)
    if figure == 1:
        messages = [p.messages for p in heuristic_prompts(SIZES["fig1_problems"], SIZES["fig1_heuristics"])]
        samples, new = SIZES["fig1_samples"], SIZES["fig1_new_tokens"]
    else:
        messages = [long_context_messages(backend.tokenizer, SIZES["fig3_long"])]
        samples, new = SIZES["fig3_batch"], SIZES["fig3_new_tokens"]

    def run() -> Any:
        return backend_generate(backend, messages, samples, new)

    run()  # warm-up
    return run


def training_profile(figure: int, work: Path) -> Any:
    """Profile steps 2-4 of figure 7's SFT trainer or steps 2-3 of figure 8's GRPO trainer (the
    benchmark's own builders; step 1 is warm-up)."""
    from bench_train import ours_sft_trainer, rl_trainer, sft_examples, vary_rewards
    from run import SIZES
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    if figure == 7:
        trainer, first, last = (
            ours_sft_trainer(sft_examples(4 * SIZES["fig7_batch"]), 4, SIZES["fig7_batch"], work),
            2,
            4,
        )
    else:
        trainer, first, last = rl_trainer(3, SIZES["fig8_completion"], work), 2, 3
        vary_rewards(trainer)  # steps that train, as the figure times
    prof = profile(activities=[ProfilerActivity.CPU])

    class StepWindow(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step + 1 == first:
                prof.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == last:
                prof.__exit__(None, None, None)

    trainer.add_callback(StepWindow())
    trainer.train()
    return prof


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("figure", type=int, choices=PROFILED_FIGURES)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)
    set_threads(1)
    if args.figure in (1, 3):
        prof = profiled(generation_workload(args.figure))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            prof = training_profile(args.figure, Path(tmp))
    text = summarize(prof, args.top)
    out = REPO_ROOT / "bench_out"
    out.mkdir(exist_ok=True)
    (out / f"profile_{args.figure}.txt").write_text(summarize(prof, 60) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
