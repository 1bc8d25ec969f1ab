"""Procedurally generated problems from reasoning-gym, with provably disjoint splits.

Each question belongs to one split, decided by its text: :func:`question_split` hashes the
normalised question (:func:`manyways.data.contamination.normalise`) with SHA-256 and sends about
half to ``train`` and half to ``test`` -- never Python's ``hash()``. Each split draws from
``reasoning_gym.create_dataset(task, size=..., seed=..., **options)`` with a seed derived by
SHA-256 from ``(seed, split, round)`` and keeps the first ``size`` distinct questions that
belong to it, topping up with further rounds. So a test split never holds a question of a train
split, whatever the two sizes and seeds: disjoint by construction, not by luck.

``problem_id`` is ``f"{task}-{split}-{index}"``, stable across runs for the same config.
Only numeric golds (integers, decimals, fractions such as ``-4``, ``6.32``, ``3/7``) become
``answer_type="math"``; other golds (knights_knaves sentences, zebra_puzzles names, clock
times...) are rejected as ``non_numeric_gold`` because the schema has no exact-text answer
type that our verifiers check. Each problem's metadata keeps ``gym_task``, ``gym_seed``,
``gym_index`` and reasoning-gym's own ``gym_metadata`` so a reasoning-gym scorer can be used
later. :data:`NUMERIC_TASKS` lists tasks whose golds are numeric; the recommended
out-of-domain default is ``aiw`` ("Alice has 4 sisters and 1 brother; how many sisters does
her brother have?": relational reasoning, one small integer).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from manyways.data.answers import is_numeric_answer, strip_dollars
from manyways.data.contamination import normalise
from manyways.data.sources import GymSource
from manyways.data.validate import LoadResult, RawRow, RowError, collect

logger = logging.getLogger(__name__)

MAX_ROUNDS = 20
# Tasks whose golds were all numeric in a 20-sample survey (reasoning-gym 0.1.25, default
# options): short, exact answers that verify_math can check. base_conversion (hex digits),
# polynomial_equations (lists) and prime_factorization ("5 × 7") are only partly numeric.
NUMERIC_TASKS: tuple[str, ...] = (
    "aiw",
    "basic_arithmetic",
    "binary_alternation",
    "chain_sum",
    "circuit_logic",
    "coin_flip",
    "count_bits",
    "count_primes",
    "decimal_arithmetic",
    "decimal_chain_sum",
    "dice",
    "fraction_simplification",
    "gcd",
    "gsm_symbolic",
    "largest_island",
    "lcm",
    "leg_counting",
    "letter_counting",
    "maze",
    "number_format",
    "number_sequence",
    "power_function",
    "products",
    "rectangle_count",
    "rotten_oranges",
    "self_reference",
    "simple_equations",
    "simple_geometry",
)
RECOMMENDED_OOD_TASK = "aiw"


def split_seed(seed: int, split: str, round_idx: int = 0) -> int:
    """A 63-bit seed for one generation round of one split, from SHA-256."""
    digest = hashlib.sha256(f"manyways/gym/{seed}/{split}/{round_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _generate(task: str, size: int, seed: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    import reasoning_gym  # heavy import, only when a gym source is loaded

    dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **options)
    return [dict(dataset[i]) for i in range(size)]


def question_split(question: str) -> str:
    """``train`` or ``test``: the split a question belongs to, a function of its normalised text."""
    digest = hashlib.sha256(f"manyways/gym/split/{normalise(question)}".encode()).digest()
    return "test" if digest[0] < 128 else "train"


def unique_entries(
    task: str, size: int, seed: int, split: str, options: dict[str, Any]
) -> list[tuple[dict[str, Any], int]]:
    """``size`` entries with distinct questions of ``split``, with the seed of each round."""
    seen: set[str] = set()
    entries: list[tuple[dict[str, Any], int]] = []
    for round_idx in range(MAX_ROUNDS):
        round_seed = split_seed(seed, split, round_idx)
        for entry in _generate(task, 2 * size, round_seed, options):  # about half are this split's
            key = normalise(str(entry["question"]))
            if key not in seen and question_split(entry["question"]) == split:
                seen.add(key)
                entries.append((entry, round_seed))
            if len(entries) == size:
                return entries
        logger.info("%s/%s: %d of %d distinct after round %d", task, split, len(entries), size, round_idx)
    raise ValueError(
        f"reasoning_gym task {task!r} yielded only {len(entries)} distinct {split} questions of {size} "
        f"after {MAX_ROUNDS} rounds; widen its options or lower size"
    )


def split_entries(source: GymSource) -> list[tuple[dict[str, Any], int]]:
    """The entries of ``source.split`` (see :func:`question_split`)."""
    return unique_entries(source.task, source.size, source.seed, source.split, source.options)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, skipkeys=True))


def gym_candidate(source: GymSource, entry: dict[str, Any], seed: int, index: int) -> dict[str, Any]:
    """One reasoning-gym entry as our candidate dict; non-numeric golds are rejected."""
    answer = entry.get("answer")
    if isinstance(answer, str):
        answer = strip_dollars(answer)
    if isinstance(answer, str) and answer.strip() and not is_numeric_answer(answer):
        hint = "" if source.task in NUMERIC_TASKS else f"; numeric tasks: {', '.join(NUMERIC_TASKS)}"
        raise RowError(
            "answer", "non_numeric_gold", f"{source.task} gold {answer[:60]!r} is not a number{hint}"
        )
    return {
        "problem_id": f"{source.task}-{source.split}-{index}",
        "question": entry.get("question"),
        "answer": answer,
        "answer_type": "math",
        "metadata": {
            "gym_task": source.task,
            "gym_split": source.split,
            "gym_seed": seed,
            "gym_index": index,
            "gym_metadata": _json_safe(entry.get("metadata", {})),
        },
    }


def load_gym(source: GymSource, *, skip_bad: bool = False) -> LoadResult:
    """Generate the problems of one reasoning-gym split."""
    label = source.source or f"reasoning_gym/{source.task}"
    file = f"reasoning_gym:{source.task}:{source.split}"
    rows = [
        RawRow(file, i + 1, i, str(entry.get("question"))[:500], record={"entry": entry, "seed": seed})
        for i, (entry, seed) in enumerate(split_entries(source))
    ]

    def mapper(row: RawRow) -> dict[str, Any]:
        record = row.record or {}
        return gym_candidate(source, record["entry"], record["seed"], row.index)

    return collect(rows, mapper, source=label, skip_bad=skip_bad)
