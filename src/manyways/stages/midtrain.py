"""Stage ``midtrain``: supervised fine-tuning ("mid-training") on the selected heuristic traces.

TRL's ``SFTTrainer``, configured and not subclassed, trains ``cfg.model.name`` on the conversations
of ``<run>/select/train.parquet`` (``schema.SFT_SCHEMA``: ``messages`` + provenance). Each
conversation becomes a conversational prompt-completion pair (all messages but the last as the
prompt, the final assistant turn as the completion), so with ``completion_only_loss`` the loss
covers the assistant's trace only, whatever the chat template (SmolLM2's has no generation markers
for ``assistant_only_loss``). Full fine-tuning or LoRA (``midtrain.lora``, merged on save unless
``lora.merge`` is false). Trainable weights are fp32 whatever the saved dtype
(:func:`manyways.training.load_trainable_model`); bf16 only as autocast, where the hardware
supports it.

Bad input stops before training with a clear message: no rows, conversations that do not end in a
non-empty assistant turn, a tokenizer without a chat template, all examples longer than
``midtrain.max_length`` (some too long: dropped and counted). That length is the only one: TRL's
``max_length`` is the same value (``MidtrainSection.length_limit``), so TRL never truncates what we
kept, and every dropped row is counted in the manifest (``dropped_*``, ``dropped``) and logged.

A rerun resumes from the newest *complete* checkpoint (see :mod:`manyways.training`).

Inputs: ``select`` (``train.parquet``). Outputs under ``<run>/midtrain/``: ``model/`` (an ordinary
HF model directory, written under a temporary name then renamed), ``checkpoints/``,
``samples.jsonl`` (which examples each optimizer step consumed), ``manifest.json`` (written last:
the data fingerprint, rows, tokens, final loss).

CPU command: ``manyways midtrain configs/tiny_cpu.yaml``
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from manyways.artifacts import StageDir, append_metrics, read_manifest
from manyways.config import Config
from manyways.packed_attention import use_packed_attention
from manyways.ranks import open_stage
from manyways.training import (
    CheckpointMarkerCallback,
    MasterWeightsCallback,
    MetricsCallback,
    SampleLog,
    TrainingDataError,
    clip_only_when_needed,
    device_args,
    drop_checkpoints,
    example_key,
    final_loss,
    keep_cpu_allocations,
    load_trainable_model,
    lora_config,
    master_weights_summary,
    quiet_trainer,
    remove_stale_model_dirs,
    resume_checkpoint,
    save_trained_model,
    trainer_kwargs,
    use_bf16,
)

log = logging.getLogger(__name__)

STAGE = "midtrain"
TRAIN_FILE = "train.parquet"


def stage_config(cfg: Config) -> dict[str, Any]:
    """The part of the config this stage's output depends on."""
    data = cfg.to_dict()
    data["midtrain"]["max_length"] = cfg.midtrain.length_limit  # the length in force, however set
    return {"model": data["model"], "midtrain": data["midtrain"], "seed": cfg.run.seed}


def read_train_rows(select_dir: Path) -> list[dict[str, Any]]:
    """The mid-training conversations written by the select stage."""
    path = Path(select_dir) / TRAIN_FILE
    if not path.is_file():
        raise TrainingDataError(f"{select_dir} has no {TRAIN_FILE}: run `manyways select` first")
    return pq.read_table(path).to_pylist()


def sample_id(row: dict[str, Any], index: int) -> str:
    """A readable id of one training example: problem|heuristic|sample, else its row index."""
    if row.get("problem_id") is None:
        return f"row{index}"
    return f"{row['problem_id']}|{row.get('heuristic_id') or '-'}|{row.get('sample_idx')}"


