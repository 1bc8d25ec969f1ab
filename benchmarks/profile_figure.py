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


class StepProfiler:
    """A trainer callback that profiles steps ``first``..``last`` (1-based)."""

    def __init__(self, first: int, last: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.first, self.last = first, last
        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.step = 0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                outer.step += 1
                if outer.step == outer.first:
                    outer.prof.__enter__()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if outer.step == outer.last:
                    outer.prof.__exit__(None, None, None)

        return _Callback()


def training_profile(figure: int, work: Path) -> Any:
    from bench_train import CONFIG, sft_examples

    from manyways.config import load_config
    from manyways.models import DEFAULT_MODEL, load_tokenizer

    if figure == 7:
        from manyways.stages.midtrain import build_trainer

        cfg = load_config(
            CONFIG,
            [
                f"run.root={work}",
                "midtrain.max_steps=4",
                "midtrain.batch_size=2",
                "midtrain.save_steps=100000",
                'midtrain.trl.save_strategy="no"',
                "midtrain.log_samples=false",
            ],
        )
        trainer = build_trainer(cfg, work / "midtrain", sft_examples(8), load_tokenizer(DEFAULT_MODEL))
        steps = StepProfiler(2, 4)
    else:
        from run import SIZES

        from manyways.models import resolve_model_path
        from manyways.stages.rl import build_trainer as build_rl
        from manyways.stages.rl import load_rl_problems

        cfg = load_config(
            CONFIG,
            [
                f"run.root={work}",
                "rl.max_steps=3",
                "rl.save_steps=100000",
                'rl.trl.save_strategy="no"',
                f"rl.max_completion_length={SIZES['fig8_completion']}",
            ],
        )
        problems, _ = load_rl_problems(cfg)
        trainer, _ = build_rl(cfg, work / "rl", resolve_model_path(DEFAULT_MODEL), problems)
        steps = StepProfiler(2, 3)
    trainer.add_callback(steps.callback())
    trainer.train()
    return steps.prof


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
