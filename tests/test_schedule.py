"""Stage runs at once (manyways.schedule): the order, sharing and failure rules on synthetic
chains, and a two-job experiment in worker processes that writes what a one-job run writes."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from manyways import experiment, schedule
from manyways.artifacts import MANIFEST, is_finished
from manyways.data import load_problems
from manyways.experiment import Step
from manyways.schedule import Chain, Scheduler


class ThreadLauncher:
    """Runs synthetic stages on threads: each writes its manifest after ``delay`` seconds, or
    raises at once when its stage name is in ``fail``; records order and concurrency."""

    def __init__(self, slots: int, delay: float = 0.05, fail: tuple[str, ...] = ()):
        self.slots, self.delay, self.fail = slots, delay, fail
        self.submitted: list[str] = []
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=slots)

    def _job(self, stage: str, out: Path) -> str:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            time.sleep(0 if stage in self.fail else self.delay)  # failures come first
            if stage in self.fail:
                raise ValueError(f"{stage} refused")
            out.mkdir(parents=True, exist_ok=True)
            (out / MANIFEST).write_text(json.dumps({"fingerprint": out.name}))
            return str(out)
        finally:
            with self._lock:
                self.running -= 1

    def submit(self, stage: str, cfg, out: Path, inputs) -> Future:
        self.submitted.append(out.name)
        return self._pool.submit(self._job, stage, out)

    def close(self) -> None:
        self._pool.shutdown()


def _key(stage: str, cfg, inputs: dict[str, Path]) -> str:
    """A content address from the inputs' directory names: ``s2`` after ``s1`` is ``s2-s1-0``."""
    return "+".join(sorted(p.name for p in inputs.values())) or "0"


def _chain(label: str, *stages: str) -> Chain:
    """A linear chain: each stage reads the one before it."""
    steps, previous = [], None
    for stage in stages:
        steps.append((Step(stage, stage, {}, {"in": previous} if previous else {}), None))
        previous = stage
    return Chain(label, steps)


def test_the_stage_most_chains_wait_for_runs_first_and_once(tmp_path):
    launcher = ThreadLauncher(slots=2)
    shared = [_chain(f"arm{i}", "gen", f"train{i}") for i in range(3)]
    chains = [_chain("base", "evalbase", "analyzebase"), *shared]
    Scheduler(tmp_path, launcher, _key).run(chains)

    assert launcher.submitted[0] == "gen-0"  # three chains wait for it; the base chain for nothing
    assert launcher.submitted.count("gen-0") == 1  # shared: run once
    assert launcher.most_running == 2  # both slots used, never more
    assert all(c.finished for c in chains)
    # the chain that ran it counts it as its own, the others as reused
    assert [c.stages["gen"]["reused"] for c in shared] == [False, True, True]
    assert {c.stages[f"train{i}"]["dir"] for i, c in enumerate(shared)} == {
        str(tmp_path / f"train{i}-gen-0") for i in range(3)
    }


def test_a_step_reading_nothing_is_ready_from_the_start_in_every_chain(tmp_path):
    launcher = ThreadLauncher(slots=1, delay=0)
    chains = []
    for i in range(3):  # gen -> train -> analyze(train, validity); validity reads nothing
        steps = [
            (Step("gen", "gen", {}), None),
            (Step("train", f"train{i}", {}, {"in": "gen"}), None),
            (Step("validity", "validity", {}), None),
            (Step("analyze", f"analyze{i}", {}, {"a": "train", "b": "validity"}), None),
        ]
        chains.append(Chain(f"arm{i}", steps))
    Scheduler(tmp_path, launcher, _key).run(chains)
    # validity and gen are both wanted by all three chains at once; the tie goes to config order
    assert launcher.submitted[:2] == ["gen-0", "validity-0"]
    assert launcher.submitted.count("validity-0") == 1
    assert all(c.finished for c in chains)
    assert list(chains[0].stages) == ["gen", "train", "validity", "analyze"]  # the chain's order
    assert chains[2].stages["analyze"]["dir"] == str(tmp_path / "analyze2-train2-gen-0+validity-0")


def test_one_slot_runs_every_stage_in_dependency_order(tmp_path):
    launcher = ThreadLauncher(slots=1, delay=0)
    chains = [_chain("a", "s1", "s2", "s3"), _chain("b", "t1", "t2")]
    scheduler = Scheduler(tmp_path, launcher, _key)
    scheduler.run(chains)
    assert launcher.most_running == 1
    order = launcher.submitted
    assert order.index("s1-0") < order.index("s2-s1-0") < order.index("s3-s2-s1-0")
    assert sorted(scheduler.executed) == sorted(order)
    # a second run finds everything finished and runs nothing
    again = ThreadLauncher(slots=1)
    Scheduler(tmp_path, again, _key).run([_chain("a", "s1", "s2", "s3"), _chain("b", "t1", "t2")])
    assert again.submitted == []


