"""Stage ``rl``: GRPO with a verifiable correctness reward, on TRL's ``GRPOTrainer``.

The policy starts from the mid-trained model (``inputs["midtrain"]/model``) or, without one, from
the base model ``cfg.model.name`` (the vanilla-RL baseline). Prompts are the RL problems
(``data.rl``, else ``data.train``) rendered with :func:`manyways.heuristics.render_plain_messages`
as conversational prompts; completions are rewarded by :mod:`manyways.rewards` (our verifier:
1 correct, 0 incorrect, None when unjudgeable, so TRL skips it; an optional ``\\boxed{}`` format
reward weighted by ``rl.format_reward``). The GRPO knobs (group size, KL beta, loss type, reward
scaling, clip epsilons, temperature, completion length, learning rate, steps) are ``rl.*`` fields;
anything else of ``trl.GRPOConfig`` goes in ``rl.trl``, passed through untouched. On GPUs,
``rl.use_vllm`` with ``rl.vllm_mode`` colocate (vLLM inside the trainer) or server (start
``trl vllm-serve --model PATH`` first; ``rl.trl.vllm_server_base_url`` points at it).

The policy's trainable weights are fp32 whatever the saved dtype (bf16 only as the trainer's
autocast: :func:`manyways.training.load_trainable_model`). A rerun resumes from the newest complete
checkpoint (:mod:`manyways.training`). Metrics (reward mean/std, frac_reward_zero_std, completion
lengths, KL when beta > 0, verifier timeouts) go to the run's ``metrics.jsonl`` and any
``report_to`` target. The manifest's verifier counters are summed over all processes of a
multi-process launch.

Inputs: ``midtrain`` (optional). Outputs under ``<run>/rl/``: ``model/`` (HF model directory,
written under a temporary name then renamed), ``checkpoints/``, ``manifest.json`` (written last).

CPU command: ``manyways rl configs/tiny_cpu.yaml rl.max_steps=2``
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from manyways.artifacts import StageDir, append_metrics, read_manifest
from manyways.config import Config
from manyways.heuristics import render_plain_messages
from manyways.ranks import launched_processes, open_stage, sum_over_processes
from manyways.rewards import reward_functions
from manyways.schema import Problem
from manyways.training import (
    CheckpointMarkerCallback,
    MasterWeightsCallback,
    MetricsCallback,
    TrainingDataError,
    cache_casts_during_generation,
    clip_only_when_needed,
    device_args,
    drop_checkpoints,
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

STAGE = "rl"


def rl_source(cfg: Config) -> Any:
    return cfg.data.rl if cfg.data.rl is not None else cfg.data.train


def stage_config(cfg: Config) -> dict[str, Any]:
    """The part of the config this stage's output depends on."""
    data = cfg.to_dict()
    source = data["data"]["rl"] if data["data"]["rl"] is not None else data["data"]["train"]
    return {
        "model": data["model"],
        "rl": data["rl"],
        "data": {"rl": source, "skip_bad": cfg.data.skip_bad},
        "verify_timeout_s": cfg.verify.timeout_s,
        "seed": cfg.run.seed,
    }


def start_model(cfg: Config, inputs: dict[str, Path]) -> str:
    """The policy's starting point: the mid-trained model, else the base model (vanilla RL)."""
    if "midtrain" in inputs:
        path = Path(inputs["midtrain"]) / "model"
        if not (path / "config.json").is_file():
            raise TrainingDataError(
                f"{inputs['midtrain']} has no model/ directory: rerun `manyways midtrain`"
            )
        return str(path)
    from manyways.models import resolve_model_path

    return resolve_model_path(cfg.model.name)


def load_rl_problems(cfg: Config) -> tuple[list[Problem], dict[str, int]]:
    from manyways.data import load_problems

    result = load_problems(rl_source(cfg), skip_bad=cfg.data.skip_bad)
    for bad in result.set_aside:
        log.warning("set aside: %s", bad)
    problems = list(result.problems)
    if not problems:
        raise TrainingDataError("the RL problem set is empty (data.rl / data.train)")
    return problems, dict(result.counts)


