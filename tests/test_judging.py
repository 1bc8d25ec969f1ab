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


class _EchoJudge:
    """Answers each request with the menu id whose text the trace names (so labels can be told
    apart), and records the size of every generate call."""

    name = "echo"
    model_id = "echo-judge"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, requests, progress=None):  # type: ignore[no-untyped-def]
        from manyways.backends.protocol import GenSample

        self.calls.append(len(requests))
        out = []
        for r in requests:
            ids = r.json_schema["items"]["enum"]
            trace = r.messages[-1]["content"].split("Solution:")[-1]
            out.append([GenSample(f'["{next(i for i in ids if i in trace)}"]', "stop", 1, 1)])
        return out


def test_jobs_with_one_menu_share_shards_and_get_their_own_labels_back() -> None:
    from manyways.heuristics import load_taxonomy

    taxonomy = load_taxonomy()
    a, b, c = taxonomy.ids[:3]
    jobs = [
        judging.JudgeJob("first", taxonomy, [f"uses {a}", f"uses {b}"], [None, None]),
        judging.JudgeJob("second", taxonomy, [f"uses {c}", f"uses {a}", f"uses {b}"], ["q", "q", "q"]),
        judging.JudgeJob("one_each", taxonomy, [f"uses {c}"], [None], max_labels=1),
    ]
    judge = _EchoJudge()
    cfg = load_config(None, ["analyze.judge_shard_size=4"])
    got = judging.run_jobs(cfg, jobs, judge=judge)
    assert {k: [lab.ids for lab in v] for k, v in got.items()} == {
        "first": [(a,), (b,)],
        "second": [(c,), (a,), (b,)],
        "one_each": [(c,)],
    }
    # the two taxonomy jobs' 5 traces pooled into shards of 4 + 1; the one-label job on its own
    assert judge.calls == [4, 1, 1]
