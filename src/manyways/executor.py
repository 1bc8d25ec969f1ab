"""Run a shard function over shards, in-process or as Ray actors, with identical output.

Ray is an executor, not an architecture: the same worker object runs here or inside a Ray actor
(one model load per actor), and the driver alone writes shards, so the artifact does not depend
on which executor or how many workers ran it. Ray is imported only when asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

WorkerFactory = Callable[[], Callable[[Any], Any]]


class ShardError(RuntimeError):
    """A shard failed for good; the message names it. Finished shards are kept."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("executor 'ray' needs Ray: pip install 'manyways[ray]'") from None
    return ray


def map_shards(
    factory: WorkerFactory,
    items: list[tuple[int, Any]],
    on_result: Callable[[int, Any], None],
    *,
    executor: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    ray_num_cpus: int | None = None,
) -> None:
    """Call ``worker(item)`` for every (index, item) and hand each result to ``on_result``."""
    if not items:
        return
    if executor == "local":
        worker = factory()
        for index, item in items:
            on_result(index, _call(worker, index, item))
        return
    if executor != "ray":
        raise ValueError(f"unknown executor {executor!r}: use local or ray")
    _map_ray(factory, items, on_result, workers, ray_address, ray_num_cpus)


def _call(worker: Callable[[Any], Any], index: int, item: Any) -> Any:
    try:
        return worker(item)
    except ShardError:
        raise
    except Exception as exc:
        raise ShardError(f"shard {index} failed: {type(exc).__name__}: {exc}") from exc


class _Actor:
    def __init__(self, factory: WorkerFactory):
        self.worker = factory()

    def run(self, index: int, item: Any) -> Any:
        return _call(self.worker, index, item)


def _map_ray(
    factory: WorkerFactory,
    items: list[tuple[int, Any]],
    on_result: Callable[[int, Any], None],
    workers: int,
    address: str | None,
    num_cpus: int | None,
) -> None:
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": num_cpus or workers}
        ray.init(log_to_driver=False, include_dashboard=False, **kwargs)
    try:
        actor_cls = ray.remote(num_cpus=1)(_Actor)
        actors = [actor_cls.remote(factory) for _ in range(max(1, min(workers, len(items))))]
        pending: dict[Any, tuple[int, Any]] = {}
        queue = list(items)
        for actor in actors:
            if queue:
                index, item = queue.pop(0)
                pending[actor.run.remote(index, item)] = (index, actor)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            index, actor = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                raise ShardError(f"shard {index} failed in Ray: {exc}") from exc
            on_result(index, result)
            if queue:
                nxt, item = queue.pop(0)
                pending[actor.run.remote(nxt, item)] = (nxt, actor)
    finally:
        if started_here:
            ray.shutdown()
