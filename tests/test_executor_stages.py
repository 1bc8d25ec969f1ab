"""Issue 12 defect 6: evaluate and score run their shards over the same executor choice as
generate, with output identical to the local executor (a small local Ray cluster)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from manyways.artifacts import read_table
from manyways.backends.config import BackendConfig
from manyways.backends.fake import FakeBackend
from manyways.config import config_from_dict, load_config
from manyways.stages.score import scorer_gpus
from test_stage_evaluate import QUESTIONS, RATES, make_cfg
from test_stage_score import _fake_run


class GoldFactory:
    """Fake back-ends that know the golds, with a per-model correct rate (built in each actor)."""

    def __call__(self, backend_cfg: object, path: str) -> FakeBackend:
        return FakeBackend(answers=QUESTIONS, correct_rate=RATES.get(path, 0.5), model_id=path)


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    yield ray
    ray.shutdown()


def _with(cfg: Any, section: str, **values: Any) -> Any:
    data = cfg.to_dict()
    data[section].update(values)
    return config_from_dict(data)


@pytest.mark.slow
def test_evaluate_on_ray_matches_local(ray_cluster: Any, tmp_path: Path) -> None:
    from manyways.stages import evaluate

    local = make_cfg(tmp_path, "run.name=l")
    remote = _with(make_cfg(tmp_path, "run.name=r"), "evaluate", executor="ray", workers=2)
    a = evaluate.run(local, local.run_dir / "evaluate", show_progress=False, backend_factory=GoldFactory())
    b = evaluate.run(remote, remote.run_dir / "evaluate", show_progress=False, backend_factory=GoldFactory())
    assert a["fingerprint"] == b["fingerprint"]  # the executor is not part of the output's identity
    assert a["counts"] == b["counts"] and a["counts"]["correct"] > 0
    assert (
        read_table(local.run_dir / "evaluate").to_pylist()
        == read_table(remote.run_dir / "evaluate").to_pylist()
    )
    results = [
        json.loads((c.run_dir / "evaluate" / "results.json").read_text())["results"] for c in (local, remote)
    ]
    assert results[0] == results[1]


@pytest.mark.slow
def test_score_on_ray_matches_local(
    ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from manyways.stages import score

    cfg, run_dir = _fake_run(tmp_path, monkeypatch, "score.scorer=judge", "score.backend.kind=fake")
    monkeypatch.undo()  # the judge is the plain fake back-end, here and in the actors
    inputs = {"generate": run_dir / "generate", "verify": run_dir / "verify"}
    local = _with(cfg, "score", cache_dir=str(tmp_path / "cache_l"))
    remote = _with(cfg, "score", cache_dir=str(tmp_path / "cache_r"), executor="ray", workers=2)
    a = score.run(local, run_dir / "score_l", inputs=inputs, show_progress=False)
    b = score.run(remote, run_dir / "score_r", inputs=inputs, show_progress=False)
    assert a["counts"] == b["counts"] and a["counts"]["computed"] == a["counts"]["rows"] > 0
    assert read_table(run_dir / "score_l").to_pylist() == read_table(run_dir / "score_r").to_pylist()


def test_score_and_evaluate_take_the_executor_keys() -> None:
    cfg = load_config(
        None,
        ["score.executor=ray", "score.workers=8", "evaluate.executor=ray", "evaluate.ray_address=auto"],
    )
    assert (cfg.score.executor, cfg.score.workers) == ("ray", 8)
    assert (cfg.evaluate.executor, cfg.evaluate.ray_address) == ("ray", "auto")
    assert load_config(None).score.executor == "local" == load_config(None).evaluate.executor


def test_scorer_gpus() -> None:
    from manyways.config import ScoreSection

    assert scorer_gpus(ScoreSection(scorer="reward_model", model="rm")) == "auto"
    assert scorer_gpus(ScoreSection(scorer="reward_model", model="rm", device="cuda:0")) == 1
    assert scorer_gpus(ScoreSection(scorer="reward_model", model="rm", device="cpu")) == 0
    vllm = BackendConfig(kind="vllm", vllm={"tensor_parallel_size": 2})
    assert scorer_gpus(ScoreSection(scorer="judge", backend=vllm)) == 2
    assert scorer_gpus(ScoreSection(scorer="none")) == 0
