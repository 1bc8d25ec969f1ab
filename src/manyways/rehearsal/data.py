"""Small local files shaped exactly like the rows of the Hub datasets a config names.

Each writer produces rows with the real dataset's columns and value types (AIME 2024's integer
``Answer``, AMC23's float ``answer``, OlympiadBench's ``final_answer`` list, MuSR's ``choices``
as a list literal string, DAPO's chat-message ``prompt`` with its answer-format instructions, ...),
so the rehearsal runs the same preset transforms as a real run. The questions are simple sums;
half of them have the gold ``7`` (the answer the stand-in models were taught to box most of the
time, see :mod:`manyways.rehearsal.models`) so that correct and incorrect traces both exist. The
training questions all have the gold 7 (``gold_seven``): the fixed-budget arms need a correct
trace for nearly every one of them (``budget_1x7408``: 7,408 of GSM8K's 7,473), and the stand-in's
misses still give the incorrect-trace arms their traces.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from manyways.data.sources import HubSource

Row = dict[str, Any]

# Sizes of the real datasets (rows before deduplication), for scaling and for the projection.
REAL_SIZES: dict[str, int] = {
    "gsm8k:train": 7473,
    "gsm8k:test": 1319,
    "dapo_math:train": 17917,
    "math:test": 5000,
    "math500:test": 500,
    "aime2024:train": 30,
    "aime2025:train": 30,
    "amc23:test": 40,
    "olympiadbench:train": 674,
    "humaneval:test": 164,
    "musr:murder_mysteries": 250,
    "musr:object_placements": 256,
    "musr:team_allocation": 250,
    "MathArena/hmmt_feb_2025:train": 30,
}


def _question(i: int) -> tuple[str, int]:
    """The i-th question and its gold: half the golds are 7."""
    a = 3 + i % 4
    b = 7 - a if i % 2 == 0 else 8 - a + i % 3
    return f"Sam has {a} apples and buys {b} more at shop {i}. How many apples does Sam have now?", a + b


def _gsm8k(i: int) -> Row:
    q, g = _question(i)
    return {"question": q, "answer": f"Sam starts with some apples and buys more.\n#### {g}"}


def _dapo(i: int) -> Row:
    q, g = _question(i)
    content = (
        "Solve the following math problem step by step. The last line of your response should be of "
        "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        f'{q}\n\nRemember to put your answer on its own line after "Answer:".'
    )
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": content, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": str(g), "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": f"rehearsal-{i:05d}"},
    }


def _math(i: int) -> Row:
    q, g = _question(i)
    return {
        "problem": q,
        "solution": f"Adding gives $\\boxed{{{g}}}$.",
        "answer": str(g),
        "subject": "Prealgebra",
        "level": 1 + i % 5,
        "unique_id": f"test/prealgebra/{i}.json",
    }


def _aime2024(i: int) -> Row:
    q, g = _question(i)
    return {"ID": f"2024-I-{i + 1}", "Problem": q, "Solution": f"The answer is {g}.", "Answer": g}


def _aime2025(i: int) -> Row:
    q, g = _question(i)
    return {"id": str(i), "problem": q, "answer": str(g), "url": "", "year": 2025}


def _amc23(i: int) -> Row:
    q, g = _question(i)
    return {"id": i, "question": q, "answer": float(g), "url": ""}


def _olympiadbench(i: int) -> Row:
    q, g = _question(i)
    return {
        "id": 1600 + i,
        "question": q,
        "solution": [f"Adding gives ${g}$."],
        "final_answer": [f"${g}$"],
        "context": None,
        "modality": "Text-only",
        "difficulty": "Competition",
        "is_multiple_answer": False,
        "unit": None,
        "answer_type": "Numerical",
        "error": None,
        "question_type": "Open-ended",
        "subfield": "Algebra",
        "subject": "Math",
        "language": "English",
    }


def _musr(i: int) -> Row:
    names = ["Mackenzie", "Ana", "Bruno"]
    return {
        "narrative": f"In the old house, {names[i % 3]} was seen near the library at midnight.",
        "question": "Who is the most likely murderer?",
        "choices": repr(names[:2]),
        "answer_index": i % 2,
        "answer_choice": names[i % 2],
    }


WRITERS: dict[str, Callable[[int], Row]] = {
    "gsm8k": _gsm8k,
    "dapo_math": _dapo,
    "math": _math,
    "math500": _math,
    "aime2024": _aime2024,
    "aime2025": _aime2025,
    "amc23": _amc23,
    "olympiadbench": _olympiadbench,
    "musr": _musr,
}


def _field_row(source: HubSource, i: int) -> Row:
    """A row for a hub source described by a field map instead of a preset."""
    assert source.fields is not None
    q, g = _question(i)
    row: Row = {source.fields.question: q, source.fields.answer: str(g)}
    if source.fields.problem_id:
        row[source.fields.problem_id] = f"{source.name}-{i}"
    return row


def real_size(source: HubSource) -> int | None:
    """The real dataset's row count when known (preset or name, with its split)."""
    from manyways.data.hub import PRESETS

    spec = PRESETS.get(source.preset) if source.preset else None
    split = source.split or (spec.split if spec else "train")
    key = f"{source.preset or source.name}:{split}"
    size = REAL_SIZES.get(key)
    return min(size, source.limit) if size and source.limit else size


def write_hub_file(source: HubSource, rows: int, path: Path, *, gold_seven: bool = False) -> Path:
    """``rows`` rows shaped like ``source``'s dataset, as JSONL at ``path``; ``gold_seven``: every
    gold is 7 (the even question numbers), else half of them."""
    if source.preset is not None and source.preset not in WRITERS:
        raise ValueError(f"no rehearsal rows for hub preset {source.preset!r} (known: {sorted(WRITERS)})")
    make = WRITERS[source.preset] if source.preset else (lambda i: _field_row(source, i))
    first = question_offset(source)
    step = 2 if gold_seven else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(first, first + step * rows, step):
            f.write(json.dumps(make(i)) + "\n")
    return path


def question_offset(source: HubSource) -> int:
    """Where ``source``'s questions start: each data set gets its own block of question numbers
    (a multiple of 12, so the pattern of golds is kept), so no benchmark question equals a
    training question or shares a 13-gram with one (every 13-gram holds the question's number),
    and the evaluate stage's decontamination leaves the benchmarks whole, as on real data."""
    spec = f"{source.preset or source.name}:{source.split}"
    return 12_000 * (1 + zlib.crc32(spec.encode()) % 5000)