def prompt_dataset(problems: list[Problem]) -> Any:
    """Conversational prompts plus the ``problem_id`` column the reward looks problems up by."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": render_plain_messages(p.question), "problem_id": p.problem_id} for p in problems]
    )


def grpo_args(cfg: Config, out_dir: Path, weights: list[float], show_progress: bool = False) -> Any:
    """``trl.GRPOConfig``: our defaults from ``cfg.rl``, then ``cfg.rl.trl`` on top (renamed arguments spelled for the
    installed transformers: :func:`manyways.training.trainer_kwargs`)."""
    from trl import GRPOConfig

    r = cfg.rl
    if (r.batch_size * r.grad_accum) % r.num_generations:
        raise TrainingDataError(
            f"rl.batch_size * rl.grad_accum ({r.batch_size * r.grad_accum}) must be a multiple of "
            f"rl.num_generations ({r.num_generations})"
        )
    defaults: dict[str, Any] = {
        "output_dir": str(out_dir / "checkpoints"),
        "num_generations": r.num_generations,
        "per_device_train_batch_size": r.batch_size,
        "gradient_accumulation_steps": r.grad_accum,
        "beta": r.beta,
        "loss_type": r.loss_type,
        "scale_rewards": r.scale_rewards,
        "epsilon": r.epsilon,
        "epsilon_high": r.epsilon_high,
        "temperature": r.temperature,
        "max_completion_length": r.max_completion_length,
        "learning_rate": r.learning_rate,
        "num_train_epochs": r.epochs,
        "max_steps": r.max_steps,
        "save_strategy": "steps",
        "save_steps": r.save_steps,
        "logging_steps": 1,
        "report_to": "none",
        "seed": cfg.run.seed,
        "data_seed": cfg.run.seed,
        "reward_weights": weights,
        "use_vllm": r.use_vllm,
        "vllm_mode": r.vllm_mode,
        "activation_checkpointing": False,
        "disable_tqdm": not show_progress,
        "log_completions": False,
        **device_args(use_bf16(cfg.model.dtype, cfg.model.name)),
    }
    return GRPOConfig(**trainer_kwargs(GRPOConfig, defaults, dict(r.trl)))


def prompts_per_step(cfg: Config, processes: int) -> int:
    """Prompts one optimizer step consumes: batch x accumulation x processes / generations."""
    r = cfg.rl
    return r.batch_size * r.grad_accum * processes // r.num_generations


def check_one_step(cfg: Config, problems: int, processes: int) -> None:
    """An epoch-based run needs at least one optimizer step's prompts (else TRL stops with
    "args.max_steps must be set to a positive value")."""
    need = prompts_per_step(cfg, processes)
    if cfg.rl.max_steps <= 0 and problems * cfg.rl.epochs < need:
        raise TrainingDataError(
            f"rl: {problems} problems make no optimizer step: one step takes {need} prompts "
            f"(rl.batch_size {cfg.rl.batch_size} x rl.grad_accum {cfg.rl.grad_accum} x {processes} "
            f"processes / rl.num_generations {cfg.rl.num_generations}); add problems, lower the "
            "batch, or set rl.max_steps"
        )


def build_trainer(
    cfg: Config, out_dir: Path, model_path: str, problems: list[Problem], show_progress: bool = False
) -> tuple[Any, Any]:
    """A ``GRPOTrainer`` with our rewards and callbacks; returns (trainer, correctness reward)."""
    from trl import GRPOTrainer

    from manyways.models import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    if getattr(tokenizer, "chat_template", None) is None:
        raise TrainingDataError(f"the tokenizer of {model_path} has no chat template; GRPO prompts need one")
    funcs, weights = reward_functions(
        problems, format_weight=cfg.rl.format_reward, timeout_s=cfg.verify.timeout_s
    )
    check_one_step(cfg, len(problems), launched_processes())  # before loading a model
    args = grpo_args(cfg, out_dir, weights, show_progress)
    keep_cpu_allocations()  # large per-step tensors reuse heap memory (manyways.training)
    model = load_trainable_model(model_path)
    correctness = funcs[0]
    metrics = MetricsCallback(
        out_dir.parent, STAGE, extra=lambda: {"verifier_timeouts": correctness.counts["status_timeout"]}
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=prompt_dataset(problems),
        processing_class=tokenizer,
        peft_config=lora_config(cfg.rl.lora),
        callbacks=[
            CheckpointMarkerCallback(cfg.rl.keep_checkpoints, final=cfg.rl.keep_checkpoints_when_done),
            metrics,
            MasterWeightsCallback(),
        ],
    )
    cache_casts_during_generation(trainer.model, args.bf16)  # one weight cast per generate on CPU
    from manyways.loss_head import forward_stats, use_loss_head  # issue 16: completion positions, bf16

    stats = forward_stats()
    use_loss_head(trainer, cfg.rl.loss_head, shared_prefix=cfg.rl.shared_prefix, stats=stats)
    from manyways import zero_advantage  # rows with zero advantage: no backward

    zero_advantage.install(trainer, stats, enabled=cfg.rl.skip_zero_advantage)
    trainer.manyways_forward_stats = stats  # the manifest's training_forwards
    clip_only_when_needed(trainer)  # no multiply by 1 on CPU (manyways.training)
    check_one_step(cfg, len(problems), trainer.accelerator.num_processes)  # the trainer's own count
    return quiet_trainer(trainer), correctness


def run(
    cfg: Config,
    out_dir: Path,
    *,
    inputs: dict[str, Path] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the stage into ``out_dir``; returns the manifest (existing one when already done)."""
    inputs = {k: Path(v) for k, v in (inputs or {}).items() if k == "midtrain"}
    stage = StageDir(out_dir, STAGE, stage_config(cfg), inputs=inputs)
    if open_stage(stage, overwrite):  # rank 0 alone deletes on overwrite
        log.info("%s already finished: %s", STAGE, out_dir)
        return read_manifest(out_dir)
    remove_stale_model_dirs(out_dir)
    model_path = start_model(cfg, inputs)
    problems, load_counts = load_rl_problems(cfg)
    trainer, correctness = build_trainer(cfg, out_dir, model_path, problems, show_progress)
    resume = resume_checkpoint(out_dir / "checkpoints")
    log.info(
        "%s: %d problems from %s, %s",
        STAGE,
        len(problems),
        model_path,
        f"resuming from {resume.name}" if resume else "from the start",
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    verifier = sum_over_processes(correctness.totals())  # each rank verified its own completions
    forwards = sum_over_processes(trainer.manyways_forward_stats)
    packed_none = forwards.get("forwards") and not forwards.get("shared")
    if cfg.rl.shared_prefix and packed_none and trainer.accelerator.is_main_process:  # said once
        why = {k: v for k, v in forwards.items() if k.startswith("unshared_") and v}
        log.warning("rl.shared_prefix is on but no training forward was packed: %s", why)
    if forwards.get("zero_advantage_rows") and trainer.accelerator.is_main_process:
        log.info(
            "%s: %d of %d completions had zero advantage and ran without a backward (rl.skip_zero_advantage)",
            STAGE,
            forwards["zero_advantage_rows"],
            forwards["policy_rows"],
        )
    if save_trained_model(trainer, trainer.processing_class, out_dir / "model", merge_lora=cfg.rl.lora.merge):
        write_manifest(stage, trainer, verifier, load_counts, model_path, resume, forwards)
    trainer.accelerator.wait_for_everyone()  # other ranks return the manifest the main process wrote
    if trainer.accelerator.is_main_process and (out_dir / "manifest.json").is_file():
        drop_checkpoints(out_dir, cfg.rl.keep_checkpoints_when_done)
    return read_manifest(out_dir)


def write_manifest(
    stage: StageDir,
    trainer: Any,
    verifier: dict[str, int],
    load_counts: dict[str, int],
    model_path: str,
    resume: Path | None,
    forwards: dict[str, int] | None = None,
) -> None:
    """The manifest (last): start model, steps, verifier counters, reward and loss summary, and
    ``training_forwards``: the completion loss head's forwards in this run (all zero when TRL's
    head is in use), how many were packed per group (``rl.shared_prefix``), how many ran unpacked
    and why (``unshared_*``), the positions computed against TRL's padded rows, and, with any head,
    the rows of the policy-loss forwards and how many of them had zero advantage and so no
    backward (``policy_rows``, ``zero_advantage_rows``: ``rl.skip_zero_advantage``)."""
    out_dir = stage.path
    problems = trainer.train_dataset
    counts: Counter[str] = Counter({f"load_{k}": v for k, v in load_counts.items()})
    counts.update({"problems": len(problems), "global_step": trainer.state.global_step, **verifier})
    summary = summarize_history(trainer.state.log_history)
    manifest = stage.finish(
        dict(counts),
        {
            "model": str(out_dir / "model"),
            "start_model": model_path,
            "vanilla": "midtrain" not in stage.inputs,
            "resumed_from": resume.name if resume else None,
            "bf16": bool(trainer.args.bf16),
            **master_weights_summary(trainer),
            "training_forwards": forwards,
            **summary,
        },
    )
    append_metrics(out_dir.parent, STAGE, {**dict(counts), **summary, "wall_s": manifest["wall_s"]})
    log.info(
        "%s: %d steps, mean reward %s -> %s",
        STAGE,
        trainer.state.global_step,
        summary.get("mean_reward"),
        out_dir / "model",
    )


def summarize_history(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean reward over the run and the last logged loss, from the trainer's log history."""
    rewards = [e["reward"] for e in history if isinstance(e.get("reward"), int | float)]
    losses = [e["loss"] for e in history if isinstance(e.get("loss"), int | float)]
    return {
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "final_loss": losses[-1] if losses else None,
        "logged_steps": len(rewards),
    }
