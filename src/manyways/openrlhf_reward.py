"""An OpenRLHF reward function that scores with manyways' hang-proof verifier.

Use with ``rl_openrlhf.jsonl`` from ``manyways export`` (see the README's "Export" section for a
full ``openrlhf.cli.train_ppo_ray`` command)::

    --reward.remote_url $(python -c "import manyways.openrlhf_reward as m; print(m.__file__)")
    --data.input_key input --data.label_key label --data.apply_chat_template

OpenRLHF (``openrlhf/utils/agent.py``, ``SingleTurnAgentExecutor``) loads a ``--reward.remote_url``
that ends in ``.py`` with ``importlib`` and calls ``reward_func(queries, prompts, labels)``:
``queries`` are prompt + response decoded with special tokens, ``prompts`` the chat-templated
prompts (``openrlhf/datasets/prompts_dataset.py``) and ``labels`` the dataset's ``label`` column.
Our label is the JSON object written by :func:`manyways.exports.openrlhf_label` (gold, answer
type, choices, tests, entry point, code prompt), so every answer type is judged exactly as by
:func:`manyways.verify.registry.verify_problem`. A plain (non-JSON) label is taken as a math gold.

Returns ``{"rewards", "scores", "extra_logs"}`` as OpenRLHF expects: rewards and scores are 1.0
for a correct response and 0.0 otherwise (incorrect, no answer, or not judgeable: OpenRLHF needs a
number); ``extra_logs`` has the share of correct responses and the count the verifier could not
judge. The verifier's time limit is ``MANYWAYS_VERIFY_TIMEOUT_S`` (seconds) when set.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from manyways.schema import Problem

# Special tokens a decode with ``skip_special_tokens=False`` leaves after the response
# (ChatML / Llama 3 / Gemma / DeepSeek end-of-turn and end-of-text markers).
_TRAILING_SPECIAL = re.compile(
    r"(?:\s*(?:<\|[^<>|]{1,40}\|>|</s>|<eos>|<end_of_turn>|<｜[^<>]{1,40}｜>))+\s*$"
)


def response_text(query: str, prompt: str) -> str:
    """The response inside ``query`` (prompt + response): the text after the prompt, without the
    end-of-turn special tokens the decode left; the whole query when the prompt is not found."""
    if prompt and query.startswith(prompt):
        response = query[len(prompt) :]
    elif prompt and prompt in query:
        response = query[query.rindex(prompt) + len(prompt) :]
    else:
        response = query
    return _TRAILING_SPECIAL.sub("", response)


def problem_from_label(label: Any, index: int = 0) -> Problem:
    """The :class:`Problem` an exported label stands for (a non-JSON label is a math gold)."""
    from manyways.exports import problem_from_fields

    fields: Any = None
    if isinstance(label, dict):
        fields = label
    elif isinstance(label, str):
        try:
            fields = json.loads(label)
        except json.JSONDecodeError:
            fields = None
    if not isinstance(fields, dict) or "answer" not in fields:
        return problem_from_fields(str(label), {}, problem_id=f"label{index}")
    pid = fields.get("problem_id") or f"label{index}"
    return problem_from_fields(str(fields["answer"]), fields, problem_id=str(pid), source="openrlhf")


def _timeout() -> float | None:
    value = os.environ.get("MANYWAYS_VERIFY_TIMEOUT_S")
    return float(value) if value else None


def reward_func(queries: list[str], prompts: list[str], labels: list[Any], **kwargs: Any) -> dict[str, Any]:
    """1.0 per correct response, else 0.0, by our verifier (see the module docstring)."""
    import torch

    from manyways.verify.registry import verify_many

    if not len(queries) == len(prompts) == len(labels):
        raise ValueError(
            f"reward_func got {len(queries)} queries, {len(prompts)} prompts, {len(labels)} labels"
        )
    pairs = [
        (problem_from_label(label, i), response_text(query, prompt))
        for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels, strict=True))
    ]
    verdicts = verify_many(pairs, timeout_s=_timeout())
    rewards = torch.tensor([1.0 if v.correct else 0.0 for v in verdicts], dtype=torch.float)
    unjudged = sum(v.correct is None and v.status != "no_answer" for v in verdicts)
    return {
        "rewards": rewards,
        "scores": rewards.clone(),
        "extra_logs": {
            "verifier_correct": rewards.mean() if len(verdicts) else torch.tensor(0.0),
            "verifier_unjudged": torch.tensor(float(unjudged)),
        },
    }
