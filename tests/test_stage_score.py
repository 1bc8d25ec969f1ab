"""Stage ``score`` and the adherence scorers: judge P(Yes) on the tiny model, a tiny reward model,
the content-hash cache, and the stage on a fake generate + verify run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from manyways.artifacts import read_table
from manyways.config import config_from_dict, load_config
from manyways.heuristics import load_catalogue
from manyways.scorers import (
    JudgeScorer,
    RewardModelScorer,
    ScoreCache,
    ScoreItem,
    judge_messages,
    reward_model_messages,
    score_with_cache,
)

QUESTIONS = [(f"What is {a} + {b}?", str(a + b)) for a, b in [(1, 2), (3, 4), (5, 6), (7, 1), (2, 9), (4, 4)]]


def _items() -> list[ScoreItem]:
    h = load_catalogue().heuristics
    return [
        ScoreItem(h[0], "What is 2 + 3?", "Work backward: 5 - 3 = 2, so \\boxed{5}."),
        ScoreItem(h[1], "What is 2 + 3?", "Step 1: add. \\boxed{5}"),
        ScoreItem(h[0], "What is 7 * 6?", "Decompose 7*6 = 7*5 + 7 = 42. \\boxed{42}"),
    ]


def test_judge_prompt_names_heuristic_and_asks_yes_no():
    item = _items()[0]
    text = judge_messages(item)[-1]["content"]
    assert item.heuristic.name in text and item.heuristic.instruction in text
    assert item.question in text and "\\boxed{5}" in text
    assert text.endswith("Does the solution follow this heuristic? Answer Yes or No.")
    rm = reward_model_messages(item)
    assert [m["role"] for m in rm] == ["user", "assistant"]
    assert rm[0]["content"].startswith(item.heuristic.instruction) and rm[1]["content"] == item.completion


@pytest.fixture(scope="module")
def judge(tiny_model_dir: Path):
    from manyways.backends.config import BackendConfig, make_backend

    backend = make_backend(BackendConfig(kind="hf", dtype="float32"), str(tiny_model_dir))
    yield JudgeScorer(backend, batch_size=2)
    backend.close()


def test_judge_scores_are_probabilities_and_cached(judge: JudgeScorer, tmp_path: Path):
    items = _items()
    cache = ScoreCache(tmp_path / "scores.sqlite")
    first, hits1 = score_with_cache(judge, cache, items)
    assert hits1 == 0
    assert all(0.0 <= s <= 1.0 for s in first)
    assert len(set(first)) > 1  # different conversations, different P(yes)
    # the same probability the back-end gives for the judge conversation, not a parsed answer
    direct = judge.backend.next_token_probs([judge_messages(items[0])], ["Yes", "No"])[0]["Yes"]
    assert first[0] == pytest.approx(direct, abs=1e-6)
    again, hits2 = score_with_cache(judge, cache, items)
    assert hits2 == len(items) and again == first
    # the cache identity known without loading the model is the loaded judge's own
    from manyways.backends.config import BackendConfig
    from manyways.config import ScoreSection
    from manyways.scorers import scorer_identity

    section = ScoreSection(scorer="judge", backend=BackendConfig(kind="hf"))
    assert scorer_identity(section, judge.backend.model_id) == judge.identity
    plain = ScoreItem(None, "What is 2 + 3?", "\\boxed{5}")
    assert judge.score([plain]) == [0.0]


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    from manyways.models import tiny_shape

    config = LlamaConfig(**tiny_shape(tok), num_labels=1)  # the tiny test models' shape, a score head
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_reward_model_logit_matches_direct_forward_and_batching(tiny_reward_model: Path):
    import torch

    items = _items()
    batched = RewardModelScorer(str(tiny_reward_model), batch_size=3, dtype="float32").score(items)
    single = RewardModelScorer(str(tiny_reward_model), batch_size=1, dtype="float32")
    one_by_one = single.score(items)
    # exactly: scores are cached by content and only misses computed, so a score must not depend
    # on which other traces shared its call (off CUDA each is its own forward: batch_invariant_step)
    assert batched == one_by_one
    assert len(set(round(s, 6) for s in batched)) == len(items)
    text = single.tokenizer.apply_chat_template(reward_model_messages(items[0]), tokenize=False)
    ids = single.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logit = float(single.model(input_ids=ids).logits[0, 0])
    assert one_by_one[0] == pytest.approx(logit, abs=1e-5)


def test_reward_model_identity_changes_with_weights(tiny_reward_model: Path):
    scorer = RewardModelScorer(str(tiny_reward_model), dtype="float32")
    assert str(tiny_reward_model.resolve()) in scorer.identity
    assert scorer.identity == RewardModelScorer(str(tiny_reward_model), dtype="float32").identity
    from manyways.config import ScoreSection
    from manyways.scorers import scorer_identity

    section = ScoreSection(scorer="reward_model", model=str(tiny_reward_model))
    assert scorer_identity(section, "unused") == scorer.identity


def _fake_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str):
    """A fake-back-end generate + verify run on six sums (about half the samples correct)."""
    from manyways.backends import config as backend_config
    from manyways.backends.fake import FakeBackend
    from manyways.stages import generate, verify

    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    answers = dict(QUESTIONS)
    monkeypatch.setattr(
        backend_config,
        "make_backend",
        lambda cfg, model: FakeBackend(answers, correct_rate=0.5, model_id=model),
    )
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            "run.name=t",
            "generate.backend.kind=fake",
            f"data.train={{kind: local, path: {data}}}",
            "heuristics.n=2",
            "generate.samples=3",
            "generate.shard_size=4",
            "heuristics.exemplars=1",
            f"score.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
    )
    run_dir = cfg.run_dir
    generate.run(cfg, run_dir / "generate", show_progress=False)
    verify.run(cfg, run_dir / "verify", inputs={"generate": run_dir / "generate"}, show_progress=False)
    return cfg, run_dir


def test_stage_scores_correct_attempts_and_counts_cache_hits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from manyways.stages import score

    cfg, run_dir = _fake_run(tmp_path, monkeypatch, "score.scorer=judge", "score.backend.kind=fake")
    inputs = {"generate": run_dir / "generate", "verify": run_dir / "verify"}
    manifest = score.run(cfg, run_dir / "score", inputs=inputs, show_progress=False)
    verdicts = read_table(run_dir / "verify").to_pylist()
    correct = {
        (v["problem_id"], v["heuristic_id"], v["sample_idx"]) for v in verdicts if v["status"] == "correct"
    }
    rows = read_table(run_dir / "score").to_pylist()
    assert 0 < len(correct) < len(verdicts)
    assert {(r["problem_id"], r["heuristic_id"], r["sample_idx"]) for r in rows} == correct
    assert all(r["scorer"] == "judge" and 0.0 <= r["score"] <= 1.0 for r in rows)
    assert manifest["counts"]["rows"] == len(correct) and manifest["counts"]["cache_hits"] == 0
    # a second run (another directory, same texts) is served from the cache, with identical scores,
    # without loading the judge at all
    from manyways import scorers

    def no_model(*args, **kwargs):
        raise AssertionError("the judge was loaded although every score was cached")

    monkeypatch.setattr(scorers, "make_scorer", no_model)
    again = score.run(cfg, run_dir / "score2", inputs=inputs, show_progress=False)
    assert again["counts"]["cache_hits"] == len(correct) and again["counts"]["computed"] == 0
    assert read_table(run_dir / "score2").to_pylist() == rows
    # relaunch in place: already finished, returns the same manifest
    assert (
        score.run(cfg, run_dir / "score", inputs=inputs, show_progress=False)["fingerprint"]
        == manifest["fingerprint"]
    )


def test_stage_include_incorrect_scores_incorrect_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from manyways.stages import score

    cfg, run_dir = _fake_run(tmp_path, monkeypatch, "score.scorer=none", "score.include_incorrect=true")
    inputs = {"generate": run_dir / "generate", "verify": run_dir / "verify"}
    manifest = score.run(cfg, run_dir / "score", inputs=inputs, show_progress=False)
    statuses = [v["status"] for v in read_table(run_dir / "verify").to_pylist()]
    rows = read_table(run_dir / "score").to_pylist()
    assert len(rows) == statuses.count("correct") + statuses.count("incorrect") == manifest["counts"]["rows"]
    assert {r["score"] for r in rows} == {0.0} and {r["scorer"] for r in rows} == {"none"}
    shard_files = sorted((run_dir / "score" / "shards").glob("part-*.parquet"))
    assert len(shard_files) == len(sorted((run_dir / "generate" / "shards").glob("part-*.parquet")))
    assert pq.read_schema(shard_files[0]).names == [
        "problem_id",
        "heuristic_id",
        "sample_idx",
        "scorer",
        "score",
    ]


def test_cached_scores_are_computed_one_trace_per_forward_except_on_cuda():
    import torch

    from manyways.backends.hf_next_token import batch_invariant_step

    assert batch_invariant_step("cpu", 8) == 1
    assert batch_invariant_step(torch.device("cpu"), 8) == 1
    assert batch_invariant_step("cuda", 8) == 8  # batching is most of a GPU's speed
    assert batch_invariant_step("cuda:1", 3) == 3


@pytest.mark.slow
def test_stage_scores_do_not_depend_on_what_the_cache_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
):
    """The hf judge (bf16) scoring every attempt from a cold cache, and again after a correct-only
    score stage filled another cache: there the correct attempts are hits and the incorrect ones are
    computed without them, in other batches. The tables must be equal, or select's choices would
    depend on the cache's history."""
    from manyways.stages import score

    cfg, run_dir = _fake_run(
        tmp_path,
        monkeypatch,
        "score.scorer=judge",
        "score.backend.kind=hf",
        "score.backend.dtype=bfloat16",
        f"score.model={tiny_model_dir}",
        "score.batch_size=4",
    )
    monkeypatch.undo()  # the judge is the tiny model on the hf back-end
    inputs = {"generate": run_dir / "generate", "verify": run_dir / "verify"}

    def scored(out: str, cache: str, include_incorrect: bool) -> tuple[dict, list]:
        data = cfg.to_dict()
        data["score"].update(cache_dir=str(tmp_path / cache), include_incorrect=include_incorrect)
        c = config_from_dict(data)
        manifest = score.run(c, run_dir / out, inputs=inputs, show_progress=False)
        return manifest["counts"], read_table(run_dir / out).to_pylist()

    cold_counts, cold = scored("score_cold", "cold", True)
    warm_first, _ = scored("score_correct", "warm", False)
    warm_counts, warm = scored("score_warm", "warm", True)
    assert cold_counts["cache_hits"] == 0 and warm_counts["cache_hits"] == warm_first["rows"] > 0
    assert warm_counts["computed"] == cold_counts["rows"] - warm_first["rows"] > 0
    assert warm == cold