def to_prompt_completion(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Conversations -> conversational prompt/completion examples; bad rows counted and dropped."""
    examples, counts = [], Counter[str]()
    for i, row in enumerate(rows):
        messages = [{"role": m["role"], "content": m["content"]} for m in (row.get("messages") or [])]
        if not messages or messages[-1]["role"] != "assistant":
            counts["dropped_no_assistant_turn"] += 1
            continue
        if not (messages[-1]["content"] or "").strip():
            counts["dropped_empty_assistant_turn"] += 1
            continue
        if len(messages) < 2:
            counts["dropped_no_prompt"] += 1
            continue
        examples.append(
            {"prompt": messages[:-1], "completion": messages[-1:], "sample_id": sample_id(row, i)}
        )
    return examples, counts


def _token_count(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


def check_examples(
    examples: list[dict[str, Any]], tokenizer: Any, max_length: int, counts: Counter[str]
) -> tuple[list[dict[str, Any]], int]:
    """Drop (and count) examples longer than ``max_length``; stop when nothing trainable is left."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TrainingDataError(
            "the tokenizer has no chat template; mid-training needs one to render conversations"
        )
    if not examples:
        raise TrainingDataError(
            f"no trainable conversations (dropped: {dict(counts) or 'the input is empty'})"
        )
    kept, tokens = [], 0
    for ex in examples:
        n = _token_count(tokenizer, ex["prompt"] + ex["completion"])
        if n > max_length:
            counts["dropped_too_long"] += 1
            continue
        kept.append(ex)
        tokens += n
    if not kept:
        raise TrainingDataError(
            f"all {len(examples)} examples are longer than midtrain.max_length={max_length} tokens"
        )
    return kept, tokens


