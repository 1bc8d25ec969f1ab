"""GRPO: completions whose advantage is zero skip the backward (``rl.skip_zero_advantage``).

A group whose rewards are all equal (all wrong, all right: TRL's ``frac_reward_zero_std``) has
advantage zero on every row, and with ``beta: 0``, no entropy bonus and no router aux loss every
TRL loss type multiplies a row's per-token loss by its advantage: the row's loss is exactly 0 and
so is its gradient. TRL still runs its training forward with autograd and its backward. Here the
policy-loss forward (``GRPOTrainer._get_per_token_logps_and_entropies`` inside ``_compute_loss``)
is split by rows:

- rows with a non-zero advantage run as before (through the wrapped model, with autograd);
- the others run under ``torch.no_grad`` on the unwrapped model, so their log-probs and entropies
  are still computed and every logged metric (entropy, clip ratios) and the ``top_entropy_quantile``
  threshold are those of the plain run; what they no longer cost is the backward and the
  activations kept for it;
- when no row of a micro-batch has a non-zero advantage, a two-token forward of one row, weighted
  by 0, is the graph the backward runs through: every trainable weight gets an exactly-zero gradient,
  as in the plain run, so the optimizer step (weight decay, moments) is the same, and each process
  runs one forward and backward of the wrapped model per micro-batch, as collectives under DDP or
  DeepSpeed ZeRO-1/2 need.

The loss and gradients are the plain run's up to the float rounding of a different batch
composition (tested in fp32: loss to 1e-5, gradients to 1e-4 relative); with dropout active the
draws differ as with any batching change. ZeRO-1/2 is reasoned, not tested (DDP is, on 2 CPU
ranks). It steps aside (TRL's forward, unchanged) with ``beta > 0`` (the KL term's gradient does
not vanish with the advantage), an entropy bonus, a router aux loss, a loss type it does not know,
multimodal inputs, or sharded parameters (ZeRO-3, FSDP: a forward outside the wrapper would see
shards, and one inside is a collective every process must join).

Counters (the rl manifest's ``training_forwards``): ``policy_rows`` (rows in the policy-loss
forwards) and ``zero_advantage_rows`` (of them, computed without autograd); both stay 0 when the
skip is off or steps aside. What it saves is about 2/3 of those rows' training compute (the
backward's share of a forward and backward). On the demo's rl stage most steps have no row to
train: the 135M model's completions are mostly all wrong.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# TRL 1.16's loss types; each multiplies the per-token loss by the advantage (grpo, bnpo, dr_grpo,
# dapo, luspo: -min(r A, clip(r) A); cispo, vespo: -w A log p; sapo: -g(r) A)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
COUNTERS = ("policy_rows", "zero_advantage_rows")


def unsupported_reason(trainer: Any) -> str | None:
    """Why the split cannot be exact for this trainer, or None."""
    if float(getattr(trainer, "beta", 0.0)) != 0.0:
        return "beta > 0 (the KL term's gradient does not vanish with the advantage)"
    if getattr(trainer, "_entropy_bonus_enabled", False):
        return "an entropy bonus is on"
    if getattr(trainer, "aux_loss_enabled", False):
        return "the model's router aux loss is on"
    if getattr(trainer, "loss_type", None) not in LOSS_TYPES:
        return f"loss_type {getattr(trainer, 'loss_type', None)!r} is not one it knows"
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) or (plugin is not None and plugin.zero_stage == 3):
        return "parameters are sharded (FSDP or ZeRO-3)"
    return None


def zero_rows(advantages: torch.Tensor) -> torch.Tensor:
    """Rows whose advantage is exactly zero (per row, or at every position for ``(B, T)``)."""
    return advantages == 0 if advantages.dim() == 1 else (advantages == 0).all(dim=-1)


def install(trainer: Any, stats: dict[str, int], enabled: bool = True) -> bool:
    """Split the policy-loss forward of a built ``GRPOTrainer`` (see the module docstring) when
    ``enabled`` and exact; returns whether it is installed. ``stats`` gets the :data:`COUNTERS`."""
    for key in COUNTERS:
        stats.setdefault(key, 0)
    if not enabled:
        return False
    reason = unsupported_reason(trainer)
    if reason is not None:
        log.info("rl.skip_zero_advantage steps aside: %s", reason)
        return False
    compute_loss = trainer._compute_loss
    logps_and_entropies = trainer._get_per_token_logps_and_entropies
    pending: dict[str, torch.Tensor | None] = {"zero": None}

    def split_compute_loss(model: Any, inputs: dict[str, Any]) -> Any:
        if torch.is_grad_enabled():
            zero = zero_rows(inputs["advantages"])
            stats["policy_rows"] += zero.numel()
            pending["zero"] = zero if bool(zero.any()) else None
        try:
            return compute_loss(model, inputs)
        finally:
            pending["zero"] = None

    def split_logps(
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **extra: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        zero, pending["zero"] = pending["zero"], None  # the policy's call only, once per loss
        plain = (model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy)
        if zero is None or compute_aux_loss or any(v is not None for v in extra.values()):
            return logps_and_entropies(*plain, compute_aux_loss, **extra)  # multimodal: not split
        train = (~zero).nonzero().squeeze(1)
        frozen = zero.nonzero().squeeze(1)
        stats["zero_advantage_rows"] += frozen.numel()
        with torch.no_grad():  # outside the wrapper: no collective, nothing kept for a backward
            f_logps, f_ent, _ = logps_and_entropies(
                trainer.accelerator.unwrap_model(model),
                input_ids[frozen],
                attention_mask[frozen],
                logits_to_keep,
                batch_size,
                compute_entropy,
            )
        if train.numel():
            t_logps, t_ent, _ = logps_and_entropies(
                model, input_ids[train], attention_mask[train], logits_to_keep, batch_size, compute_entropy
            )
            inverse = torch.cat([train, frozen]).argsort()
            logps = torch.cat([t_logps, f_logps])[inverse]
            ent = None if f_ent is None else torch.cat([t_ent, f_ent])[inverse]
            return logps, ent, None
        anchor = zero_anchor(model, input_ids, logits_to_keep)
        return f_logps + anchor, f_ent, None

    def zero_anchor(model: Any, input_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        """0, connected to every weight through a two-token forward of the wrapped model (the last
        prompt token, the first completion token of row 0); not counted by the loss head."""
        first = max(input_ids.shape[1] - logits_to_keep, 1)
        ids = input_ids[:1, first - 1 : first + 1]
        saved = dict(stats)  # a one-row forward is no training forward of the run's batches
        try:
            logps, _, _ = logps_and_entropies(model, ids, torch.ones_like(ids), 1)
        finally:
            stats.update(saved)
        return logps.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0

    trainer._compute_loss = split_compute_loss
    trainer._get_per_token_logps_and_entropies = split_logps
    return True
