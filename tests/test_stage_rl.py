"""Stage rl (GRPO) on the tiny random model, reward functions, and a slow chain on the default model."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from manyways.artifacts import write_json_atomic
from manyways.config import Config, load_config
from manyways.rewards import CorrectnessReward, FormatReward, completion_text, verdict_reward
from manyways.schema import Problem
from manyways.training import MARKER, TrainingDataError
from manyways.verify import Verdict


def rl_cfg(tmp_path: Path, model: Path | str, n: int = 4, *overrides: str) -> Config:
    path = tmp_path / "rl.jsonl"
    path.write_text(
        "".join(
            json.dumps({"question": f"What is {i} + 2?", "answer": str(i + 2), "id": f"r{i}"}) + "\n"
            for i in range(n)
        )
    )
    return load_config(
        None,
        [
            f"run.root={tmp_path}",
            "run.name=run",
            f"model.name={model}",
            "model.dtype=float32",
            f"data.rl={{kind: local, path: {path}, fields: {{problem_id: id}}}}",
            "rl.max_steps=2",
            "rl.save_steps=1",
            "rl.max_completion_length=12",
            "rl.learning_rate=1e-2",
            "rl.num_generations=4",
            "rl.batch_size=4",
            *overrides,
        ],
    )


def fake_verify_many(pairs: list[tuple[Problem, str]], *, timeout_s: float | None = None) -> list[Verdict]:
    """Deterministic mixed verdicts so that groups have reward variance (a random model is never right)."""
    kinds = [
        Verdict("correct", True, "x"),
        Verdict("incorrect", False, "y"),
        Verdict("no_answer", None),
        Verdict("timeout", None),
    ]
    return [kinds[i % 4] for i in range(len(pairs))]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_rl_trains_and_logs(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import manyways.verify.registry as registry
    from manyways.stages import rl

    monkeypatch.setattr(registry, "verify_many", fake_verify_many)
    cfg = rl_cfg(tmp_path, tiny_model_dir)
    manifest = rl.run(cfg, cfg.run_dir / "rl", show_progress=False)

    counts = manifest["counts"]
    assert counts["global_step"] == 2 and counts["completions"] == 8
    assert counts["verifier_timeouts"] == 2 and counts["unscorable"] == 2 and counts["status_no_answer"] == 2
    assert manifest["vanilla"] is True and manifest["start_model"] == str(tiny_model_dir)
    assert math.isfinite(manifest["final_loss"])
    before, after = weights(tiny_model_dir), weights(cfg.run_dir / "rl" / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    steps = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "rl/reward" in r]
    assert len(steps) == 2
    for r in steps:
        # rewards 1, 0, 0, None per group: mean 1/3 over the scorable ones
        assert r["rl/reward"] == pytest.approx(1 / 3, abs=1e-4)
        assert r["rl/frac_reward_zero_std"] == 0.0 and r["rl/verifier/timeouts"] == 1.0
        assert r["rl/completions/mean_length"] > 0


def test_rl_lora_run_packs_its_groups_and_merges_into_a_plain_model(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import manyways.verify.registry as registry
    from manyways.stages import rl

    monkeypatch.setattr(registry, "verify_many", fake_verify_many)
    lora = ("rl.lora.enabled=true", "rl.lora.r=4", "rl.lora.dropout=0")
    cfg = rl_cfg(tmp_path, tiny_model_dir, 4, *lora)
    manifest = rl.run(cfg, cfg.run_dir / "rl", show_progress=False)
    assert manifest["counts"]["global_step"] == 2
    # PEFT's forward passes extra None inputs: the shared-prefix packing must still apply (each
    # step's 3 rows with an advantage; the unanswered row, advantage 0, runs alone without autograd)
    forwards = manifest["training_forwards"]
    assert forwards["forwards"] == 4 and forwards["shared"] == forwards["unshared_layout"] == 2
    assert forwards["unshared_inputs"] == forwards["unshared_dropout"] == 0
    before, after = weights(tiny_model_dir), weights(cfg.run_dir / "rl" / "model")
    assert before.keys() == after.keys()  # merged: no lora_A / lora_B tensors left
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # with LoRA's dropout on, packing would share the prompt's dropout draw: the plain forward runs
    (tmp_path / "dropout").mkdir()
    cfg = rl_cfg(tmp_path / "dropout", tiny_model_dir, 4, *lora[:2], "rl.lora.dropout=0.1")
    with caplog.at_level(logging.WARNING, logger="manyways.stages.rl"):
        forwards = rl.run(cfg, cfg.run_dir / "rl", show_progress=False)["training_forwards"]
    assert forwards["forwards"] == 4 and forwards["shared"] == 0 and forwards["unshared_dropout"] == 4
    assert "no training forward was packed" in caplog.text and "unshared_dropout" in caplog.text


def test_rl_rerun_resumes_from_the_last_complete_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import manyways.verify.registry as registry
    from manyways.stages import rl

    monkeypatch.setattr(registry, "verify_many", fake_verify_many)
    cfg = rl_cfg(tmp_path, tiny_model_dir, 4, "rl.max_steps=3", "rl.keep_checkpoints_when_done=true")
    out = cfg.run_dir / "rl"
    rl.run(cfg, out, show_progress=False)
    # simulate a crash during the last save: no manifest, no model, last checkpoint unmarked
    (out / "manifest.json").unlink()
    shutil.rmtree(out / "model")
    (out / "checkpoints" / "checkpoint-3" / MARKER).unlink()
    manifest = rl.run(cfg, out, show_progress=False)
    assert manifest["resumed_from"] == "checkpoint-2"
    assert manifest["counts"]["global_step"] == 3
    assert manifest["counts"]["completions"] == 4  # only the one step left was generated again
    assert (out / "model" / "model.safetensors").is_file()


def test_rl_starts_from_the_midtrained_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from manyways.stages import rl

    cfg = rl_cfg(tmp_path, tiny_model_dir)
    mid = tmp_path / "run" / "midtrain"
    shutil.copytree(tiny_model_dir, mid / "model")
    write_json_atomic(mid / "manifest.json", {"fingerprint": "m"})
    assert rl.start_model(cfg, {"midtrain": mid}) == str(mid / "model")
    shutil.rmtree(mid / "model")
    with pytest.raises(TrainingDataError, match="no model/ directory"):
        rl.start_model(cfg, {"midtrain": mid})


def test_rl_rejects_batch_not_a_multiple_of_the_group(tmp_path: Path, tiny_model_dir: Path) -> None:
    from manyways.stages import rl

    cfg = rl_cfg(tmp_path, tiny_model_dir, 4, "rl.batch_size=3")
    with pytest.raises(TrainingDataError, match="multiple of rl.num_generations"):
        rl.run(cfg, cfg.run_dir / "rl", show_progress=False)
    assert not (cfg.run_dir / "rl" / "manifest.json").exists()
    assert not (cfg.run_dir / "rl" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("status", "correct", "reward"),
    [
        ("correct", True, 1.0),
        ("incorrect", False, 0.0),
        ("no_answer", None, 0.0),
        ("passed", True, 1.0),
        ("bad_gold", None, None),
        ("timeout", None, None),
        ("error", None, None),
    ],
)
def test_verdict_reward(status: str, correct: bool | None, reward: float | None) -> None:
    assert verdict_reward(status, correct) == reward


def test_correctness_reward_uses_the_real_verifier() -> None:
    problems = [Problem("a", "t", "What is 2 + 3?", "5"), Problem("b", "t", "Half of 1?", "\\frac{1}{2}")]
    reward = CorrectnessReward(problems, timeout_s=5.0)
    completions: list[Any] = [
        [{"role": "assistant", "content": "2 + 3 = 5, so \\boxed{5}"}],
        [{"role": "assistant", "content": "\\boxed{6}"}],
        [{"role": "assistant", "content": "It is one half: \\boxed{0.5}"}],
        [{"role": "assistant", "content": "I do not know."}],
    ]
    out = reward(prompts=[[]] * 4, completions=completions, problem_id=["a", "a", "b", "b"])
    assert out == [1.0, 0.0, 1.0, 0.0]
    assert reward.totals()["completions"] == 4 and reward.totals()["status_correct"] == 2


def test_format_reward_and_completion_text() -> None:
    fmt = FormatReward()
    assert fmt(
        prompts=[], completions=["so \\boxed{3}", "so 3", [{"role": "assistant", "content": "\\boxed{x}"}]]
    ) == [1.0, 0.0, 1.0]
    assert (
        completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}])
        == "ab"
    )
    assert fmt.__name__ == "format" and CorrectnessReward([]).__name__ == "correct"  # TRL names metrics by it


@pytest.mark.slow
def test_default_model_midtrain_then_two_grpo_steps(tmp_path: Path) -> None:
    """The embedded SmolLM2-135M: a few SFT steps on real-looking traces, then 2 GRPO steps, real verifier."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manyways.heuristics import PLAIN_SYSTEM, render_sft_messages
    from manyways.schema import SFT_SCHEMA
    from manyways.stages import midtrain, rl

    traces = [
        (
            f"Tom has {a} apples and buys {b} more. How many apples does he have?",
            f"Work backward from what is asked: the total. Tom starts with {a} and adds {b}, "
            f"so {a} + {b} = {a + b}. Check: {a + b} - {b} = {a}. \\boxed{{{a + b}}}",
        )
        for a, b in ((3, 4), (5, 2), (7, 6), (10, 9), (12, 3), (8, 8))
    ]
    rows = [
        {
            "messages": render_sft_messages(q, t, system=PLAIN_SYSTEM),
            "problem_id": f"p{i}",
            "heuristic_id": "working_backwards",
            "sample_idx": 0,
            "variant": "best",
            "correct": True,
            "score": 0.9,
        }
        for i, (q, t) in enumerate(traces)
    ]
    cfg = rl_cfg(
        tmp_path,
        "smollm2-135m-instruct",
        4,
        "model.dtype=auto",
        "rl.max_completion_length=32",
        "rl.learning_rate=1e-6",
        "midtrain.max_steps=2",
        "midtrain.batch_size=2",
        "midtrain.learning_rate=1e-5",
    )
    select = cfg.run_dir / "select"
    select.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), select / "train.parquet")
    write_json_atomic(select / "manifest.json", {"fingerprint": "real-looking"})
    mt = midtrain.run(cfg, cfg.run_dir / "midtrain", inputs={"select": select}, show_progress=False)
    assert mt["counts"]["global_step"] == 2 and math.isfinite(mt["final_loss"]) and mt["final_loss"] < 3.0
    manifest = rl.run(
        cfg, cfg.run_dir / "rl", inputs={"midtrain": cfg.run_dir / "midtrain"}, show_progress=False
    )
    assert manifest["counts"]["global_step"] == 2 and manifest["counts"]["completions"] == 8
    assert manifest["vanilla"] is False and math.isfinite(manifest["final_loss"])
    assert 0.0 <= manifest["mean_reward"] <= 1.0
    assert (cfg.run_dir / "rl" / "model" / "model.safetensors").is_file()


