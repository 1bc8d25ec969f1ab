"""GRPO reward functions, called by TRL's ``GRPOTrainer`` with the batch's prompts, completions and
dataset columns (here ``problem_id``).

- :class:`CorrectnessReward`: 1.0 when our hang-proof verifier
  (:func:`manyways.verify.registry.verify_many`, the same code as the offline verify stage and
  evaluation) says correct, 0.0 when incorrect or no answer, and None when the verifier could not
  judge (bad gold, timeout, error). Timeouts and unscorable completions are counted.
- :class:`FormatReward`: 1.0 when the completion ends in a ``\\boxed{}`` answer, 0.0 when not,
  and None for a completion the verifier could not judge (it shares the correctness verdicts).

A completion the verifier cannot judge therefore gets None from *every* reward function, with or
without the format term, and TRL (>= 1.6, the floor in ``pyproject.toml``) leaves a completion
whose rewards are all None out of the group baseline and gives it zero advantage. (Were the format
reward given anyway, TRL's ``nansum`` would score it ``format_weight`` and keep it in the baseline.)

Both are plain callables with a ``__name__`` (TRL names its reward metrics after it).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from manyways.heuristics import last_boxed
from manyways.schema import Problem
from manyways.verify import Verdict

log = logging.getLogger(__name__)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or a conversational list of messages (assistant turns joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(
            m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant"
        )
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    return str(completion)


def verdict_reward(status: str, correct: bool | None) -> float | None:
    """1.0 correct, 0.0 incorrect or no answer, None when the verifier could not judge."""
    if correct is not None:
        return float(correct)
    return 0.0 if status == "no_answer" else None


class CorrectnessReward:
    """1.0 correct / 0.0 incorrect or no answer / None unjudgeable, by our verifier."""

    __name__ = "correct"

    def __init__(self, problems: list[Problem], *, timeout_s: float | None = None):
        self.problems = {p.problem_id: p for p in problems}
        self.timeout_s = timeout_s
        self.counts: Counter[str] = Counter()
        self._batch: dict[tuple[str, str], Verdict] = {}  # the latest batch's verdicts

    def verdicts(self, problem_id: list[str], texts: list[str]) -> list[Verdict]:
        """Verdicts of (problem, text) pairs; a batch already judged (by either reward) is not rerun."""
        from manyways.verify.registry import verify_many

        keys = list(zip(problem_id, texts, strict=True))
        todo = [k for k in dict.fromkeys(keys) if k not in self._batch]
        pairs = [(self.problems[pid], text) for pid, text in todo]
        fresh = verify_many(pairs, timeout_s=self.timeout_s) if pairs else []
        known = {**self._batch, **dict(zip(todo, fresh, strict=True))}
        self._batch = {k: known[k] for k in keys}
        return [known[k] for k in keys]

    def __call__(
        self, prompts: list[Any], completions: list[Any], problem_id: list[str], **kwargs: Any
    ) -> list[float | None]:
        verdicts = self.verdicts(problem_id, [completion_text(c) for c in completions])
        batch: Counter[str] = Counter(v.status for v in verdicts)
        self.counts.update({f"status_{k}": n for k, n in batch.items()})
        self.counts["completions"] += len(verdicts)
        rewards = [verdict_reward(v.status, v.correct) for v in verdicts]
        unscorable = sum(r is None for r in rewards)
        self.counts["unscorable"] += unscorable
        log_metric: Callable[[str, float], None] | None = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric("verifier/timeouts", float(batch["timeout"]))
            log_metric("verifier/unscorable", float(unscorable))
        if batch["timeout"]:
            log.warning("verifier timed out on %d of %d completions", batch["timeout"], len(verdicts))
        return rewards

    def totals(self) -> dict[str, int]:
        """Counters over the whole run (statuses, completions, unscorable)."""
        return {"verifier_timeouts": self.counts["status_timeout"], **dict(self.counts)}


class FormatReward:
    """1.0 when the completion contains a ``\\boxed{...}`` final answer, else 0.0; None when
    ``correctness`` (given) could not judge the completion, so it stays out of the baseline."""

    __name__ = "format"

    def __init__(self, correctness: CorrectnessReward | None = None):
        self.correctness = correctness

    def __call__(
        self, prompts: list[Any], completions: list[Any], problem_id: list[str] | None = None, **kwargs: Any
    ) -> list[float | None]:
        texts = [completion_text(c) for c in completions]
        rewards: list[float | None] = [1.0 if last_boxed(t) is not None else 0.0 for t in texts]
        if self.correctness is None or problem_id is None:
            return rewards
        verdicts = self.correctness.verdicts(problem_id, texts)
        return [
            None if verdict_reward(v.status, v.correct) is None else r
            for v, r in zip(verdicts, rewards, strict=True)
        ]


def reward_functions(
    problems: list[Problem], *, format_weight: float = 0.0, timeout_s: float | None = None
) -> tuple[list[Any], list[float]]:
    """The reward functions and their weights: correctness (1.0), plus format when weighted."""
    funcs: list[Any] = [CorrectnessReward(problems, timeout_s=timeout_s)]
    weights = [1.0]
    if format_weight > 0:
        funcs.append(FormatReward(funcs[0]))
        weights.append(format_weight)
    return funcs, weights
