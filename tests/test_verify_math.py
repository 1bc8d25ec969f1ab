"""Regression table and hang-proofing of manyways.verify.math (math-verify behind a killable pool).

Expected statuses are what is mathematically right, with two documented conventions taken from
math-verify: decimals are compared after rounding to 6 places (``third_rounded``: 1/3 vs 0.333333
counts as correct) and a percentage equals its bare number (``pct_vs_int``: 25 vs 25\\% correct,
the GSM8K convention). Every case runs twice: with the exact fast path and through the pool only;
both must give the expected status.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manyways.verify import math as vmath
from manyways.verify import verify_math, verify_math_batch
from manyways.verify.pool import WorkerPool

BIG = "Let me think step by step. " * 4000
CASES = [
    # (id, gold, response, expected)
    ("int_boxed", "42", "So the answer is \\boxed{42}.", "correct"),
    ("int_boxed_wrong", "42", "\\boxed{41}", "incorrect"),
    ("neg_int", "-7", "\\boxed{-7}", "correct"),
    ("neg_vs_pos", "-7", "\\boxed{7}", "incorrect"),
    ("one_minus_inv_e", "1-1/e", "\\boxed{1+1/e}", "incorrect"),
    ("one_minus_inv_e_ok", "1-1/e", "\\boxed{1-\\frac{1}{e}}", "correct"),
    ("pm_vs_one_root", "\\pm 2021", "\\boxed{2021}", "incorrect"),
    ("pm_same", "\\pm 2021", "\\boxed{\\pm 2021}", "correct"),
    ("clock_12_vs_1", "12:00", "\\boxed{1:00}", "incorrect"),
    ("clock_same", "12:00", "\\boxed{12:00}", "correct"),
    ("four_vs_four_root2", "4", "\\boxed{4\\sqrt{2}}", "incorrect"),
    ("root2_vs_four", "4\\sqrt{2}", "\\boxed{4}", "incorrect"),
    ("root_same", "4\\sqrt{2}", "\\boxed{\\sqrt{32}}", "correct"),
    ("md_bold_answer", "73", "The answer is **73**", "correct"),
    ("md_bold_final", "73", "**Final Answer:** **73**", "correct"),
    ("text_13", "13", "\\boxed{\\text{13}}", "correct"),
    ("gold_text", "\\text{13}", "\\boxed{13}", "correct"),
    ("half_vs_decimal", "1/2", "\\boxed{0.5}", "correct"),
    ("frac_vs_decimal", "\\frac{1}{2}", "\\boxed{0.5}", "correct"),
    ("decimal_vs_frac", "0.5", "\\boxed{\\frac{1}{2}}", "correct"),
    ("dfrac", "\\frac{3}{4}", "\\boxed{\\dfrac{3}{4}}", "correct"),
    ("frac_wrong", "\\frac{3}{4}", "\\boxed{\\frac{4}{3}}", "incorrect"),
    ("unreduced_frac", "3/4", "\\boxed{6/8}", "correct"),
    ("third_rounded", "\\frac{1}{3}", "\\boxed{0.333333}", "correct"),
    ("third_coarse", "1/3", "\\boxed{0.33}", "incorrect"),
    ("decimal_trailing_zero", "2.50", "\\boxed{2.5}", "correct"),
    ("int_vs_float", "3", "\\boxed{3.0}", "correct"),
    ("pct_vs_int", "25", "\\boxed{25\\%}", "correct"),
    ("pct_gold_vs_int", "50\\%", "\\boxed{50}", "correct"),
    ("pct_vs_wrong", "25\\%", "\\boxed{30\\%}", "incorrect"),
    ("thousands_answer", "1000", "\\boxed{1,000}", "correct"),
    ("thousands_gold", "1,000", "\\boxed{1000}", "correct"),
    ("thousands_big", "1234567", "The answer is 1,234,567.", "correct"),
    ("thousands_wrong", "1000", "\\boxed{1,001}", "incorrect"),
    ("unit_dollars", "5", "\\boxed{5 dollars}", "correct"),
    ("unit_cm", "5", "\\boxed{5 cm}", "correct"),
    ("unit_text_cm", "5", "\\boxed{5\\text{ cm}}", "correct"),
    ("dollar_sign", "18", "\\boxed{\\$18}", "correct"),
    ("unit_wrong", "5", "\\boxed{6 dollars}", "incorrect"),
    ("last_box_wins", "5", "First \\boxed{3}, then I fix it: \\boxed{5}", "correct"),
    ("last_box_wins_wrong", "3", "First \\boxed{3}, then I fix it: \\boxed{5}", "incorrect"),
    ("nested_braces_box", "\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", "correct"),
    ("fbox", "9", "\\fbox{9}", "correct"),
    ("no_box_no_statement", "42", "I think it is probably 42 or so", "no_answer"),
    ("empty_response", "42", "", "no_answer"),
    ("empty_box", "42", "\\boxed{}", "no_answer"),
    ("box_never_closes", "42", "so \\boxed{42", "no_answer"),
    ("latex_never_closes", "\\frac{1}{2}", "The answer is \\boxed{\\frac{1}{2", "no_answer"),
    ("big_response", "42", BIG + "\\boxed{42}", "correct"),
    ("big_response_no_answer", "42", BIG, "no_answer"),
    ("answer_is", "17", "Thus the answer is 17.", "correct"),
    ("answer_colon", "17", "Work...\nAnswer: 17", "correct"),
    ("gsm_hashes", "17", "Work...\n#### 17", "correct"),
    ("answer_is_dollars", "\\frac{1}{2}", "The final answer is $\\frac{1}{2}$.", "correct"),
    ("answer_is_last_wins", "17", "The answer is 12.\nWait, no. The answer is 17.", "correct"),
    ("box_beats_statement", "8", "The answer is 7. Hmm, \\boxed{8}", "correct"),
    ("bad_gold_empty", "", "\\boxed{3}", "bad_gold"),
    ("bad_gold_box", "\\boxed{}", "\\boxed{3}", "bad_gold"),
    ("bad_gold_garbage", "}{", "\\boxed{3}", "bad_gold"),
    ("polynomial_commuted", "x^2+1", "\\boxed{1+x^2}", "correct"),
    ("polynomial_wrong", "x^2+1", "\\boxed{x^2-1}", "incorrect"),
    ("tuple", "(1,2)", "\\boxed{(1, 2)}", "correct"),
    ("tuple_swapped", "(1,2)", "\\boxed{(2, 1)}", "incorrect"),
    ("interval", "[0,1)", "\\boxed{[0,1)}", "correct"),
    ("pi_multiple", "2\\pi", "\\boxed{2\\pi}", "correct"),
    ("sqrt_form", "\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", "correct"),
    ("equation_answer", "3", "\\boxed{x = 3}", "correct"),
    ("multiple_answers_set", "2, 3", "\\boxed{3, 2}", "correct"),
    ("letter_choice", "B", "\\boxed{B}", "correct"),
    ("big_int", "123456789012345678901234567890", "\\boxed{123456789012345678901234567890}", "correct"),
    ("pct_spaced", "25", "\\boxed{25 \\%}", "correct"),
    ("pct_zero", "0\\%", "\\boxed{0}", "correct"),
    ("pct_negative", "-5\\%", "\\boxed{-5}", "incorrect"),
    ("pct_vs_decimal", "25\\%", "\\boxed{0.25}", "correct"),
    ("pct_other", "7", "\\boxed{8\\%}", "incorrect"),
    ("surd_reduced", "2\\sqrt{3}", "\\boxed{\\sqrt{12}}", "correct"),
    ("surd_spaced", "2\\sqrt{3}", "\\boxed{2 \\sqrt{3}}", "correct"),
    ("surd_wrong", "3\\sqrt{2}", "\\boxed{2\\sqrt{3}}", "incorrect"),
    ("surd_negative", "-\\sqrt{8}", "\\boxed{-2\\sqrt{2}}", "correct"),
    ("surd_sign", "-\\sqrt{8}", "\\boxed{2\\sqrt{2}}", "incorrect"),
    ("surd_is_integer", "4", "\\boxed{\\sqrt{16}}", "correct"),
    ("pi_slash_vs_frac", "\\pi/2", "\\boxed{\\frac{\\pi}{2}}", "correct"),
    ("pi_frac_forms", "\\frac{3\\pi}{4}", "\\boxed{\\dfrac{3}{4}\\pi}", "correct"),
    ("pi_wrong", "\\pi/2", "\\boxed{\\pi/3}", "incorrect"),
    ("pi_sign", "-\\pi", "\\boxed{\\pi}", "incorrect"),
    ("pi_vs_decimal_rounded", "\\pi", "\\boxed{3.141593}", "correct"),
    ("poly_reordered", "3x^2-2x+1", "\\boxed{1 - 2x + 3x^{2}}", "correct"),
    ("poly_leading_minus", "-x^2+2x", "\\boxed{2x-x^2}", "correct"),
    ("poly_coefficient", "x^2+1", "\\boxed{2x^2+1}", "incorrect"),
    ("poly_two_vars", "x+y", "\\boxed{y+x}", "correct"),
    ("poly_other_var", "x^2", "\\boxed{t^2}", "incorrect"),
    ("poly_bare_symbol", "x", "\\boxed{x+0}", "incorrect"),
    ("interval_spaced", "(1,2)", "\\boxed{(1, 2)}", "correct"),
    ("interval_closed_end", "[0,1)", "\\boxed{[0,1]}", "incorrect"),
    ("interval_open_vs_closed", "(1,2)", "\\boxed{[1,2]}", "incorrect"),
    ("interval_negative", "(-3,5]", "\\boxed{(-3, 5]}", "correct"),
    ("interval_end_point", "(-3,5]", "\\boxed{(-3,4]}", "incorrect"),
    # LaTeX thousands separators; a first group of 0 is never a thousands group
    ("thousands_thin_space", "11111111100", "is $\\boxed{11,\\! 111,\\! 111,\\! 100}$", "correct"),
    ("thousands_thin_space_short", "32349", "\\boxed{32,\\!349}", "correct"),
    ("thousands_braced_comma", "32349", "\\boxed{32{,}349}", "correct"),
    ("zero_group_is_not_thousands", "125", "\\boxed{0,125}", "incorrect"),
    ("neg_zero_group_is_not_thousands", "-500", "\\boxed{-0,500}", "incorrect"),
    ("zero_group_decimal_comma_gold", "0,111", "\\boxed{0.111}", "correct"),
    # several boxes forming one answer (a list, judged as a whole)
    ("boxes_joined_by_and", "1, 2, 3", "\\boxed{1} and \\boxed{2} and \\boxed{3}", "correct"),
    ("boxes_joined_by_commas", "1,2,3", "\\boxed{1},\\boxed{2},\\boxed{3}", "correct"),
    (
        "two_roots_two_boxes",
        "1, -2",
        "so \\[ \\boxed{-2} \\quad \\text{and} \\quad \\boxed{1}. \\]",
        "correct",
    ),
    (
        "pairs_in_boxes",
        "(2, 2), (6, 2)",
        "$$\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}$$",
        "correct",
    ),
    ("candidates_do_not_game", "3", "\\boxed{1}, \\boxed{2}, \\boxed{3}", "incorrect"),
    ("candidates_or_do_not_game", "2", "\\boxed{2} or \\boxed{5}", "incorrect"),
    ("roots_in_two_boxes", "1, -2", "\\boxed{-2} and \\boxed{1}", "correct"),
    ("one_root_of_two", "1, -2", "\\boxed{1}", "incorrect"),
    (
        "final_statement_after_boxes",
        "10455",
        "\\boxed{200} then \\boxed{255}. Final Answer: The final answer is $10,455$. I hope it is correct.",
        "correct",
    ),
    ("prose_statement_after_box", "8", "\\boxed{8}. So the final answer is correct.", "correct"),
    # exact rational values compared exactly (math-verify chops tiny differences to 0)
    ("factorial_tiny_differ", "\\frac{1}{2004!}", "\\boxed{\\frac{1}{2006!}}", "incorrect"),
    ("factorial_tiny_same", "\\frac{1}{2004!}", "\\boxed{\\frac{1}{2004 \\cdot 2003!}}", "correct"),
    ("power_tiny_differ", "\\frac{1}{2^{99}}", "\\boxed{\\frac{1}{2^{98}}}", "incorrect"),
    ("factorial_big_differ", "2004!", "\\boxed{2006!}", "incorrect"),
    # truncated LaTeX
    ("bad_gold_truncated_frac", "\\frac{1}{2", "\\boxed{\\frac{1}{2}}", "bad_gold"),
    ("answer_truncated_statement", "\\frac{1}{2}", "The answer is $\\frac{1}{2$", "no_answer"),
    (
        "big_int_off_by_one",
        "123456789012345678901234567890",
        "\\boxed{123456789012345678901234567891}",
        "incorrect",
    ),
]

PATHOLOGICAL = [
    "\\boxed{\\dfrac{5^{(5^{(5^{(5^5)})} - 4)} - 5}{16}}",
    "\\boxed{10^{10^{10^{10}}}}",
    "\\boxed{9^{9^{9^{9}}}!}",
]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "pool"])
@pytest.mark.parametrize(("gold", "response", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_regression_table(gold: str, response: str, expected: str, fast_path: bool) -> None:
    verdict = verify_math(gold, response, fast_path=fast_path)
    assert verdict.status == expected
    assert verdict.correct is {"correct": True, "incorrect": False}.get(expected)


def test_exact_forms_take_the_fast_path() -> None:
    exact = [c for c in CASES if c[0].split("_")[0] in ("surd", "pi", "poly", "interval", "pct")]
    decided = [
        c[0]
        for c in exact
        if vmath._fast_verdict(vmath.normalize_answer(c[1]), vmath.extract_answer(c[2]) or "")
    ]
    undecided = {c[0] for c in exact} - set(decided)
    left_to_math_verify = {"pi_vs_decimal_rounded", "poly_bare_symbol", "pct_negative", "pct_vs_decimal"}
    assert undecided == left_to_math_verify


def test_benchmark_expression_mix_never_reaches_the_pool() -> None:
    pairs = [("2\\sqrt{3}", "\\sqrt{12}"), ("\\pi/2", "\\frac{\\pi}{2}"), ("3\\sqrt{2}", "2\\sqrt{3}")]
    pairs += [("(1,2)", "(1, 2)"), ("x^2+1", "1+x^2"), ("[0,1)", "[0,1]")]
    assert all(vmath._fast_verdict(g, a) is not None for g, a in pairs)


_SMALL = st.integers(-30, 30)


def _exact_text(kind: str, a: int, b: int) -> str:
    b = abs(b) + 1
    return {
        "int": str(a),
        "pct": f"{abs(a)}\\%" if b % 2 else str(abs(a)),
        "frac": f"\\frac{{{a}}}{{{b}}}" if a >= 0 else f"-\\frac{{{-a}}}{{{b}}}",
        "slash": f"{a}/{b}",
        "surd": f"{a}\\sqrt{{{b}}}",
        "pi": f"{a}\\pi/{b}",
        "poly": f"{a}x^2+{b}x" if a else f"{b}x-1",
        "interval": f"({a}, {a + b}]" if b % 2 else f"[{a},{a + b})",
    }[kind]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.tuples(st.sampled_from(["int", "frac", "slash"]), st.sampled_from(["int", "frac", "slash"])),
    values=st.tuples(_SMALL, _SMALL, _SMALL, _SMALL),
)
def test_property_rationals_fast_path_agrees_with_pool(
    kinds: tuple[str, str], values: tuple[int, ...]
) -> None:
    gold = _exact_text(kinds[0], values[0], values[1])
    answer = _exact_text(kinds[1], values[2], values[3]) if values[2] % 3 else gold.replace("/", " / ")
    fast = verify_math(gold, f"\\boxed{{{answer}}}", fast_path=True)
    slow = verify_math(gold, f"\\boxed{{{answer}}}", fast_path=False)
    assert fast.status == slow.status, (gold, answer)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["surd", "pi", "poly", "interval", "int", "pct"]),
    values=st.tuples(_SMALL, st.integers(0, 12), _SMALL, st.integers(0, 12)),
    same=st.booleans(),
)
def test_property_exact_forms_fast_path_agrees_with_pool(
    kind: str, values: tuple[int, ...], same: bool
) -> None:
    gold = _exact_text(kind, values[0], values[1])
    answer = gold if same else _exact_text(kind, values[2], values[3])
    if same:
        answer = {
            "surd": f"\\sqrt{{{values[0] ** 2 * (values[1] + 1)}}}",
            "poly": "+".join(gold.split("+")[::-1]),
        }.get(kind, answer)
    fast = verify_math(gold, f"\\boxed{{{answer}}}", fast_path=True)
    slow = verify_math(gold, f"\\boxed{{{answer}}}", fast_path=False)
    assert fast.status == slow.status, (gold, answer)


def test_table_is_large_and_ids_unique() -> None:
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


def test_batch_matches_single_calls() -> None:
    pairs = [(g, r) for _, g, r, _ in CASES]
    assert [v.status for v in verify_math_batch(pairs)] == [e for *_, e in CASES]


def _gsm_pairs(n: int) -> list[tuple[str, str]]:
    rng = random.Random(0)
    pairs = []
    for i in range(n):
        gold = rng.randint(1, 5000)
        ans = gold if rng.random() < 0.6 else gold + rng.randint(1, 9)
        text = f"She has {ans} apples.\n#### {ans}" if i % 2 else f"so the total is \\boxed{{{ans:,}}}."
        pairs.append((str(gold), text))
    return pairs


def test_gsm_pairs_take_the_fast_path_only() -> None:
    before = vmath.prefilter_counts()
    verdicts = [verify_math(g, r) for g, r in _gsm_pairs(200)]
    after = vmath.prefilter_counts()
    assert after.get("pool", 0) == before.get("pool", 0)
    assert (
        after["fast"] - before.get("fast", 0) + after.get("identical", 0) - before.get("identical", 0) == 200
    )
    assert all(v.status in ("correct", "incorrect") for v in verdicts)


def test_fast_path_is_20x_faster_than_plain_math_verify() -> None:
    import math_verify

    pairs = _gsm_pairs(100)
    start = time.perf_counter()
    for gold, resp in pairs:
        gold_parsed = math_verify.parse("\\boxed{" + gold + "}", parsing_timeout=None)
        math_verify.verify(gold_parsed, math_verify.parse(resp, parsing_timeout=None), timeout_seconds=None)
    plain = time.perf_counter() - start
    start = time.perf_counter()
    ours = [verify_math(g, r) for g, r in pairs]
    fast = time.perf_counter() - start
    assert plain / fast >= 20, (plain, fast)
    assert sum(v.correct for v in ours) > 0


def test_extraction_rules() -> None:
    assert vmath.extract_answer("a \\boxed{1} b \\boxed{\\frac{2}{3}} c") == "\\frac{2}{3}"
    assert vmath.extract_answer("\\boxed{1} then \\boxed{2") is None
    assert vmath.extract_answer("Answer: 12\nThe answer is 13.") == "13."
    assert vmath.normalize_answer("**1,234**.") == "1234"
    assert vmath.normalize_answer("2x") == "2x"  # a variable is not a unit
    assert vmath.normalize_answer("1,23") == "1,23"  # not a thousands separator
    assert vmath.normalize_answer("0,111") == "0,111"  # a first group of 0 is never a thousands group
    assert vmath.normalize_answer("-0,500") == "-0,500"
    assert vmath.normalize_answer("11,\\! 111,\\! 111,\\! 100") == "11111111100"
    assert vmath.normalize_answer("1{,}234{,}567") == "1234567"


def test_multi_box_rule() -> None:
    extract = vmath.extract_answer
    assert extract("\\boxed{1} and \\boxed{2} and \\boxed{3}") == "1, 2, 3"
    assert extract("$x = \\boxed{1}$ or $x = \\boxed{2}$") == "1, 2"
    assert extract("\\(y_1 = \\boxed{a} \\) and \\( y_2 = \\boxed{b} \\)") == "a, b"
    assert extract("\\boxed{(3, 3)} \\text{ for part (a) and } \\boxed{(1, 1)}") == "(3, 3), (1, 1)"
    # prose between boxes: the last box alone
    assert extract("\\boxed{3} is wrong, so \\boxed{5}") == "5"
    assert extract("\\boxed{3}\n\n**Final Answer**\n\\boxed{3}") == "3"
    assert extract("\\boxed{3} \\boxed{5}") == "5"  # no separator, no list
    # only the chain that ends in the last box counts
    assert extract("\\boxed{1}, \\boxed{2}. Hence \\boxed{7}") == "7"
    # a final-answer statement after the last box is the answer; prose after "is" is not
    assert extract("\\boxed{200} so Final Answer: The final answer is $10,455$.") == "$10,455$"
    assert extract("\\boxed{8}. The final answer is correct.") == "8"
    assert extract("The final answer is $4$. Check: \\boxed{5}") == "5"


def test_huge_numbers_never_raise() -> None:
    huge = "9" * 300_000
    assert verify_math("5", f"The answer is \\boxed{{{huge}}}").status == "incorrect"  # exact, in-process
    assert verify_math(huge, f"\\boxed{{{huge}}}").status == "correct"
    assert verify_math("1" + "0" * 5000, "\\boxed{0" + "1" + "0" * 5000 + "}").status == "correct"
    assert verify_math("-1" + "0" * 5000, "\\boxed{1" + "0" * 5000 + "}").status == "incorrect"
    try:  # through math-verify (too slow for it: the worker is killed) and a non-integer
        for gold, fast_path in (("5", False), (f"{huge}.5", True)):
            verdict = verify_math(gold, f"\\boxed{{{huge}}}", fast_path=fast_path, timeout_s=2)
            assert verdict.status in ("incorrect", "no_answer", "timeout", "error"), verdict
    finally:
        vmath.reset_pool()  # later tests do not wait for the killed worker's replacement


_HOSTILE = st.sampled_from(
    [
        "\\boxed{",
        "\\fbox{",
        "{",
        "}",
        "\\{",
        "\\}",
        "$",
        "$$",
        "\\(",
        "\\)",
        "\\[",
        "\\]",
        "\\frac{",
        "\\sqrt{",
        "\\pi",
        "^",
        "^{",
        "_",
        "!",
        ",",
        ",\\!",
        "{,}",
        ".",
        "-",
        "/",
        "\\%",
        "%",
        " ",
        "\n",
        "and",
        "or",
        "\\quad",
        "\\text{",
        "x",
        "=",
        "0",
        "7",
        "123",
        "0,5",
        "9" * 5000,
        "1" + "0" * 1200,
        "The answer is ",
        "Answer: ",
        "#### ",
        "final answer is ",
        "**",
        "\\left(",
        "\\right)",
        "\\\\",
        "\x00",
        "\u00e9",
        "\ud83d",
    ]
)
_HOSTILE_TEXT = st.one_of(st.lists(_HOSTILE, max_size=12).map("".join), st.text(max_size=40), _HOSTILE)
_HUGE = st.sampled_from(
    [
        "9" * 5000,
        "-" + "1" * 4400,
        "0" * 4301 + "1",
        "1" + "0" * 1200 + ".5",
        "7" * 5000 + "/3",
        "9" * 5000 + " cm",
    ]
)
_HOSTILE_RESPONSE = st.one_of(
    _HOSTILE_TEXT,
    _HOSTILE_TEXT.map(lambda t: "\\boxed{" + t + "}"),
    _HUGE.map(lambda t: "\\boxed{" + t + "}"),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gold=st.one_of(_HOSTILE_TEXT, _HUGE), response=_HOSTILE_RESPONSE, fast_path=st.booleans())
def test_property_no_input_makes_verify_math_raise(gold: str, response: str, fast_path: bool) -> None:
    verdict = verify_math(gold, response, fast_path=fast_path, timeout_s=3.0)
    assert verdict.status in ("correct", "incorrect", "no_answer", "bad_gold", "timeout", "error")
    assert verdict.correct is {"correct": True, "incorrect": False}.get(verdict.status)


def _concurrent(
    calls: list[tuple[str, str]], timeout_s: float, prefilter: bool
) -> list[tuple[float, object]]:
    results: list[tuple[float, object]] = [(0.0, None)] * len(calls)

    def run(i: int) -> None:
        start = time.monotonic()
        verdict = verify_math(calls[i][0], calls[i][1], timeout_s=timeout_s, prefilter=prefilter)
        results[i] = (time.monotonic() - start, verdict)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return results


def test_pathological_inputs_are_prefiltered_and_counted() -> None:
    before = vmath.prefilter_counts().get("prefilter:tower_answer", 0)
    calls = [("1", PATHOLOGICAL[i % 3]) for i in range(8)]
    for elapsed, verdict in _concurrent(calls, timeout_s=2.0, prefilter=True):
        assert elapsed < 2.0 + 2.0
        assert verdict.status == "timeout" and verdict.correct is None
    assert vmath.prefilter_counts()["prefilter:tower_answer"] - before == 8


def test_pathological_inputs_are_killed_in_workers_and_pool_recovers() -> None:
    timeout_s = 1.5
    pool = vmath.reset_pool(workers=8)
    try:
        pool.start(wait=True)
        calls = [("1", PATHOLOGICAL[i % 3]) for i in range(8)]
        for elapsed, verdict in _concurrent(calls, timeout_s=timeout_s, prefilter=False):
            assert verdict.status == "timeout", verdict
            assert elapsed < timeout_s + 2.0
        assert pool.kills == 8
        pool.start(wait=True)  # every replacement has started and is back in the idle queue
        assert verify_math("x^2+1", "\\boxed{1+x^2}", fast_path=False).status == "correct"
    finally:
        pool.shutdown()
        vmath.reset_pool()


def test_timeout_is_a_deadline_from_the_call_queueing_included() -> None:
    """8 threads, one worker, each sending a power tower: the calls that queue behind the busy
    worker return ``timeout`` at their own deadline instead of waiting their turn."""
    timeout_s = 3.0
    pool = vmath.reset_pool(workers=1)
    try:
        pool.start(wait=True)
        calls = [("1", PATHOLOGICAL[i % 3]) for i in range(8)]
        results = _concurrent(calls, timeout_s=timeout_s, prefilter=False)
        assert [v.status for _, v in results] == ["timeout"] * 8
        assert max(elapsed for elapsed, _ in results) < 2 * timeout_s, results
        assert pool.kills >= 1 and pool.kills + pool.queue_timeouts == 8
        pool.start(wait=True)
        assert verify_math("x^2+1", "\\boxed{1+x^2}", fast_path=False).status == "correct"
    finally:
        pool.shutdown()
        vmath.reset_pool()


def _nap_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, import_s: float) -> WorkerPool:
    """A one-worker pool whose task sleeps for its argument; importing it takes ``import_s``."""
    (tmp_path / "naptask.py").write_text(
        f"import time\ntime.sleep({import_s})\n\ndef nap(s):\n    time.sleep(s)\n    return s\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return WorkerPool("naptask:nap", workers=1)


def _threads(fn: Callable[[int], object], n: int) -> list[tuple[float, object]]:
    results: list[tuple[float, object]] = [(0.0, None)] * n

    def run(i: int) -> None:
        start = time.monotonic()
        out = fn(i)
        results[i] = (time.monotonic() - start, out)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_pool_deadline_includes_queueing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = _nap_pool(tmp_path, monkeypatch, 0.0)
    try:
        pool.start(wait=True)
        results = _threads(lambda i: pool.call((30.0,), 1.0), 6)
        assert [out for _, out in results] == [("timeout", None)] * 6
        assert max(elapsed for elapsed, _ in results) < 2 * 1.0
        assert pool.kills >= 1 and pool.kills + pool.queue_timeouts == 6
        pool.start(wait=True)  # the replacement has started
        assert pool.call((0.0,), 5.0) == ("ok", 0.0)
    finally:
        pool.shutdown()


def test_pool_first_start_is_not_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = _nap_pool(tmp_path, monkeypatch, 2.0)  # importing the task takes longer than the timeout
    try:
        results = _threads(lambda i: pool.call((0.0,), 1.0), 3)
        assert [out for _, out in results] == [("ok", 0.0)] * 3
    finally:
        pool.shutdown()


def test_threads_get_the_same_verdicts_as_sequential_calls() -> None:
    cases = [c for c in CASES if c[0] != "big_response"][:24]
    calls = [(g, r) for _, g, r, _ in cases]
    got = _concurrent(calls, timeout_s=10.0, prefilter=True)
    assert [v.status for _, v in got] == [e for *_, e in cases]


def test_import_is_cheap() -> None:
    code = (
        "import sys, manyways.verify; assert 'math_verify' not in sys.modules and 'sympy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