def test_an_epoch_run_with_fewer_prompts_than_one_step_is_a_clear_error() -> None:
    from manyways.config import load_config
    from manyways.stages.rl import check_one_step, prompts_per_step
    from manyways.training import TrainingDataError

    cfg = load_config(None, ["rl.batch_size=16", "rl.grad_accum=4", "rl.num_generations=16"])
    assert prompts_per_step(cfg, 2) == 8
    check_one_step(cfg, 8, 2)  # exactly one step
    with pytest.raises(
        TrainingDataError, match=r"7 problems make no optimizer step: one step takes 8 prompts"
    ):
        check_one_step(cfg, 7, 2)
    fixed = load_config(
        None, ["rl.batch_size=16", "rl.grad_accum=4", "rl.num_generations=16", "rl.max_steps=3"]
    )
    check_one_step(fixed, 7, 2)  # a fixed step count cycles the data: fine


def test_too_few_prompts_fail_before_any_model_is_loaded(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import manyways.stages.rl as rl
    from manyways.config import load_config
    from manyways.schema import Problem
    from manyways.training import TrainingDataError

    def no_model(path: str):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(rl, "load_trainable_model", no_model)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as the launcher sets it, before torch.distributed starts
    cfg = load_config(None, ["rl.batch_size=16", "rl.grad_accum=4", "rl.num_generations=16"])
    problems = [Problem(f"p{i}", "gym", "What is 1 + 1?", "2") for i in range(7)]
    with pytest.raises(TrainingDataError, match="7 problems make no optimizer step: one step takes 8"):
        rl.build_trainer(cfg, tmp_path / "rl", str(tiny_model_dir), problems)


def test_no_checkpoint_at_the_last_step_unless_checkpoints_are_kept(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints are deleted once the model is saved, so the last step writes none; with
    keep_checkpoints_when_done it does (and every step's checkpoint is still written before)."""
    import manyways.verify.registry as registry
    from manyways.stages import rl
    from manyways.training import CheckpointMarkerCallback

    monkeypatch.setattr(registry, "verify_many", fake_verify_many)
    saved: list[int] = []
    on_save = CheckpointMarkerCallback.on_save

    def spy(self, args, state, control, **kw):
        saved.append(state.global_step)
        return on_save(self, args, state, control, **kw)

    monkeypatch.setattr(CheckpointMarkerCallback, "on_save", spy)
    cfg = rl_cfg(tmp_path, tiny_model_dir, 4, "rl.max_steps=3")
    manifest = rl.run(cfg, cfg.run_dir / "rl", show_progress=False)
    assert saved == [1, 2] and manifest["counts"]["global_step"] == 3
    assert not (cfg.run_dir / "rl" / "checkpoints").exists()
    assert (cfg.run_dir / "rl" / "model" / "model.safetensors").is_file()
    saved.clear()
    (tmp_path / "kept").mkdir()
    kept = rl_cfg(
        tmp_path / "kept", tiny_model_dir, 4, "rl.max_steps=3", "rl.keep_checkpoints_when_done=true"
    )
    rl.run(kept, kept.run_dir / "rl", show_progress=False)
    assert saved == [1, 2, 3]