def check_tokenized_lengths(dataset: Any, limit: int) -> None:
    """Padding-free training does not truncate: every example as TRL tokenized it must fit the
    limit (:func:`check_examples` counts tokens with the chat template; this is the trainer's own
    count, so a difference between the two cannot silently train on a longer example). Lengths
    are read in Arrow (the recipe's 448K tokenized examples never become Python lists)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_numpy()
    over = (lengths > limit).nonzero()[0]
    if len(over):
        raise TrainingDataError(
            f"midtrain: {len(over)} tokenized examples exceed midtrain.max_length={limit} "
            f"(first: example {over[0]}, {lengths[over[0]]} tokens); lower the data's length or set "
            "midtrain.padding_free: false (then TRL truncates them)"
        )


def sft_args(cfg: Config, out_dir: Path, show_progress: bool = False) -> Any:
    """``trl.SFTConfig``: our defaults, then ``cfg.midtrain.trl`` on top (renamed arguments spelled for
    the installed transformers: :func:`manyways.training.trainer_kwargs`)."""
    from trl import SFTConfig

    m = cfg.midtrain
    defaults: dict[str, Any] = {
        "output_dir": str(out_dir / "checkpoints"),
        "num_train_epochs": m.epochs,
        "max_steps": m.max_steps,
        "learning_rate": m.learning_rate,
        "per_device_train_batch_size": m.batch_size,
        "gradient_accumulation_steps": m.grad_accum,
        # padding-free does not truncate (TRL refuses max_length with it): check_examples has
        # dropped the examples over the limit, and build_trainer checks the tokenized ones
        "max_length": None if m.padding_free else m.length_limit,
        "padding_free": m.padding_free,
        "completion_only_loss": True,
        "save_strategy": "steps",
        "save_steps": m.save_steps,
        "logging_steps": 1,
        "report_to": "none",
        "seed": cfg.run.seed,
        "data_seed": cfg.run.seed,
        "activation_checkpointing": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": not show_progress,
        **device_args(use_bf16(cfg.model.dtype, cfg.model.name)),
    }
    return SFTConfig(**trainer_kwargs(SFTConfig, defaults, dict(m.trl)))


def use_packed_attention_here(cfg: Config) -> bool:
    """Whether the trained model runs :mod:`manyways.packed_attention` (``midtrain.packed_attention``)."""
    import torch

    mode = cfg.midtrain.packed_attention
    if not cfg.midtrain.padding_free or mode is False:
        return False
    return mode is True or not torch.cuda.is_available()


def build_trainer(
    cfg: Config, out_dir: Path, examples: list[dict[str, Any]], tokenizer: Any, show_progress: bool = False
) -> Any:
    """An ``SFTTrainer`` with our callbacks (checkpoint markers, metrics, sample log)."""
    from datasets import Dataset
    from trl import SFTTrainer

    from manyways.models import resolve_model_path

    keep_cpu_allocations()  # large per-step tensors reuse heap memory (manyways.training)
    model = load_trainable_model(resolve_model_path(cfg.model.name))
    if use_packed_attention_here(cfg):
        use_packed_attention(model)
    dataset = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    trainer = SFTTrainer(
        model=model,
        args=sft_args(cfg, out_dir, show_progress),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.midtrain.lora),
        callbacks=[
            CheckpointMarkerCallback(
                cfg.midtrain.keep_checkpoints, final=cfg.midtrain.keep_checkpoints_when_done
            ),
            MetricsCallback(out_dir.parent, STAGE),
            MasterWeightsCallback(),
        ],
    )
    quiet_trainer(trainer)
    clip_only_when_needed(trainer)  # no multiply by 1 on CPU (manyways.training)
    if cfg.midtrain.padding_free:
        check_tokenized_lengths(trainer.train_dataset, cfg.midtrain.length_limit)
    from manyways.loss_head import use_loss_head  # issue 16: labelled positions only, bf16 head

    use_loss_head(trainer, cfg.midtrain.loss_head)
    if cfg.midtrain.log_samples and len(trainer.train_dataset) == len(examples):
        keys = {
            example_key(row["input_ids"]): e["sample_id"]
            for row, e in zip(trainer.train_dataset, examples, strict=True)
        }
        sample_log = SampleLog(keys, out_dir / "samples.jsonl")
        trainer.data_collator = sample_log.wrap(trainer.data_collator)
        trainer.add_callback(sample_log)
    return trainer


def run(
    cfg: Config,
    out_dir: Path,
    *,
    inputs: dict[str, Path] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the stage into ``out_dir``; returns the manifest (existing one when already done)."""
    from manyways.models import load_tokenizer

    inputs = inputs or {}
    if "select" not in inputs:
        raise TrainingDataError("midtrain needs the select stage's output (inputs['select'])")
    stage = StageDir(out_dir, STAGE, stage_config(cfg), inputs={"select": inputs["select"]})
    if open_stage(stage, overwrite):  # rank 0 alone deletes on overwrite
        log.info("%s already finished: %s", STAGE, out_dir)
        return read_manifest(out_dir)
    remove_stale_model_dirs(out_dir)
    rows = read_train_rows(inputs["select"])
    examples, counts = to_prompt_completion(rows)
    tokenizer = load_tokenizer(cfg.model.name)
    examples, tokens = check_examples(examples, tokenizer, cfg.midtrain.length_limit, counts)
    counts["dropped"] = sum(v for k, v in counts.items() if k.startswith("dropped_"))
    if counts["dropped"]:
        log.warning(
            "%s: %d of %d rows dropped (%s)",
            STAGE,
            counts["dropped"],
            len(rows),
            ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k.startswith("dropped_")),
        )
    trainer = build_trainer(cfg, out_dir, examples, tokenizer, show_progress)
    resume = resume_checkpoint(out_dir / "checkpoints")
    log.info(
        "%s: %d examples (%d tokens), %s",
        STAGE,
        len(examples),
        tokens,
        f"resuming from {resume.name}" if resume else "from the start",
    )
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if save_trained_model(trainer, tokenizer, out_dir / "model", merge_lora=cfg.midtrain.lora.merge):
        write_manifest(stage, trainer, result, resume, counts | Counter(rows=len(rows), tokens=tokens))
    trainer.accelerator.wait_for_everyone()  # other ranks return the manifest the main process wrote
    if trainer.accelerator.is_main_process and (out_dir / "manifest.json").is_file():
        drop_checkpoints(out_dir, cfg.midtrain.keep_checkpoints_when_done)
    return read_manifest(out_dir)


def write_manifest(
    stage: StageDir, trainer: Any, result: Any, resume: Path | None, counts: Counter[str]
) -> None:
    """The manifest (last): the data trained on, rows, tokens, steps, final loss."""
    out_dir = stage.path
    loss = final_loss(trainer.state.log_history)
    counts.update(
        {
            "examples": len(trainer.train_dataset),
            "global_step": trainer.state.global_step,
        }
    )
    extra = {
        "model": str(out_dir / "model"),
        "base_model": stage.config["model"]["name"],
        "final_loss": loss,
        "train_loss": result.training_loss,
        "resumed_from": resume.name if resume else None,
        "data": {
            "path": str(stage.inputs["select"] / TRAIN_FILE),
            "fingerprint": stage.input_hashes["select"],
        },
        "bf16": bool(trainer.args.bf16),
        **master_weights_summary(trainer),
    }
    manifest = stage.finish(dict(counts), extra)
    append_metrics(out_dir.parent, STAGE, {**dict(counts), "final_loss": loss, "wall_s": manifest["wall_s"]})
    log.info("%s: %d steps, final loss %s -> %s", STAGE, trainer.state.global_step, loss, out_dir / "model")
