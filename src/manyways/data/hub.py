"""Hugging Face datasets through presets: column mappings and gold extraction per benchmark.

Each preset knows its usual dataset id and split and turns one row shaped like that
dataset's rows into our candidate dict:

==============  ==========================================  ========================================
preset          default dataset (split)                     row shape -> Problem
==============  ==========================================  ========================================
gsm8k           openai/gsm8k, config main (train)           question / answer, gold after ``####``
math            DigitalLearningGmbH/MATH-lighteval (test)   problem / solution, boxed gold
math500         HuggingFaceH4/MATH-500 (test)               problem / answer (else boxed solution)
aime2024        Maxwell-Jia/AIME_2024 (train)               ID / Problem / Answer
aime2025        yentinglin/aime_2025 (train)                id / problem / answer
amc23           math-ai/amc23 (test)                        id / question / answer (float -> "27")
olympiadbench   Hothan/OlympiadBench OE_TO_maths_en_COMP    id / question / all final_answer items
dapo_math       BytedTsinghua-SIA/DAPO-Math-17k (train)     prompt[user].content without DAPO's
                                                            instructions / reward_model.ground_truth
humaneval       openai/openai_humaneval (test)              task_id / prompt / canonical_solution /
                                                            test / entry_point, answer_type code
musr            TAUR-Lab/MuSR (murder_mysteries)            narrative + question / choices (a list
                                                            literal) / answer_index -> letter
==============  ==========================================  ========================================

With ``data_files`` the preset runs on local Parquet / JSONL / JSON files and the network is
never touched (this is how the tests run). Without them, ``datasets.load_dataset`` is called;
when it cannot reach or find the dataset (e.g. ``HF_HUB_OFFLINE=1`` and nothing cached),
:class:`HubUnavailableError` names the dataset and suggests ``data_files``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from manyways.data.answers import extract_boxed, extract_gsm8k_gold, strip_dollars
from manyways.data.local import field_columns, field_mapper, iter_rows, parse_choices
from manyways.data.sources import HubSource
from manyways.data.validate import LoadResult, Mapper, RawRow, RowError, collect

logger = logging.getLogger(__name__)

Record = dict[str, Any]


class HubUnavailableError(RuntimeError):
    """The named hub dataset could not be loaded (offline, unknown, or no access)."""


def _get(record: Record, *keys: str) -> Any:
    """The value of the first of ``keys`` present in ``record``; missing_field otherwise."""
    for key in keys:
        if key in record:
            return record[key]
    raise RowError(keys[0], "missing_field")


def _solution_gold(record: Record, extract: Callable[[str], str | None], key: str) -> str:
    solution = _get(record, key)
    if not isinstance(solution, str):
        raise RowError(key, "wrong_type", "expected a string")
    gold = extract(solution)
    if gold is None:
        raise RowError(key, "unparseable_gold" if solution.strip() else "empty_gold", "no gold found")
    return gold


def gsm8k_record(record: Record) -> Record:
    """GSM8K: the gold is the number after ``####`` in ``answer`` (commas removed)."""
    gold = _solution_gold(record, extract_gsm8k_gold, "answer")
    return {"question": _get(record, "question"), "answer": gold, "metadata": {"solution": record["answer"]}}


def math_record(record: Record) -> Record:
    """MATH / MATH-500: ``answer`` column when present, else the boxed gold of ``solution``."""
    answer = record.get("answer")
    if not (isinstance(answer, str) and answer.strip()):
        answer = _solution_gold(record, extract_boxed, "solution")
    meta = {k: record[k] for k in ("level", "type", "subject", "solution") if record.get(k) is not None}
    return {
        "problem_id": record.get("unique_id"),
        "question": _get(record, "problem"),
        "answer": answer,
        "metadata": meta,
    }


def simple_math_record(record: Record) -> Record:
    """AIME 2024 / 2025, AMC23: an id, a question and a (possibly numeric) answer column."""
    return {
        "problem_id": next((record[k] for k in ("ID", "id") if record.get(k) is not None), None),
        "question": _get(record, "Problem", "problem", "question"),
        "answer": _get(record, "Answer", "answer"),
    }


