"""GRPO's training forward with each group's prompt computed once (shared-prefix packing).

The ``num_generations`` completions of one GRPO group continue the same prompt. TRL's training
forward (the policy's log-probs, the reference model's, the old policy's) runs every row of
``[prompt | completion]`` at the batch's full padded width, so a group's prompt is computed once
per completion, left padding and the padding after each completion's end included. Here each group
becomes one packed sequence, ``[prompt, completion 1, ..., completion k]``, with a 4D attention mask
under which the prompt is causal, every completion sees the whole prompt and its own earlier tokens,
and nothing else; position ids are the columns the tokens had in TRL's padded row, so every
position's inputs, positions and visible keys are those of the plain forward. The hidden states
are then put back in TRL's ``[rows, columns]`` layout (a gather: in the backward, the prompt's
gradient sums over the group's completions, as the plain forward's does over its copies).

Same log-probs and gradients as the plain forward up to float rounding (tested); less arithmetic by
the factor ``rows x width / (prompt + sum of completion lengths)`` per group: on the demo's rl
stage (4 completions of a ~40-token prompt, up to 64 new tokens) about 1.5x. Used by the
completion loss head (:mod:`manyways.loss_head`) on GRPO's models when ``rl.shared_prefix`` is on
(the default). It steps aside (the plain forward runs) whenever the batch is not the shape it
expects: a completion whose mask is not ones then zeros (the shared part ends at the first
labelled column; a label inside the prompt only shortens it), a masked last prompt column, inputs besides ids and mask, an attention implementation other than
``sdpa``/``eager`` (flash attention takes no 4D mask), no two rows sharing a prompt, a packed
batch whose dense mask would exceed ``MAX_MASK_ELEMENTS`` (long completions: the recipe's 3K
tokens; there the prompt is a small part of each row anyway), or dropout active in the model
(:func:`dropout_active`: LoRA's default ``lora.dropout: 0.05``; packed, the group's completions
would share one dropout draw over the prompt where the plain forward draws one per copy, so
``rl.lora.dropout: 0`` is what lets a LoRA run pack).

On CPU the packed length is rounded up to a few buckets (:func:`bucket_length`; the extra
positions are padding of the packing) so that oneDNN's per-shape kernels are reused from step to
step.

Attention of the packed forward on CPU: torch's CPU flash kernel (what ``sdpa`` runs) is slow on
short sequences: at the demo's packed groups (~230 tokens, 9 query and 3 key/value heads of 64)
its forward and backward took 4.3-4.6 ms a layer against 2.4-2.9 ms for the plain product
attention, 1.2-3x faster up to ~400 tokens and slower from ~500 (``benchmarks`` figure 8 notes).
So where the model runs ``sdpa`` on CPU and a packed group is at most
:data:`SMALL_ATTENTION_ELEMENTS` scores (query heads x length^2), the packed forward runs
:func:`small_attention_forward`: transformers' eager attention (scores in bf16 under autocast,
the additive mask, softmax in fp32, probabilities back to bf16) with each key/value head's query
heads batched together instead of copying the keys and values per query head. Its outputs are
eager attention's (tested); against ``sdpa`` they differ by bf16 rounding, as any two attention
kernels do. Not with gradient checkpointing (the recomputed layers would run the model's own
attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
SMALL_ATTENTION = "manyways_small_attention"  # registered with transformers' AttentionInterface
# query heads x length^2 of a packed group up to which small_attention_forward runs on CPU
# (9 heads: up to 482 tokens; it was 1.2-3x faster than sdpa to ~400 tokens, even at ~500)
SMALL_ATTENTION_ELEMENTS = 2**21
# the packed batch's dense mask, groups x length^2: above this the plain forward runs (at 3K-token
# completions a group of 8 would be a 25K-long sequence; its mask alone 600M elements, and SDPA
# with a mask computes every masked score, so packing would cost more attention than it saves)
MAX_MASK_ELEMENTS = 2**24


def dropout_active(model: torch.nn.Module) -> bool:
    """Whether a forward of ``model`` now would draw dropout noise (a training-mode dropout module
    with ``p > 0``, or attention dropout in the config while training)."""
    if model.training and float(getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(
        isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in model.modules()
    )


@dataclass
class PackedBatch:
    """The groups as packed sequences (``[groups, length]``) and the way back to TRL's layout."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor  # [groups, 1, length, length]: bool (sdpa) or additive float (eager)
    gather: torch.Tensor  # [rows, columns]: index into the packed positions (flattened), or the zero row
    computed: int  # positions the packed forward computes (padding of the packing included)


