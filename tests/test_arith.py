"""Tests for the exact, safe arithmetic evaluator behind catalogue exemplars' ``check``."""

from __future__ import annotations

from fractions import Fraction

import pytest

from manyways.arith import MAX_LENGTH, ArithError, evaluate, parse_number


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("3 * (4 + 1) / 2", Fraction(15, 2)),
        ("1 / (1/6 + 1/3)", Fraction(2)),  # exact: no float rounding
        ("0.1 + 0.2", Fraction(3, 10)),  # decimals are read exactly
        ("-(-130 // 40)", Fraction(4)),  # ceiling division
        ("58 % 6", Fraction(4)),
        ("3 * 2 ** 4", Fraction(48)),
        ("2 ** -2", Fraction(1, 4)),
        ("min(7, 3, 5) + max(1, 2) - abs(-4)", Fraction(1)),
        ("+5", Fraction(5)),
    ],
)
def test_evaluates_arithmetic_exactly(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    ("expression", "pattern"),
    [
        ("__import__('os').getpid()", "not allowed"),
        ("x + 1", "Name is not allowed"),
        ("(1).real", "Attribute is not allowed"),
        ("len([1, 2])", "not allowed"),
        ("'a' * 3", "not a number"),
        ("True + 1", "not a number"),
        ("1 < 2", "Compare is not allowed"),
        ("lambda: 1", "not allowed"),
        ("2 ** 1000", "exponent"),
        ("2 ** 0.5", "exponent"),
        ("abs(1, 2)", "abs\\(\\) takes one number"),
        ("max(key=1)", "positional numbers only"),
        ("1 / 0", "division by zero"),
        ("7 % 0", "division by zero"),
        ("1 +", "not an arithmetic expression"),
        ("   ", "empty expression"),
        ("1 & 3", "BitAnd is not allowed"),
        ("1 +" + " 1 +" * MAX_LENGTH + " 1", "longer than"),
    ],
)
def test_rejects_anything_but_arithmetic_with_a_reason(expression, pattern):
    with pytest.raises(ArithError, match=pattern):
        evaluate(expression)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("12", Fraction(12)),
        (" -2.5 ", Fraction(-5, 2)),
        ("3/4", Fraction(3, 4)),
        ("five", None),
        ("1/0", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value
