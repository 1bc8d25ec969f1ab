"""Hang-proof math answer checking built on math-verify.

``verify_math(gold, response)`` reads the model's final answer (:mod:`manyways.verify.answer`: the
last complete ``\\boxed{}`` together with the boxes just before it that form one answer with it,
e.g. ``\\boxed{1} and \\boxed{2}``, read as the list ``1, 2``; a "final answer is $...$" statement
after the last box; else a final "answer is ..." / "Answer: ..." / "#### ..." statement),
normalises both strings (``$``, ``\\text{}``, ``**bold**``, unambiguous thousands separators
including LaTeX's ``,\\!`` and ``{,}`` (a first group of 0 is never one: ``0,125`` is not 125), a
trailing period, trailing unit words after a number), then decides:

1. no answer read, or an answer whose braces do not balance -> ``no_answer``; empty gold or a
   gold whose braces do not balance (a truncated ``\\frac{1}{2``) -> ``bad_gold``;
2. identical normalised strings -> ``correct``;
3. a counted pre-filter: power towers (exponents nested three deep, e.g. ``10^{10^{10^{10}}}``)
   -> ``timeout`` without trying (see :func:`prefilter_counts`);
4. the exact fast path, in the caller: both sides plain integers / decimals / simple fractions
   -> compared with :class:`fractions.Fraction` (integers of 1,000+ digits as digit strings,
   past Python's int-string conversion limit); both sides one exact form (non-negative integer
   percentages, ``c\\sqrt{r}`` surds, rational multiples of ``\\pi``, integer polynomials,
   intervals with integer end points) -> compared in canonical form. It only answers when
   math-verify would certainly agree (decimals within its 6-digit rounding, negative
   percentages, bare variables go to the pool; tests compare both paths on every form);
5. otherwise math-verify (``parse`` gold first, then ``verify(gold, answer)``) in a killable
   worker process (:mod:`manyways.verify.pool`); where both sides are exact rational values
   (no decimals, percentages or symbols) the worker compares them exactly instead, because
   math-verify's numeric check chops tiny differences (``1/2004!`` vs ``1/2006!``) to 0.
   ``timeout_s`` is a deadline from the call, queueing for a worker included -> ``timeout``.

No input makes ``verify_math`` raise: a failure in the caller is an ``error`` verdict.
Every use of a parsed expression (parse, verify, ``str()``) happens in the worker; only plain
strings cross back. Pool size: ``MANYWAYS_VERIFY_WORKERS`` (default 1).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from fractions import Fraction

from manyways.verify import Verdict
from manyways.verify.answer import (
    _last_box,  # noqa: F401  (the choice verifier reads it here)
    extract_answer,
    normalize_answer,
)
from manyways.verify.answer import balanced as _balanced
from manyways.verify.answer import to_fraction as _to_fraction
from manyways.verify.pool import WorkerPool

log = logging.getLogger(__name__)

_PREFILTER_HITS: Counter[str] = Counter()
_PATH_COUNTS: Counter[str] = Counter()
_COUNT_LOCK = threading.Lock()
_POOL: WorkerPool | None = None
_POOL_LOCK = threading.Lock()

_LONG_DIGITS_RE = re.compile(r"\d{1000}")  # int() refuses > 4300 digits; exact forms stay far below
_TOWER_DEPTH = 3
_MAX_EXACT_INT = 10**4  # distinct exact forms then differ by > 1e-7
_MAX_POWER = 20
_SPACE_RE = re.compile(r"\s+")
_SPACE_MEANS_RE = re.compile(r"\d\s+\d|[A-Za-z]\s+[A-Za-z]")
_INT_RE = re.compile(r"-?\d+")
_SURD_RE = re.compile(r"(-?)(\d+)?\\sqrt\{(\d+)\}")
_PI_RE = re.compile(r"(-?)(\d+)?\\pi(?:/(\d+))?")
_PI_FRAC_RE = re.compile(r"(-?)\\[dt]?frac\{(\d+)?\\pi\}\{(\d+)\}")
_PI_AFTER_FRAC_RE = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}\\pi")
_TERM_RE = re.compile(r"([+-]?)(\d*)(?:([kmntxyz])(\^(?:\d|\{\d+\}))?)?")
_PERCENT_RE = re.compile(r"(\d+)(?:\\%)?")
_INTERVAL_RE = re.compile(r"([\[(])(-?\d+),(-?\d+)([\])])")


def prefilter_counts() -> dict[str, int]:
    """How often each pre-filter fired, and how often each decision path was taken."""
    with _COUNT_LOCK:
        return {**{f"prefilter:{k}": v for k, v in _PREFILTER_HITS.items()}, **_PATH_COUNTS}


def _count(counter: Counter[str], key: str) -> None:
    with _COUNT_LOCK:
        counter[key] += 1


def _exponent_depth(s: str) -> int:
    """Deepest nesting of exponents: ``a^{b^{c}}`` is 2, ``a^b`` is 1."""
    best, stack, depth = 0, [], 0
    for i, ch in enumerate(s):
        if ch == "^":
            nxt = s[i + 1] if i + 1 < len(s) else ""
            best = max(best, depth + 1)
            if nxt == "{":
                stack.append(True)
                depth += 1
                continue
        if ch in "{(":
            if not (ch == "{" and i > 0 and s[i - 1] == "^"):
                stack.append(False)
        elif ch in "})" and stack:
            if stack.pop():
                depth -= 1
    return best


def _fast_verdict(gold: str, answer: str) -> Verdict | None:
    """Exact comparison of plain numbers and of the exact forms below; None when math-verify might
    judge differently."""
    if _LONG_DIGITS_RE.search(gold) or _LONG_DIGITS_RE.search(answer):
        return _long_integer_verdict(gold, answer)
    g, a = _to_fraction(gold), _to_fraction(answer)
    if g is None or a is None:
        return _exact_form_verdict(gold, answer)
    if g == a:
        return Verdict("correct", True, answer)
    has_decimal = "." in gold or "." in answer
    if not has_decimal or abs(g - a) > Fraction(1, 10**5):
        return Verdict("incorrect", False, answer)
    return None


def _long_integer_verdict(gold: str, answer: str) -> Verdict | None:
    """Integers too long for ``int()`` (Python's int-string conversion limit) compared as canonical
    digit strings; anything else that long is left to the pool."""
    if not (_INT_RE.fullmatch(gold) and _INT_RE.fullmatch(answer)):
        return None

    def canonical(s: str) -> str:
        sign, digits = ("-", s[1:]) if s.startswith("-") else ("", s)
        digits = digits.lstrip("0") or "0"
        return digits if digits == "0" else sign + digits

    same = canonical(gold) == canonical(answer)
    return Verdict("correct" if same else "incorrect", same, answer)


def _compact(s: str) -> str | None:
    """``s`` without spaces, None where a space may carry meaning (``2 3``, ``\\pi r``)."""
    return None if _SPACE_MEANS_RE.search(s) else _SPACE_RE.sub("", s)


def _small(*values: int) -> bool:
    return all(abs(v) <= _MAX_EXACT_INT for v in values)


def _surd(s: str) -> tuple[int, int] | None:
    """``[-][c]\\sqrt{r}`` or an integer as (coefficient, square-free radicand), exactly."""
    if _INT_RE.fullmatch(s):
        return (int(s), 1) if _small(int(s)) else None
    m = _SURD_RE.fullmatch(s)
    if m is None or not _small(int(m.group(2) or 1), int(m.group(3))):
        return None
    coef, rad, f = (-1 if m.group(1) else 1) * int(m.group(2) or 1), int(m.group(3)), 2
    while f * f <= rad:
        while rad % (f * f) == 0:
            rad, coef = rad // (f * f), coef * f
        f += 1
    return (0, 1) if coef == 0 or rad == 0 else (coef, rad)


def _pi_multiple(s: str) -> Fraction | None:
    """q for ``q\\pi`` written ``[-][a]\\pi[/b]``, ``\\frac{[a]\\pi}{b}`` or ``\\frac{a}{b}\\pi``."""
    m = _PI_RE.fullmatch(s) or _PI_FRAC_RE.fullmatch(s) or _PI_AFTER_FRAC_RE.fullmatch(s)
    if m is None:
        return None
    sign, num, den = m.group(1), int(m.group(2) or 1), int(m.group(3) or 1)
    if num == 0 or den == 0 or not _small(num, den):
        return None
    return (-1 if sign else 1) * Fraction(num, den)


def _polynomial(s: str) -> Counter[tuple[str, int]] | None:
    """Integer polynomial in a few plain variables (one per term) as {(var, power): coef}; None
    unless it has a variable term and is not a bare variable (math-verify treats those apart)."""
    terms: Counter[tuple[str, int]] = Counter()
    pos = 0
    while pos < len(s):
        m = _TERM_RE.match(s, pos)
        sign, digits, var, power = m.groups() if m else (None, "", None, None)
        if m is None or not (digits or var) or (sign == "+" if pos == 0 else not sign):
            return None
        exp = int(power.strip("^{}")) if power else (1 if var else 0)
        coef = int(digits or 1)
        if not _small(coef) or exp > _MAX_POWER or (var and exp == 0):
            return None
        terms[(var or "", exp)] += -coef if sign == "-" else coef
        pos = m.end()
    terms = Counter({k: v for k, v in terms.items() if v != 0})
    has_var = any(exp > 0 for _, exp in terms)
    bare = len(terms) == 1 and any(exp == 1 and coef == 1 for (_, exp), coef in terms.items())
    return terms if has_var and not bare else None


def _percent(s: str) -> int | None:
    """A non-negative integer with or without ``\\%`` (math-verify: 25\\% equals 25; a negative
    percentage is not atomic there and compares differently, so it is left to the pool)."""
    m = _PERCENT_RE.fullmatch(s)
    return int(m.group(1)) if m and _small(int(m.group(1))) else None


def _interval(s: str) -> tuple[str, int, int, str] | None:
    """Two integer end points in brackets, start < end (math-verify: an ``Interval``)."""
    m = _INTERVAL_RE.fullmatch(s)
    if m is None or not _small(int(m.group(2)), int(m.group(3))) or int(m.group(2)) >= int(m.group(3)):
        return None
    return (m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))


def _exact_form_verdict(gold: str, answer: str) -> Verdict | None:
    """Both sides in one exact form (integer percentages, surds, rational multiples of pi, integer polynomials,
    intervals with integer end points): equal forms are equal values, different forms differ by
    far more than math-verify's tolerance (small integers). Decimals never take this path."""
    g, a = _compact(gold), _compact(answer)
    if g is None or a is None or "." in g or "." in a:
        return None
    kinds = (_percent, _pi_multiple, _polynomial, _interval)
    if "\\sqrt" in g or "\\sqrt" in a:
        kinds = (_surd,)
    for kind in kinds:
        g_form, a_form = kind(g), kind(a)  # type: ignore[operator]
        if g_form is not None and a_form is not None:
            same = g_form == a_form
            return Verdict("correct" if same else "incorrect", same, answer)
    return None


def check_in_worker(gold: str, answer: str) -> tuple[str, str | None]:
    """Runs inside a pool worker: math-verify on plain strings, returning (status, detail)."""
    import math_verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_parsed = math_verify.parse(_boxed(gold), parsing_timeout=None)
    if not gold_parsed:
        return ("bad_gold", "gold did not parse")
    answer_parsed = math_verify.parse(_boxed(answer), parsing_timeout=None)
    if not answer_parsed:
        return ("no_answer", "answer did not parse")
    ok = math_verify.verify(gold_parsed, answer_parsed, timeout_seconds=None)
    exact = _exact_rational_eq(gold_parsed, answer_parsed)
    if exact is not None and exact != ok:
        return ("correct" if exact else "incorrect", "exact rational comparison")
    return ("correct" if ok else "incorrect", None)


def _exact_rational(parsed: list) -> object | None:
    """The exact rational value of a parse without decimals, percentages or symbols, else None."""
    import sympy

    expr, text = (parsed + [None, ""])[:2]
    if not isinstance(expr, sympy.Expr) or "%" in str(text) or expr.free_symbols or expr.atoms(sympy.Float):
        return None
    value = expr.doit()
    return value if isinstance(value, sympy.Rational) else None


def _exact_rational_eq(gold_parsed: list, answer_parsed: list) -> bool | None:
    """Exact equality where math-verify's numeric check cannot be trusted: two exact rational
    values (``1/2004!``, ``2^{-99}``) whose difference math-verify evaluates to 15 digits and chops
    to 0 when tiny. Decimals (6-place rounding) and percentages keep math-verify's conventions."""
    try:
        gold_value, answer_value = _exact_rational(gold_parsed), _exact_rational(answer_parsed)
    except Exception:  # an expression sympy cannot evaluate exactly: keep math-verify's verdict
        return None
    if gold_value is None or answer_value is None:
        return None
    return bool(gold_value == answer_value)


def _boxed(text: str) -> str:
    return text if "\\boxed" in text else "\\boxed{" + text + "}"


def _new_pool(workers: int | None) -> WorkerPool:
    preload = ("math_verify", "manyways.verify.math")
    return WorkerPool("manyways.verify.math:check_in_worker", workers=workers, preload=preload)


def _pool() -> WorkerPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _new_pool(None)
        return _POOL


def _front(gold: str, response: str, *, fast_path: bool, prefilter: bool) -> tuple[Verdict | None, str, str]:
    """Everything decided in the caller; returns (verdict or None, normalised gold, answer)."""
    raw = extract_answer(response or "")
    if raw is None:
        return Verdict("no_answer", None, None), "", ""
    answer, gold_n = normalize_answer(raw), normalize_answer(gold or "")
    if not gold_n or not _balanced(gold_n):
        return Verdict("bad_gold", None, answer), gold_n, answer
    if not _balanced(answer):
        return Verdict("no_answer", None, answer, "unbalanced braces"), gold_n, answer
    if answer == gold_n:
        _count(_PATH_COUNTS, "identical")
        return Verdict("correct", True, answer), gold_n, answer
    if prefilter:
        for name, text in (("tower_answer", answer), ("tower_gold", gold_n)):
            if _exponent_depth(text) >= _TOWER_DEPTH:
                _count(_PREFILTER_HITS, name)
                return Verdict("timeout", None, answer, f"prefilter:{name}"), gold_n, answer
    if fast_path:
        verdict = _fast_verdict(gold_n, answer)
        if verdict is not None:
            _count(_PATH_COUNTS, "fast")
            return verdict, gold_n, answer
    return None, gold_n, answer


def _from_pool(result: tuple[str, object], answer: str) -> Verdict:
    kind, payload = result
    if kind == "timeout":
        return Verdict("timeout", None, answer)
    if kind == "error":
        return Verdict("error", None, answer, str(payload))
    status, detail = payload  # type: ignore[misc]
    correct = {"correct": True, "incorrect": False}.get(status)
    return Verdict(status, correct, answer, detail)


def _safe_front(
    gold: str, response: str, *, fast_path: bool, prefilter: bool
) -> tuple[Verdict | None, str, str]:
    """:func:`_front`, with any failure turned into an ``error`` verdict (no input may raise)."""
    try:
        return _front(gold, response, fast_path=fast_path, prefilter=prefilter)
    except Exception as exc:
        log.warning("verify_math failed on an input (%s: %s)", type(exc).__name__, str(exc)[:200])
        return Verdict("error", None, None, f"{type(exc).__name__}: {exc}"[:500]), "", ""


def verify_math(
    gold: str, response: str, *, timeout_s: float = 5.0, fast_path: bool = True, prefilter: bool = True
) -> Verdict:
    """Judge ``response`` against ``gold`` (see module docstring); returns within ``timeout_s`` of
    waiting for the pool (queueing included) and never raises."""
    verdict, gold_n, answer = _safe_front(gold, response, fast_path=fast_path, prefilter=prefilter)
    if verdict is not None:
        return verdict
    _count(_PATH_COUNTS, "pool")
    return _from_pool(_pool().call((gold_n, answer), timeout_s), answer)


def verify_math_batch(
    pairs: list[tuple[str, str]], *, timeout_s: float = 5.0, fast_path: bool = True, prefilter: bool = True
) -> list[Verdict]:
    """:func:`verify_math` over (gold, response) pairs, fanned out over the worker pool."""
    fronts = [_safe_front(g, r, fast_path=fast_path, prefilter=prefilter) for g, r in pairs]
    pending = [i for i, (verdict, _, _) in enumerate(fronts) if verdict is None]
    results = _pool().call_many([(fronts[i][1], fronts[i][2]) for i in pending], timeout_s)
    out: list[Verdict | None] = [verdict for verdict, _, _ in fronts]
    for i, result in zip(pending, results, strict=True):
        _count(_PATH_COUNTS, "pool")
        out[i] = _from_pool(result, fronts[i][2])
    return [v for v in out if v is not None]


def reset_pool(workers: int | None = None) -> WorkerPool:
    """Shut the math pool down and make a new one (``workers`` None: from the environment)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown()
        _POOL = _new_pool(workers)
        return _POOL