def bucket_length(length: int) -> int:
    """``length`` rounded up to a multiple of an eighth of the power of two at or below it (at
    least 8): 133 -> 144, 232 -> 240, 600 -> 640; under 12.5% more positions from 64 up.

    oneDNN builds and caches a kernel (a "primitive": JIT code and scratch buffers) for every new
    matrix shape; GRPO's packed groups change length every step, so each step built new ones for
    every linear layer's forward and backward shapes: ~50 MB more resident memory a step without
    end (until oneDNN's 1,024-entry cache is full) and, on the development VM, 20-35K page faults
    (0.15-0.3 s) in the backward of steps well past warm-up (``benchmarks/bench_train.py`` figure 8
    notes). Lengths in a few buckets reuse the kernels.
    """
    if length <= 8:
        return 8
    step = max(8, 1 << (length.bit_length() - 4))
    return -(-length // step) * step


def pack_groups(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    attn_implementation: str | None,
) -> PackedBatch | None:
    """The shared-prefix packing of a GRPO training batch, or None where it does not apply (see
    the module doc). ``labels`` is TRL's: ``-100`` on the prompt columns and on masked positions."""
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS or input_ids.dim() != 2:
        return None
    if attention_mask.shape != input_ids.shape or labels.shape != input_ids.shape:
        return None
    rows, width = input_ids.shape
    labelled = (labels != -100).any(0).nonzero()
    if rows < 2 or labelled.numel() == 0:
        return None
    start = int(labelled[0])  # the first completion column: every earlier column is prompt
    real = attention_mask.bool()
    if start < 1 or not bool(real[:, start - 1].all()):  # the last prompt token predicts the first
        return None
    lengths = real[:, start:].sum(1)
    steps = torch.arange(width - start, device=real.device)
    if not torch.equal(real[:, start:], steps.unsqueeze(0) < lengths.unsqueeze(1)):
        return None  # a completion's mask is not ones then zeros: keep the plain forward
    groups: dict[bytes, list[int]] = {}
    prompt_ids, prompt_real = input_ids[:, :start].cpu(), real[:, :start].cpu()
    for r in range(rows):
        key = prompt_ids[r].numpy().tobytes() + prompt_real[r].numpy().tobytes()
        groups.setdefault(key, []).append(r)
    if all(len(g) == 1 for g in groups.values()):
        return None
    return _pack(input_ids, real, start, lengths.tolist(), list(groups.values()), attn_implementation)


def _pack(
    input_ids: torch.Tensor,
    real: torch.Tensor,
    start: int,
    lengths: list[int],
    groups: list[list[int]],
    attn_implementation: str,
) -> PackedBatch | None:
    rows, width = input_ids.shape
    device = input_ids.device
    ids_cpu, real_cpu = input_ids.cpu(), real.cpu()
    prompts = [real_cpu[members[0], :start].nonzero().squeeze(1) for members in groups]
    sizes = [len(p) + sum(lengths[r] for r in members) for p, members in zip(prompts, groups, strict=True)]
    n, length = len(groups), max(sizes)
    if device.type == "cpu":  # oneDNN's per-shape kernels (bucket_length)
        length = bucket_length(length)
    if n * length * length > MAX_MASK_ELEMENTS:  # a dense mask this large costs more than it saves
        return None
    ids = torch.zeros(n, length, dtype=torch.long)
    positions = torch.zeros(n, length, dtype=torch.long)
    segments = torch.full((n, length), -1, dtype=torch.long)  # -1: padding of the packing
    # the way back: TRL's (row, column) -> packed flat index; prompt columns read the group's copy
    gather = torch.full((rows, width), n * length, dtype=torch.long)  # n * length: a zero row
    for g, (members, prompt) in enumerate(zip(groups, prompts, strict=True)):
        k = len(prompt)
        ids[g, :k], positions[g, :k], segments[g, :k] = ids_cpu[members[0], prompt], prompt, 0
        gather[torch.tensor(members).unsqueeze(1), prompt.unsqueeze(0)] = g * length + torch.arange(k)
        at = k
        for j, r in enumerate(members, start=1):
            span = torch.arange(start, start + lengths[r])
            ids[g, at : at + len(span)], positions[g, at : at + len(span)] = ids_cpu[r, span], span
            segments[g, at : at + len(span)] = j
            gather[r, span] = g * length + at + torch.arange(len(span))
            at += len(span)
    order = torch.arange(length)
    seg_q, seg_k = segments.unsqueeze(2), segments.unsqueeze(1)
    # causal in packed order; a token sees the prompt (segment 0) and its own segment; the padding
    # of the packing comes last, so no real token sees it, and each padding query sees itself
    allowed = (order.view(1, 1, -1) <= order.view(1, -1, 1)) & ((seg_k == 0) | (seg_k == seg_q))
    allowed |= torch.eye(length, dtype=torch.bool).unsqueeze(0)
    mask = allowed.unsqueeze(1)
    if attn_implementation == "eager":  # eager attention adds the mask to the scores
        mask = additive_mask(mask)
    return PackedBatch(
        input_ids=ids.to(device),
        position_ids=positions.to(device),
        attention_mask=mask.to(device),
        gather=gather.to(device),
        computed=n * length,
    )


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask (True: attend) as the float32 mask eager attention adds to the
    scores: 0 where allowed, the float32 minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(torch.float32).min
    )


