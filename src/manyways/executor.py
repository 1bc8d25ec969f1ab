"""Run a shard function over shards, in-process or as Ray actors, with identical output.

Ray is an executor, not an architecture: the same worker object runs here or inside a Ray actor
(one model load per actor), and the driver alone writes shards, so the artifact does not depend
on which executor or how many workers ran it. Ray is imported only when asked for.

On Ray each actor asks for the GPUs its back-end needs (:func:`backend_gpus`: a vLLM engine its
tensor-parallel size), so Ray gives every actor its own ``CUDA_VISIBLE_DEVICES``; an actor whose
process dies (OOM killer, ``kill -9``, a lost node) is restarted and its shard redone, so the
output is the one an undisturbed run writes. The stages that sample or score (generate, evaluate,
score; the analysis judge) all run their shards through :func:`map_shards`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

WorkerFactory = Callable[[], Callable[[Any], Any]]
DEFAULT_MAX_RESTARTS = 2


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
    num_gpus: float | str = 0,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    affinity: Callable[[Any], Any] | None = None,
) -> None:
    """Call ``worker(item)`` for every (index, item) and hand each result to ``on_result``.

    ``factory()`` builds one worker per process (local) or per actor (Ray); a worker with a
    ``close()`` method is closed when the local run ends (Ray actors end with their process).

    Ray only: ``num_gpus`` is what each actor requests (Ray then sets its ``CUDA_VISIBLE_DEVICES``
    to GPUs of its own; "auto" = 1 when the cluster has GPUs, else 0; see :func:`backend_gpus`).
    An actor whose process dies is restarted (its worker built anew) and its shard redone, up to
    ``max_restarts`` times; after that the stage stops with a :class:`ShardError` naming the shard.
    ``affinity(item)`` (optional) is a key an actor prefers to keep: a free actor takes the first
    queued item with the key of its previous one (e.g. the same model), else the first queued.
    """
    if not items:
        return
    if executor == "local":
        worker = factory()
        try:
            for index, item in items:
                on_result(index, _call(worker, index, item))
        finally:
            _close(worker)
        return
    if executor != "ray":
        raise ValueError(f"unknown executor {executor!r}: use local or ray")
    options = RayOptions(workers, ray_address, ray_num_cpus, num_gpus, max_restarts, affinity)
    _map_ray(factory, items, on_result, options)


def backend_gpus(backend: Any) -> float | str:
    """GPUs one worker of ``backend`` (a :class:`~manyways.backends.config.BackendConfig`) needs:
    vllm: its tensor- x pipeline-parallel size; hf: 1 on an explicit cuda device, "auto" when the
    device is left to the worker (cuda if it has one), 0 on cpu; openai and fake: 0."""
    if backend.kind == "vllm":
        options = backend.vllm or {}
        return int(options.get("tensor_parallel_size", 1)) * int(options.get("pipeline_parallel_size", 1))
    if backend.kind == "hf":
        if backend.device is None:
            return "auto"
        return 1 if str(backend.device).startswith("cuda") else 0
    return 0


def _call(worker: Callable[[Any], Any], index: int, item: Any) -> Any:
    try:
        return worker(item)
    except ShardError:
        raise
    except Exception as exc:
        raise ShardError(f"shard {index} failed: {type(exc).__name__}: {exc}") from exc


def _close(worker: Any) -> None:
    """A worker with a ``close()`` (a loaded model) is closed when the executor is done with it."""
    close = getattr(worker, "close", None)
    if callable(close):
        close()


class _Actor:
    def __init__(self, factory: WorkerFactory):
        self.worker = factory()

    def run(self, index: int, item: Any) -> Any:
        return _call(self.worker, index, item)


@dataclass(frozen=True)
class RayOptions:
    workers: int = 1
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: float | str = 0
    max_restarts: int = DEFAULT_MAX_RESTARTS
    affinity: Callable[[Any], Any] | None = None


def _resolve_gpus(ray: Any, num_gpus: float | str) -> float:
    if num_gpus == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return float(num_gpus)


def _actor_count(resources: dict[str, float], workers: int, n_items: int, gpus: float) -> int:
    """Actors to start: ``workers``, but no more than there are items, nor than the cluster can
    host at once (1 CPU and ``gpus`` GPUs each): an actor that can never be placed would hold its
    shard forever."""
    fits = int(resources.get("CPU", 0) // 1)
    if gpus > 0:
        fits = min(fits, int(resources.get("GPU", 0) // gpus))
    if fits < 1:
        raise ShardError(
            f"the Ray cluster ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs) cannot "
            f"host one worker (1 CPU, {gpus:g} GPUs)"
        )
    count = max(1, min(workers, n_items, fits))
    if count < min(workers, n_items):
        log.warning("ray: %d workers asked for, the cluster hosts %d at once", workers, count)
    return count


def _next_item(
    queue: list[tuple[int, Any]], key: Any, affinity: Callable[[Any], Any] | None
) -> tuple[int, Any]:
    if affinity is not None and key is not None:
        for pos, (_, item) in enumerate(queue):
            if affinity(item) == key:
                return queue.pop(pos)
    return queue.pop(0)


def _map_ray(
    factory: WorkerFactory,
    items: list[tuple[int, Any]],
    on_result: Callable[[int, Any], None],
    opts: RayOptions,
) -> None:
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = (
            {"address": opts.address} if opts.address else {"num_cpus": opts.num_cpus or opts.workers}
        )
        ray.init(log_to_driver=False, include_dashboard=False, **kwargs)
    actors: list[Any] = []
    try:
        gpus = _resolve_gpus(ray, opts.num_gpus)
        actor_cls = ray.remote(
            num_cpus=1, num_gpus=gpus, max_restarts=opts.max_restarts, max_task_retries=opts.max_restarts
        )(_Actor)
        count = _actor_count(ray.cluster_resources(), opts.workers, len(items), gpus)
        actors = [actor_cls.remote(factory) for _ in range(count)]
        log.info(
            "ray: %d actors, %g GPU(s) each, restarted up to %d times", len(actors), gpus, opts.max_restarts
        )
        _drive(ray, actors, list(items), on_result, opts)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started_here:
            ray.shutdown()


def _drive(
    ray: Any,
    actors: list[Any],
    queue: list[tuple[int, Any]],
    on_result: Callable[[int, Any], None],
    opts: RayOptions,
) -> None:
    """Keep every actor busy with one shard at a time; the driver alone hands results on."""
    pending: dict[Any, tuple[int, Any, Any]] = {}

    def submit(actor: Any, key: Any) -> None:
        if queue:
            index, item = _next_item(queue, key, opts.affinity)
            key = opts.affinity(item) if opts.affinity else None
            pending[actor.run.remote(index, item)] = (index, actor, key)

    for actor in actors:
        submit(actor, None)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        index, actor, key = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:
            raise ShardError(f"shard {index} failed in Ray: {exc}") from exc
        except ray.exceptions.RayError as exc:
            raise ShardError(
                f"shard {index} failed: its Ray worker died or could not start, after up to "
                f"{opts.max_restarts} restarts ({type(exc).__name__}: {exc})"
            ) from exc
        on_result(index, result)
        submit(actor, key)
