"""Run a config's experiment as a rehearsal: stand-ins from :mod:`.substitute`, real code paths.

- generation, scoring and evaluation: the config's back-ends and executors; ``kind: vllm`` runs
  :mod:`manyways.backends.vllm` on the engine stand-in (a ``vllm`` package put first on the
  path of this process and of the Ray workers only), Ray on a local cluster started here with
  ``num_cpus=2`` and ``scale.fake_gpus`` declared GPUs;
- midtrain and rl: on two processes (``torch.distributed.run`` with ``ACCELERATE_USE_CPU``,
  which is what ``accelerate launch``'s multi-process launcher runs; gloo), started once and kept
  for every training stage of the rehearsal;
- every arm of ``experiment.arms``, evaluation and analysis, then a table of what ran and of
  the real run's projected size.

CPU command: ``manyways experiment configs/paper_llama3b.yaml --rehearse``
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from manyways.artifacts import read_manifest, write_json_atomic
from manyways.config import Config
from manyways.rehearsal.engine import GPU_COUNT_ENV, GPU_DIR_ENV
from manyways.rehearsal.substitute import Scale, Substitutions, rehearsal_config

log = logging.getLogger(__name__)

TRAINING_STAGES = ("midtrain", "rl")
SHIM = '''"""vLLM stand-in of a manyways rehearsal (manyways.rehearsal.engine); only on a rehearsal's path."""
from manyways.rehearsal.engine import LLM, SamplingParams, TokensPrompt

