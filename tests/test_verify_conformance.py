"""Conformance of ``verify_math`` with math-verify's own released test cases.

The (gold, prediction, expected) cases are read out of the test files of the pinned math-verify
version's source distribution (constraints.txt), which ``make install`` downloads into
``.cache/sdist/`` (``pip download --no-binary :all: --no-deps math-verify==<pin>``); nothing of it is
copied into this tree. Each case runs through ``verify_math`` (a bare prediction put in
``\\boxed{}``) and through plain math-verify with the case's own settings (its test helper
``compare_strings``: extraction targets, ``float_rounding``, ``strict``, set/relation comparison).

Every case where ``verify_math`` disagrees with the released expectation must be listed in
``BY_DESIGN`` with its reason; a case listed there that now agrees fails too, so the table and the
README stay exact. ``python tests/test_verify_conformance.py`` prints the table for the README.
"""

from __future__ import annotations

import ast
import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SDIST_DIR = Path(os.environ.get("MANYWAYS_SDIST_DIR", REPO_ROOT / ".cache" / "sdist"))

_PROSE = "no answer is guessed from prose: the prediction has no box and no 'answer is'/'Answer:' statement"
_PROSE_BOXED = (
    "the harness boxes the whole prose prediction; math-verify's case tests that this prose is NOT "
    "matched, while the boxed text does hold the answer"
)
_ROUNDING = "the case sets float_rounding={}; verify_math uses math-verify's default of 6 decimal places"
_DECIMAL_COMMA = (
    "a comma inside an answer separates list items (math-verify reads the same boxed text as a set "
    "too); the case reads it as a decimal comma with math-verify's expression-only extraction"
)
BY_DESIGN: dict[str, str] = {
    "test_all.py::test_number_extraction[2]": (
        "digits separated by a plain space are not joined into one number (`2 3` may be two answers); "
        "the case uses math-verify's expression-only extraction"
    ),
    "test_all.py::test_number_extraction[5]": _DECIMAL_COMMA,
    "test_all.py::test_number_extraction[6]": _DECIMAL_COMMA,
    "test_all.py::test_number_extraction[7]": _PROSE,
    "test_all.py::test_latex_notation[1]": _PROSE,
    "test_all.py::test_latex_notation[2]": _PROSE,
    "test_all.py::test_latex_notation[6]": _PROSE_BOXED,
    "test_all.py::test_latex_notation[8]": _PROSE,
    "test_all.py::test_relations_math[0]": _PROSE,
    "test_all.py::test_relations_math[1]": _PROSE,
    "test_all.py::test_relations_math[2]": _PROSE,
    "test_all.py::test_relations_math[3]": _PROSE,
    "test_all.py::test_relations_math[4]": _PROSE,
    "test_all.py::test_relations_math[7]": _PROSE,
    "test_all.py::test_matrix_extraction[5]": _PROSE,
    "test_all.py::test_math_extraction_additional_cases[4]": (
        "'Final Answer: The largest $n$ is 34.' is prose after the colon; only a box, an "
        "'answer is ...'/'Answer: ...' value or a 'final answer is $...$' after the last box is read"
    ),
    "test_all.py::test_complex_math_expressions[7]": _ROUNDING.format(2),
    "test_all.py::test_complex_math_expressions[13]": _ROUNDING.format(2),
    "test_all.py::test_precision": _ROUNDING.format(4),
    "test_all.py::test_set_rel_assymetry[2]": (
        "the case turns on allow_set_relation_comp (an inequality equals an interval); verify_math "
        "keeps math-verify's default (off)"
    ),
    "test_strict.py::test_strict_variable_comparison[1]": (
        "the case turns strict off (f(x) equals f(y)); verify_math keeps strict variable comparison"
    ),
    "test_numina_cases.py::test_numina_cases[24]": (
        "the released gold is truncated (its `\\boxed{` never closes): verify_math says bad_gold, a "
        "truncated gold is never gradable; math-verify closes the brace itself"
    ),
    "test_yujianll.py::test_string_extraction[9]": (
        "1 - 1/e and 1 + 1/e differ; the released case records math-verify accepting them, "
        "verify_math says incorrect (regression case one_minus_inv_e)"
    ),
}


@dataclass
class Case:
    """One released case: ``settings`` are the keyword arguments of its ``compare_strings`` call
    (None: the test calls plain ``verify(parse(gold), parse(pred))``)."""

    case_id: str
    gold: str
    pred: str
    expected: bool
    settings: dict | None = field(default=None)


def pinned_version() -> str:
    """math-verify's version in constraints.txt."""
    text = (REPO_ROOT / "constraints.txt").read_text()
    found = re.search(r"^math-verify==(\S+)", text, re.MULTILINE)
    assert found, "constraints.txt pins no math-verify version"
    return found.group(1)


def sdist_path() -> Path:
    return SDIST_DIR / f"math_verify-{pinned_version()}.tar.gz"


def _literal(node: ast.AST) -> object:
    if isinstance(node, ast.JoinedStr):  # one case builds its gold with an f-string over math.sqrt
        return eval(compile(ast.Expression(node), "<case>", "eval"), {"math": math, "__builtins__": {}})
    return ast.literal_eval(node)


def _settings(call: ast.Call, values: dict) -> dict:
    return {
        kw.arg: values[kw.value.id] if isinstance(kw.value, ast.Name) else ast.literal_eval(kw.value)
        for kw in call.keywords
    }


def _helper_call(func: ast.FunctionDef) -> ast.Call | None:
    for node in ast.walk(func):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "compare_strings":
            return node
    return None


