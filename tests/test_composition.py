"""The composition judge: strict parsing of its answers, prompts, labelling and summaries."""

from __future__ import annotations

import os

import pytest

from manyways.backends.fake import FakeBackend
from manyways.backends.protocol import BackendStats, GenSample
from manyways.composition import (
    judge_messages,
    judge_schema,
    judge_token_budget,
    label_traces,
    parse_labels,
    summarize_labels,
)
from manyways.heuristics import load_taxonomy

KNOWN = ["decompose", "carry_out", "check_result", "working_backwards"]

# (judge output, parsed ids or None, failure reason)
CASES = [
    ('["decompose", "carry_out"]', ("decompose", "carry_out"), None),
    ('  ["check_result"]\n', ("check_result",), None),
    ('```json\n["decompose"]\n```', ("decompose",), None),
    ("", None, "empty"),
    ("decompose, carry_out", None, "not_json"),
    ('The heuristics are ["decompose"]', None, "not_json"),
    ('["decompose"] because it splits', None, "not_json"),
    ('{"ids": ["decompose"]}', None, "not_a_list"),
    ('"decompose"', None, "not_a_list"),
    ("[]", None, "wrong_length"),
    ('["decompose", 3]', None, "non_string_item"),
    ('["decompose", "decompose"]', None, "duplicate_ids"),
    ('["decompose", "invent_magic"]', None, "unknown_id"),
    ('["Decompose"]', None, "unknown_id"),
    ("[" + ", ".join(['"decompose"'] * 9) + "]", None, "wrong_length"),
    ("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", None, "not_json"),
]


@pytest.mark.parametrize(("text", "ids", "error"), CASES)
def test_parse_labels_is_strict(text: str, ids: tuple[str, ...] | None, error: str | None) -> None:
    parsed = parse_labels(text, KNOWN)
    assert parsed.ids == ids
    assert parsed.error == error
    assert parsed.ok == (ids is not None)


def test_nine_distinct_ids_are_too_many() -> None:
    ids = load_taxonomy().ids[:9]
    assert parse_labels(str(ids).replace("'", '"'), ids).error == "wrong_length"
    assert parse_labels(str(ids[:8]).replace("'", '"'), ids).ids == tuple(ids[:8])


def test_prompt_lists_every_taxonomy_id_and_the_trace() -> None:
    tax = load_taxonomy()
    msgs = judge_messages(tax, "Step 1: split <b>it</b>", question="What is 2+2?")
    user = msgs[-1]["content"]
    assert len(tax.entries) == 64
    assert all(f"- {e.id}: {e.description}" in user for e in tax.entries)
    assert "Step 1: split <b>it</b>" in user and "What is 2+2?" in user
    assert "JSON list" in user


class ScriptedJudge:
    """A stand-in judge answering each request with the next scripted text."""

    name = "scripted"
    model_id = "scripted-judge"

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.stats = BackendStats()
        self.temperatures: list[float] = []

    def generate(self, requests, progress=None):  # type: ignore[no-untyped-def]
        self.temperatures += [r.temperature for r in requests]
        return [
            [GenSample(self.answers[i % len(self.answers)], "stop", 1, 1)] for i, _ in enumerate(requests)
        ]

    def next_token_probs(self, messages_list, options):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def close(self) -> None:
        pass


def test_label_traces_and_summary_count_failures() -> None:
    tax = load_taxonomy()
    judge = ScriptedJudge(
        ['["decompose", "carry_out"]', '["carry_out", "decompose"]', '["check_result"]', "oops"]
    )
    labels = label_traces(judge, tax, ["t1", "t2", "t3", "t4"])
    assert judge.temperatures == [0.0] * 4  # greedy by default
    summary = summarize_labels(labels)
    assert summary["traces"] == 4 and summary["parsed"] == 3 and summary["parse_failures"] == 1
    assert summary["parse_failure_rate"] == pytest.approx(0.25)
    assert summary["multi_heuristic_share"] == pytest.approx(2 / 3)
    assert summary["failure_reasons"] == {"not_json": 1}
    assert summary["failure_examples"] == ["oops"]
    assert summary["top_combinations"][0] == {"combination": "carry_out + decompose", "count": 2}


def test_fake_backend_answers_fail_to_parse_and_are_not_empty_labels() -> None:
    labels = label_traces(FakeBackend(), load_taxonomy(), ["Step 1: add.", "Step 1: multiply."])
    assert all(lab.ids is None and lab.error == "not_json" for lab in labels)
    summary = summarize_labels(labels)
    assert summary["parse_failure_rate"] == 1.0
    assert summary["multi_heuristic_share"] is None and summary["top_combinations"] == []