def small_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' ``eager_attention_forward`` without ``repeat_kv``'s copies: the query heads
    that share a key/value head are one batch of rows against it. ``attention_mask``: additive
    (float) or boolean (True: attend), ``[batch, 1, q, k]``. No dropout (the packed forward runs
    only without it). Returns ``([batch, q, heads, dim], None)`` as transformers' attention
    functions do."""
    if dropout:
        raise ValueError("small_attention_forward has no dropout")
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(query.reshape(batch, kv_heads, group * length, dim), key.transpose(2, 3))
    scores = scores.view(batch, kv_heads, group, length, keys) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = additive_mask(attention_mask)
        scores = scores + attention_mask[:, :, None, :, :keys]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.view(batch, kv_heads, group * length, keys), value)
    return out.view(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def _register_small_attention() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers before the attention interface: the model's own attention
        return False
    AttentionInterface.register(SMALL_ATTENTION, small_attention_forward)
    return True


def _checkpointing(backbone: torch.nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is on, under either of transformers' names."""
    if hasattr(type(backbone), "is_activation_checkpointing"):  # transformers >= 5.24
        return bool(backbone.is_activation_checkpointing)
    return bool(getattr(backbone, "is_gradient_checkpointing", False))


def _use_small_attention(backbone: torch.nn.Module, packed: PackedBatch) -> bool:
    config = getattr(backbone, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if packed.input_ids.device.type != "cpu" or _checkpointing(backbone):
        return False
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    length = packed.input_ids.shape[1]
    return 0 < heads * length * length <= SMALL_ATTENTION_ELEMENTS and _register_small_attention()


def shared_prefix_hidden(backbone: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """The backbone's last hidden states over the packed groups, in TRL's ``[rows, columns, H]``
    layout (zeros at the positions the plain forward computes on padding; no label reads them).
    Short groups on CPU under ``sdpa`` run :func:`small_attention_forward` (module doc)."""
    small = _use_small_attention(backbone, packed)
    config = getattr(backbone, "config", None)
    mask = packed.attention_mask
    if small:
        config._attn_implementation = SMALL_ATTENTION  # type: ignore[union-attr]
        if mask.dtype == torch.bool:  # additive once, not in every layer
            mask = additive_mask(mask)
    try:
        hidden = backbone(
            input_ids=packed.input_ids,
            attention_mask=mask,
            position_ids=packed.position_ids,
            use_cache=False,
        ).last_hidden_state
    finally:
        if small:
            config._attn_implementation = "sdpa"  # type: ignore[union-attr]
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])
    return flat[packed.gather]
