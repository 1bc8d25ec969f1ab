"""Shared pieces of the training stages (midtrain, rl): checkpoints that can be trusted, resume,
metrics, the bf16 decision, the CPU allocator setting, LoRA and atomic model saving.

CPU allocator: training a small model allocates and frees tensors of tens to hundreds of MB every
step (TRL's chunked LM head: 32K-vocabulary weight chunks cast to bf16 and their fp32 gradients;
the tied embedding's gradient). glibc serves every allocation over 32 MiB with a fresh ``mmap``,
so each one is page-faulted in again and unmapped on free: on the development VM zeroing a
113 MB tensor took 240 ms that way and 11-18 ms from a reused heap (``benchmarks/bench_train.py``
profile). :func:`keep_cpu_allocations` therefore turns glibc's ``mmap`` path off and raises its
trim threshold while training on CPU, so freed memory is reused; the process keeps its peak heap.

transformers writes a checkpoint as many files, not atomically. A checkpoint therefore counts only
once :class:`CheckpointMarkerCallback` has written ``checkpoint-N/manyways_complete`` after the
save returned (``on_save`` fires after ``Trainer._save_checkpoint`` finished writing model,
optimizer, scheduler, RNG and trainer state). On a rerun :func:`resume_checkpoint` picks the newest
marked checkpoint and deletes unmarked ones. The callback also keeps only the newest
``keep`` complete checkpoints (so transformers' own rotation, which runs before the marker is
written, is not needed).

Gradient clipping on CPU (:func:`clip_only_when_needed`): torch's ``clip_grad_norm_`` always
multiplies every gradient by ``min(1, max_norm / (norm + 1e-6))``, to spare a GPU a host sync; on
CPU there is no sync to spare, and the multiply by 1 (a read and a write of every gradient, 3% of an
SFT step of the 135M default on the AMX machine) is skipped: bitwise the same result. When it does
clip and the optimizer is torch's fused Adam/AdamW (transformers' default ``adamw_torch_fused``),
the factor goes to the optimizer instead, as the ``grad_scale`` that ``torch.amp.GradScaler`` hands
it: the fused kernel divides each gradient by ``1 / factor`` as it reads it for the update and
writes the clipped gradient back, so the separate multiply pass over every gradient (38 ms of a
GRPO step of the 135M default, ``benchmarks/bench_train.py`` figure 8) is gone. The update and the
gradients left afterwards equal the multiply path's up to that one rounding (a division by the
reciprocal instead of a multiplication; tested); between the clip and the optimizer step, a
callback's ``on_pre_optimizer_step`` sees the gradients not yet clipped.

Fault injection for tests: ``MANYWAYS_FAULT_BEFORE_MARKER=N`` SIGKILLs the process in ``on_save``
of step N, after the checkpoint files exist but before the marker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
from collections import deque
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from manyways.artifacts import append_metrics, write_json_atomic
from manyways.ranks import gather_lists

log = logging.getLogger(__name__)

MARKER = "manyways_complete"
CHECKPOINT_PREFIX = "checkpoint-"
FAULT_ENV = "MANYWAYS_FAULT_BEFORE_MARKER"


class TrainingDataError(ValueError):
    """The training data cannot be trained on; raised before training starts."""


def load_trainable_model(path: str) -> Any:
    """The causal LM to train, with fp32 weights whatever dtype it was saved in.

    transformers 5 loads ``dtype="auto"``: a model saved in bfloat16 (Llama 3.2) would be trained
    with AdamW writing straight into bf16 weights, where an update of 1e-6 to a weight of 0.02
    rounds away (bf16 keeps 8 significant bits). Weights and optimizer state therefore stay fp32;
    bf16 enters only as the trainer's autocast (``bf16=True``). Under DeepSpeed the engine casts
    the module to bf16 itself and keeps the fp32 master copy in its optimizer.
    """
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class MasterWeightsCallback(TrainerCallback):
    """Checks, as the first optimizer step begins, that the weights the optimizer updates are fp32.

    ``dtypes`` (the dtypes of the trainable parameters) goes into the stage's manifest. Under
    DeepSpeed (``args.deepspeed`` set) the module may hold bf16 weights because the engine keeps
    fp32 masters in its optimizer; anywhere else a trainable weight that is not fp32 stops training.
    """

    def __init__(self) -> None:
        self.dtypes: list[str] = []
        self.fp32_masters = ""

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> Any:
        if self.dtypes or model is None:
            return control
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.dtypes = sorted({_dtype_name(p.dtype) for p in trainable})
        if getattr(args, "deepspeed", None):
            self.fp32_masters = "deepspeed optimizer"
        elif self.dtypes == ["float32"]:
            self.fp32_masters = "weights"
        else:
            raise RuntimeError(
                f"trainable weights are {self.dtypes}, not float32: optimizer updates smaller than "
                "the dtype's resolution would round away (load with manyways.training."
                "load_trainable_model, or train under a DeepSpeed config that keeps fp32 masters)"
            )
        return control

    def summary(self) -> dict[str, Any]:
        return {"trainable_dtypes": self.dtypes, "fp32_masters": self.fp32_masters}


def master_weights_summary(trainer: Any) -> dict[str, Any]:
    """The manifest fields of the trainer's :class:`MasterWeightsCallback` (empty without one)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, MasterWeightsCallback):
            return callback.summary()
    return {}