def test_summary_of_nothing() -> None:
    assert summarize_labels([])["parse_failure_rate"] is None


def test_new_combinations_on_hand_made_labels() -> None:
    from manyways.composition import ParsedLabels, new_combinations

    mid = [
        ParsedLabels(("decompose", "restate")),
        ParsedLabels(("bolzano_bracketing",)),
        ParsedLabels(None, "x"),
    ]
    after = [
        ParsedLabels(("bolzano_bracketing", "decompose")),  # never together before: new
        ParsedLabels(("decompose", "restate")),  # seen together: not new
        ParsedLabels(("carry_out", "decompose", "restate")),  # 3 new pairs/triples, not (decompose, restate)
        ParsedLabels(("bolzano_bracketing", "decompose")),
        ParsedLabels(("decompose",)),
    ]
    got = {c["combination"]: c["count"] for c in new_combinations(after, mid, top=20)}
    assert got == {
        "bolzano_bracketing + decompose": 2,
        "carry_out + decompose": 1,
        "carry_out + restate": 1,
        "carry_out + decompose + restate": 1,
    }
    assert new_combinations(after, after) == []


def test_judge_validity_and_share_ci() -> None:
    from manyways.composition import ParsedLabels, judge_validity, multi_share_ci

    labels = [
        ParsedLabels(("decompose",)),
        ParsedLabels(("restate", "carry_out")),
        ParsedLabels(None, "empty"),
    ]
    v = judge_validity(labels, [["decompose"], ["working_backwards"], ["decompose"]])
    assert v["recall"] == pytest.approx(1 / 3) and v["low_recall"] is True
    assert v["multi_label_share"] == pytest.approx(0.5) and v["parsed"] == 2
    assert judge_validity(labels[:1], [["decompose"]])["low_recall"] is False
    low, high = multi_share_ci(labels)
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert multi_share_ci([ParsedLabels(None, "x")]) is None


def test_long_traces_are_counted_too_long_not_cut() -> None:
    tax = load_taxonomy()
    judge = ScriptedJudge(['["decompose"]'])
    sent: list = []
    real = judge.generate
    judge.generate = lambda requests, progress=None: (sent.extend(requests), real(requests))[1]  # type: ignore[method-assign]
    long_trace = "step " * 5000  # 25,000 characters: the old 4,000-character cut would have hidden it
    labels = label_traces(judge, tax, ["short", long_trace, "also short"], context_tokens=4000)
    assert [lab.error for lab in labels] == [None, "too_long", None]
    assert len(sent) == 2 and all(r.json_schema is not None for r in sent)
    assert all(r.max_new_tokens == judge_token_budget(judge_schema(tax.ids)) for r in sent)
    whole = label_traces(judge, tax, [long_trace], context_tokens=None)
    assert whole[0].ok and long_trace.strip() in sent[-1].messages[-1]["content"]  # sent whole
    label_traces(judge, tax, ["t"], constrain=False)
    assert sent[-1].json_schema is None


def test_menu_comes_before_the_trace_so_prompts_share_a_prefix() -> None:
    tax = load_taxonomy()
    a = judge_messages(tax, "trace one", "q1")[-1]["content"]
    b = judge_messages(tax, "another trace", "q2")[-1]["content"]
    shared = len(os.path.commonprefix([a, b]))
    prefix = a[:shared]
    assert all(f"- {e.id}:" in prefix for e in tax.entries) and "JSON list" in prefix  # menu + instruction
    assert prefix.index("JSON list") < prefix.index("Problem:")


def test_judge_requests_declare_the_menu_as_their_shared_prefix() -> None:
    from manyways.backends.protocol import check_request
    from manyways.composition import judge_prefix

    tax = load_taxonomy()
    judge = ScriptedJudge(['["decompose"]'])
    sent: list = []
    real = judge.generate
    judge.generate = lambda requests, progress=None: (sent.extend(requests), real(requests))[1]  # type: ignore[method-assign]
    label_traces(judge, tax, ["one", "two"], questions=["q1", None])
    label_traces(judge, tax, ["three"], max_labels=1)
    assert [r.shared_prefix for r in sent] == [judge_prefix(tax)] * 2 + [judge_prefix(tax, 1)]
    for request in sent:
        check_request(request)  # the declared prefix starts the user message
        assert "JSON list" in request.shared_prefix and "Problem:" not in request.shared_prefix
    assert judge_prefix(tax) != judge_prefix(tax, 1)