__version__ = "0.0.0+manyways.rehearsal"
'''


def write_shim(workdir: Path) -> Path:
    """A ``vllm`` package that re-exports the engine stand-in; returns the directory to put on the path."""
    root = workdir / "shim"
    (root / "vllm").mkdir(parents=True, exist_ok=True)
    (root / "vllm" / "__init__.py").write_text(SHIM)
    (root / "vllm" / "inputs.py").write_text("from manyways.rehearsal.engine import TokensPrompt\n")
    return root


@contextlib.contextmanager
def rehearsal_environment(workdir: Path, fake_gpus: int) -> Iterator[dict[str, str]]:
    """The shim on the path (here and for Ray workers), fake-GPU bookkeeping; returns the
    environment for the training launches (no shim: TRL must not find a vllm there)."""
    shim = str(write_shim(workdir))
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", GPU_DIR_ENV, GPU_COUNT_ENV)}
    train_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and p != shim)}
    os.environ["PYTHONPATH"] = os.pathsep.join([shim, *filter(None, [saved["PYTHONPATH"]]), *sys.path[1:]])
    os.environ[GPU_DIR_ENV] = str(workdir / "gpus")
    os.environ[GPU_COUNT_ENV] = str(fake_gpus)
    sys.path.insert(0, shim)
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]
    try:
        yield train_env
    finally:
        sys.path.remove(shim)
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_ray(fake_gpus: int) -> Iterator[None]:
    """A local Ray cluster with two CPUs and ``fake_gpus`` declared GPUs, shut down afterwards."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("a rehearsal starts its own Ray cluster; shut the running one down first")
    ray.init(num_cpus=2, num_gpus=fake_gpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


class AccelerateStages:
    """Runs midtrain and rl on N processes (``torch.distributed.run`` with ``ACCELERATE_USE_CPU``,
    what ``accelerate launch --num_processes N`` runs); the other stages in-process.

    The ranks are started once and kept for every training stage (``launch --serve``): each stage
    is a spec file in their queue, finished when rank 0 marks it done. A stage that fails ends the
    ranks; the error names the stage and shows the log's tail, and the next stage starts new ones.
    Call :meth:`close` at the end (a context manager does)."""

    def __init__(
        self, workdir: Path, env: dict[str, str], processes: int = 2, timeout_s: float = 3600
    ) -> None:
        self.workdir, self.env, self.processes, self.timeout_s = workdir / "launch", env, processes, timeout_s
        self.launched: list[str] = []
        self.starts = 0  # how many times the ranks were started
        self._proc: subprocess.Popen[bytes] | None = None
        self._queue: Path | None = None
        self._next = 0
        self._log: Path | None = None

    def __enter__(self) -> AccelerateStages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(
        self,
        stage: str,
        cfg: Config,
        out: Path,
        inputs: dict[str, Path],
        overwrite: bool,
        show_progress: bool,
    ) -> Any:
        from manyways.pipeline import stage_module

        if stage not in TRAINING_STAGES:
            return stage_module(stage).run(
                cfg, out, inputs=inputs, overwrite=overwrite, show_progress=show_progress
            )
        queue = self._ranks()
        spec = queue / f"{self._next:04d}.json"
        self._next += 1
        log.info("== %s on the %d training processes -> %s (log %s)", stage, self.processes, spec, self._log)
        write_json_atomic(
            spec,
            {
                "stage": stage,
                "config": cfg.to_dict(),
                "out": str(out),
                "inputs": {k: str(v) for k, v in inputs.items()},
                "overwrite": overwrite,
            },
        )
        self._wait(spec.with_suffix(".done"), f"{stage} ({out.name})")
        self.launched.append(out.name)
        return read_manifest(out)

    def _ranks(self) -> Path:
        """The running ranks' queue, starting them when none are running."""
        if self._proc is not None and self._proc.poll() is None and self._queue is not None:
            return self._queue
        self.starts += 1
        self._queue = self.workdir / f"queue-{self.starts}"
        self._queue.mkdir(parents=True, exist_ok=True)
        self._log = self.workdir / f"ranks-{self.starts}.log"
        self._next = 0
        # `accelerate launch --cpu --num_processes 2` starts ONE process (its simple launcher) in
        # accelerate 1.x; its multi-process launcher is torch.distributed.run, used here directly
        # with ACCELERATE_USE_CPU so that accelerate sets up gloo across the two ranks.
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(self.processes), "-m", "manyways.rehearsal.launch",
            "--serve", str(self._queue),
        ]  # fmt: skip
        env = {**self.env, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        with open(self._log, "wb") as f:
            self._proc = subprocess.Popen(  # its own process group: a kill reaches the ranks too
                cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        log.info(
            "started %d training processes (torch.distributed.run, gloo), log %s", self.processes, self._log
        )
        return self._queue

    def _wait(self, done: Path, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        assert self._proc is not None and self._log is not None
        while not done.exists():
            rc = self._proc.poll()
            if rc is not None or time.monotonic() > deadline:
                if rc is None:
                    self._stop(kill=True)
                tail = "".join(self._log.read_text(errors="replace").splitlines(keepends=True)[-30:])
                why = f"exit {rc}" if rc is not None else f"no answer in {self.timeout_s:.0f} s"
                raise RuntimeError(
                    f"{what} on {self.processes} processes failed ({why}); log {self._log}:\n{tail}"
                )
            time.sleep(0.2)

    def _stop(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        if not kill and self._queue is not None:
            (self._queue / "stop").touch()
        try:
            self._proc.wait(timeout=0 if kill else 60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def close(self) -> None:
        """End the training processes (they finish the stage they are running first)."""
        self._stop()


def ran_counts(cfg: Config, summary: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per arm and stage: the stage directory, whether it was reused, and its manifest counts."""
    from manyways.experiment import arm_steps

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for arm in ["base", *cfg.experiment.arms]:
        path = cfg.run_dir / "arms" / f"{arm}.json"
        if arm == "base" or not path.is_file():
            continue
        record = json.loads(path.read_text())
        out[arm] = {}
        order = [s.name for s in arm_steps(arm, cfg)]  # run order (the record's keys are sorted)
        for step, info in sorted(record["stages"].items(), key=lambda kv: order.index(kv[0])):
            manifest = read_manifest(Path(info["dir"]))
            counts = {k: v for k, v in manifest.get("counts", {}).items() if isinstance(v, (int, float))}
            out[arm][step] = {"dir": Path(info["dir"]).name, "reused": info["reused"], "counts": counts}
    return out


def real_projection(cfg: Config) -> Any:
    """The real run's projection: :func:`manyways.plan.project` (per arm and step: counts, tokens,
    GPU-hours), or None in a build without :mod:`manyways.plan`."""
    try:
        from manyways.plan import project
    except ImportError:
        log.warning("manyways.plan is not available: the report shows no projection of the real run")
        return None
    return project(cfg)


def _projected(plan: Any, arm: str, step: str) -> str:
    """``real: <what>, <count> <unit>, <tokens> out, <h> GPU-h`` for one arm's step, if planned."""
    try:
        run = plan.steps(arm)[step]
    except (AttributeError, KeyError):
        return ""
    e = run.estimate
    shared = f" (shared by {len(run.arms)} arms)" if len(run.arms) > 1 else ""
    return f" | real: {e.count:,} {e.unit}, {e.tokens_out:,} tokens out, {e.gpu_hours:.1f} GPU-h{shared}"


KEY_COUNTS = (
    "problems",
    "rows",
    "samples",
    "attempts",
    "correct",
    "scored",
    "selected",
    "examples",
    "dropped",
    "steps",
    "completion_tokens",
)


def _short(counts: dict[str, Any]) -> str:
    keys = [k for k in counts if ":" not in k and any(k == c or k.endswith(c) for c in KEY_COUNTS)] or list(
        counts
    )
    return ", ".join(f"{k}={counts[k]}" for k in keys[:6])


def format_report(subs: Substitutions, ran: dict[str, Any], projection: Any) -> str:
    """The printed rehearsal table: substitutions, what ran per arm/stage, the real projection."""
    lines = ["== rehearsal: substitutions (manyways.rehearsal.substitute)"]
    lines += [f"  scale: {subs.scale}"]
    lines += [f"  model {hub} -> {path}" for hub, path in subs.models.items()]
    lines += [
        f"  data {k}: {v['hub']} ({v['real_rows']} rows) -> {v['rows']} rows in {v['file']}"
        for k, v in subs.datasets.items()
    ]
    lines += [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in subs.settings.items()]
    lines += ["", "== rehearsal: stages run per arm (counts from each stage's manifest | the real run's)"]
    for arm, stages in ran.items():
        lines.append(f"  {arm}")
        for step, info in stages.items():
            tag = "reused" if info["reused"] else "ran   "
            real = _projected(projection, arm, step) if projection is not None else ""
            lines.append(f"    {step:<9} {tag} {info['dir']:<24} {_short(info['counts'])}{real}")
    lines += ["", "== real run: projected counts and GPU-hours (manyways.plan)"]
    if projection is None:
        lines.append("  manyways.plan is not available in this build: no projection printed")
    else:
        lines.append(projection.table())
    return "\n".join(lines)


def rehearse(
    cfg: Config,
    *,
    workdir: Path | None = None,
    scale: Scale | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Rehearse ``cfg``'s experiment; returns the summary with the printed ``report`` text."""
    from manyways.experiment import run_experiment

    scale = scale or Scale()
    workdir = Path(workdir or Path(cfg.run.root) / f"{cfg.run.name}-rehearsal").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    rcfg, subs = rehearsal_config(cfg, workdir, scale)
    write_json_atomic(workdir / "rehearsal_substitutions.json", subs.to_dict())
    with rehearsal_environment(workdir, scale.fake_gpus) as train_env, local_ray(scale.fake_gpus):
        with AccelerateStages(workdir, train_env, processes=scale.fake_gpus) as runner:
            result = run_experiment(
                rcfg, overwrite=overwrite, show_progress=show_progress, stage_runner=runner
            )
    ran = ran_counts(rcfg, result)
    report = format_report(subs, ran, real_projection(cfg))
    summary = {
        "workdir": str(workdir),
        "substitutions": subs.to_dict(),
        "ran": ran,
        "launched": runner.launched,
        "experiment": result,
        "report": report,
    }
    write_json_atomic(workdir / "rehearsal.json", {k: v for k, v in summary.items() if k != "report"})
    return summary