def use_bf16(dtype: str, model: Any = None) -> bool:
    """bf16 autocast (weights stay fp32), else the named dtype. ``auto``: with ``model`` (name, path
    or config) the faster dtype for training at its shapes, measured once per machine
    (:func:`manyways.dtype_auto.resolve_auto_dtype`); without, the hardware's bf16 flags."""
    if dtype == "float32":
        return False
    if dtype == "bfloat16":
        return True
    if model is not None:
        import torch

        from manyways.dtype_auto import resolve_auto_dtype

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return resolve_auto_dtype("training", model, device=device)[0] == "bfloat16"
    from manyways.models import preferred_bf16

    return preferred_bf16()


def device_args(bf16: bool) -> dict[str, Any]:
    """TrainingArguments for the device: CPU needs ``use_cpu`` for bf16 autocast to be allowed."""
    import torch

    on_gpu = torch.cuda.is_available()
    return {"bf16": bf16, "fp16": False, "use_cpu": not on_gpu}


# TrainingArguments renamed in transformers 5.24 (the old names still work there, with a warning)
RENAMED_ARGS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def trainer_kwargs(args_cls: Any, defaults: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """Our defaults overridden by the user's pass-through section, each renamed argument spelled
    the way the installed ``args_cls`` (a TrainingArguments dataclass) expects it, so a config
    written for either transformers version works with both and raises no deprecation warning."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(args_cls)}

    def spell(section: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in section.items():
            for old, new in RENAMED_ARGS.items():
                if key == old and new in fields:
                    key = new
                elif key == new and new not in fields:
                    key = old
            out[key] = value
        return out

    return {**spell(defaults), **spell(user)}


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc <malloc.h>
_KEEP_TRIM_BYTES = 2**31 - 1  # mallopt takes an int
_GLIBC_MMAP_MAX, _GLIBC_STEADY_MMAP_THRESHOLD = 65536, 32 * 2**20


def _mallopt(settings: list[tuple[int, int]]) -> bool:
    """Apply glibc ``mallopt`` settings; False where there is no glibc or a setting was refused."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or "musl" in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError):
        return False


def keep_cpu_allocations(enabled: bool = True) -> bool:
    """Let glibc reuse freed heap memory instead of mapping large blocks anew (see module doc).

    ``enabled=False`` restores glibc's steady-state defaults (``mmap`` above 32 MiB, trim at
    twice that); benchmarks use it for a plain baseline. No-op (False) on CUDA or without glibc.
    """
    import torch

    if torch.cuda.is_available():
        return False
    if enabled:
        settings = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_TRIM_BYTES)]
    else:
        settings = [
            (_M_MMAP_MAX, _GLIBC_MMAP_MAX),
            (_M_MMAP_THRESHOLD, _GLIBC_STEADY_MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, 2 * _GLIBC_STEADY_MMAP_THRESHOLD),
        ]
    done = _mallopt(settings)
    log.debug("glibc allocator %s: %s", "keeps freed memory" if enabled else "defaults", done)
    return done


