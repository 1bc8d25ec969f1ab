"""Exact, safe evaluation of small arithmetic expressions (a catalogue exemplar's ``check``).

Input: a string such as ``"(28 - 2 * 10) / 2"``. Output: its exact value as a
:class:`fractions.Fraction` (``/`` is exact division, decimals are read exactly). Only numbers,
``+ - * / // % **`` (small integer exponents), unary signs, parentheses and ``min``/``max``/``abs``
are allowed; anything else (names, attributes, calls to other functions) raises
:class:`ArithError`. No ``eval``: the expression is walked as a Python AST.

Try it on CPU::

    python -c "from manyways.arith import evaluate; print(evaluate('3 * (4 + 1) / 2'))"
"""

from __future__ import annotations

import ast
import logging
import operator
from fractions import Fraction
from typing import Any

logger = logging.getLogger(__name__)

MAX_EXPONENT = 64
MAX_LENGTH = 500

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_FUNCTIONS = {"min": min, "max": max, "abs": abs}


class ArithError(ValueError):
    """The expression is not plain arithmetic, or cannot be evaluated (division by zero, ...)."""


def evaluate(expression: str) -> Fraction:
    """The exact value of ``expression``; ArithError says what is not allowed or what failed."""
    if not isinstance(expression, str) or not expression.strip():
        raise ArithError("empty expression")
    if len(expression) > MAX_LENGTH:
        raise ArithError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ArithError(f"not an arithmetic expression: {exc.msg}") from exc
    try:
        return _eval(tree.body)
    except ZeroDivisionError as exc:
        raise ArithError("division by zero") from exc


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number (``"12"``, ``"-2.5"``, ``"3/4"``), or None if it is not one."""
    try:
        return Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        return None


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant):
        return _constant(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        function = _BINARY.get(type(node.op))
        if function is None:
            raise ArithError(f"operator {type(node.op).__name__} is not allowed")
        return Fraction(function(left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if node.keywords or not node.args:
            raise ArithError(f"{node.func.id}() takes positional numbers only")
        values = [_eval(arg) for arg in node.args]
        if node.func.id == "abs" and len(values) != 1:
            raise ArithError("abs() takes one number")
        function: Any = _FUNCTIONS[node.func.id]
        return Fraction(function(*values))
    raise ArithError(f"{type(node).__name__} is not allowed (numbers, + - * / // % **, min, max, abs only)")


def _constant(value: object) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArithError(f"constant {value!r} is not a number")
    return Fraction(str(value)) if isinstance(value, float) else Fraction(value)


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
        raise ArithError(f"exponent {exponent} must be an integer of at most {MAX_EXPONENT} in size")
    return base ** int(exponent)