def olympiadbench_record(record: Record) -> Record:
    """OlympiadBench: ``final_answer`` is a list; a problem with several final answers (e.g. two
    solutions, or x and y) is graded against all of them: the gold is their comma-separated list,
    which the verifier compares as a set (every answer, nothing more, in any order). The list is
    kept in ``metadata["final_answers"]``."""
    finals = _get(record, "final_answer")
    if isinstance(finals, str):
        finals = [finals]
    if not isinstance(finals, list) or not finals:
        raise RowError("final_answer", "empty_gold" if finals in ([], None) else "wrong_type")
    if not all(isinstance(f, str) for f in finals):
        raise RowError("final_answer", "wrong_type", "expected a list of strings")
    answers = [strip_dollars(f) for f in finals]
    if not all(a.strip() for a in answers):
        raise RowError("final_answer", "empty_gold", "an empty answer in the list")
    meta = {k: record[k] for k in ("unit", "is_multiple_answer", "subfield") if record.get(k) is not None}
    if len(answers) > 1:
        meta["final_answers"] = answers
    return {
        "problem_id": record.get("id"),
        "question": _get(record, "question"),
        "answer": ", ".join(answers),
        "metadata": meta,
    }


_DAPO_PREFIX = "Solve the following math problem step by step."
_DAPO_ANSWER_LINE = "where $Answer is the answer to the problem."
_DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'


def dapo_question(content: str) -> str:
    """The bare problem inside a DAPO prompt, without its answer-format instructions."""
    text = content.strip()
    if text.startswith(_DAPO_PREFIX) and _DAPO_ANSWER_LINE in text:
        text = text.split(_DAPO_ANSWER_LINE, 1)[1]
    return text.strip().removesuffix(_DAPO_SUFFIX).strip()


def dapo_record(record: Record) -> Record:
    """DAPO-Math-17K: chat-message prompt, ``reward_model.ground_truth``, ``extra_info.index``."""
    prompt = _get(record, "prompt")
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise RowError("prompt", "wrong_type", "expected a list of chat messages")
    user = [m.get("content") for m in prompt if m.get("role", "user") == "user"]
    if not user or not isinstance(user[0], str):
        raise RowError("prompt", "missing_field", "no user message")
    reward = _get(record, "reward_model")
    if not isinstance(reward, dict) or "ground_truth" not in reward:
        raise RowError("reward_model", "missing_field", "no ground_truth")
    extra = record.get("extra_info") or {}
    index = extra.get("index") if isinstance(extra, dict) else None
    return {
        "problem_id": None if index is None else f"dapo-{index}",
        "question": dapo_question(user[0]),
        "answer": reward["ground_truth"],
    }


def humaneval_record(record: Record) -> Record:
    """HumanEval: the prompt is the question, the canonical solution the gold, ``test`` the tests."""
    prompt, entry = _get(record, "prompt"), _get(record, "entry_point")
    return {
        "problem_id": _get(record, "task_id"),
        "question": prompt,
        "answer": _get(record, "canonical_solution"),
        "answer_type": "code",
        "tests": _get(record, "test"),
        "metadata": {"entry_point": entry, "prompt": prompt},
    }


def musr_record(record: Record) -> Record:
    """MuSR: narrative + question; ``choices`` is a list literal; the gold is the right letter."""
    choices = parse_choices(_get(record, "choices"))
    index = _get(record, "answer_index")
    if not isinstance(choices, list) or isinstance(index, bool) or not isinstance(index, int):
        raise RowError("answer_index", "wrong_type", "expected a choices list and an integer index")
    if not 0 <= index < len(choices):
        raise RowError("answer_index", "unparseable_gold", f"index {index} outside {len(choices)} choices")
    expected = record.get("answer_choice")
    if expected is not None and expected != choices[index]:
        raise RowError("answer_choice", "unparseable_gold", "answer_choice disagrees with answer_index")
    narrative, question = _get(record, "narrative"), _get(record, "question")
    if not isinstance(narrative, str) or not isinstance(question, str):
        raise RowError("question", "wrong_type", "narrative and question must be strings")
    return {
        "question": f"{narrative.strip()}\n\n{question.strip()}",
        "answer": chr(ord("A") + index),
        "answer_type": "choice",
        "choices": choices,
        "metadata": {"answer_choice": choices[index]},
    }