def cache_casts_during_generation(model: Any, bf16: bool) -> bool:
    """Run ``model.generate`` inside one bf16 autocast region, with the linear layers' bf16
    weights cast and packed once and kept for the training forward (CPU with bf16 autocast only).

    accelerate wraps a prepared model's ``forward`` in an autocast region of its own, and autocast
    forgets its weight casts when the outermost region exits, so TRL's GRPO generation on CPU
    recast every fp32 weight to bf16 at every decode step (``copy_`` was 53% of a GRPO step's CPU
    time: ``benchmarks/profile_figure.py 8``). Inside one outer region each weight is cast once.
    The linear layers' weights are also packed once for oneDNN, which torch's bf16 linear would
    otherwise do on every decode step, and both copies are kept until the next optimizer step, so
    the training forward of the same step reuses them instead of casting every weight again
    (:func:`manyways.backends.packed_linear.install` with ``for_training``: bitwise the same
    outputs and gradients). Each call makes them anew. Returns whether it wrapped ``generate``.
    """
    import functools

    import torch

    if not bf16 or torch.cuda.is_available() or getattr(model.generate, "_manyways_cached", False):
        return False
    inner = model.generate

    from manyways.backends.packed_linear import drop_copies, drop_copies_on_optimizer_step, install

    install(model, for_training=True)
    drop_copies_on_optimizer_step(model)  # fused AdamW leaves the version counters as they were

    @functools.wraps(inner)
    def generate(*args: Any, **kwargs: Any) -> Any:
        drop_copies(model)  # made again from the weights of this moment
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return inner(*args, **kwargs)

    generate._manyways_cached = True  # type: ignore[attr-defined]
    model.generate = generate
    return True


def clip_only_when_needed(trainer: Any) -> bool:
    """Make ``trainer``'s gradient clipping multiply only when it changes the gradients (module doc).

    Only for one process or DDP on CPU (every rank holds the whole, reduced gradient), without
    DeepSpeed or FSDP; elsewhere, and for sparse or distributed-tensor gradients, transformers'
    own ``_clip_grad_norm`` runs. Returns whether it was installed.
    """
    import torch
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU)
    if torch.cuda.is_available() or not plain or getattr(trainer.args, "deepspeed", None):
        return False
    if getattr(trainer, "is_fsdp_enabled", False):
        return False
    inner = trainer._clip_grad_norm

    def clip(model: Any) -> Any:
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        if not grads or any(
            type(g) is not torch.Tensor or g.is_sparse or g.device.type != "cpu" for g in grads
        ):
            return inner(model)
        max_norm = float(trainer.args.max_grad_norm)
        total = torch.nn.utils.get_total_norm(grads)  # clip_grad_norm_'s own norm (2, foreach)
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # clip_grads_with_norm_'s
        if bool(factor == 1.0):  # NaN clips too (and spreads NaN, as torch does)
            return total
        if not _clip_in_optimizer(trainer.optimizer, params, factor):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    trainer._clip_grad_norm = clip
    return True


_ONE_SHOT = "_manyways_grad_scale_once"
_OURS = "_manyways_clip_grad_scale"  # the grad_scale we set (a clip not followed by a step is replaced)


