"""Training's loss head: per-token log-probabilities at the scored positions only, in bf16.

TRL's ``SFTTrainer`` and ``GRPOTrainer`` get their per-token log-probabilities from
``model(..., labels=labels, fused_lm_head=True)``, the forward that ``trl.trainer.utils.
add_fused_lm_head`` patches onto the model (it returns a ``FusedCausalLMOutput``). On devices
without Triton (every CPU) TRL 1.16 projects *every* position through the 49K-vocabulary LM head,
not only those with a label (SFT: the assistant turn; GRPO: the completion), recasts the fp32
head weight to bf16 chunk by chunk in the forward and again in the backward, recomputes the logits
in the backward, and runs both gradient matmuls of the head in fp32 (its bf16-in/fp32-out path
is CUDA-only). :func:`install_completion_head` wraps that forward with one that keeps TRL's
contract (same output fields, zeros where the label is ``-100``) and

- scores only the positions whose next-token label is not ``-100`` (compacted rows; on CPU
  padded with zero rows to :func:`~manyways.prefix_sharing.bucket_length`, so that oneDNN reuses
  its per-shape kernels from step to step; the padding's outputs are dropped);
- casts the head weight to the compute dtype once per forward (bf16 under bf16 autocast, else the
  weights' dtype) and reuses that copy in the backward; in GRPO on CPU it takes the bf16 copy that
  generation made of the same weights instead (:mod:`manyways.backends.packed_linear`);
- projects rows in chunks of about ``chunk_elements`` logits, each a bf16 matmul (oneDNN
  accumulates in fp32 and rounds the logits to bf16, as TRL's CPU path and a plain autocast head
  do), with the log-softmax, entropy and top-1 computed in fp32;
- keeps the bf16 logits for the backward while they fit in ``keep_logits_bytes`` (else recomputes
  them: the same matmul, the same values), and runs the backward's two matmuls in bf16 with fp32
  accumulation inside each matmul (the weight gradient summed over row chunks in fp32, and
  written a few thousand vocabulary rows at a time: no vocabulary-sized bf16 temporary);
- with tied embeddings, has the input embedding's gradient rows added into the head's gradient
  buffer rather than into a vocabulary-sized matrix of their own (:mod:`manyways.tied_embedding`).

Non-fused calls (generation, evaluation) go to the original forward untouched; models the head
does not cover (a bias or a LoRA layer on the LM head, logit scaling or soft-capping, sharded
DTensor weights, vision-language models, MoE router losses, prompt-learning PEFT) keep TRL's head.

Config switch: ``midtrain.loss_head`` / ``rl.loss_head`` = ``auto`` (default: this head on CPU,
TRL's elsewhere, where TRL's Triton path already scores only the labelled positions with bf16
matmuls and fp32 outputs), ``completion`` (this head on any device) or ``trl`` (TRL's unchanged).
The hook is :func:`use_loss_head`, called on the built trainer before ``train()``. What TRL could
change upstream instead: ``docs/trl_fused_head_cpu.md``.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

import torch

from manyways.prefix_sharing import bucket_length, dropout_active, pack_groups, shared_prefix_hidden
from manyways.tied_embedding import Handoff, tied_embedding

log = logging.getLogger(__name__)

MODES = ("auto", "completion", "trl")
SUPPORTED_OUTPUTS = ("log_probs", "entropy", "is_top1")
CHUNK_ELEMENTS = 16 * 2**20  # logits per row chunk: 341 rows of a 49K vocabulary (64 MiB in fp32)
KEEP_LOGITS_BYTES = 512 * 2**20  # bf16 logits kept for the backward up to this size, else recomputed
_SCALE_ATTRS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_MARK = "_manyways_completion_head"
_PLAIN_INPUTS = {"input_ids", "attention_mask", "use_cache"}  # what TRL's GRPO forward passes
# forwards, packed (shared), positions computed / TRL's; and, with rl.shared_prefix on, the forwards
# that ran unpacked and why: extra inputs, dropout active, a batch layout pack_groups declines
FORWARD_STATS = (
    "forwards",
    "shared",
    "positions",
    "plain_positions",
    "unshared_inputs",
    "unshared_dropout",
    "unshared_layout",
)


def forward_stats() -> dict[str, int]:
    """Zeroed counters for :func:`install_completion_head`'s ``stats``."""
    return dict.fromkeys(FORWARD_STATS, 0)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where autocast is on (as TRL's head), else the promoted dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class CompletionLogProbs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T * inv_t)[target]`` per row, plus entropy and top-1.

    ``hidden`` ``[N, H]`` holds only the rows to score; the ``[N, V]`` logits exist one row chunk
    at a time (and, below ``keep_logits_bytes``, as saved bf16 chunks for the backward). Returns
    ``(log_probs, entropy, is_top1)``, fp32 / fp32 / bool, each ``[N]``; entropy and top-1 are
    ``None`` unless asked for. Gradients flow to ``hidden`` and ``weight`` from the log-probs
    and the entropy.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        inv_t: float,
        want_entropy: bool,
        want_top1: bool,
        chunk_elements: int,
        keep_logits_bytes: int,
        cast: torch.Tensor | None = None,
        handoff: Handoff | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        ctx.set_materialize_grads(False)
        dtype = _compute_dtype(hidden, weight)
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = max(1, chunk_elements // vocab)
        keep = n * vocab * torch.finfo(dtype).bits // 8 <= keep_logits_bytes
        out = {k: torch.empty(n, dtype=torch.float32, device=hidden.device) for k in ("lse", "logp", "ent")}
        top1 = torch.empty(n, dtype=torch.bool, device=hidden.device) if want_top1 else None
        with torch.autocast(hidden.device.type, enabled=False):
            # generation's bf16 copy of these very weights, where it made one (packed_linear)
            w = cast if cast is not None and cast.dtype == dtype else weight.to(dtype)
            kept = []
            for a in range(0, n, rows):
                b = min(a + rows, n)
                logits = hidden[a:b].to(dtype) @ w.t()
                _fold(logits, targets[a:b], inv_t, out, a, b, want_entropy, top1)
                if keep:
                    kept.append(logits)
        ctx.save_for_backward(hidden, w, targets, out["lse"], out["ent"])
        ctx.kept, ctx.rows, ctx.inv_t, ctx.weight_dtype = kept if keep else None, rows, inv_t, weight.dtype
        ctx.handoff = handoff
        if top1 is not None:
            ctx.mark_non_differentiable(top1)
        return out["logp"], out["ent"] if want_entropy else None, top1

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_logp: torch.Tensor | None, g_ent: torch.Tensor | None, _g_top1: Any
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, w, targets, lse, ent = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n, rows = hidden.shape[0], ctx.rows
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        if g_logp is None and g_ent is None:
            return (None,) * 10
        with torch.autocast(hidden.device.type, enabled=False):
            for i, a in enumerate(range(0, n, rows)):
                b = min(a + rows, n)
                h = hidden[a:b].to(w.dtype)
                if ctx.kept is not None:
                    logits, ctx.kept[i] = ctx.kept[i], None  # freed once used
                else:
                    logits = h @ w.t()
                gz = _logits_grad(
                    logits,
                    targets[a:b],
                    lse[a:b],
                    ent[a:b],
                    None if g_logp is None else g_logp[a:b].float(),
                    None if g_ent is None else g_ent[a:b].float(),
                    ctx.inv_t,
                ).to(w.dtype)
                if grad_hidden is not None:
                    grad_hidden[a:b] = gz @ w
                if need_weight:
                    first = grad_weight is None
                    if first:
                        grad_weight = torch.empty(w.shape, dtype=torch.float32, device=w.device)
                    _add_weight_grad(grad_weight, gz, h, first)
        ctx.kept = None
        if need_weight and grad_weight is None:  # no rows: a zero gradient, still connected
            grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        handoff, ctx.handoff = ctx.handoff, None
        if grad_weight is not None and handoff is not None and handoff.embedding_ran:
            handoff.grad, grad_weight = grad_weight, None  # the tied embedding's backward returns it
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


VOCAB_CHUNK = 4096  # vocabulary rows of the head's weight gradient computed at a time


def _add_weight_grad(out: torch.Tensor, gz: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """``out`` (fp32 ``[V, H]``) = or += ``gz.T @ h`` (bf16), :data:`VOCAB_CHUNK` vocabulary rows at
    a time: the same products and roundings as the whole ``[V, H]`` bf16 product cast to fp32
    (tested), without that 57 MB bf16 temporary (at a 49K x 576 head) in every backward."""
    for v in range(0, out.shape[0], VOCAB_CHUNK):
        part = gz[:, v : v + VOCAB_CHUNK].t() @ h
        if first:
            out[v : v + VOCAB_CHUNK].copy_(part)
        else:
            out[v : v + VOCAB_CHUNK].add_(part)


def _fold(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inv_t: float,
    out: dict[str, torch.Tensor],
    a: int,
    b: int,
    want_entropy: bool,
    top1: torch.Tensor | None,
) -> None:
    """One row chunk's fp32 log-softmax statistics, written into ``out[...][a:b]``."""
    z = logits.to(torch.float32, copy=True)  # fp32 logits may be kept for the backward: not in place
    if inv_t != 1.0:
        z.mul_(inv_t)
    m = z.amax(-1)
    target_z = z.gather(1, targets.unsqueeze(1)).squeeze(1)
    if top1 is not None:  # argmax: the first maximum, as TRL's is_top1
        top1[a:b] = z.argmax(-1) == targets
    z.sub_(m.unsqueeze(1))
    e = torch.exp(z)
    s = e.sum(-1)
    log_s = s.log()
    out["lse"][a:b] = m + log_s
    out["logp"][a:b] = target_z - m - log_s
    if want_entropy:  # H = lse - E_p[z] = log s - sum(e * (z - m)) / s
        out["ent"][a:b] = log_s - e.mul_(z).sum(-1) / s


def _logits_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    inv_t: float,
) -> torch.Tensor:
    """d(loss)/d(logits) in fp32: ``g_logp * (onehot - p) - g_ent * p * (log p + H)``, times 1/T.
    Consumes ``logits`` (fp32 ones are overwritten)."""
    logp = logits.float()
    if inv_t != 1.0:
        logp.mul_(inv_t)
    logp.sub_(lse.unsqueeze(1))
    p = torch.exp(logp)
    if g_ent is not None:
        grad = logp.add_(ent.unsqueeze(1)).mul_(p).mul_(-g_ent.unsqueeze(1))
        if g_logp is not None:
            grad.sub_(p.mul_(g_logp.unsqueeze(1)))
    else:
        grad = p.mul_(-g_logp.unsqueeze(1))  # type: ignore[union-attr]
    if g_logp is not None:
        rows = torch.arange(targets.shape[0], device=targets.device)
        grad[rows, targets] += g_logp
    if inv_t != 1.0:
        grad.mul_(inv_t)
    return grad


def unsupported_reason(model: Any) -> str | None:
    """Why this head cannot stand in for TRL's on ``model`` (checked once), else None."""
    config = model.config
    text_config = config.get_text_config()
    if text_config is not config:
        return "a vision-language model"
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        return f"config.final_logit_softcapping={text_config.final_logit_softcapping}"
    for attr in _SCALE_ATTRS:
        value = getattr(text_config, attr, None)
        if value is not None and value != 1.0:
            return f"config.{attr}={value}"
    if getattr(text_config, "output_router_logits", False) or hasattr(text_config, "router_aux_loss_coef"):
        return "a mixture-of-experts model (router loss)"
    return None


def _head_weight(model: Any) -> torch.Tensor | None:
    """The LM head's weight when the head is a plain bias-free ``nn.Linear`` (looked up per call:
    PEFT and FSDP replace modules after patching), else None."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):  # e.g. a sharded DTensor
        return None
    return weight


def _generation_cast(model: Any) -> torch.Tensor | None:
    """The bf16 copy of the head's weight that GRPO's generation made and kept for the training
    forward (:mod:`manyways.backends.packed_linear`, ``for_training``), if it is still current."""
    from manyways.backends.packed_linear import cached_copies

    copies = cached_copies(model.get_output_embeddings())
    return None if copies is None else copies[0]


def install_completion_head(
    model: Any,
    *,
    temperature: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
    chunk_elements: int = CHUNK_ELEMENTS,
    keep_logits_bytes: int = KEEP_LOGITS_BYTES,
    share_prefix: bool = False,
    stats: dict[str, int] | None = None,
) -> bool:
    """Wrap ``model``'s TRL fused-head forward (see module doc). ``model`` is the transformers model
    TRL patched (the base model under PEFT). Returns False (and logs why) where TRL's head stays.

    ``share_prefix``: compute each GRPO group's prompt once (:mod:`manyways.prefix_sharing`).
    ``stats``: a dict of counters the forward adds to (``forwards``, ``shared``: forwards packed;
    ``positions``: positions the backbone computed; ``plain_positions``: TRL's padded rows';
    with ``share_prefix``, ``unshared_inputs`` / ``unshared_dropout`` / ``unshared_layout``: the
    forwards that ran unpacked because of extra inputs, active dropout, or a batch layout
    :func:`~manyways.prefix_sharing.pack_groups` declines)."""
    if getattr(model.forward, _MARK, False):
        return True
    if "forward" not in vars(model):
        raise RuntimeError(
            f"{type(model).__name__} has no TRL fused LM head (trl.trainer.utils.add_fused_lm_head): "
            "install the completion head on a model a TRL trainer has prepared"
        )
    unknown = set(outputs) - set(SUPPORTED_OUTPUTS)
    reason = unsupported_reason(model) or (f"outputs {sorted(unknown)}" if unknown else None)
    if reason is not None:
        log.info("loss head: TRL's fused head kept (%s)", reason)
        return False
    fused = model.forward
    options = {
        "inv_t": 1.0 / temperature,
        "want_entropy": "entropy" in outputs,
        "want_top1": "is_top1" in outputs,
        "chunk_elements": chunk_elements,
        "keep_logits_bytes": keep_logits_bytes,
        "share_prefix": share_prefix,
        "stats": stats,
    }

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against the signature
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        weight = _head_weight(self) if fused_lm_head else None
        if weight is None or args:
            return fused(*args, fused_lm_head=fused_lm_head, **kwargs)
        return _completion_forward(self, weight, options, **kwargs)

    setattr(forward, _MARK, True)
    model.forward = types.MethodType(forward, model)
    return True


def _dropout_steps_aside(model: Any, options: dict[str, Any]) -> bool:
    """Dropout in the model: the packed forward would share the prompt's dropout draw across the
    group (see :mod:`manyways.prefix_sharing`), so the plain forward runs; said once."""
    if not dropout_active(model):
        return False
    if not options.get("dropout_logged"):
        options["dropout_logged"] = True
        log.warning(
            "rl.shared_prefix: dropout is active in the model (e.g. rl.lora.dropout > 0), so each "
            "group's prompt is computed once per completion as in TRL; set the dropout to 0 to pack"
        )
    return True


def _completion_forward(
    model: Any,
    weight: torch.Tensor,
    options: dict[str, Any],
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: Any = None,
    **kwargs: Any,
) -> Any:
    """``model(..., fused_lm_head=True)``: the backbone, then the head on the labelled rows only."""
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs["use_cache"] = False
    packed, unshared = None, None
    if options.get("share_prefix"):
        if shift_labels is not None or labels is None:
            unshared = "unshared_inputs"
        elif {k for k, v in kwargs.items() if v is not None} != _PLAIN_INPUTS:  # PEFT adds Nones
            unshared = "unshared_inputs"
        elif _dropout_steps_aside(model, options):
            unshared = "unshared_dropout"
        else:
            attn = getattr(model.config, "_attn_implementation", None)
            packed = pack_groups(kwargs["input_ids"], kwargs["attention_mask"], labels, attn)
            unshared = "unshared_layout" if packed is None else None
    stats = options.get("stats")
    if stats is not None:  # positions the backbone computes, against TRL's padded rows
        stats["forwards"] += 1
        stats["shared"] += packed is not None
        if unshared is not None:
            stats[unshared] = stats.get(unshared, 0) + 1
        stats["positions"] += packed.computed if packed is not None else kwargs["input_ids"].numel()
        stats["plain_positions"] += kwargs["input_ids"].numel()
    with tied_embedding(model, weight) as handoff:  # its gradient into the head's buffer
        if packed is not None:
            hidden = shared_prefix_hidden(model.base_model, packed)
        else:
            hidden = model.base_model(**kwargs).last_hidden_state
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]  # type: ignore[index]
    else:
        labels = shift_labels
    if labels is None or hidden.shape[:2] != labels.shape:  # e.g. prompt-learning virtual tokens
        raise ValueError(
            f"loss head: labels of shape {None if labels is None else tuple(labels.shape)} do not match "
            f"the hidden states {tuple(hidden.shape[:2])}; set loss_head: trl for this model"
        )
    labels = labels.to(weight.device)
    mask = labels != -100
    rows, targets = hidden.to(weight.device)[mask], labels[mask]
    scored = rows.shape[0]
    if rows.device.type == "cpu":  # zero rows up to a bucket: oneDNN reuses its per-shape kernels
        pad = bucket_length(scored) - scored
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        targets = torch.cat([targets, targets.new_zeros(pad)])
    training = torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)
    logp, entropy, top1 = CompletionLogProbs.apply(
        rows,
        weight,
        targets,
        options["inv_t"],
        options["want_entropy"],
        options["want_top1"],
        options["chunk_elements"],
        options["keep_logits_bytes"] if training else 0,  # nothing to keep without a backward
        _generation_cast(model),
        handoff,
    )
    logp, entropy, top1 = (None if x is None else x[:scored] for x in (logp, entropy, top1))

    def spread(x: torch.Tensor | None) -> torch.Tensor | None:
        # masked_scatter keeps an all-masked batch connected to the graph (a zero, not an error)
        return None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)

    log_probs = spread(logp)
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / denom,  # type: ignore[union-attr]
        log_probs=log_probs,
        entropy=spread(entropy),
        is_top1=spread(top1),
        label_mask=mask,
    )


def _trainer_head(trainer: Any) -> tuple[dict[str, Any], list[tuple[Any, tuple[str, ...]]]] | None:
    """(install options, [(model, outputs)]) for the TRL trainers we use, else None."""
    from trl import GRPOTrainer, SFTTrainer

    policy = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    if isinstance(trainer, SFTTrainer):
        return {}, [(policy, ("log_probs", "entropy", "is_top1"))]
    if isinstance(trainer, GRPOTrainer):
        models = [(policy, ("log_probs", "entropy"))]
        if trainer.ref_model is not None:
            models.append((trainer.ref_model, ("log_probs",)))
        return {"temperature": trainer.temperature}, models
    return None


def use_loss_head(
    trainer: Any,
    mode: str = "auto",
    *,
    shared_prefix: bool = False,
    stats: dict[str, int] | None = None,
    **options: Any,
) -> str:
    """Choose the loss head of a built (not yet trained) TRL trainer; returns ``completion`` or
    ``trl``, the head now in use. ``options`` go to :func:`install_completion_head`;
    ``shared_prefix`` (GRPO only) computes each group's prompt once in the training forwards, and
    ``stats`` (a dict of counters, see :func:`install_completion_head`) counts their positions."""
    if mode not in MODES:
        raise ValueError(f"loss_head must be one of {', '.join(MODES)}, not {mode!r}")
    device = next(trainer.model.parameters()).device
    fp32_head = bool(getattr(trainer.args, "cast_lm_head_to_fp32", False))
    target = _trainer_head(trainer)
    if mode == "completion" and (fp32_head or target is None):
        why = "cast_lm_head_to_fp32 is set" if fp32_head else f"{type(trainer).__name__} is not covered"
        raise ValueError(f"loss_head: completion is not available: {why}; use auto or trl")
    if mode == "trl" or (mode == "auto" and (device.type != "cpu" or fp32_head or target is None)):
        log.info("loss head: TRL's fused head (%s, mode %s)", device.type, mode)
        return "trl"
    common, models = target  # type: ignore[misc]
    from trl import GRPOTrainer

    if isinstance(trainer, GRPOTrainer):  # the rows of a group share their prompt
        common = {**common, "share_prefix": shared_prefix, "stats": stats}
    done = [install_completion_head(m, outputs=o, **common, **options) for m, o in models]
    head = "completion" if done[0] else "trl"
    log.info("loss head: %s (%s, mode %s)", head, device.type, mode)
    return head
