"""A verl custom reward function that scores with manyways' hang-proof verifier.

Use with the data written by ``manyways export`` (``rl_verl.parquet``); see the README's "Export"
section for a full ``verl.trainer.main_ppo`` command::

    custom_reward_function.path=pkg://manyways.verl_reward   # or the file's path
    custom_reward_function.name=compute_score
    +custom_reward_function.reward_kwargs.timeout_s=10       # optional

verl (``verl/trainer/ppo/reward.py``, ``get_custom_reward_fn``) calls ``compute_score`` with
``data_source``, ``solution_str``, ``ground_truth`` and ``extra_info`` as keywords, adds every
``custom_reward_function.reward_kwargs`` entry, and its reward loop
(``verl/experimental/reward_loop/reward_manager/naive.py``) may add ``reward_router_address`` and
``reward_model_tokenizer``: keywords we do not use are accepted and ignored.

``compute_score`` returns 1.0 when :func:`manyways.verify.registry.verify_problem` judges the
solution correct and 0.0 otherwise (incorrect, no answer, or not judgeable: verl needs a number).
The export carries the problem's verification fields in ``extra_info`` (choices, tests, entry
point and the code problem's prompt), so verl training and manyways' own verify/evaluate stages
mean the same thing by "correct", including for a code completion that gives only the body.
The verifier's time limit is the ``timeout_s`` keyword, else ``extra_info["timeout_s"]``, else
the verifier's default for the answer type.
"""

from __future__ import annotations

from typing import Any

from manyways.schema import Problem


def problem_from_verl(data_source: str, ground_truth: str, extra_info: dict[str, Any] | None) -> Problem:
    """The :class:`Problem` a verl row stands for (question text is not needed to verify)."""
    from manyways.exports import problem_from_fields

    info = dict(extra_info or {})
    pid = info.get("problem_id") or info.get("index")
    return problem_from_fields(
        str(ground_truth), info, problem_id=str(pid if pid is not None else "verl"), source=data_source
    )


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    *,
    timeout_s: float | None = None,
    **kwargs: Any,
) -> float:
    """1.0 if ``solution_str`` answers correctly per our verifier, else 0.0."""
    from manyways.verify.registry import verify_problem

    limit = timeout_s if timeout_s is not None else (extra_info or {}).get("timeout_s")
    verdict = verify_problem(
        problem_from_verl(data_source, ground_truth, extra_info),
        solution_str,
        timeout_s=float(limit) if limit else None,
    )
    return 1.0 if verdict.correct else 0.0