def _clip_in_optimizer(optimizer: Any, params: list[Any], factor: Any) -> bool:
    """Hand the clip ``factor`` to ``optimizer``'s next step as its ``grad_scale`` (module doc);
    False (nothing done) unless it is torch's Adam/AdamW, fused in every group, updating exactly
    ``params`` with fp32 gradients, and no ``GradScaler`` is using the attribute."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if type(inner) not in (torch.optim.Adam, torch.optim.AdamW) or not getattr(
        inner, "_step_supports_amp_scaling", False
    ):
        return False
    if not all(group.get("fused") for group in inner.param_groups):
        return False
    ours = inner.__dict__.get(_OURS)
    scale = getattr(inner, "grad_scale", None)
    if (scale is not None and scale is not ours) or getattr(inner, "found_inf", None) is not None:
        return False  # a GradScaler's
    owned = {id(p) for group in inner.param_groups for p in group["params"]}
    if any(id(p) not in owned or p.grad.dtype != torch.float32 for p in params):
        return False
    if not getattr(inner.step, _ONE_SHOT, False):
        step = inner.step

        def step_once(*args: Any, **kwargs: Any) -> Any:
            try:
                return step(*args, **kwargs)
            finally:  # this step's factor only, and only ours
                mine = inner.__dict__.pop(_OURS, None)
                if mine is not None and inner.__dict__.get("grad_scale") is mine:
                    del inner.grad_scale

        setattr(step_once, _ONE_SHOT, True)
        inner.step = step_once
    inner.grad_scale = inner.__dict__[_OURS] = (1.0 / factor).to(torch.float32)  # the kernel divides by it
    return True


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name[len(CHECKPOINT_PREFIX) :])
    except ValueError:
        return -1


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``checkpoint-N`` directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted((p for p in found if checkpoint_step(p) >= 0), key=checkpoint_step)


def is_complete_checkpoint(path: Path) -> bool:
    return (path / MARKER).is_file()


def resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (no marker) are deleted."""
    newest = None
    for path in list_checkpoints(ckpt_dir):
        if is_complete_checkpoint(path):
            newest = path
        else:
            log.warning("deleting incomplete checkpoint %s (no %s marker)", path, MARKER)
            shutil.rmtree(path, ignore_errors=True)
    if newest is not None:
        log.info("resuming from %s", newest)
    return newest


class CheckpointMarkerCallback(TrainerCallback):
    """Marks each checkpoint complete after transformers saved it; keeps the newest ``keep``.

    ``final=False``: no checkpoint at the last step. Checkpoints exist for resume; when the stage
    deletes them once its model is saved (``keep_checkpoints_when_done: false``), the last one
    would be written only to be removed a moment later (weights and optimizer state: ~4 s of a
    60 s demo rl stage on a 2-core CPU). A run killed between its last step and its model save
    resumes from the checkpoint before and redoes those steps.
    """

    def __init__(self, keep: int = 2, *, final: bool = True):
        self.keep = keep
        self.final = final

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # runs after transformers' DefaultFlowCallback, which asks for a save at the last step
        if not self.final and state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_save = False
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not state.is_world_process_zero:
            return control
        path = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if os.environ.get(FAULT_ENV) == str(state.global_step):
            log.error("fault injection: killing the process before marking %s", path)
            os.kill(os.getpid(), signal.SIGKILL)
        if not (path / "trainer_state.json").is_file():
            log.warning("on_save: %s has no trainer_state.json; not marking it complete", path)
            return control
        write_json_atomic(path / MARKER, {"global_step": state.global_step, "epoch": state.epoch})
        complete = [p for p in list_checkpoints(Path(args.output_dir)) if is_complete_checkpoint(p)]
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return control


class MetricsCallback(TrainerCallback):
    """Appends every trainer log (loss, reward, KL, ...) to the run's ``metrics.jsonl``."""

    def __init__(self, run_dir: Path, stage: str, extra: Any = None):
        self.run_dir = run_dir
        self.stage = stage
        self.extra = extra  # optional callable returning more metrics (e.g. verifier counters)
        self.last: dict[str, float] = {}

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> Any:
        if not state.is_world_process_zero or not logs:
            return control
        record = {k: v for k, v in logs.items() if isinstance(v, int | float | str)}
        if self.extra is not None:
            record.update(self.extra())
        record["step"] = state.global_step
        self.last.update({k: v for k, v in record.items() if isinstance(v, int | float)})
        append_metrics(self.run_dir, self.stage, record)
        return control