def test_after_a_failure_running_stages_finish_nothing_new_starts_and_the_error_is_raised(tmp_path):
    launcher = ThreadLauncher(slots=2, delay=0.2, fail=("bad",))
    chains = [_chain("slow", "long", "after_long"), _chain("broken", "bad", "after_bad")]
    with pytest.raises(ValueError, match="bad refused"):
        Scheduler(tmp_path, launcher, _key).run(chains)
    assert is_finished(tmp_path / "long-0")  # was running beside the failure: finished
    assert launcher.submitted == ["long-0", "bad-0"]  # nothing started after the failure
    assert not (tmp_path / "bad-0").exists()


def test_a_dead_worker_process_is_named_in_the_error(tmp_path):
    class DyingLauncher:
        slots = 2

        def submit(self, stage, cfg, out, inputs):
            future: Future = Future()
            future.set_exception(BrokenProcessPool("A process in the process pool was terminated"))
            return future

    with pytest.raises(RuntimeError, match=r"gen-0: the worker process running it died .*rerun to resume"):
        Scheduler(tmp_path, DyingLauncher(), _key).run([_chain("a", "gen")])


def test_threads_per_job_splits_the_cores():
    assert schedule.threads_per_job(2, cores=2) == 1
    assert schedule.threads_per_job(2, cores=8) == 4
    assert schedule.threads_per_job(3, cores=2) == 1  # never zero
    assert schedule.threads_per_job(1, cores=2) == 2


# ----------------------------------------------------------------------------- real stages
def _experiment_cfg(root: Path, tiny: Path, arms: str, *extra: str):
    from test_experiment import _cfg

    return _cfg(root, tiny, f"experiment.arms={arms}", *extra)


@pytest.fixture
def fake_answers_file(tmp_path, monkeypatch):
    """The fake back-ends' golds in a file, so that worker processes answer like this one."""

    def write(cfg) -> None:
        golds = {p.question: p.answer for p in load_problems(cfg.data.train).problems}
        golds.update({p.question: p.answer for p in load_problems(cfg.data.eval["arith"]).problems})
        path = tmp_path / "answers.json"
        path.write_text(json.dumps(golds))
        monkeypatch.setenv("MANYWAYS_FAKE_ANSWERS", str(path))

    return write


VOLATILE = ("wall_s", "finished_at", "started_at", "pid")  # clocks and process ids


def _steady(value):
    """``value`` without the fields that record when and in which process it was written."""
    if isinstance(value, dict):
        return {k: _steady(v) for k, v in value.items() if not k.endswith(VOLATILE)}
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


def _contents(run_dir: Path) -> dict[str, object]:
    """Every file of every stage directory; JSON without clocks and process ids."""
    out: dict[str, object] = {}
    for path in sorted((run_dir / "stages").rglob("*")):
        if not path.is_file() or path.name == "metrics.jsonl":  # the run's clock log
            continue
        rel = str(path.relative_to(run_dir))
        if path.suffix == ".json":
            out[rel] = _steady(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            out[rel] = [_steady(json.loads(line)) for line in path.read_text().splitlines() if line]
        else:
            out[rel] = path.read_bytes()
    return out


@pytest.mark.slow
def test_two_jobs_in_worker_processes_write_what_one_job_writes(
    tmp_path, tiny_model_dir, fake_answers_file, monkeypatch
):
    import shutil

    import torch

    arms = "[vanilla_rl, polya_n1, budget_2x3]"
    # both runs in the same directory (stage configs name model paths under it), one after the other
    # each run its own empty score cache: the score manifests count cache hits
    cfg = _experiment_cfg(tmp_path / "runs", tiny_model_dir, arms, f"score.cache_dir={tmp_path / 's1'}")
    fake_answers_file(cfg)
    monkeypatch.setattr(schedule, "available_cores", lambda: 2)  # one torch thread per worker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        first = experiment.run_experiment(cfg, show_progress=False, jobs=1)
    finally:
        torch.set_num_threads(threads)
    one = tmp_path / "one"
    shutil.move(cfg.run_dir, one)
    cfg = experiment.derive_config(cfg, {"score.cache_dir": str(tmp_path / "s2")})
    second = experiment.run_experiment(cfg, show_progress=False, jobs=2)
    two = cfg.run_dir

    assert first["jobs"] == 1 and second["jobs"] == 2
    assert sorted(first["executed"]) == sorted(second["executed"])
    assert len(second["executed"]) == len(set(second["executed"]))  # nothing ran twice
    a, b = _contents(one), _contents(two)
    assert any(k.endswith(".safetensors") for k in a)  # the models are compared too
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k] != b[k]]
    assert different == []
    for arm in ("vanilla_rl", "polya_n1", "budget_2x3"):
        rec_one = json.loads((one / "arms" / f"{arm}.json").read_text())
        rec_two = json.loads((two / "arms" / f"{arm}.json").read_text())
        assert [Path(s["dir"]).name for s in rec_one["stages"].values()] == [
            Path(s["dir"]).name for s in rec_two["stages"].values()
        ]
    assert first["summary"] == second["summary"]


