"""Tests for the Polya heuristic catalogue, the taxonomy, and prompt rendering."""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
from pathlib import Path

import pytest
import yaml

from manyways.arith import evaluate, parse_number
from manyways.config import load_config
from manyways.experiment import max_heuristics
from manyways.heuristics import (
    DEFAULT_CATALOGUE,
    PLAIN_SYSTEM,
    REPO_ROOT,
    CatalogueError,
    Heuristic,
    last_boxed,
    load_catalogue,
    load_taxonomy,
    prompt_hash,
    render_heuristic_messages,
    render_heuristic_prefix,
    render_plain_messages,
    render_sft_messages,
    resolve_catalogue_path,
)
from manyways.stages.generate import selected_heuristics
from manyways.verify import verify_math

CATALOGUE = load_catalogue()
EXEMPLARS = [(h.id, j, e) for h in CATALOGUE.heuristics for j, e in enumerate(h.exemplars)]
EXEMPLAR_IDS = [f"{hid}[{j}]" for hid, j, _ in EXEMPLARS]

V2_PATH = "configs/heuristics/polya_v2.yaml"
V2 = load_catalogue(V2_PATH)
V2_NEW = V2.heuristics[16:]  # the 48 heuristics v2 adds after polya_v1's 16
V2_NEW_EXEMPLARS = [(h.id, j, e) for h in V2_NEW for j, e in enumerate(h.exemplars)]
V2_NEW_EXEMPLAR_IDS = [f"{hid}[{j}]" for hid, j, _ in V2_NEW_EXEMPLARS]
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SHIPPED = {"polya_v1": CATALOGUE, "polya_v2": V2}
POLYA_V1_HASH = "3ad4a8f01219bc4b"  # polya_v1's content hash before v2 (and `check`) existed


def _brute(pred, candidates) -> int:
    """The single candidate satisfying pred (fails if zero or several do)."""
    hits = [c for c in candidates if pred(c)]
    assert len(hits) == 1, hits
    return hits[0]


# Every exemplar's gold answer, recomputed from its question independently of its solution.
RECOMPUTED = {
    ("plan_and_carry_out", 0): 20 - (3 * 4 + 2),
    ("plan_and_carry_out", 1): 48 - 48 // 2 - 15,
    ("work_backward", 0): _brute(lambda s: s - 7 + 12 == 30, range(100)),
    ("work_backward", 1): _brute(lambda x: 2 * x + 5 == 37, range(100)),
    ("decompose", 0): 4 * 35 + 3 * 8,
    ("decompose", 1): 6 * 10 + 4 * 15,
    ("auxiliary_unknown", 0): 3 * _brute(lambda b: b + 3 * b == 24, range(100)),
    ("auxiliary_unknown", 1): _brute(lambda p: p + (p - 2) == 10, range(100)),
    ("guess_check_refine", 0): _brute(lambda c: 4 * c + 2 * (10 - c) == 28, range(11)),
    ("guess_check_refine", 1): _brute(lambda a: a - (20 - a) == 6, range(21)),
    ("draw_figure_or_table", 0): _brute(lambda w: 5 * w == 12 + 2 * w, range(50)),
    ("draw_figure_or_table", 1): 2 * (8 + 5),
    ("look_for_pattern", 0): [3 + 2 * k for k in range(10)][-1],
    ("look_for_pattern", 1): 2**10 % 10,
    ("specialise_small_cases", 0): 12 - 1,
    ("specialise_small_cases", 1): len(range(5, 20)),
    ("related_problem", 0): 180 * 5 // 3,
    ("related_problem", 1): 8 * 6 // 12,
    ("restate_problem", 0): 2 * 6 + 4,
    ("restate_problem", 1): 24 // 6,
    ("eliminate_cases", 0): _brute(lambda x: x % 2 == 1 and x % 5 == 0, range(10, 20)),
    ("eliminate_cases", 1): _brute(lambda t: 10 * t + 5 * (4 - t) == 30, range(5)),
    ("extreme_cases", 0): len({"red", "blue"}) + 1,
    ("extreme_cases", 1): 12 - (5 - 1),
    ("use_symmetry", 0): sum(range(1, 21)),
    ("use_symmetry", 1): 30 // 2,
    ("find_invariant", 0): 10 + 3 - 5 + 1,
    ("find_invariant", 1): 7 + _brute(lambda y: 35 + y == 3 * (7 + y), range(50)),
    ("generalise", 0): 3 + 2 * 9,
    ("generalise", 1): len(list(itertools.combinations(range(6), 2))),
    ("look_back_verify", 0): 120 // 15,
    ("look_back_verify", 1): 3 * 12 - 10,
}

