"""The shard executor: GPUs per Ray actor, restart of killed workers, failing shards, affinity.

The Ray tests share one small local cluster with two declared (fake) GPUs: Ray hands those out
and sets each actor's ``CUDA_VISIBLE_DEVICES`` exactly as on a GPU node.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from manyways.backends.config import BackendConfig
from manyways.executor import ShardError, _actor_count, _next_item, backend_gpus, map_shards


class DeviceWorker:
    """Reports the GPUs Ray gave this actor's process."""

    def __call__(self, item: int) -> tuple[int, str | None, int]:
        import time

        time.sleep(0.5)  # keep the first actor busy so both actors take shards
        return item, os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()


class DyingWorker:
    """Squares its item; on shard ``die_on`` the process SIGKILLs itself (once when ``marker``
    is given: the marker file says it already died; every time when it is None)."""

    def __init__(self, die_on: int, marker: str | None) -> None:
        self.die_on, self.marker = die_on, marker

    def __call__(self, item: int) -> dict[str, int]:
        if item == self.die_on and (self.marker is None or not Path(self.marker).exists()):
            if self.marker is not None:
                Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return {"item": item, "square": item * item}


@pytest.fixture(scope="module")
def fake_gpu_cluster() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    yield ray
    ray.shutdown()


def _collect(factory: Any, items: list[tuple[int, Any]], **kw: Any) -> dict[int, Any]:
    out: dict[int, Any] = {}
    map_shards(factory, items, out.__setitem__, **kw)
    return out


@pytest.mark.slow
def test_each_gpu_actor_gets_its_own_cuda_visible_devices(fake_gpu_cluster: Any) -> None:
    items = [(i, i) for i in range(6)]
    out = _collect(DeviceWorker, items, executor="ray", workers=2, num_gpus=1)
    devices_by_pid: dict[int, set[str | None]] = {}
    for _, device, pid in out.values():
        devices_by_pid.setdefault(pid, set()).add(device)
    assert len(devices_by_pid) == 2
    devices = [d for ds in devices_by_pid.values() for d in ds]
    assert sorted(devices) == ["0", "1"]  # one GPU each, not the same one, not none


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_its_shard_redone(fake_gpu_cluster: Any, tmp_path: Path) -> None:
    items = [(i, i) for i in range(5)]
    local = _collect(functools.partial(DyingWorker, -1, None), items)
    marker = tmp_path / "died"
    ray_out = _collect(functools.partial(DyingWorker, 2, str(marker)), items, executor="ray", workers=2)
    assert marker.is_file()  # the worker really was killed with SIGKILL on shard 2
    assert ray_out == local


@pytest.mark.slow
def test_a_shard_that_keeps_killing_its_worker_stops_the_stage(fake_gpu_cluster: Any) -> None:
    items = [(i, i) for i in range(3)]
    with pytest.raises(
        ShardError, match=r"shard 1 failed: its Ray worker died or could not start, after up to 1 restarts"
    ):
        _collect(functools.partial(DyingWorker, 1, None), items, executor="ray", workers=1, max_restarts=1)


@pytest.mark.slow
def test_a_failing_shard_on_ray_names_its_index_and_error(fake_gpu_cluster: Any) -> None:
    items = [(0, 1), (1, 0)]
    with pytest.raises(ShardError, match=r"shard 1 failed: ZeroDivisionError"):
        _collect(lambda: lambda x: 1 / x, items, executor="ray", workers=1)


@pytest.mark.parametrize(
    ("backend", "gpus"),
    [
        (BackendConfig(kind="vllm"), 1),
        (BackendConfig(kind="vllm", vllm={"tensor_parallel_size": 4}), 4),
        (BackendConfig(kind="vllm", vllm={"tensor_parallel_size": 2, "pipeline_parallel_size": 2}), 4),
        (BackendConfig(kind="hf", device="cuda"), 1),
        (BackendConfig(kind="hf", device="cuda:1"), 1),
        (BackendConfig(kind="hf", device="cpu"), 0),
        (BackendConfig(kind="hf"), "auto"),
        (BackendConfig(kind="fake"), 0),
        (BackendConfig(kind="openai"), 0),
    ],
)
def test_backend_gpus(backend: BackendConfig, gpus: float | str) -> None:
    assert backend_gpus(backend) == gpus


def test_affinity_prefers_the_previous_key() -> None:
    queue = [(0, ("a", 1)), (1, ("b", 1)), (2, ("a", 2))]
    first = lambda item: item[0]  # noqa: E731
    assert _next_item(queue, "b", first) == (1, ("b", 1))
    assert _next_item(queue, "c", first) == (0, ("a", 1))
    assert _next_item(queue, None, first) == (2, ("a", 2)) and queue == []


def test_actor_count_fits_the_cluster() -> None:
    assert _actor_count({"CPU": 16, "GPU": 8}, 8, 100, 1) == 8
    assert _actor_count({"CPU": 16, "GPU": 2}, 8, 100, 1) == 2  # 8 workers, 2 GPUs: 2 at once
    assert _actor_count({"CPU": 16, "GPU": 8}, 8, 100, 4) == 2  # tensor parallel 4
    assert _actor_count({"CPU": 2}, 8, 100, 0) == 2
    assert _actor_count({"CPU": 16}, 8, 3, 0) == 3
    with pytest.raises(ShardError, match="cannot host one worker"):
        _actor_count({"CPU": 16}, 8, 3, 1)


@pytest.mark.slow
def test_more_gpu_workers_than_gpus_do_not_hang(fake_gpu_cluster: Any) -> None:
    items = [(i, i) for i in range(4)]
    out = _collect(DeviceWorker, items, executor="ray", workers=4, num_gpus=1)
    assert sorted(out) == [0, 1, 2, 3] and {d for _, d, _ in out.values()} <= {"0", "1"}