def _parametrized(name: str, func: ast.FunctionDef) -> list[Case]:
    cases = []
    for deco in func.decorator_list:
        if not (isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "parametrize"):
            continue
        names = [n.strip() for n in ast.literal_eval(deco.args[0]).split(",")]
        if not {"gold", "pred"} <= set(names):
            continue
        expected_name = "expected" if "expected" in names else "result"
        call = _helper_call(func)
        for i, row in enumerate(deco.args[1].elts):
            values = dict(zip(names, (_literal(e) for e in row.elts), strict=True))
            settings = _settings(call, values) if call is not None else None
            case_id = f"{name}::{func.name}[{i}]"
            cases.append(Case(case_id, values["gold"], values["pred"], bool(values[expected_name]), settings))
    return cases


def _inline(name: str, func: ast.FunctionDef) -> list[Case]:
    """``assert compare_strings("gold", "pred", ...) == 1`` written out in a test body."""
    cases = []
    for node in ast.walk(func):
        if not (isinstance(node, ast.Compare) and isinstance(node.left, ast.Call)):
            continue
        call, literals = node.left, [*node.left.args, node.comparators[0]]
        if getattr(call.func, "id", "") != "compare_strings" or len(call.args) != 2:
            continue
        if not all(isinstance(n, ast.Constant) for n in literals):
            continue  # a parametrized test's own helper call
        gold, pred = (ast.literal_eval(a) for a in call.args)
        expected = bool(ast.literal_eval(node.comparators[0]))
        cases.append(Case(f"{name}::{func.name}", gold, pred, expected, _settings(call, {})))
    return cases


def released_cases(path: Path) -> list[Case]:
    """Every (gold, pred, expected) case of the sdist's ``tests/test_*.py`` files."""
    cases: list[Case] = []
    with tarfile.open(path) as tar:
        members = sorted(tar.getmembers(), key=lambda m: m.name)
        for member in members:
            parts = member.name.split("/")
            if len(parts) != 3 or parts[1] != "tests" or not re.fullmatch(r"test_\w+\.py", parts[2]):
                continue
            tree = ast.parse(tar.extractfile(member).read().decode())  # type: ignore[union-attr]
            for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
                cases += _parametrized(parts[2], func) + _inline(parts[2], func)
    return cases


def plain_math_verify(case: Case) -> bool:
    """What math-verify's own test computes for ``case``."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if case.settings is None:
        return bool(verify(parse(case.gold), parse(case.pred)))
    targets = [
        LatexExtractionConfig(boxed_match_priority=0) if t == "latex" else ExprExtractionConfig()
        for t in case.settings.get("match_types", ["latex", "expr"])
    ]
    return bool(
        verify(
            parse(case.gold, targets),
            parse(case.pred, targets),
            float_rounding=case.settings.get("precision", 6),
            strict=case.settings.get("strict", True),
            allow_set_relation_comp=case.settings.get("allow_set_relation_comp", False),
        )
    )


def ours(case: Case) -> str:
    from manyways.verify import verify_math

    response = case.pred if "\\boxed" in case.pred else "\\boxed{" + case.pred + "}"
    return verify_math(case.gold, response, timeout_s=20.0).status


@dataclass
class Table:
    cases: int
    agree: int
    disagree: dict[str, str]  # case id -> our status


def conformance_table(cases: list[Case]) -> Table:
    disagree = {}
    for case in cases:
        status = ours(case)
        if (status == "correct") != case.expected:
            disagree[case.case_id] = status
    return Table(len(cases), len(cases) - len(disagree), disagree)


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    path = sdist_path()
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: the math-verify conformance cases come from the pinned sdist. Run "
            f"`make install`, or: pip download --no-binary :all: --no-deps "
            f"math-verify=={pinned_version()} -d {SDIST_DIR}"
        )
    return released_cases(path)


def test_sdist_is_the_installed_version() -> None:
    from importlib.metadata import version

    assert version("math-verify") == pinned_version()


def test_every_released_case_is_read(cases: list[Case]) -> None:
    assert len(cases) == 276
    assert len({c.case_id for c in cases}) == len(cases)
    by_file = {name: sum(c.case_id.startswith(name) for c in cases) for name in ("test_open_thoughts.py",)}
    assert by_file == {"test_open_thoughts.py": 29}


@pytest.mark.slow
def test_plain_math_verify_passes_its_released_cases(cases: list[Case]) -> None:
    failing = [c.case_id for c in cases if plain_math_verify(c) != c.expected]
    assert failing == []


def test_by_design_reasons_name_real_cases(cases: list[Case]) -> None:
    ids = {c.case_id for c in cases}
    assert set(BY_DESIGN) <= ids
    assert all(len(reason) > 20 for reason in BY_DESIGN.values())


@pytest.mark.slow
def test_conformance_table(cases: list[Case]) -> None:
    table = conformance_table(cases)
    assert set(table.disagree) == set(BY_DESIGN), sorted(set(table.disagree) ^ set(BY_DESIGN))
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"{table.agree} of {table.cases}" in readme


def markdown(table: Table) -> str:
    """The table as README lines."""
    lines = [
        f"{table.agree} of {table.cases} released cases agree; {len(table.disagree)} differ by design:",
        "",
    ]
    reasons: dict[str, list[str]] = {}
    for case_id in sorted(table.disagree):
        reasons.setdefault(BY_DESIGN.get(case_id, "NOT LISTED"), []).append(case_id)
    lines += ["| cases | reason |", "|---|---|"]
    for reason, ids in reasons.items():
        lines.append(f"| {', '.join(f'`{i}`' for i in ids)} | {reason} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown(conformance_table(released_cases(sdist_path()))) + "\n")
