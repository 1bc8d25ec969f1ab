"""Stage midtrain on the tiny random model: trains, masks the prompt, refuses bad data early."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from manyways.artifacts import write_json_atomic
from manyways.config import Config, load_config
from manyways.schema import SFT_SCHEMA
from manyways.training import TrainingDataError


def sft_row(i: int, *, messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    if messages is None:
        messages = [
            {"role": "system", "content": "Solve step by step."},
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"Add {i} to itself: {i} + {i} = {2 * i}. \\boxed{{{2 * i}}}"},
        ]
    return {
        "messages": messages,
        "problem_id": f"p{i}",
        "heuristic_id": "decompose",
        "sample_idx": 0,
        "variant": "best",
        "correct": True,
        "score": 1.0,
    }


def make_select_dir(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """A finished select stage holding ``rows`` as train.parquet."""
    select = run_dir / "select"
    select.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), select / "train.parquet")
    write_json_atomic(select / "manifest.json", {"stage": "select", "fingerprint": f"rows{len(rows)}"})
    return select


def tiny_cfg(tmp_path: Path, model: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            f"run.root={tmp_path}",
            "run.name=run",
            f"model.name={model}",
            "model.dtype=float32",
            "midtrain.learning_rate=1e-3",
            "midtrain.max_steps=3",
            "midtrain.save_steps=2",
            *overrides,
        ],
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_midtrain_trains_and_writes_a_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from manyways.stages import midtrain

    cfg = tiny_cfg(tmp_path, tiny_model_dir)
    select = make_select_dir(cfg.run_dir, [sft_row(i) for i in range(8)])
    manifest = midtrain.run(cfg, cfg.run_dir / "midtrain", inputs={"select": select}, show_progress=False)

    assert manifest["counts"]["examples"] == 8 and manifest["counts"]["global_step"] == 3
    assert manifest["counts"]["tokens"] > 8 * 20
    assert math.isfinite(manifest["final_loss"])
    assert manifest["data"]["fingerprint"] == "rows8"
    before, after = weights(tiny_model_dir), weights(cfg.run_dir / "midtrain" / "model")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (cfg.run_dir / "midtrain" / "model" / "tokenizer_config.json").is_file()
    # checkpoints exist for resume only: gone once the model and manifest are written
    assert not (cfg.run_dir / "midtrain" / "checkpoints").exists()
    logged = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["midtrain/loss"] for r in logged if "midtrain/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    lines = (cfg.run_dir / "midtrain" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    consumed = [json.loads(line)["ids"] for line in lines]
    assert len(consumed) == 3 and all(len(b) == 4 for b in consumed)
    assert {i for b in consumed[:2] for i in b} == {f"p{i}|decompose|0" for i in range(8)}
    # a rerun with the same config is a no-op that returns the manifest
    again = midtrain.run(cfg, cfg.run_dir / "midtrain", inputs={"select": select}, show_progress=False)
    assert again["fingerprint"] == manifest["fingerprint"] and again["wall_s"] == manifest["wall_s"]


def test_loss_mask_covers_only_the_assistant_turn(tmp_path: Path, tiny_model_dir: Path) -> None:
    from manyways.models import load_tokenizer
    from manyways.stages import midtrain

    cfg = tiny_cfg(tmp_path, tiny_model_dir, "midtrain.padding_free=false")  # rows, not one sequence
    examples, _ = midtrain.to_prompt_completion([sft_row(3), sft_row(7)])
    tok = load_tokenizer(str(tiny_model_dir))
    trainer = midtrain.build_trainer(cfg, tmp_path / "mt", examples, tok)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    for i, row in enumerate((sft_row(3), sft_row(7))):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        trained = tok.decode(ids[labels != -100])
        assert trained.strip() == row["messages"][-1]["content"] + "<|im_end|>"
        assert "What is" in tok.decode(ids) and "What is" not in trained
        assert "Solve step by step" not in trained


def test_lora_run_merges_into_a_plain_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from manyways.stages import midtrain

    cfg = tiny_cfg(
        tmp_path,
        tiny_model_dir,
        "midtrain.lora.enabled=true",
        "midtrain.lora.r=4",
        "midtrain.max_steps=2",
        "midtrain.learning_rate=1e-2",
    )
    select = make_select_dir(cfg.run_dir, [sft_row(i) for i in range(4)])
    midtrain.run(cfg, cfg.run_dir / "midtrain", inputs={"select": select}, show_progress=False)
    before, after = weights(tiny_model_dir), weights(cfg.run_dir / "midtrain" / "model")
    assert before.keys() == after.keys()  # merged: no lora_A / lora_B tensors left
    assert any(not torch.equal(before[k], after[k]) for k in before)


BAD_DATA = [
    ("empty", [], "input is empty"),
    ("no assistant turn", [sft_row(1, messages=[{"role": "user", "content": "hi"}])], "no_assistant_turn"),
    (
        "empty assistant",
        [sft_row(1, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}])],
        "empty_assistant",
    ),
]


@pytest.mark.parametrize(("name", "rows", "message"), BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_stops_before_training(
    tmp_path: Path, tiny_model_dir: Path, name: str, rows: list[dict[str, Any]], message: str
) -> None:
    from manyways.stages import midtrain

    cfg = tiny_cfg(tmp_path, tiny_model_dir)
    select = make_select_dir(cfg.run_dir, rows)
    with pytest.raises(TrainingDataError, match=message):
        midtrain.run(cfg, cfg.run_dir / "midtrain", inputs={"select": select}, show_progress=False)
    out = cfg.run_dir / "midtrain"
    assert not (out / "manifest.json").exists() and not (out / "model").exists()
    assert not (out / "checkpoints").exists()


def test_too_long_examples_are_dropped_and_all_too_long_stops(tmp_path: Path, tiny_model_dir: Path) -> None:
    from manyways.stages import midtrain

    long_row = sft_row(
        5,
        messages=[
            {"role": "user", "content": "Count."},
            {"role": "assistant", "content": " ".join(["one"] * 300)},
        ],
    )
    cfg = tiny_cfg(tmp_path, tiny_model_dir, "midtrain.max_length=128", "midtrain.max_steps=1")
    select = make_select_dir(cfg.run_dir, [long_row, sft_row(1), sft_row(2)])
    manifest = midtrain.run(cfg, cfg.run_dir / "midtrain", inputs={"select": select}, show_progress=False)
    assert manifest["counts"]["dropped_too_long"] == 1 and manifest["counts"]["examples"] == 2

    cfg2 = tiny_cfg(tmp_path, tiny_model_dir, "run.name=run2", "midtrain.max_length=128")
    select2 = make_select_dir(cfg2.run_dir, [long_row])
    with pytest.raises(TrainingDataError, match="longer than midtrain.max_length=128"):
        midtrain.run(cfg2, cfg2.run_dir / "midtrain", inputs={"select": select2}, show_progress=False)
    assert not (cfg2.run_dir / "midtrain" / "manifest.json").exists()


def test_tokenizer_without_chat_template_is_refused(tiny_model_dir: Path) -> None:
    from manyways.models import load_tokenizer
    from manyways.stages import midtrain

    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = None
    examples, counts = midtrain.to_prompt_completion([sft_row(1)])
    with pytest.raises(TrainingDataError, match="no chat template"):
        midtrain.check_examples(examples, tok, 1024, counts)


def test_one_length_setting_drops_and_counts(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12 defect 5: midtrain.max_length is the one length setting: it is TRL's max_length and
    the limit that drops (and counts) long rows, not a silent TRL truncation next to another limit."""
    from manyways.stages import midtrain

    long_row = sft_row(
        5, messages=[{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one " * 300}]
    )
    cfg = tiny_cfg(tmp_path, tiny_model_dir, "midtrain.max_length=128", "midtrain.max_steps=1")
    assert cfg.midtrain.length_limit == 128
    padded = tiny_cfg(tmp_path, tiny_model_dir, "midtrain.max_length=128", "midtrain.padding_free=false")
    assert midtrain.sft_args(padded, tmp_path / "args").max_length == 128
    # padding-free never truncates (TRL refuses a max_length with it): the drop below is the limit
    assert midtrain.sft_args(cfg, tmp_path / "args").max_length is None
    select = make_select_dir(cfg.run_dir, [long_row, sft_row(1), {**sft_row(2), "messages": []}])
    with caplog.at_level("WARNING", logger="manyways.stages.midtrain"):
        manifest = midtrain.run(cfg, cfg.run_dir / "midtrain", inputs={"select": select}, show_progress=False)
    counts = manifest["counts"]
    assert counts["dropped_too_long"] == 1 and counts["dropped_no_assistant_turn"] == 1
    assert counts["dropped"] == 2 and counts["rows"] == 3 and counts["examples"] == 1
    assert "2 of 3 rows dropped" in caplog.text and "dropped_too_long=1" in caplog.text


def test_disagreeing_length_settings_are_a_config_error(tmp_path: Path, repo_root: Path) -> None:
    from manyways.config import ConfigError

    for trl_only in (
        ["midtrain.trl={max_length: 2048}"],
        ["midtrain.max_length=1024", "midtrain.trl={max_length: 2048}"],
    ):
        with pytest.raises(ConfigError, match=r"midtrain.trl.max_length duplicates midtrain.max_length"):
            load_config(None, trl_only)
    assert load_config(None, ["midtrain.max_length=512"]).midtrain.length_limit == 512
    assert load_config(None).midtrain.length_limit == 1024
    assert load_config(repo_root / "configs/paper_llama3b.yaml").midtrain.length_limit == 2048


def test_the_fingerprint_holds_the_length_in_force() -> None:
    from manyways.stages import midtrain

    default = midtrain.stage_config(load_config(None))
    assert default["midtrain"]["max_length"] == 1024  # as before max_length became optional
    explicit = midtrain.stage_config(load_config(None, ["midtrain.max_length=2048"]))
    assert explicit["midtrain"]["max_length"] == 2048


@pytest.mark.parametrize("packed_attention", ["auto", "false"])
def test_padding_free_batch_gives_the_padded_batch_loss_and_gradients(
    tmp_path: Path, tiny_model_dir: Path, packed_attention: str
) -> None:
    """Examples of different lengths as one flattened sequence (no padding computed): the same loss
    and the same gradients as the padded batch, with the loss head in use, with the per-sequence
    attention (auto: on CPU) and with sdpa's block mask (false)."""
    from manyways import packed_attention as pa
    from manyways.models import load_tokenizer
    from manyways.stages import midtrain

    rows = [sft_row(3), sft_row(12345), sft_row(7), sft_row(987654321)]
    rows[1]["messages"][-1]["content"] += " Check: the sum of the two equal terms is even." * 3
    examples, _ = midtrain.to_prompt_completion(rows)
    tok = load_tokenizer(str(tiny_model_dir))
    results = {}
    for free in (True, False):
        cfg = tiny_cfg(
            tmp_path,
            tiny_model_dir,
            f"midtrain.padding_free={str(free).lower()}",
            f"midtrain.packed_attention={packed_attention}",
        )
        trainer = midtrain.build_trainer(cfg, tmp_path / f"mt{free}", examples, tok)
        per_sequence = free and packed_attention == "auto"
        assert (trainer.model.config._attn_implementation == pa.NAME) == per_sequence
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        lengths = [len(trainer.train_dataset[i]["input_ids"]) for i in range(4)]
        if free:
            assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
        else:
            assert batch["input_ids"].shape == (4, max(lengths)) and len(set(lengths)) > 1
        model = trainer.model
        model.zero_grad()
        before = pa.stats()["packed"]
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        assert (pa.stats()["packed"] > before) == per_sequence
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[free] = (loss.item(), grads, (batch["labels"] != -100).sum().item())
    (loss_free, grads_free, labelled_free), (loss_pad, grads_pad, labelled_pad) = (
        results[True],
        results[False],
    )
    assert labelled_free == labelled_pad
    assert loss_free == pytest.approx(loss_pad, rel=1e-5)
    assert grads_free.keys() == grads_pad.keys()
    for name, grad in grads_pad.items():
        scale = grad.abs().max().item() + 1e-12
        assert (grads_free[name] - grad).abs().max().item() <= 1e-4 * scale, name


def test_padding_free_refuses_a_tokenized_example_over_the_limit() -> None:
    from datasets import Dataset

    from manyways.stages import midtrain

    midtrain.check_tokenized_lengths(Dataset.from_dict({"input_ids": [[1] * 10, [1] * 15]}), 15)
    # the rows TRL kept (a filtered dataset: its index mapping, not the rows it dropped)
    data = Dataset.from_dict({"input_ids": [[1] * 30, [1] * 10, [1] * 20, [1] * 5]})
    kept = data.filter(lambda row: len(row["input_ids"]) != 30)
    with pytest.raises(
        TrainingDataError,
        match=r"1 tokenized examples exceed midtrain.max_length=15 \(first: example 1, 20 tokens",
    ):
        midtrain.check_tokenized_lengths(kept, 15)


@pytest.mark.parametrize("max_grad_norm", [1e6, 1e-3, float("nan")])
def test_clipping_multiplies_only_when_it_changes_the_gradients(
    tmp_path: Path, tiny_model_dir: Path, max_grad_norm: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's clipping (manyways.training.clip_only_when_needed) returns the same norm and
    leaves bitwise the same gradients as transformers' own, and multiplies only when clipping: a
    norm under the limit leaves the gradients untouched, a NaN limit spreads NaN as torch does."""
    from transformers import Trainer

    from manyways.models import load_tokenizer
    from manyways.stages import midtrain

    examples, _ = midtrain.to_prompt_completion([sft_row(3), sft_row(12345)])
    cfg = tiny_cfg(tmp_path, tiny_model_dir, f"midtrain.trl.max_grad_norm={max_grad_norm}")
    trainer = midtrain.build_trainer(cfg, tmp_path / "mt", examples, load_tokenizer(str(tiny_model_dir)))
    assert "_clip_grad_norm" in vars(trainer)  # installed on CPU
    model = trainer.model
    trainer.compute_loss(
        model, trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    multiplies = []
    inner = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: multiplies.append(1) or inner(*a, **k)
    )
    ours = trainer._clip_grad_norm(model)
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad.copy_(grads[name])
    theirs = Trainer._clip_grad_norm(trainer, model)
    assert torch.equal(ours, theirs) or (ours.isnan() and theirs.isnan())
    for name, p in model.named_parameters():
        assert torch.equal(ours_grads[name], p.grad) or (
            ours_grads[name].isnan().all() and p.grad.isnan().all()
        ), name
    clipping = not (ours.item() <= max_grad_norm - 1e-6)  # NaN: clips
    assert len(multiplies) == int(clipping)
    if not clipping:
        assert all(torch.equal(ours_grads[n], grads[n]) for n in grads)


@pytest.mark.parametrize("max_grad_norm", [1e6, 1e-3])
def test_clipping_in_the_fused_optimizer_steps_as_the_multiply_does(
    tmp_path: Path, tiny_model_dir: Path, max_grad_norm: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the trainer's fused AdamW in place, a clipping step hands the factor to the optimizer
    (no multiply pass): the weights, the optimizer's moments and the gradients left after the step
    are transformers' clip-then-step ones up to one float rounding, and the factor is used once."""
    from transformers import Trainer

    from manyways.models import load_tokenizer
    from manyways.stages import midtrain

    examples, _ = midtrain.to_prompt_completion([sft_row(3), sft_row(12345)])
    cfg = tiny_cfg(tmp_path, tiny_model_dir, f"midtrain.trl.max_grad_norm={max_grad_norm}")
    trainer = midtrain.build_trainer(cfg, tmp_path / "mt", examples, load_tokenizer(str(tiny_model_dir)))
    model = trainer.model
    trainer.compute_loss(
        model, trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ).backward()
    start = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    multiplies = []
    inner = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: multiplies.append(1) or inner(*a, **k)
    )

    def step(clip: Any) -> tuple[Any, dict[str, tuple[torch.Tensor, ...]]]:
        for name, p in model.named_parameters():
            p.data.copy_(start[name][0])
            p.grad = start[name][1].clone()
        trainer.optimizer = None
        optimizer = trainer.create_optimizer()
        assert all(g["fused"] for g in optimizer.param_groups)
        norm = clip(model)
        optimizer.step()
        assert getattr(optimizer, "grad_scale", None) is None  # consumed by this step only
        state = optimizer.state
        return norm, {
            n: (
                p.detach().clone(),
                p.grad.clone(),
                state[p]["exp_avg"].clone(),
                state[p]["exp_avg_sq"].clone(),
            )
            for n, p in model.named_parameters()
        }

    ours_norm, ours = step(trainer._clip_grad_norm)
    assert multiplies == []  # clipping or not, no multiply pass
    theirs_norm, theirs = step(lambda m: Trainer._clip_grad_norm(trainer, m))
    assert torch.equal(ours_norm, theirs_norm)
    clipping = ours_norm.item() > max_grad_norm
    assert clipping == (max_grad_norm < 1)
    for name in ours:
        for what, a, b in zip(
            ("weight", "grad", "exp_avg", "exp_avg_sq"), ours[name], theirs[name], strict=True
        ):
            if clipping:
                # a few float32 roundings, relative to the element or to the tensor's largest
                eps = torch.finfo(torch.float32).eps
                scale = b.abs().max().item()
                torch.testing.assert_close(a, b, rtol=8 * eps, atol=eps * scale, msg=f"{name} {what}")
            else:
                assert torch.equal(a, b), f"{name} {what}"
    if clipping:  # the gradients were clipped: not the ones the backward left
        assert any(not torch.equal(ours[n][1], start[n][1]) for n in ours)


def test_clip_factor_in_the_optimizer_is_ours_once_and_leaves_a_grad_scaler_alone(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A clip not followed by a step is replaced by the next clip's factor (never applied twice);
    a grad_scale someone else set (torch's GradScaler) makes the clip multiply instead, and the
    step leaves that attribute for its owner to remove."""
    from manyways.models import load_tokenizer
    from manyways.stages import midtrain

    examples, _ = midtrain.to_prompt_completion([sft_row(3), sft_row(12345)])
    cfg = tiny_cfg(tmp_path, tiny_model_dir, "midtrain.trl.max_grad_norm=0.001")
    trainer = midtrain.build_trainer(cfg, tmp_path / "mt", examples, load_tokenizer(str(tiny_model_dir)))
    model = trainer.model
    trainer.compute_loss(
        model, trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer = trainer.create_optimizer()
    norm = trainer._clip_grad_norm(model)
    factor = 0.001 / (norm + 1e-6)
    first = optimizer.grad_scale
    trainer._clip_grad_norm(model)  # again, without a step in between: replaced, not stacked
    assert optimizer.grad_scale is not first and torch.equal(optimizer.grad_scale, first)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())  # not multiplied
    optimizer.step()
    assert getattr(optimizer, "grad_scale", None) is None
    for name, p in model.named_parameters():  # clipped by the step, once
        torch.testing.assert_close(p.grad, grads[name] * factor, rtol=1e-6, atol=1e-12)
    theirs = torch.tensor(1.0)
    optimizer.grad_scale = theirs  # a GradScaler's
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    trainer._clip_grad_norm(model)
    assert optimizer.grad_scale is theirs
    assert any(not torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())  # multiplied
    optimizer.step()
    assert optimizer.grad_scale is theirs  # its owner deletes it
