"""Run an experiment's stage runs in dependency order, several at once with ``experiment.jobs``.

``manyways experiment configs/tiny_cpu.yaml`` (the demo runs 2 jobs, one per core; ``--jobs N``
overrides the config)

Each arm, and the base model, is a *chain* of steps. A step is ready once the steps it reads have
finished, and only then is its stage directory known (the content address hashes their
fingerprints, see :func:`manyways.experiment.stage_key`). The scheduler keeps up to ``jobs``
stage runs going. A free slot takes the ready stage that the most chains wait for (the judge's
validity, read by every arm's analysis; the one heuristic generation that feeds most arms), then
the one whose chain has the most steps left, then the earliest chain in config order. A stage
several chains need runs once; the others wait for it and count it as reused.

With ``jobs: 1`` stages run in this process, one at a time. With more they run in worker
processes (spawned, each with ``cores // jobs`` torch threads, CPU count from the process's
affinity), kept for the whole experiment so that per-process caches (the judge's prefix KV store)
serve later stages. On a small CPU the stages of the demo are single-threaded (its back-ends say
``threads: 1``), so one job leaves a core idle. With two on the 2-core development machine the
demo's experiment took 19.3 min instead of 35.9: side by side the stages cost each other 2-13%
of their time (BENCHMARKS.md, figure 9).

Artifacts do not depend on ``jobs``: every stage writes the same content-addressed directory with
the same contents whichever process ran it and whatever ran beside it (tested against a one-job
run). On a failure no new stage starts; the stages already running finish (their artifacts are
complete, a rerun reuses them), then the first error is raised, with its own type and message.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manyways.artifacts import is_finished

log = logging.getLogger(__name__)

StageRunner = Callable[..., Any]  # (stage, cfg, out, inputs, overwrite, show_progress)


def available_cores() -> int:
    """CPUs this process may run on (its affinity where the OS tells, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Torch threads of each worker when ``jobs`` stages share the machine's cores."""
    return max(1, (cores or available_cores()) // max(1, jobs))


# ----------------------------------------------------------------------------- launchers
class InProcessLauncher:
    """Runs each stage here and now (``jobs: 1``), or through ``runner`` (the rehearsal's)."""

    slots = 1

    def __init__(self, overwrite: bool, show_progress: bool, runner: StageRunner | None = None):
        self.overwrite, self.show_progress, self.runner = overwrite, show_progress, runner

    def submit(self, stage: str, cfg: Any, out: Path, inputs: dict[str, Path]) -> Future:
        future: Future = Future()
        try:
            if self.runner is not None:
                self.runner(stage, cfg, out, inputs, self.overwrite, self.show_progress)
            else:
                run_stage_job(stage, cfg, out, inputs, self.overwrite, self.show_progress)
        except Exception as exc:  # the scheduler raises it after the bookkeeping, unchanged
            future.set_exception(exc)
        else:
            future.set_result(str(out))
        return future

    def close(self) -> None:
        pass


class PoolLauncher:
    """Runs stages in ``jobs`` spawned worker processes with ``threads`` torch threads each."""

    def __init__(self, jobs: int, threads: int, overwrite: bool):
        import multiprocessing

        self.slots = jobs
        self.overwrite = overwrite
        level = logging.getLogger().getEffectiveLevel()
        self._pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(threads, level),
        )

    def submit(self, stage: str, cfg: Any, out: Path, inputs: dict[str, Path]) -> Future:
        # workers show no bars (two at once garble a terminal); the scheduler shows one for all
        return self._pool.submit(run_stage_job, stage, cfg, out, inputs, self.overwrite, False)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def init_worker(threads: int, level: int) -> None:
    """A worker process's set-up: its thread budget (before torch starts) and logging."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from manyways.cli import quiet_library_bars, setup_logging

    setup_logging(level, worker=True)
    quiet_library_bars()
    import torch

    torch.set_num_threads(threads)


def run_stage_job(
    stage: str, cfg: Any, out: Path, inputs: dict[str, Path], overwrite: bool, show_progress: bool
) -> str:
    """One stage run (in this process or a worker's)."""
    from manyways.pipeline import stage_module

    stage_module(stage).run(cfg, out, inputs=inputs, overwrite=overwrite, show_progress=show_progress)
    return str(out)


# ----------------------------------------------------------------------------- chains
@dataclass
class Chain:
    """One arm's (or the base model's) steps; ``steps`` are (Step, its Config). A step is ready
    when the steps it reads (``Step.inputs``) are done, so a step with no inputs (the judge's
    validity) can run from the start; ``stages`` lists the steps in the chain's order."""

    label: str
    steps: list[tuple[Any, Any]]
    done: dict[str, Path] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)
    started: float | None = None
    wall_s: float | None = None

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.steps)

    @property
    def left(self) -> int:
        return len(self.steps) - len(self.done)

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return {
            step.name: {"dir": str(self.done[step.name]), "reused": self.reused[step.name]}
            for step, _ in self.steps
            if step.name in self.done
        }

    def ready(self) -> list[tuple[Any, Any]]:
        """Steps not done whose inputs are done, in the chain's order."""
        return [
            (step, cfg)
            for step, cfg in self.steps
            if step.name not in self.done and all(src in self.done for src in step.inputs.values())
        ]

    def complete(self, step: Any, out: Path, reused: bool) -> None:
        self.done[step.name] = out
        self.reused[step.name] = reused
        if self.finished and self.started is not None:
            self.wall_s = round(time.time() - self.started, 1)


