"""The judge worker's lifecycle and GPU request on the executor."""

from __future__ import annotations

from typing import Any

from manyways import judging
from manyways.config import load_config


class _Closing:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_judge_worker_closes_only_the_backend_it_loaded() -> None:
    cfg = load_config(None)
    given = _Closing()
    judging.JudgeWorker(cfg.to_dict(), given).close()
    assert given.closed == 0  # the caller's judge stays open
    worker = judging.JudgeWorker(cfg.to_dict())
    worker.backend = own = _Closing()  # as _backend() sets it after loading
    worker.close()
    worker.close()
    assert own.closed == 1 and worker.backend is None


def test_judge_shards_request_the_judge_backends_gpus(monkeypatch: Any) -> None:
    seen: dict[str, Any] = {}

    def fake_map_shards(factory, items, on_result, **kw):
        seen.update(kw)

    monkeypatch.setattr(judging, "map_shards", fake_map_shards)
    cfg = load_config(
        None,
        ["analyze.judge_backend={kind: vllm, vllm: {tensor_parallel_size: 2}}", "analyze.executor=ray"],
    )
    judging.run_jobs(cfg, [], judge=None)
    assert seen["num_gpus"] == 2 and seen["executor"] == "ray"
