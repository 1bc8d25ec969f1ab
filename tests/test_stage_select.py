"""Stage ``select``: the best correct trace per (problem, heuristic) as TRL conversations, the
incorrect and STaR variants, heuristic subsets, fixed budgets and the empty-selection error."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from manyways.artifacts import read_table
from manyways.backends.fake import FakeBackend
from manyways.backends.protocol import GenSample
from manyways.config import load_config
from manyways.heuristics import PLAIN_SYSTEM
from manyways.stages import generate, score, select, verify

QUESTIONS = [
    (f"What is {a} + {b}?", str(a + b))
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 1), (2, 9), (4, 4), (8, 3), (6, 6), (9, 9), (2, 2)]
]
KEY = ("problem_id", "heuristic_id", "sample_idx")


def _base(tmp: Path, name: str, *overrides: str) -> list[str]:
    data = tmp / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    return [
        f"run.root={tmp}",
        f"run.name={name}",
        "generate.backend.kind=fake",
        "heuristics.exemplars=1",
        f"data.train={{kind: local, path: {data}}}",
        "heuristics.n=3",
        "generate.samples=4",
        "generate.shard_size=4",
        "score.scorer=judge",
        "score.backend.kind=fake",
        "score.include_incorrect=true",
        f"score.cache_dir={tmp / 'cache'}",
        *overrides,
    ]


class EditedBackend(FakeBackend):
    """The fake back-end with each sample passed through ``edit(sample, seed) -> sample``."""

    edit = staticmethod(lambda sample, seed: sample)

    def _sample(self, request, seed):
        return self.edit(super()._sample(request, seed), seed)


def _upstream(
    tmp: Path, name: str, correct_rate: float, *overrides: str, backend: type = FakeBackend
) -> list[str]:
    """Run generate (fake back-end that knows the golds) -> verify -> score; the config overrides."""
    from manyways.backends import config as backend_config

    ovs = _base(tmp, name, *overrides)
    cfg = load_config(None, ovs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            backend_config,
            "make_backend",
            lambda c, model: backend(dict(QUESTIONS), correct_rate=correct_rate, model_id=model),
        )
        generate.run(cfg, cfg.run_dir / "generate", show_progress=False)
        verify.run(cfg, cfg.run_dir / "verify", inputs=_inputs(cfg, "generate"), show_progress=False)
        score.run(cfg, cfg.run_dir / "score", inputs=_inputs(cfg, "generate", "verify"), show_progress=False)
    return ovs


def _inputs(cfg, *names: str) -> dict[str, Path]:
    return {n: cfg.run_dir / n for n in names or ("generate", "verify", "score")}


@pytest.fixture(scope="module")
def heuristic_run(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _upstream(tmp_path_factory.mktemp("sel"), "h", 0.4)


def _select(ovs: list[str], out: str, *extra: str) -> tuple[dict, list[dict]]:
    cfg = load_config(None, [*ovs, *extra])
    manifest = select.run(cfg, cfg.run_dir / out, inputs=_inputs(cfg), show_progress=False)
    return manifest, pq.read_table(cfg.run_dir / out / "train.parquet").to_pylist()


def _joined(ovs: list[str]) -> list[dict]:
    cfg = load_config(None, ovs)
    status = {tuple(v[k] for k in KEY): v["status"] for v in read_table(cfg.run_dir / "verify").to_pylist()}
    scores = {tuple(s[k] for k in KEY): s["score"] for s in read_table(cfg.run_dir / "score").to_pylist()}
    return [
        {**a, "status": status[tuple(a[k] for k in KEY)], "score": scores.get(tuple(a[k] for k in KEY))}
        for a in read_table(cfg.run_dir / "generate").to_pylist()
    ]


def _best(cands: list[dict]) -> dict:
    return min(cands, key=lambda c: (-c["score"], c["sample_idx"]))


def test_best_keeps_top_scored_correct_trace_per_pair(heuristic_run: list[str]):
    manifest, rows = _select(heuristic_run, "select")
    attempts = _joined(heuristic_run)
    pairs: dict[tuple, list[dict]] = {}
    for a in attempts:
        if a["status"] == "correct":
            pairs.setdefault((a["problem_id"], a["heuristic_id"]), []).append(a)
    assert 0 < len(pairs) < 10 * 3
    assert {(r["problem_id"], r["heuristic_id"]): r["sample_idx"] for r in rows} == {
        k: _best(c)["sample_idx"] for k, c in pairs.items()
    }
    questions = {f"sums-{i}": q for i, (q, _) in enumerate(QUESTIONS)}
    by_key = {tuple(a[k] for k in KEY): a for a in attempts}
    for r in rows:
        src = by_key[tuple(r[k] for k in KEY)]
        assert r["messages"] == [
            {"role": "system", "content": PLAIN_SYSTEM},
            {"role": "user", "content": questions[r["problem_id"]]},
            {"role": "assistant", "content": src["completion"].strip()},
        ]
        assert r["variant"] == "best" and r["correct"] is True and r["score"] == src["score"]
    c = manifest["counts"]
    assert c["selected_rows"] == len(rows) == c["pairs_with_correct"] and c["pairs_total"] == 30
    assert c["problems_covered"] == len({r["problem_id"] for r in rows})
    assert manifest["per_heuristic"] == dict(Counter(r["heuristic_id"] for r in rows)) | {
        h: 0 for h in manifest["heuristic_ids"] if h not in {r["heuristic_id"] for r in rows}
    }
    out = load_config(None, heuristic_run).run_dir / "select"
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert lines == rows


def test_subset_uses_first_generated_heuristics(heuristic_run: list[str]):
    full_manifest, full = _select(heuristic_run, "select_full")
    manifest, rows = _select(heuristic_run, "select_sub", "select.heuristics=2")
    first_two = full_manifest["heuristic_ids"][:2]
    assert manifest["heuristic_ids"] == first_two
    assert rows == [r for r in full if r["heuristic_id"] in first_two]
    with pytest.raises(select.SelectionError, match="only 3"):
        _select(heuristic_run, "select_bad", "select.heuristics=4")


def test_budget_is_exact_seeded_and_uses_the_first_heuristics(heuristic_run: list[str]):
    budget = ("select.budget_heuristics=2", "select.budget_problems=3")
    manifest, a = _select(heuristic_run, "b1", *budget, "select.seed=5")
    _, b = _select(heuristic_run, "b2", *budget, "select.seed=5")
    assert a == b and len(a) == 2 * 3
    full_manifest, full = _select(heuristic_run, "b_full")
    first_two = full_manifest["heuristic_ids"][:2]
    assert manifest["heuristic_ids"] == first_two and {r["heuristic_id"] for r in a} == set(first_two)
    per_problem = Counter(r["problem_id"] for r in a)
    assert len(per_problem) == 3 and set(per_problem.values()) == {2}  # every problem: both heuristics
    assert all(r in full for r in a)  # a subset of the best selection, same trace per pair
    draws = {
        tuple(
            sorted(
                {r["problem_id"] for r in _select(heuristic_run, f"b_s{s}", *budget, f"select.seed={s}")[1]}
            )
        )
        for s in range(6)
    }
    assert len(draws) > 1  # the seed matters
    with pytest.raises(select.SelectionError, match=r"3 x 10 = 30 traces cannot be met.* only \d+ of 10"):
        _select(heuristic_run, "b_big", "select.budget_heuristics=3", "select.budget_problems=10")


def test_one_heuristic_budget_takes_one_trace_per_problem(heuristic_run: list[str]):
    manifest, rows = _select(heuristic_run, "b1x", "select.budget_heuristics=1", "select.budget_problems=9")
    assert len(rows) == 9 == len({r["problem_id"] for r in rows})
    _, full = _select(heuristic_run, "b1x_full")
    ids = _select(heuristic_run, "b1x_ids")[0]["heuristic_ids"]
    for r in rows:  # the first heuristic in catalogue order that has a selected trace
        have = [
            h for h in ids if any(f["problem_id"] == r["problem_id"] and f["heuristic_id"] == h for f in full)
        ]
        assert r["heuristic_id"] == have[0] and r in full
    fallback = sum(1 for r in rows if r["heuristic_id"] != ids[0])
    assert manifest["counts"]["budget_fallback_rows"] == fallback


def _pairs(n_problems: int, heuristics: list[str], rate: float, seed: int = 0) -> dict:
    """Synthetic selected traces: each (problem, heuristic) pair has one with probability rate."""
    import random

    rng = random.Random(seed)
    return {
        (f"q{p}", h): {"problem_id": f"q{p}", "heuristic_id": h, "sample_idx": 0}
        for p in range(n_problems)
        for h in heuristics
        if rng.random() < rate
    }


def test_budgets_are_exact_at_the_recipe_sizes():
    """7,473 questions x 16 heuristics: 16 x 463 and 1 x 7,408 both give exactly 7,408 traces."""
    heuristics = [f"h{i}" for i in range(16)]
    order = [f"q{p}" for p in range(7473)]
    best = _pairs(7473, heuristics, 0.9)
    rows, counts = select.choose_budget(best, order, heuristics, 16, 463, seed=0)
    assert len(rows) == 7408 == 16 * 463
    per_problem = Counter(r["problem_id"] for r in rows)
    assert len(per_problem) == 463 and set(per_problem.values()) == {16}
    assert counts["budget_eligible_problems"] == sum(all((p, h) in best for h in heuristics) for p in order)
    rows, counts = select.choose_budget(best, order, heuristics, 1, 7408, seed=0)
    assert len(rows) == 7408 == len({r["problem_id"] for r in rows})
    assert 0 < counts["budget_fallback_rows"] < 7408 * 0.2  # mostly the first heuristic
    assert sum(r["heuristic_id"] == "h0" for r in rows) == 7408 - counts["budget_fallback_rows"]


def test_budget_the_data_cannot_supply_is_an_error_with_the_numbers():
    heuristics = [f"h{i}" for i in range(16)]
    order = [f"q{p}" for p in range(7473)]
    best = _pairs(7473, heuristics, 0.6)  # 0.6 ** 16: about 21 problems have all 16
    eligible = sum(all((p, h) in best for h in heuristics) for p in order)
    with pytest.raises(select.SelectionError, match=f"16 x 463 = 7408 .* only {eligible} of 7473"):
        select.choose_budget(best, order, heuristics, 16, 463, seed=0)
    sparse = {k: v for k, v in best.items() if int(k[0][1:]) >= 100}  # 100 problems with nothing
    with pytest.raises(select.SelectionError, match="1 x 7408 = 7408 .* only 7373 of 7473"):
        select.choose_budget(sparse, order, heuristics, 1, 7408, seed=0)


def test_incorrect_variant_keeps_wrong_answers_only(heuristic_run: list[str]):
    manifest, rows = _select(heuristic_run, "sel_inc", "select.variant=incorrect")
    attempts = {tuple(a[k] for k in KEY): a for a in _joined(heuristic_run)}
    assert rows and all(r["correct"] is False and r["variant"] == "incorrect" for r in rows)
    assert all(attempts[tuple(r[k] for k in KEY)]["status"] == "incorrect" for r in rows)
    assert len({(r["problem_id"], r["heuristic_id"]) for r in rows}) == len(rows)
    assert manifest["counts"]["unscored_candidates"] == 0


def test_tie_break_without_scores_keeps_the_first_sample_not_the_shortest(tmp_path: Path):
    ovs = _upstream(tmp_path, "none", 0.6, "score.scorer=none")
    _, rows = _select(ovs, "select")
    pairs: dict[tuple, list[dict]] = {}
    for a in _joined(ovs):
        if a["status"] == "correct":
            pairs.setdefault((a["problem_id"], a["heuristic_id"]), []).append(a)
    expected = {k: min(a["sample_idx"] for a in c) for k, c in pairs.items()}
    shortest = {
        k: min(c, key=lambda a: (a["completion_tokens"], a["sample_idx"]))["sample_idx"]
        for k, c in pairs.items()
    }
    assert expected != shortest  # the data can tell the two rules apart
    assert {(r["problem_id"], r["heuristic_id"]): r["sample_idx"] for r in rows} == expected
    assert {r["score"] for r in rows} == {0.0}


class CutBackend(EditedBackend):
    """A third of the traces is cut by the token limit after an early (correct or not) answer."""

    edit = staticmethod(
        lambda s, seed: (
            GenSample(s.text + " Then", "length", s.prompt_tokens, s.completion_tokens)
            if seed % 3 == 0
            else s
        )
    )


def test_only_traces_that_stopped_on_their_own_are_selected(tmp_path: Path):
    ovs = _upstream(tmp_path, "cut", 0.6, backend=CutBackend)
    manifest, rows = _select(ovs, "select")
    attempts = {tuple(a[k] for k in KEY): a for a in _joined(ovs)}
    cut_correct = [
        a for a in attempts.values() if a["finish_reason"] == "length" and a["status"] == "correct"
    ]
    assert cut_correct  # verified correct although cut: selectable before the fix
    assert rows and all(attempts[tuple(r[k] for k in KEY)]["finish_reason"] == "stop" for r in rows)
    assert manifest["counts"]["unfinished"] == manifest["counts"]["unfinished_length"] == len(cut_correct)


def _think(s: GenSample, seed: int) -> GenSample:
    """A reasoning teacher: deliberation in a think block, then (or not) a written solution."""
    text = [
        "<think>\nMaybe \\boxed{0}?\n</think>\n\n" + s.text,  # the solution after the block
        "<think>\n" + s.text + "\n</think>\n\nI am done.",  # the answer only inside the block
        "<think>\n" + s.text + "\n</think>\n",  # nothing after the block
        "<think>\n" + s.text,  # the block never closes
    ][seed % 4]
    return GenSample(text, "stop", s.prompt_tokens, s.completion_tokens)


class ThinkBackend(EditedBackend):
    edit = staticmethod(_think)


def test_think_blocks_are_stripped_and_the_solution_verified_again(tmp_path: Path):
    ovs = _upstream(tmp_path, "think", 0.7, backend=ThinkBackend)
    manifest, rows = _select(ovs, "select")
    attempts = {tuple(a[k] for k in KEY): a for a in _joined(ovs)}
    assert rows and all("think>" not in r["messages"][-1]["content"] for r in rows)
    stripped = [r for r in rows if "<think>" in attempts[tuple(r[k] for k in KEY)]["completion"]]
    assert stripped  # a think-block trace was selected, and only its solution is the target
    for r in stripped:
        assert (
            r["messages"][-1]["content"]
            == attempts[tuple(r[k] for k in KEY)]["completion"].split("</think>")[1].strip()
        )
    c = manifest["counts"]
    assert c["think_empty"] > 0 and c["think_verdict_changed"] > 0 and c["think_unclosed"] > 0
    _, kept = _select(ovs, "select_keep", "select.think=keep")
    assert any("</think>" in r["messages"][-1]["content"] for r in kept)


def test_training_text_rules():
    assert select.training_text("a <think>x</think> b", "strip") == ("b", None)
    assert select.training_text("x</think>\nb", "strip") == ("b", None)  # template opened the block
    assert select.training_text("<think> x", "strip") == (None, "think_unclosed")
    assert select.training_text("<think>x</think>  ", "strip") == (None, "think_empty")
    assert select.training_text("<think>x</think>b", "keep") == ("<think>x</think>b", None)
    assert select.training_text("plain \\boxed{1}", "strip") == ("plain \\boxed{1}", None)


def test_star_needs_plain_mode_and_keeps_one_per_problem(tmp_path: Path, heuristic_run: list[str]):
    with pytest.raises(select.SelectionError, match="plain"):
        _select(heuristic_run, "sel_star", "select.variant=star")
    ovs = _upstream(tmp_path, "plain", 0.5, "generate.mode=plain")
    manifest, rows = _select(ovs, "select", "select.variant=star")
    assert rows and all(r["heuristic_id"] is None and r["variant"] == "star" for r in rows)
    assert len({r["problem_id"] for r in rows}) == len(rows) == manifest["counts"]["problems_covered"]


def test_empty_selection_is_an_error(tmp_path: Path):
    ovs = _upstream(tmp_path, "zero", 0.0)
    with pytest.raises(select.SelectionError, match="nothing to train on"):
        _select(ovs, "select")
    assert not (load_config(None, ovs).run_dir / "select" / "train.parquet").exists()


def test_budget_needs_both_sizes():
    from manyways.config import ConfigError

    with pytest.raises(ConfigError, match="go together"):
        load_config(None, ["select.budget_heuristics=2"])
