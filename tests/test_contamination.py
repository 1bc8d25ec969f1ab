"""Training questions in evaluation sets: normalised exact matches excluded, 13-gram overlaps
reported (excluded on request), counts in the evaluate stage's results and manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from manyways.backends.fake import FakeBackend
from manyways.config import load_config
from manyways.data import read_problems
from manyways.data.contamination import build_index, check_benchmark, ngrams, normalise
from manyways.schema import Problem
from manyways.stages import evaluate

LONG = (
    "A bag holds red and blue marbles; if three more red marbles were added the number of red "
    "marbles would be twice the number of blue ones."
)
TRAIN = {
    "t0": ("What is $2 + 3$?", "5"),
    "t1": (LONG + " How many blue marbles are there if there are 7 red?", "5"),
}
EVAL = {
    "e0": ("what is 2+3", "5"),  # the same question, written differently
    "e1": (LONG + " How many marbles in all?", "15"),  # shares a 13-gram with t1
    "e2": ("What is 4 + 4?", "8"),  # clean
    "e3": ("What is 2 - 3?", "-1"),  # differs by one symbol: not the same question
}


def _problems(rows: dict[str, tuple[str, str]]) -> list[Problem]:
    return [Problem(pid, "s", q, a) for pid, (q, a) in rows.items()]


def test_normalise_identifies_the_same_question_only():
    assert normalise("What is $2 + 3$?") == normalise("what is 2+3") == normalise("WHAT  IS 2 +3.")
    assert normalise("\\dfrac{1}{2} \\left( x \\right)") == normalise("\\frac{1}{2}(x)")
    assert normalise("What is 2 + 3?") != normalise("What is 2 - 3?")
    assert ngrams("one two three", 2) == {"one two", "two three"} and ngrams("one two", 13) == set()


def test_exact_matches_are_excluded_and_ngram_overlaps_reported():
    index = build_index({"train": _problems(TRAIN)})
    kept, report = check_benchmark(_problems(EVAL), index)
    assert [p.problem_id for p in kept] == ["e1", "e2", "e3"]
    assert report["exact"] == {"e0": "train:t0"} and report["ngram"] == {"e1": "train:t1"}
    assert (report["exact_overlap"], report["ngram_overlap"], report["excluded"]) == (1, 1, 1)
    kept, report = check_benchmark(_problems(EVAL), index, exclude_ngram=True)
    assert [p.problem_id for p in kept] == ["e2", "e3"] and report["excluded"] == 2


def _jsonl(path: Path, rows: dict[str, tuple[str, str]]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": k, "question": q, "answer": a}) + "\n" for k, (q, a) in rows.items())
    )
    return path


def test_evaluate_checks_every_benchmark_against_train_and_rl(tmp_path: Path):
    train = _jsonl(tmp_path / "train.jsonl", {"t0": TRAIN["t0"]})
    rl = _jsonl(tmp_path / "rl.jsonl", {"t1": TRAIN["t1"]})
    bench = _jsonl(tmp_path / "bench.jsonl", EVAL)
    other = _jsonl(tmp_path / "other.jsonl", {"o0": ("What is 2 + 3?", "5"), "o1": ("What is 9 + 9?", "18")})
    src = "{kind: local, path: %s, fields: {problem_id: id}}"
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            f"data.train={src % train}",
            f"data.rl={src % rl}",
            f"data.eval={{arith: {src % bench}, other: {src % other}}}",
            "evaluate.samples=2",
            "evaluate.bootstrap=0",
            "evaluate.exclude_ngram_overlaps=true",
        ],
    )
    golds = {q: a for q, a in [*EVAL.values(), ("What is 9 + 9?", "18")]}
    out = cfg.run_dir / "evaluate"
    manifest = evaluate.run(
        cfg, out, show_progress=False, backend_factory=lambda c, path: FakeBackend(golds, 1.0, model_id=path)
    )
    assert [p.problem_id for p in read_problems(out / "problems" / "arith.parquet")] == ["e2", "e3"]
    assert [p.problem_id for p in read_problems(out / "problems" / "other.parquet")] == ["o1"]
    assert set(pq.read_table(out / "counts.parquet").column("problem_id").to_pylist()) == {"e2", "e3", "o1"}
    report = json.loads((out / "contamination.json").read_text())["benchmarks"]
    assert report["arith"]["exact"] == {"e0": "train:t0"} and report["arith"]["ngram"] == {"e1": "rl:t1"}
    results = json.loads((out / "results.json").read_text())
    assert (
        results["contamination"]["arith"]["excluded"] == 2
        and results["contamination"]["other"]["excluded"] == 1
    )
    stats = results["results"]["base"]["arith"]
    assert stats["problems"] == 2 and stats["excluded_contaminated"] == 2 and stats["excluded"] == 2
    assert manifest["counts"]["contaminated_excluded"] == 3
    again = evaluate.recompute(out, [1])
    assert again["results"]["base"]["arith"]["excluded_contaminated"] == 2
