"""Hub presets on small local files shaped like each dataset's rows, and the offline failure."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manyways.data import PRESETS, FieldMap, HubSource, HubUnavailableError, ProblemDataError, load_problems
from manyways.data.hub import dapo_question

DAPO_CONTENT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    'In triangle $ABC$, find $x$.\n\nRemember to put your answer on its own line after "Answer:".'
)

# preset -> (rows shaped like the hub dataset, expected (problem_id, question, answer) of the first row)
PRESET_ROWS: dict[str, tuple[list[dict], tuple[str, str, str]]] = {
    "gsm8k": (
        [{"question": "Tom has 3 apples...", "answer": "3 + 1 = 4\n#### 1,004"}],
        ("gsm8k-train-0", "Tom has 3 apples...", "1004"),
    ),
    "math": (
        [
            {
                "problem": "Compute $x$.",
                "solution": "We get $\\boxed{\\frac{\\sqrt{3}}{2}}$.",
                "level": "Level 5",
                "type": "Algebra",
            }
        ],
        ("math-test-0", "Compute $x$.", "\\frac{\\sqrt{3}}{2}"),
    ),
    "math500": (
        [
            {
                "problem": "Find y.",
                "solution": "... \\boxed{3}",
                "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
                "subject": "Precalculus",
                "level": 2,
                "unique_id": "test/precalculus/807.json",
            }
        ],
        ("test/precalculus/807.json", "Find y.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ),
    "aime2024": (
        [{"ID": "2024-I-1", "Problem": "Every morning Aya...", "Solution": "...", "Answer": 204}],
        ("2024-I-1", "Every morning Aya...", "204"),
    ),
    "aime2025": (
        [{"id": 0, "problem": "Find the sum of all bases...", "answer": "70"}],
        ("0", "Find the sum of all bases...", "70"),
    ),
    "amc23": (
        [{"id": 0, "question": "Cities A and B are 45 miles apart...", "answer": 27.0}],
        ("0", "Cities A and B are 45 miles apart...", "27"),
    ),
    "olympiadbench": (
        [{"id": 1606, "question": "Xenia and Sergey...", "final_answer": ["$\\frac{1}{2}$"], "unit": None}],
        ("1606", "Xenia and Sergey...", "\\frac{1}{2}"),
    ),
    "dapo_math": (
        [
            {
                "data_source": "math_dapo",
                "prompt": [{"role": "user", "content": DAPO_CONTENT}],
                "ability": "MATH",
                "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"},
            }
        ],
        ("dapo-9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079", "In triangle $ABC$, find $x$.", "34"),
    ),
    "humaneval": (
        [
            {
                "task_id": "HumanEval/0",
                "prompt": "def f(x):\n    '''doc'''\n",
                "canonical_solution": "    return x\n",
                "test": "def check(candidate):\n    assert candidate(1) == 1\n",
                "entry_point": "f",
            }
        ],
        ("HumanEval/0", "def f(x):\n    '''doc'''\n", "    return x\n"),
    ),
    "musr": (
        [
            {
                "narrative": "In a quiet town...",
                "question": "Who is the most likely murderer?",
                "choices": "['Mackenzie', 'Ana']",
                "answer_index": 1,
                "answer_choice": "Ana",
            }
        ],
        ("musr-murder_mysteries-0", "In a quiet town...\n\nWho is the most likely murderer?", "B"),
    ),
}


def test_every_preset_has_a_shaped_fixture():
    assert set(PRESET_ROWS) == set(PRESETS)


def _write(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("preset", sorted(PRESET_ROWS))
def test_preset_on_local_files(tmp_path, monkeypatch, preset, suffix):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be used when data_files are given")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    rows, (pid, question, answer) = PRESET_ROWS[preset]
    path = _write(rows, tmp_path / f"{preset}{suffix}")
    result = load_problems(HubSource(preset=preset, data_files=str(path)))
    problem = result.problems[0]
    assert (problem.problem_id, problem.question, problem.answer) == (pid, question, answer)
    assert problem.source == preset
    assert result.counts == {"rows": 1, "kept": 1, "set_aside": 0}


def test_preset_answer_types_and_extras(tmp_path):
    he = load_problems(
        HubSource(
            preset="humaneval", data_files=str(_write(PRESET_ROWS["humaneval"][0], tmp_path / "h.jsonl"))
        )
    )
    assert he.problems[0].answer_type == "code" and he.problems[0].tests.startswith("def check")
    assert he.problems[0].metadata == {"entry_point": "f", "prompt": "def f(x):\n    '''doc'''\n"}
    musr = load_problems(
        HubSource(preset="musr", data_files=str(_write(PRESET_ROWS["musr"][0], tmp_path / "m.jsonl")))
    )
    assert musr.problems[0].answer_type == "choice" and musr.problems[0].choices == ["Mackenzie", "Ana"]
    gsm = load_problems(
        HubSource(preset="gsm8k", data_files=str(_write(PRESET_ROWS["gsm8k"][0], tmp_path / "g.jsonl")))
    )
    assert gsm.problems[0].answer_type == "math" and "#### 1,004" in gsm.problems[0].metadata["solution"]


def test_math_without_box_is_unparseable(tmp_path):
    path = _write(
        [{"problem": "P", "solution": "no box here"}, {"problem": "Q", "solution": "\\boxed{2}"}],
        tmp_path / "m.jsonl",
    )
    with pytest.raises(ProblemDataError, match=r"m\.jsonl:1: field 'solution': unparseable_gold"):
        load_problems(HubSource(preset="math", data_files=str(path)))
    result = load_problems(HubSource(preset="math", data_files=str(path)), skip_bad=True)
    assert [p.answer for p in result.problems] == ["2"]


def test_musr_inconsistent_gold_is_rejected(tmp_path):
    row = dict(PRESET_ROWS["musr"][0][0], answer_choice="Mackenzie")
    path = _write([row], tmp_path / "m.jsonl")
    with pytest.raises(ProblemDataError, match="answer_choice"):
        load_problems(HubSource(preset="musr", data_files=str(path)))


def test_dapo_repeated_questions_are_set_aside_not_lost(tmp_path):
    base = PRESET_ROWS["dapo_math"][0][0]
    rows = [dict(base, extra_info={"index": f"u{i}"}) for i in range(3)]
    path = _write(rows, tmp_path / "dapo.parquet")
    result = load_problems(HubSource(preset="dapo_math", data_files=str(path)))
    assert [p.problem_id for p in result.problems] == ["dapo-u0"]
    assert [s.reason for s in result.set_aside] == ["duplicate_question"] * 2
    assert result.counts["rows"] == 3


def test_dapo_question_strips_only_known_instructions():
    assert dapo_question(DAPO_CONTENT) == "In triangle $ABC$, find $x$."
    assert dapo_question("Plain question?") == "Plain question?"


def test_multiple_data_files_index_globally(tmp_path):
    rows = PRESET_ROWS["gsm8k"][0]
    a = _write(rows, tmp_path / "a.jsonl")
    b = _write([dict(rows[0], question="Other?")], tmp_path / "b.parquet")
    result = load_problems(HubSource(preset="gsm8k", data_files=[str(a), str(b)], split="test"))
    assert [p.problem_id for p in result.problems] == ["gsm8k-test-0", "gsm8k-test-1"]


def test_generic_hub_mapping_needs_name_and_fields(tmp_path):
    with pytest.raises(ValueError, match="needs both"):
        HubSource(name="someone/data")
    path = _write([{"p": "Q?", "s": "\\boxed{5}"}], tmp_path / "g.jsonl")
    src = HubSource(
        name="someone/data",
        fields=FieldMap(question="p", answer="s"),
        gold_extract="boxed",
        data_files=str(path),
    )
    assert load_problems(src).problems[0].answer == "5"


def test_offline_hub_failure_names_the_dataset(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError) as info:
        load_problems(HubSource(preset="gsm8k", name="manyways-tests/no-such-dataset"))
    message = str(info.value)
    assert "manyways-tests/no-such-dataset" in message and "data_files" in message


def test_source_configs_parse_by_kind():
    from manyways.data import GymSource, parse_source

    hub = parse_source({"kind": "hub", "preset": "aime2024", "data_files": ["a.parquet"]})
    assert isinstance(hub, HubSource) and hub.data_file_list == [Path("a.parquet")]
    gym = parse_source({"kind": "reasoning_gym", "task": "leg_counting", "size": 4, "split": "test"})
    assert isinstance(gym, GymSource) and gym.seed == 0
    with pytest.raises(ValueError, match="preset"):
        parse_source({"kind": "hub", "preset": "not_a_benchmark"})
    with pytest.raises(ValueError, match="kind"):
        parse_source({"kind": "ftp", "path": "x"})


def test_olympiadbench_several_final_answers_are_all_checked(tmp_path):
    from manyways.verify.registry import verify_problem

    rows = [
        {"id": 7, "question": "Find all real x with (x-2)(x+3)=0.", "final_answer": ["$2$", "$-3$"]},
        {"id": 8, "question": "Find x.", "final_answer": ["$\\frac{1}{2}$"]},
    ]
    path = _write(rows, tmp_path / "ob.jsonl")
    several, single = load_problems(HubSource(preset="olympiadbench", data_files=str(path))).problems
    assert several.metadata["final_answers"] == ["2", "-3"] and "final_answers" not in single.metadata
    assert single.answer == "\\frac{1}{2}"
    status = {
        c: verify_problem(several, f"So \\boxed{{{c}}}.").status
        for c in ("2, -3", "-3, 2", "2", "-3", "2, -3, 5")
    }
    assert status == {
        "2, -3": "correct",
        "-3, 2": "correct",
        "2": "incorrect",
        "-3": "incorrect",
        "2, -3, 5": "incorrect",
    }
    bad = _write([{"id": 9, "question": "Q", "final_answer": ["$2$", "$$"]}], tmp_path / "bad.jsonl")
    with pytest.raises(ProblemDataError, match="empty_gold"):
        load_problems(HubSource(preset="olympiadbench", data_files=str(bad)))