@dataclass
class _Want:
    chain: Chain
    stage: str
    cfg: Any
    inputs: dict[str, Path]


@dataclass
class Scheduler:
    """Runs chains over the content-addressed store at ``store`` with ``launcher``."""

    store: Path
    launcher: Any
    key: Callable[[str, Any, dict[str, Path]], str]  # stage_key
    show_progress: bool = False
    executed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    on_chain_done: Callable[[Chain], None] | None = None

    def run(self, chains: list[Chain]) -> None:
        """Run every chain to its end, or raise the first stage error once nothing runs."""
        inflight: dict[Path, tuple[Future, str, float]] = {}
        owner: dict[Path, str] = {}
        error: BaseException | None = None
        bar = self._bar(chains)
        try:
            while True:
                wants = self._advance(chains, inflight, owner, bar)
                if error is None:
                    for out in self._by_priority(wants):
                        if len(inflight) >= self.launcher.slots:
                            break
                        want = wants[out][0]
                        owner[out] = want.chain.label
                        log.info("== %s -> %s (%s)", want.stage, out.name, want.chain.label)
                        future = self.launcher.submit(want.stage, want.cfg, out, want.inputs)
                        inflight[out] = (future, want.stage, time.perf_counter())
                        self._show(bar, inflight)
                if not inflight:
                    break
                finished, _ = wait([f for f, _, _ in inflight.values()], return_when=FIRST_COMPLETED)
                for out in [o for o, (f, _, _) in inflight.items() if f in finished]:
                    future, stage, started = inflight.pop(out)
                    exc = future.exception()
                    if isinstance(exc, BrokenProcessPool):  # killed (OOM killer, kill -9): say which
                        exc = RuntimeError(
                            f"{out.name}: the worker process running it died ({exc}); finished "
                            "stages are kept, rerun to resume"
                        )
                    if exc is not None:
                        log.error("%s failed: %s", out.name, exc)
                        error = error or exc
                        continue
                    if not is_finished(out):
                        error = error or RuntimeError(f"stage {stage} returned without finishing {out}")
                        continue
                    self.executed.append(out.name)
                    if self.launcher.slots > 1:
                        log.info("finished %s in %.1f s", out.name, time.perf_counter() - started)
                self._show(bar, inflight)
        finally:
            if bar is not None:
                bar.close()
        if error is not None:
            raise error
        unfinished = [c.label for c in chains if not c.finished]
        if unfinished:  # cannot happen: every wanted stage was submitted or is running
            raise RuntimeError(f"scheduler stopped with unfinished chains: {unfinished}")

    def _advance(
        self, chains: list[Chain], inflight: dict, owner: dict[Path, str], bar: Any
    ) -> dict[Path, list[_Want]]:
        """Complete every chain's steps whose stage has finished; the stages that chains' ready
        steps now wait for and that are not running."""
        wants: dict[Path, list[_Want]] = {}
        for chain in chains:
            if chain.started is None:
                chain.started = time.time()
            progressed = True
            while progressed and not chain.finished:
                progressed = False
                for step, cfg in chain.ready():
                    inputs = {name: chain.done[src] for name, src in step.inputs.items()}
                    out = self.store / f"{step.stage}-{self.key(step.stage, cfg, inputs)}"
                    if not is_finished(out):
                        if out not in inflight:
                            wants.setdefault(out, []).append(_Want(chain, step.stage, cfg, inputs))
                        continue
                    reused = owner.get(out) != chain.label
                    if reused:
                        self.reused.append(out.name)
                    chain.complete(step, out, reused)
                    progressed = True
                    if bar is not None:
                        bar.update(1)
                    if chain.finished and self.on_chain_done is not None:
                        self.on_chain_done(chain)
        return wants

    @staticmethod
    def _by_priority(wants: dict[Path, list[_Want]]) -> list[Path]:
        """Most chains waiting first, then the longest remaining chain, then config order."""
        order = {id(w.chain): i for i, ws in enumerate(wants.values()) for w in ws}

        def key(out: Path) -> tuple[int, int, int]:
            ws = wants[out]
            left = max(w.chain.left for w in ws)
            return (-len(ws), -left, min(order[id(w.chain)] for w in ws))

        return sorted(wants, key=key)

    def _bar(self, chains: list[Chain]) -> Any:
        if not self.show_progress or self.launcher.slots <= 1:
            return None  # one job: each stage shows its own bars
        from tqdm.auto import tqdm

        return tqdm(total=sum(len(c.steps) for c in chains), desc="experiment steps", unit="step")

    @staticmethod
    def _show(bar: Any, inflight: dict) -> None:
        if bar is not None:
            bar.set_postfix_str(", ".join(sorted(o.name for o in inflight)) or "-")
