"""Attention for padding-free (packed) SFT batches: each sequence attends to itself only.

A padding-free batch (``midtrain.padding_free``, TRL's ``padding_free=True``) is one row holding
several conversations back to back, with ``position_ids`` restarting at 0 at each. transformers'
``sdpa`` attention then builds a block-diagonal causal mask over the whole row and runs one
attention over it: every query scores every key of the row, and on CPU the fused kernel with an
explicit mask has a slow backward. This attention (``manyways_packed``, registered with
transformers' ``AttentionInterface``) instead runs one causal attention per sequence, the query
heads that share a key/value head folded into one matrix product (no ``repeat_kv`` copies), the
softmax in fp32: the same result as the masked one (the masked-out scores are exactly 0 after the
softmax), at a fraction of the work for rows of many short sequences.

It takes that path only where it is exact and falls back to transformers' ``sdpa`` otherwise: one
row, no KV cache, ``dropout == 0``, no soft-capping, sliding window or position bias, queries and
keys of the same length, sequences of at most ``MAX_SEQUENCE`` positions, and a mask that is
exactly the block-diagonal causal mask of the row's ``position_ids`` (checked: a padding,
sliding-window or custom mask falls back). Reading the lengths from ``position_ids`` is a host
sync per layer on a GPU: ``auto`` uses it on CPU only.

Config: ``midtrain.packed_attention`` = ``auto`` (default: on CPU when ``midtrain.padding_free``),
``true`` (any device, padding-free) or ``false``; the stage calls :func:`use_packed_attention` on the
model it trains. The name is not written into a saved model's ``config.json``: a saved model loads
with transformers' default attention.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

NAME = "manyways_packed"
FALLBACK = "sdpa"
MAX_SEQUENCE = 1024  # longer sequences: sdpa's fused kernel (the scores here are [n, n] in fp32)
_STATS = {"packed": 0, "fallback": 0}


def stats() -> dict[str, int]:
    """Attention calls so far that took the per-sequence path / fell back to ``sdpa``."""
    return dict(_STATS)


def segment_lengths(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """Lengths of the sequences packed in a one-row batch (``position_ids`` ``[1, T]`` restarting
    at 0 and counting up by 1), or None when the ids do not describe such a packing."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape != (1, length):
        return None
    ids = position_ids[0]
    if length == 0 or int(ids[0]) != 0:
        return None
    steps = ids[1:] - ids[:-1]
    starts = (ids[1:] == 0).nonzero().flatten() + 1
    if not bool(((steps == 1) | (ids[1:] == 0)).all()):
        return None
    bounds = [0, *starts.tolist(), length]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


@functools.lru_cache(maxsize=4)
def block_causal_mask(lengths: tuple[int, ...], device: Any = None) -> torch.Tensor:
    """``[T, T]`` bool: position i may attend to j when both are in one sequence and j <= i
    (cached: every layer of a forward checks the same mask)."""
    seq = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )
    pos = torch.arange(seq.numel(), device=device)
    return (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])


def _mask_matches(mask: torch.Tensor | None, lengths: list[int]) -> bool:
    if mask is None:
        return len(lengths) == 1  # plain causal attention over one sequence
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[1] != 1:
        return False
    return torch.equal(mask[0, 0], block_causal_mask(tuple(lengths), mask.device))


@functools.lru_cache(maxsize=4)
def _above_diagonal(device: Any) -> torch.Tensor:
    """``[MAX_SEQUENCE, MAX_SEQUENCE]`` bool, True above the diagonal: its top-left ``n x n`` block
    is the future of a sequence of ``n`` (one cached tensor of 1 MiB per device)."""
    return torch.ones(MAX_SEQUENCE, MAX_SEQUENCE, dtype=torch.bool, device=device).triu(1)


def _per_sequence(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int], scaling: float
) -> torch.Tensor:
    """``[1, T, H, D]`` attention output, one causal attention per sequence."""
    _, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    outs = []
    start = 0
    for n in lengths:
        end = start + n
        # query heads kv*group .. kv*group+group-1 share key/value head kv (repeat_kv's order)
        q = query[0, :, start:end].reshape(kv_heads, group * n, dim).float()
        k, v = key[0, :, start:end].float(), value[0, :, start:end].float()
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scaling)  # [kv, group*n, n]
        future = _above_diagonal(query.device)[:n, :n]
        scores.view(kv_heads, group, n, n).masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        outs.append(torch.bmm(probs, v).to(value.dtype).reshape(heads, n, dim))
        start = end
    return torch.cat(outs, dim=1).transpose(0, 1).unsqueeze(0)


def packed_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function (see the module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = None
    plain = (
        dropout == 0.0
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and query.shape[1] % key.shape[1] == 0
        and kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
        and kwargs.get("position_bias") is None
        and kwargs.get("cache") is None
        and kwargs.get("past_key_values") is None
        and getattr(module, "is_causal", True)
    )
    if plain:
        lengths = segment_lengths(kwargs.get("position_ids"), query.shape[2])
    if lengths is None or max(lengths) > MAX_SEQUENCE or not _mask_matches(attention_mask, lengths):
        _STATS["fallback"] += 1
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _STATS["packed"] += 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    with torch.autocast(query.device.type, enabled=False):  # fp32 scores and softmax, as sdpa's kernels
        return _per_sequence(query, key, value, lengths, scale), None


def register() -> None:
    """Register ``manyways_packed`` (and ``sdpa``'s mask builder under that name) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_packed_attention(model: Any) -> bool:
    """Switch ``model`` from ``sdpa`` to the per-sequence attention; False (unchanged) for any
    other attention implementation."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != FALLBACK:
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