@dataclass(frozen=True)
class PresetSpec:
    """A preset's usual dataset location and its row transform."""

    name: str
    split: str
    transform: Callable[[Record], Record]
    config: str | None = None
    dedupe_questions: bool = False


PRESETS: dict[str, PresetSpec] = {
    "gsm8k": PresetSpec("openai/gsm8k", "train", gsm8k_record, config="main"),
    "math": PresetSpec("DigitalLearningGmbH/MATH-lighteval", "test", math_record),
    "math500": PresetSpec("HuggingFaceH4/MATH-500", "test", math_record),
    "aime2024": PresetSpec("Maxwell-Jia/AIME_2024", "train", simple_math_record),
    "aime2025": PresetSpec("yentinglin/aime_2025", "train", simple_math_record),
    "amc23": PresetSpec("math-ai/amc23", "test", simple_math_record),
    "olympiadbench": PresetSpec(
        "Hothan/OlympiadBench", "train", olympiadbench_record, config="OE_TO_maths_en_COMP"
    ),
    "dapo_math": PresetSpec("BytedTsinghua-SIA/DAPO-Math-17k", "train", dapo_record, dedupe_questions=True),
    "humaneval": PresetSpec("openai/openai_humaneval", "test", humaneval_record),
    "musr": PresetSpec("TAUR-Lab/MuSR", "murder_mysteries", musr_record),
}


def preset_mapper(transform: Callable[[Record], Record]) -> Mapper:
    """A mapper applying a preset's row transform to each parsed record."""

    def mapper(row: RawRow) -> Record:
        return transform(row.record or {})

    return mapper


def _hub_rows(name: str, config: str | None, split: str) -> Iterator[RawRow]:
    """Rows of a hub dataset, loaded with ``datasets.load_dataset`` (network or cache)."""
    import datasets  # heavy import, only when a hub dataset is really requested

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types for offline / missing / gated
        raise HubUnavailableError(
            f"could not load hub dataset {name!r} (config={config!r}, split={split!r}): {err}. "
            "If the hub is unreachable (HF_HUB_OFFLINE=1?), download the files and pass them as "
            "data_files with the same preset."
        ) from err
    label = f"hf://{name}/{split}"
    for index, record in enumerate(dataset):
        yield RawRow(label, index, index, repr(record)[:500], record=dict(record))


def _file_rows(source: HubSource) -> Iterator[RawRow]:
    """Rows of all ``data_files`` in order, indexed globally across files."""
    counter = itertools.count()
    for path in source.data_file_list:
        for row in iter_rows(path):
            index = next(counter)
            yield RawRow(row.file, row.line, index, row.raw, row.record, row.failure)


def load_hub(source: HubSource, *, skip_bad: bool = False) -> LoadResult:
    """Load a hub dataset (or its local ``data_files``) through its preset or field map."""
    spec = PRESETS.get(source.preset) if source.preset else None
    name = source.name or (spec.name if spec else "")
    split = source.split or (spec.split if spec else "train")
    config = source.config if source.config is not None else (spec.config if spec else None)
    label = source.source or source.preset or name
    if spec is not None:
        mapper, columns = preset_mapper(spec.transform), {}
    else:
        assert source.fields is not None  # guaranteed by HubSource's validator
        mapper = field_mapper(source.fields, "math", source.gold_extract)
        columns = field_columns(source.fields)
    rows = _file_rows(source) if source.data_files is not None else _hub_rows(name, config, split)
    dedupe = (
        source.dedupe_questions
        if source.dedupe_questions is not None
        else bool(spec and spec.dedupe_questions)
    )
    # ids derived from the row index carry the split so train/test rows never share an id
    return collect(
        rows,
        mapper,
        source=label,
        id_prefix=f"{label}-{split}",
        skip_bad=skip_bad,
        limit=source.limit,
        dedupe_questions=dedupe,
        columns=columns,
    )
