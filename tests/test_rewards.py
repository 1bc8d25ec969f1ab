"""The GRPO reward with a format term: a completion the verifier cannot judge gets None from every
reward function, so TRL leaves it out of the group baseline (TRL >= 1.6, our floor)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import torch

from manyways.rewards import CorrectnessReward, FormatReward, reward_functions
from manyways.schema import Problem

PROBLEMS = [Problem("ok", "t", "What is 2 + 3?", "5"), Problem("nogold", "t", "What is it?", "")]


def _call(funcs: list[Any], completions: list[str], ids: list[str]) -> list[list[float | None]]:
    return [f(prompts=[""] * len(completions), completions=completions, problem_id=ids) for f in funcs]


def trl_rewards(per_func: list[list[float | None]], weights: list[float]) -> torch.Tensor:
    """TRL's aggregation (trl/trainer/grpo_trainer.py, ``_calculate_rewards`` and
    ``_generate_and_score_completions``, sum_then_normalize): None -> NaN, weighted nansum, rows
    that are NaN for every function are unscorable (NaN reward, out of the nan-aware baseline)."""
    table = torch.tensor([[torch.nan if r is None else r for r in col] for col in per_func]).T
    rewards = (table * torch.tensor(weights).unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(table).all(dim=1)] = torch.nan
    return rewards


def test_unjudgeable_completion_gets_no_format_reward() -> None:
    funcs, weights = reward_functions(PROBLEMS, format_weight=0.2, timeout_s=5.0)
    completions = ["\\boxed{5}", "\\boxed{6}", "The answer is 5.", "\\boxed{5}"]
    ids = ["ok", "ok", "ok", "nogold"]
    per_func = _call(funcs, completions, ids)
    assert per_func == [[1.0, 0.0, 1.0, None], [1.0, 1.0, 0.0, None]]
    rewards = trl_rewards(per_func, weights)
    assert torch.allclose(rewards[:3], torch.tensor([1.2, 0.2, 1.0])) and torch.isnan(rewards[3])
    baseline = torch.nanmean(rewards)  # the group mean TRL subtracts: the unjudgeable one is out
    assert abs(baseline.item() - (1.2 + 0.2 + 1.0) / 3) < 1e-6


def test_the_verifier_runs_once_per_batch_for_both_rewards(monkeypatch) -> None:
    import manyways.verify.registry as registry

    calls: list[int] = []
    real = registry.verify_many
    monkeypatch.setattr(
        registry, "verify_many", lambda pairs, **kw: calls.append(len(pairs)) or real(pairs, **kw)
    )
    correctness = CorrectnessReward(PROBLEMS, timeout_s=5.0)
    fmt = FormatReward(correctness)
    completions, ids = ["\\boxed{5}", "\\boxed{5}", "\\boxed{7}"], ["ok", "nogold", "ok"]
    assert fmt(prompts=[], completions=completions, problem_id=ids) == [1.0, None, 1.0]
    assert correctness(prompts=[], completions=completions, problem_id=ids) == [1.0, None, 0.0]
    assert calls == [3]  # the format reward judged the batch; correctness reused it
    assert correctness.totals()["unscorable"] == 1


def test_trl_floor_has_the_none_handling_we_rely_on() -> None:
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer)
    assert "torch.isnan(rewards_per_func).all(dim=1)" in source  # the unscorable mask (TRL PR #5902)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"trl>=(\d+)\.(\d+)', pyproject)
    assert floor is not None and (int(floor[1]), int(floor[2])) >= (1, 6)