def example_key(input_ids: Any) -> str:
    """A short digest of one tokenized example, to recognise it inside a batch."""
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


class SampleLog(TrainerCallback):
    """Logs which examples each optimizer step consumed, as ``{"step", "ids"}`` JSON lines
    (under a multi-process launch the ids of all ranks, in rank order; rank 0 writes).

    :meth:`wrap` wraps the trainer's data collator to note the sample ids of every batch it builds
    (``ids_by_key`` maps :func:`example_key` of ``input_ids`` to an id); ``on_step_end`` then writes
    the batches of that step. The dataloader may build one batch ahead, so batches are queued and
    only written once their step ended; a resumed run skips finished batches without building them.
    """

    def __init__(self, ids_by_key: dict[str, str], path: Path):
        self.ids_by_key = ids_by_key
        self.path = path
        self.pending: deque[list[str]] = deque()

    def wrap(self, collator: Any) -> Any:
        def collate(examples: list[dict[str, Any]]) -> Any:
            self.pending.append([self.ids_by_key.get(example_key(e["input_ids"]), "?") for e in examples])
            return collator(examples)

        return collate

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        batches = [
            self.pending.popleft() for _ in range(min(args.gradient_accumulation_steps, len(self.pending)))
        ]
        ids = gather_lists([i for b in batches for i in b])  # every rank's batches of this step
        if state.is_world_process_zero:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(
                    json.dumps(
                        {
                            "step": state.global_step,
                            "pid": os.getpid(),
                            "ids": ids,
                        }
                    )
                    + "\n"
                )
        return control


def lora_config(section: Any, task_type: str = "CAUSAL_LM") -> Any:
    """A ``peft.LoraConfig`` from a :class:`~manyways.config.LoraSection`, or None when disabled."""
    if not section.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        task_type=task_type,
    )


def save_trained_model(trainer: Any, tokenizer: Any, target: Path, *, merge_lora: bool = True) -> bool:
    """Save the trained model as an HF directory: written under a temporary name, then renamed.

    Every process calls this (``Trainer.save_model`` gathers sharded DeepSpeed / FSDP weights);
    only the main process writes files. LoRA adapters are merged into the base weights unless
    ``merge_lora`` is false (then the directory holds the adapter). Returns True on the main process.
    """
    accelerator = trainer.accelerator
    main = bool(accelerator.is_main_process)
    tmp = target.parent / f".{target.name}.tmp-save"
    if main and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    model = trainer.model
    if merge_lora and hasattr(model, "merge_and_unload"):
        if main:
            model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
    else:
        trainer.save_model(str(tmp))
    if main:
        (tmp / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    accelerator.wait_for_everyone()
    return main


def final_loss(history: list[dict[str, Any]]) -> float | None:
    """The last logged step loss of a trainer's ``log_history`` (else the run's mean loss)."""
    for key in ("loss", "train_loss"):
        for entry in reversed(history):
            value = entry.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                return float(value)
    return None


def quiet_trainer(trainer: Any) -> Any:
    """Drop transformers' PrinterCallback (it prints every log to stdout); metrics go to our log."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def remove_stale_model_dirs(out_dir: Path, name: str = "model") -> None:
    """Delete leftovers of an interrupted save (``.model.tmp-*``)."""
    for tmp in out_dir.glob(f".{name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def drop_checkpoints(out_dir: Path, keep: bool) -> None:
    """Once the stage's model and manifest are written, checkpoints (kept only for resume) go,
    unless the config asks to keep them."""
    ckpt_dir = Path(out_dir) / "checkpoints"
    if keep or not ckpt_dir.is_dir():
        return
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info("removed %s (set keep_checkpoints_when_done to keep them)", ckpt_dir)
