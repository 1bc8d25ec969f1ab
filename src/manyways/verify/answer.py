"""Reading the final answer out of a response, and normalising answer strings (no sympy here).

The final answer (:func:`extract_answer`): a "final answer is $...$" statement after the last box
(math-verify's convention); else the last complete ``\\boxed{}`` together with the boxes just
before it that are joined to it only by separators (``,``, ``;``, "and", "or", ``\\quad``,
``\\text{...}``, math delimiters, a ``y_2 =`` label), read as one list answer (``\\boxed{1} and
\\boxed{2}`` -> ``1, 2``), so a list is judged as a whole and listing candidates cannot earn the
reward; else the last "answer is ..." / "Answer: ..." / "#### ..." statement. Nothing is guessed
from other prose.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GLUE_RE = re.compile(
    r"(?:\s|[,;]|\$|\\[()\[\]]|\\q?quad\b|\\[,;:! ]|~|\b(?:and|or)\b|\\text\s*\{[^{}]*\}"
    r"|[A-Za-z](?:_\{?\w+\}?)?\s*=)*"
)
_SEPARATOR_RE = re.compile(r"[,;]|\b(?:and|or)\b|\\text|\\q?quad")
_FINAL_STATEMENT_RE = re.compile(r"final\s+answer\s+is\s*:?\s*(\$[^$\n]+\$|\\\((?:(?!\\\)).)+\\\))", re.I)
_ANSWER_RE = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)|^\s*####\s*([^\n]+)",
    re.IGNORECASE | re.MULTILINE,
)
_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC_RE = re.compile(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}")
_SLASH_RE = re.compile(r"(-?\d+)/(\d+)")
_THOUSANDS_RE = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")  # a first group of 0 is never one
_THIN_SEP_RE = re.compile(r"(?<=\d)(?:,\\!\s*|\{,\})(?=\d{3}(?!\d))")  # 11,\! 111 and 11{,}111
_UNIT_RE = re.compile(r"(-?[\d.,/]+)\s+[A-Za-z]{2,}(?: [A-Za-z]+){0,3}")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_MAX_GLUE = 200
_MAX_DIGITS = 4000  # int() refuses more than 4300 digits


def _close(text: str, start: int, stop: int) -> int | None:
    """Index of the brace closing the one opened just before ``start`` (searching up to ``stop``)."""
    depth = 1
    for i in range(start, stop):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _last_box(text: str) -> tuple[bool, str | None]:
    """(found a box, content of the last box); content None when the last box never closes.
    (The multiple-choice verifier reads only the last box.)"""
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return False, None
    close = _close(text, matches[-1].end(), len(text))
    return True, None if close is None else text[matches[-1].end() : close]


def _final_boxes(text: str) -> tuple[bool, list[str] | None, int]:
    """(found a box, contents of the final answer's boxes, end of the last box).

    The final answer is the last complete box together with the boxes just before it that are
    joined to it only by separators (``,``, ``;``, "and", "or", ``\\quad``, ``\\text{...}``,
    math delimiters, a ``y_2 =`` label): ``\\boxed{1} and \\boxed{2}`` is one answer, read as the
    list ``1, 2``. Contents None when the last box never closes.
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return False, None, -1
    close = _close(text, matches[-1].end(), len(text))
    if close is None:
        return True, None, -1
    contents, start = [text[matches[-1].end() : close]], matches[-1].start()
    for prev in reversed(matches[:-1]):
        prev_close = _close(text, prev.end(), start)
        if prev_close is None:
            break
        glue = text[prev_close + 1 : start]
        if len(glue) > _MAX_GLUE or not _GLUE_RE.fullmatch(glue) or not _SEPARATOR_RE.search(glue):
            break
        contents.insert(0, text[prev.end() : prev_close])
        start = prev.start()
    return True, contents, close


def extract_answer(response: str) -> str | None:
    """The final answer stated in ``response`` (raw string), or None.

    In order: a "final answer is $...$" statement after the last box (math-verify's convention);
    the last box, joined with the boxes that form one answer with it (see :func:`_final_boxes`);
    else the last "answer is ..." / "Answer: ..." / "#### ..." statement.
    """
    found, contents, end = _final_boxes(response)
    if found:
        if contents is None:
            return None
        statements = list(_FINAL_STATEMENT_RE.finditer(response, end + 1))
        if statements:
            return statements[-1].group(1).strip()
        parts = [c.strip() for c in contents if c.strip()]
        return ", ".join(parts) if parts else None
    statements = list(_ANSWER_RE.finditer(response))
    if not statements:
        return None
    last = statements[-1]
    text = (last.group(1) or last.group(2) or "").strip()
    return text or None


def normalize_answer(text: str) -> str:
    """Strip presentation that never changes a value (see module docstring)."""
    s = _THIN_SEP_RE.sub(",", text.strip())
    for _ in range(3):
        before = s
        s = s.strip().strip("*").strip()
        s = s.rstrip(".").strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
        s = s.replace("\\$", "").replace("\\!", "").replace("\\,", "")
        s = _TEXT_RE.sub(lambda m: m.group(1), s).strip()
        if s == before:
            break
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    unit = _UNIT_RE.fullmatch(s)
    if unit and _is_plain_number(unit.group(1).replace(",", "")):
        s = unit.group(1).replace(",", "") if _THOUSANDS_RE.fullmatch(unit.group(1)) else unit.group(1)
    return s


def balanced(s: str) -> bool:
    """Every unescaped ``{`` closed in order (a truncated ``\\frac{1}{2`` is not)."""
    depth = 0
    for ch in s.replace("\\{", "").replace("\\}", ""):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _is_plain_number(s: str) -> bool:
    return to_fraction(s) is not None


def to_fraction(s: str) -> Fraction | None:
    """A plain integer, decimal or simple fraction as a Fraction, else None (also when it has too
    many digits for ``int()``)."""
    if len(s) > _MAX_DIGITS:
        return None
    if _NUMBER_RE.fullmatch(s):
        return Fraction(s)
    frac = _FRAC_RE.fullmatch(s) or _SLASH_RE.fullmatch(s)
    if frac is None:
        return None
    groups = frac.groups()
    sign = -1 if len(groups) == 3 and groups[0] == "-" else 1
    num, den = int(groups[-2]), int(groups[-1])
    return None if den == 0 else sign * Fraction(num, den)