# A second, brute-force recomputation for the v2 exemplars whose gold is found by search; it
# checks the `check` expressions of those exemplars (which are closed forms) independently.
BRUTE_V2 = {
    ("organised_list", 1): len([(t, f) for t in range(3) for f in range(5) if 10 * t + 5 * f == 20]),
    ("count_the_complement", 0): len([x for x in range(1, 51) if x % 5 != 0]),
    ("bracket_the_answer", 0): _brute(lambda s: s * s == 576, range(100)),
    ("bracket_the_answer", 1): min(w for w in range(100) if 7 * w > 100),
    ("lemma", 0): len([x for x in range(1, 101) if x % 3 == 0 or x % 5 == 0]),
    ("separate_the_condition", 0): _brute(lambda c: c + (c - 4) == 10, range(11)),
    ("separate_the_condition", 1): _brute(lambda x: x // 10 + x % 10 == 10, range(31, 40)),
    ("keep_part_of_condition", 0): _brute(lambda e: e % 6 == 0 and e % 5 == 1, range(20, 41)),
    ("keep_part_of_condition", 1): _brute(lambda a: 7 * a + 4 * (11 - a) == 50, range(12)),
    ("is_it_possible", 0): min(b for b in range(1, 10) if 40 * b >= 130),
    ("is_it_possible", 1): max(p for p in range(20) if 8 * p <= 100),
    ("simple_model", 1): min(p for p in range(1, 10) if 8 * p >= 5 * 3),
    ("suppose_the_opposite", 1): min(m for m in range(1, 20) if 10 * m >= 101),
    ("signs_of_progress", 0): _brute(lambda n: (n - 1) + n == 51, range(100)),
    ("signs_of_progress", 1): _brute(lambda li: 3 * li - 10 == li + 10, range(100)),
    ("system_of_equations", 0): _brute(
        lambda h: any(3 * h + 2 * d == 13 and h + 2 * d == 7 for d in range(10)), range(10)
    ),
    ("special_value", 1): _brute(lambda n: n % 6 == 0 and n - n // 2 - n // 3 == 5, range(1, 100)),
    ("justify_each_step", 1): min(10 * g + 3 * (14 - 4 * g) for g in range(14 // 4 + 1)),
    ("analogy", 0): (11 - 1) * (10 // (6 - 1)),
    ("equivalent_problem", 0): len(range(17, 53)),
}

# "a op b ... = c" with only numbers, + - * / and parentheses on the left.
EQUATION = re.compile(
    r"(?<![\w.)])(\(?\d[\d.\s+\-*/()]*?[+\-*/][\d.\s+\-*/()]*?)\s*=\s*(\d+(?:\.\d+)?)(?![\w])"
)


# --------------------------------------------------------------------------------------------
# The shipped catalogue


def test_catalogue_loads_with_at_least_16_heuristics_each_with_two_exemplars():
    assert CATALOGUE.version == "polya_v1"
    assert len(CATALOGUE.heuristics) >= 16
    assert all(len(h.exemplars) >= 2 for h in CATALOGUE.heuristics)
    assert len(set(CATALOGUE.ids)) == len(CATALOGUE.ids)


def test_first_heuristics_are_plan_then_distinct_arithmetic_moves():
    assert [h.id for h in CATALOGUE.select(1)] == ["plan_and_carry_out"]
    assert [h.id for h in CATALOGUE.select(4)] == [
        "plan_and_carry_out",
        "work_backward",
        "decompose",
        "auxiliary_unknown",
    ]


@pytest.mark.parametrize(("hid", "j", "exemplar"), EXEMPLARS, ids=EXEMPLAR_IDS)
def test_exemplar_boxed_answer_verifies_against_stated_answer(hid, j, exemplar):
    # our verifier, the one every stage uses, forced through math-verify (no fast path)
    verdict = verify_math(exemplar.answer, exemplar.solution, fast_path=False)
    assert verdict.status == "correct", f"{hid}[{j}]: boxed answer != {exemplar.answer} ({verdict})"


@pytest.mark.parametrize(("hid", "j", "exemplar"), EXEMPLARS, ids=EXEMPLAR_IDS)
def test_exemplar_answer_matches_independent_recomputation(hid, j, exemplar):
    assert exemplar.answer == str(RECOMPUTED[(hid, j)])


def test_recomputation_table_covers_every_exemplar():
    assert set(RECOMPUTED) == {(hid, j) for hid, j, _ in EXEMPLARS}


def test_equation_checker_catches_a_wrong_equation():
    assert _wrong_equations("so 3 * 4 = 12 and 12 + 2 = 15.") == ["12 + 2 = 15"]
    assert _wrong_equations("let x + 3x = 24, so 4x = 24") == []


def test_every_arithmetic_equation_in_the_solutions_is_correct():
    checked = 0
    for hid, j, exemplar in EXEMPLARS:
        assert _wrong_equations(exemplar.solution) == [], f"{hid}[{j}]"
        checked += len(EQUATION.findall(exemplar.solution))
    assert checked >= 50  # the checker actually looked at the solutions' arithmetic


def _wrong_equations(text: str) -> list[str]:
    wrong = []
    for lhs, rhs in EQUATION.findall(text):
        if lhs.count("(") != lhs.count(")"):
            lhs = lhs.strip("()")
        value = eval(lhs, {"__builtins__": {}})  # only digits, operators and parentheses
        if abs(value - float(rhs)) > 1e-9:
            wrong.append(f"{lhs.strip()} = {rhs}")
    return wrong


@pytest.mark.parametrize("heuristic", V2.heuristics, ids=V2.ids)  # v2 holds v1's 16 (tested below)
def test_instruction_and_every_exemplar_share_the_heuristic_marker(heuristic: Heuristic):
    marker = heuristic.marker.lower()
    assert marker in heuristic.instruction.lower()
    for exemplar in heuristic.exemplars:
        assert marker in exemplar.solution.lower()
        assert last_boxed(exemplar.solution) == exemplar.answer
        assert exemplar.solution.rstrip().endswith("\\boxed{" + exemplar.answer + "}")


@pytest.mark.parametrize("catalogue", SHIPPED.values(), ids=SHIPPED.keys())
def test_markers_are_distinct_so_each_names_one_heuristic(catalogue):
    markers = [h.marker.lower() for h in catalogue.heuristics]
    for a, b in itertools.permutations(markers, 2):
        assert a not in b, (a, b)


def test_exemplars_are_short():
    for hid, j, exemplar in EXEMPLARS + V2_NEW_EXEMPLARS:
        assert len(exemplar.solution.split()) <= 80, f"{hid}[{j}]"
        assert len(exemplar.question.split()) <= 40, f"{hid}[{j}]"


# --------------------------------------------------------------------------------------------
# polya_v2: 64 heuristics, the first 16 polya_v1's


def test_v2_has_64_distinct_heuristics_and_its_own_version():
    assert V2.version == "polya_v2" != CATALOGUE.version
    assert len(V2.heuristics) == 64
    assert len(set(V2.ids)) == 64
    assert len({h.name.lower() for h in V2.heuristics}) == 64
    assert V2.content_hash != CATALOGUE.content_hash


def test_v2_first_16_are_polya_v1_unchanged():
    assert V2.heuristics[:16] == CATALOGUE.heuristics
    assert len(CATALOGUE.heuristics) == 16
    for old, new in zip(CATALOGUE.heuristics, V2.heuristics[:16], strict=True):
        assert render_heuristic_prefix(old) == render_heuristic_prefix(new)  # same prompts, same runs


def test_polya_v1_identity_is_unchanged():
    # adding the optional `check` field must not change v1's content hash (run manifests record it)
    assert CATALOGUE.content_hash == POLYA_V1_HASH


@pytest.mark.parametrize("catalogue", SHIPPED.values(), ids=SHIPPED.keys())
def test_instructions_are_non_empty_and_distinct(catalogue):
    instructions = [" ".join(h.instruction.lower().split()) for h in catalogue.heuristics]
    assert all(len(i.split()) >= 8 for i in instructions)
    assert len(set(instructions)) == len(instructions)


@pytest.mark.parametrize("catalogue", SHIPPED.values(), ids=SHIPPED.keys())
def test_exemplars_of_one_heuristic_differ(catalogue):
    for heuristic in catalogue.heuristics:
        questions = [e.question for e in heuristic.exemplars]
        solutions = [e.solution for e in heuristic.exemplars]
        assert len(set(questions)) == len(questions), heuristic.id
        assert len(set(solutions)) == len(solutions), heuristic.id


def test_no_exemplar_question_is_reused_across_the_catalogue():
    questions = [e.question for h in V2.heuristics for e in h.exemplars]
    assert len(set(questions)) == len(questions) == 128


@pytest.mark.parametrize(("hid", "j", "exemplar"), V2_NEW_EXEMPLARS, ids=V2_NEW_EXEMPLAR_IDS)
def test_v2_exemplar_gold_is_recomputed_and_verified(hid, j, exemplar):
    # the gold is recomputed from the question by its `check` expression (exact arithmetic)...
    assert exemplar.check, f"{hid}[{j}] has no check expression"
    assert evaluate(exemplar.check) == parse_number(exemplar.answer)
    # ...and the solution's boxed answer agrees with it under the verifier every stage uses
    verdict = verify_math(exemplar.answer, exemplar.solution, fast_path=False)
    assert verdict.status == "correct", f"{hid}[{j}]: boxed answer != {exemplar.answer} ({verdict})"


@pytest.mark.parametrize(("hid", "j"), sorted(BRUTE_V2), ids=[f"{h}[{j}]" for h, j in sorted(BRUTE_V2)])
def test_v2_search_exemplars_match_a_brute_force_recomputation(hid, j):
    assert V2.get(hid).exemplars[j].answer == str(BRUTE_V2[(hid, j)])


def test_every_arithmetic_equation_in_the_v2_solutions_is_correct():
    checked = 0
    for hid, j, exemplar in V2_NEW_EXEMPLARS:
        assert _wrong_equations(exemplar.solution) == [], f"{hid}[{j}]"
        checked += len(EQUATION.findall(exemplar.solution))
    assert checked >= 150


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_catalogue_holds_the_heuristics_its_arms_need(path):
    cfg = load_config(path)
    catalogue = load_catalogue(cfg.heuristics.catalogue)
    assert len(catalogue.heuristics) >= max_heuristics(cfg), (path.name, catalogue.version)


def test_the_recipe_can_run_n_64_with_polya_v2():
    cfg = load_config(REPO_ROOT / "configs/paper_llama3b.yaml")
    catalogue = load_catalogue(cfg.heuristics.catalogue)
    assert catalogue.version == "polya_v2"
    assert [h.id for h in catalogue.select(64)] == V2.ids


def test_generate_records_v2_identity_and_keeps_v1_prompts_for_small_n():
    cfg = load_config(REPO_ROOT / "configs/tiny_cpu.yaml")
    v2_heuristics, v2_ident = selected_heuristics(cfg)
    v1_cfg = load_config(REPO_ROOT / "configs/tiny_cpu.yaml", [f"heuristics.catalogue={DEFAULT_CATALOGUE}"])
    v1_heuristics, v1_ident = selected_heuristics(v1_cfg)
    assert v2_ident == {"catalogue_version": "polya_v2", "catalogue_hash": V2.content_hash}
    assert v1_ident == {"catalogue_version": "polya_v1", "catalogue_hash": POLYA_V1_HASH}
    assert v2_heuristics == v1_heuristics  # tiny_cpu's n heuristics prompt exactly as with v1


def test_taxonomy_has_exactly_64_unique_entries():
    taxonomy = load_taxonomy()
    assert taxonomy.version == "taxonomy_v1"
    assert len(taxonomy.entries) == 64
    assert len(set(taxonomy.ids)) == 64
    assert all(e.name and e.description and "\n" not in e.description for e in taxonomy.entries)
    assert {"bolzano_bracketing", "decompose", "restate", "carry_out"} <= set(taxonomy.ids)


def test_taxonomy_rejects_duplicate_ids(tmp_path):
    raw = yaml.safe_load(resolve_catalogue_path("configs/heuristics/taxonomy_v1.yaml").read_text())
    raw["heuristics"].append(dict(raw["heuristics"][0]))
    path = _write(tmp_path, raw)
    with pytest.raises(CatalogueError, match=rf"{re.escape(str(path))}.*duplicate id.*what_is_the_unknown"):
        load_taxonomy(path)


# --------------------------------------------------------------------------------------------
# Validation of bad catalogues


def _valid_raw() -> dict:
    exemplar = {"question": "What is 2 + 3?", "solution": "Plan: add. 2 + 3 = 5.\n\\boxed{5}", "answer": "5"}
    heuristic = {
        "id": "plan",
        "name": "Plan",
        "marker": "plan",
        "instruction": "Make a plan.",
        "exemplars": [exemplar, dict(exemplar)],
    }
    return {"version": "test_v1", "description": "test", "heuristics": [heuristic]}


def _write(tmp_path: Path, raw: dict, name: str = "cat.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def test_minimal_valid_catalogue_loads(tmp_path):
    catalogue = load_catalogue(_write(tmp_path, _valid_raw()))
    assert catalogue.ids == ["plan"]
    assert catalogue.heuristics[0].exemplars[0].answer == "5"


def _break(mutate):
    raw = _valid_raw()
    mutate(raw)
    return raw


BAD_CATALOGUES = {
    "missing_instruction": (
        _break(lambda r: r["heuristics"][0].pop("instruction")),
        r"heuristics\[0\] \(id='plan'\): missing field 'instruction'",
    ),
    "missing_version": (_break(lambda r: r.pop("version")), r"missing field 'version'"),
    "missing_solution": (
        _break(lambda r: r["heuristics"][0]["exemplars"][1].pop("solution")),
        r"heuristics\[0\] \(id='plan'\)\.exemplars\[1\]: missing field 'solution'",
    ),
    "duplicate_id": (
        _break(lambda r: r["heuristics"].append(copy.deepcopy(r["heuristics"][0]))),
        r"duplicate id.*'plan'",
    ),
    "no_boxed": (
        _break(lambda r: r["heuristics"][0]["exemplars"][0].update(solution="Plan: 2 + 3 = 5.")),
        r"exemplars\[0\]: field 'solution' has no \\boxed",
    ),
    "boxed_differs_from_answer": (
        _break(lambda r: r["heuristics"][0]["exemplars"][0].update(answer="6")),
        r"exemplars\[0\]: field 'solution' boxes '5' but field 'answer' is '6'",
    ),
    "one_exemplar": (
        _break(lambda r: r["heuristics"][0]["exemplars"].pop()),
        r"\(id='plan'\): field 'exemplars' has 1 exemplar",
    ),
    "unknown_field": (
        _break(lambda r: r["heuristics"][0].update(phase="plan")),
        r"heuristics\[0\]: unknown field\(s\) \['phase'\]",
    ),
    "marker_not_in_solution": (
        _break(lambda r: r["heuristics"][0]["exemplars"][1].update(solution="2 + 3 = 5\n\\boxed{5}")),
        r"exemplars\[1\]: field 'solution' does not mention marker 'plan'",
    ),
    "marker_not_in_instruction": (
        _break(lambda r: r["heuristics"][0].update(instruction="Just solve it.")),
        r"field 'instruction' does not mention marker",
    ),
    "bad_id": (_break(lambda r: r["heuristics"][0].update(id="Work Backward")), r"field 'id'.*snake_case"),
    "check_differs": (
        _break(lambda r: r["heuristics"][0]["exemplars"][1].update(check="2 + 4")),
        r"exemplars\[1\]: field 'check' '2 \+ 4' gives 6 but field 'answer' is '5'",
    ),
    "check_not_arithmetic": (
        _break(lambda r: r["heuristics"][0]["exemplars"][0].update(check="__import__('os').getpid()")),
        r"exemplars\[0\]: field 'check' .*not allowed",
    ),
    "check_empty": (
        _break(lambda r: r["heuristics"][0]["exemplars"][0].update(check=" ")),
        r"exemplars\[0\]: field 'check' must be a non-empty string",
    ),
    "check_with_non_numeric_answer": (
        _break(
            lambda r: r["heuristics"][0]["exemplars"][0].update(
                solution="Plan: name it. \\boxed{five}", answer="five", check="5"
            )
        ),
        r"exemplars\[0\]: field 'check' needs a numeric 'answer'",
    ),
    "empty_name": (
        _break(lambda r: r["heuristics"][0].update(name="  ")),
        r"field 'name' must be a non-empty",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CATALOGUES))
def test_bad_catalogue_error_names_file_and_field(tmp_path, case):
    raw, pattern = BAD_CATALOGUES[case]
    path = _write(tmp_path, raw, name=f"{case}.yaml")
    with pytest.raises(CatalogueError) as info:
        load_catalogue(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert re.search(pattern, message), message


def test_check_equal_to_answer_loads_and_stays_out_of_identity(tmp_path):
    raw = _valid_raw()
    plain = load_catalogue(_write(tmp_path, raw, "plain.yaml"))
    raw["heuristics"][0]["exemplars"][0]["check"] = "(4 + 6) / 2"
    raw["heuristics"][0]["exemplars"][1]["check"] = "5.0"
    checked = load_catalogue(_write(tmp_path, raw, "checked.yaml"))
    assert checked.heuristics[0].exemplars[0].check == "(4 + 6) / 2"
    assert checked == plain  # check is metadata: not part of equality...
    assert checked.content_hash == plain.content_hash  # ...nor of the identity runs record


def test_integer_answer_in_yaml_is_accepted_as_string(tmp_path):
    raw = _break(lambda r: r["heuristics"][0]["exemplars"][0].update(answer=5))
    assert load_catalogue(_write(tmp_path, raw)).heuristics[0].exemplars[0].answer == "5"


def test_missing_file_names_the_paths_tried(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_catalogue(tmp_path / "nope.yaml")


def test_default_path_resolves_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not Path(DEFAULT_CATALOGUE).exists()
    assert resolve_catalogue_path(DEFAULT_CATALOGUE).is_file()
    assert load_catalogue().content_hash == CATALOGUE.content_hash


# --------------------------------------------------------------------------------------------
# Hashes and selection


def test_content_hash_changes_with_content_not_with_location(tmp_path):
    raw = _valid_raw()
    base = load_catalogue(_write(tmp_path, raw, "a.yaml")).content_hash
    assert re.fullmatch(r"[0-9a-f]{16}", base)
    assert load_catalogue(_write(tmp_path, raw, "b.yaml")).content_hash == base
    raw["heuristics"][0]["instruction"] = "Make a careful plan."
    assert load_catalogue(_write(tmp_path, raw, "c.yaml")).content_hash != base


def test_select_first_n_and_by_ids():
    assert CATALOGUE.select(2) == list(CATALOGUE.heuristics[:2])
    assert CATALOGUE.select() == list(CATALOGUE.heuristics)
    assert CATALOGUE.select(len(CATALOGUE.heuristics)) == list(CATALOGUE.heuristics)
    picked = CATALOGUE.select(ids=["use_symmetry", "work_backward"])
    assert [h.id for h in picked] == ["use_symmetry", "work_backward"]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"n": 17_000}, "has only"),
        ({"n": 0}, "positive integer"),
        (
            {"ids": ["work_backward", "no_such", "nor_this"]},
            r"unknown heuristic ids \['no_such', 'nor_this'\]",
        ),
        ({"ids": ["decompose", "decompose"]}, "duplicate ids"),
        ({"n": 2, "ids": ["decompose"]}, "not both"),
    ],
)
def test_select_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CATALOGUE.select(**kwargs)


def test_prompt_hash_is_sha256_of_canonical_json():
    messages = [{"role": "user", "content": "Pólya"}]
    expected = hashlib.sha256('[{"content":"Pólya","role":"user"}]'.encode()).hexdigest()[:16]
    assert prompt_hash(messages) == expected
    assert prompt_hash([{"content": "Pólya", "role": "user"}]) == expected


# --------------------------------------------------------------------------------------------
# Rendering


def test_heuristic_messages_structure():
    heuristic = CATALOGUE.get("work_backward")
    messages = render_heuristic_messages("  What is 6 * 7?  ", heuristic)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert heuristic.instruction in messages[0]["content"]
    assert "\\boxed{}" in messages[0]["content"]
    assert messages[1]["content"] == heuristic.exemplars[0].question
    assert messages[2]["content"] == heuristic.exemplars[0].solution
    assert messages[-1] == {"role": "user", "content": "What is 6 * 7?"}


def test_rendering_is_pure_and_deterministic():
    heuristic = CATALOGUE.get("decompose")
    before = copy.deepcopy(heuristic)
    first = render_heuristic_messages("Q?", heuristic)
    first[0]["content"] = "mutated by a caller"
    second = render_heuristic_messages("Q?", heuristic)
    assert second == render_heuristic_messages("Q?", heuristic)
    assert second[0]["content"] != "mutated by a caller"
    assert heuristic == before
    assert prompt_hash(second) == prompt_hash(render_heuristic_messages("Q?", heuristic))


@pytest.mark.parametrize("heuristic", CATALOGUE.heuristics, ids=CATALOGUE.ids)
def test_prefix_is_shared_by_all_questions_of_a_heuristic(heuristic: Heuristic):
    a = render_heuristic_messages("Ann has 3 apples. How many?", heuristic)
    b = render_heuristic_messages("A train goes 60 km/h for 2 hours. How far?", heuristic)
    assert a[:-1] == b[:-1] == render_heuristic_prefix(heuristic)
    assert a[-1] != b[-1]
    assert prompt_hash(a) != prompt_hash(b)


@pytest.mark.parametrize("catalogue", SHIPPED.values(), ids=SHIPPED.keys())
def test_prefixes_differ_between_heuristics(catalogue):
    prefixes = {prompt_hash(render_heuristic_prefix(h)) for h in catalogue.heuristics}
    assert len(prefixes) == len(catalogue.heuristics)


def test_n_exemplars_controls_few_shot_turns():
    heuristic = CATALOGUE.get("decompose")
    assert len(render_heuristic_messages("Q?", heuristic, n_exemplars=0)) == 2
    assert len(render_heuristic_messages("Q?", heuristic, n_exemplars=1)) == 4
    with pytest.raises(ValueError, match="n_exemplars"):
        render_heuristic_messages("Q?", heuristic, n_exemplars=len(heuristic.exemplars) + 1)
    with pytest.raises(ValueError, match="n_exemplars"):
        render_heuristic_messages("Q?", heuristic, n_exemplars=-1)


def test_empty_question_is_rejected():
    with pytest.raises(ValueError, match="empty question"):
        render_plain_messages("   ")


def test_plain_messages_ask_for_steps_and_boxed_answer():
    messages = render_plain_messages("What is 6 * 7?")
    assert messages == [
        {"role": "system", "content": PLAIN_SYSTEM},
        {"role": "user", "content": "What is 6 * 7?"},
    ]
    assert "step by step" in PLAIN_SYSTEM and "\\boxed{}" in PLAIN_SYSTEM


def test_sft_messages_drop_heuristic_scaffolding():
    heuristic = CATALOGUE.get("work_backward")
    question = "Mia has some stickers, gives away 3 and has 5 left. How many did she have?"
    trace = "Working backward: 5 + 3 = 8.\n\\boxed{8}"
    messages = render_sft_messages(question, trace)
    assert messages == [{"role": "user", "content": question}, {"role": "assistant", "content": trace}]
    flat = " ".join(m["content"] for m in messages)
    assert heuristic.instruction not in flat
    assert all(e.question not in flat for e in heuristic.exemplars)
    with_system = render_sft_messages(question, trace, system=PLAIN_SYSTEM)
    assert with_system[0] == {"role": "system", "content": PLAIN_SYSTEM}
    assert with_system[1:] == messages
    with pytest.raises(ValueError, match="empty trace"):
        render_sft_messages(question, " ")