@pytest.mark.slow
def test_a_stage_failing_in_a_worker_stops_the_experiment_with_its_own_error(
    tmp_path, tiny_model_dir, fake_answers_file
):
    # budget_5x6 asks for 5 heuristics x 6 problems of traces: more than the fake model writes
    cfg = _experiment_cfg(tmp_path, tiny_model_dir, "[vanilla_rl, budget_5x6]", "heuristics.n=5")
    fake_answers_file(cfg)
    with pytest.raises(Exception, match=r"fixed budget 5 x 6 = 30 traces cannot be met") as info:
        experiment.run_experiment(cfg, show_progress=True, jobs=2)  # the driver's one bar too
    assert not isinstance(info.value, BrokenProcessPool)
    stages = cfg.run_dir / "stages"
    # what ran beside the failure finished whole, or did not start; nothing half-written
    for path in stages.iterdir():
        if path.is_dir():
            assert is_finished(path) or path.name.startswith("select-"), path.name
    assert not any(is_finished(p) for p in stages.glob("select-*"))
    assert not (cfg.run_dir / "experiment.json").exists()


def test_jobs_is_how_a_run_executes_not_what_it_computes(tmp_path):
    from manyways.artifacts import ArtifactError
    from manyways.cli import build_parser
    from manyways.config import load_config
    from manyways.pipeline import save_run_config

    base = [f"run.root={tmp_path}", "run.name=r"]
    save_run_config(load_config(None, base))
    save_run_config(load_config(None, [*base, "experiment.jobs=2"]))  # a resumed run may change it
    with pytest.raises(ArtifactError, match="differs: generate.samples"):
        save_run_config(load_config(None, [*base, "experiment.jobs=2", "generate.samples=3"]))
    args = build_parser().parse_args(["experiment", "configs/tiny_cpu.yaml", "--jobs", "3"])
    assert args.jobs == 3
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        experiment.run_experiment(load_config(None, base), jobs=0)
    assert load_config("configs/tiny_cpu.yaml").experiment.jobs == 2  # the demo: one job per core


def test_dtype_auto_is_decided_before_the_workers_start(monkeypatch, tmp_path):
    """Measured next to a busy worker the decision could flip; the driver decides (and caches)
    it for every workload and model first, and a fixed dtype measures nothing."""
    from manyways import dtype_auto
    from manyways.config import load_config

    calls = []
    monkeypatch.setattr(dtype_auto, "resolve_auto_dtype", lambda w, m, **kw: calls.append((w, m)))
    cfg = load_config(None, [f"model.name={tmp_path}", "experiment.teacher_model=/teacher"])
    experiment._decide_auto_dtypes(cfg)
    assert sorted(calls) == sorted((w, m) for w in dtype_auto.WORKLOADS for m in (str(tmp_path), "/teacher"))
    calls.clear()
    fixed = ["model.dtype=float32", "generate.backend.dtype=float32", "score.backend.dtype=float32"]
    fixed += ["evaluate.backend.dtype=float32", "analyze.judge_backend.dtype=float32"]
    experiment._decide_auto_dtypes(load_config(None, [f"model.name={tmp_path}", *fixed]))
    assert calls == []


def test_the_fake_back_end_reads_its_answers_from_the_named_file(tmp_path, monkeypatch):
    from manyways.backends.config import BackendConfig, make_backend

    monkeypatch.delenv("MANYWAYS_FAKE_ANSWERS", raising=False)
    assert make_backend(BackendConfig(kind="fake"), "m").answers == {}
    good = tmp_path / "answers.json"
    good.write_text(json.dumps({"What is 2+3?": "5"}))
    monkeypatch.setenv("MANYWAYS_FAKE_ANSWERS", str(good))
    assert make_backend(BackendConfig(kind="fake"), "m").answers == {"What is 2+3?": "5"}
    bad = tmp_path / "bad.json"
    for text, why in (("{not json", "cannot read a JSON object"), ('{"q": 5}', "expected a JSON object")):
        bad.write_text(text)
        monkeypatch.setenv("MANYWAYS_FAKE_ANSWERS", str(bad))
        with pytest.raises(ValueError, match=f"MANYWAYS_FAKE_ANSWERS={bad}: {why}"):
            make_backend(BackendConfig(kind="fake"), "m")
