"""A KV cache that appends in place, and a decode attention that reads it without copies.

``transformers.DynamicCache`` appends each step's keys and values with ``torch.cat``, copying the
whole cache in every layer at every step (quadratic in the context). :class:`GrowingLayer` keeps
a buffer with spare capacity and writes new positions into it; the model sees a view of the
filled part, so masks and sequence lengths are exactly those of ``DynamicCache``. The buffer grows
by a quarter (at least :data:`GROW_MIN` positions, never past the ``max_len`` hint) when full, and
removing finished rows (``batch_select_indices``) copies only the filled part. Keys are stored
transposed: a bf16 batched matmul against a transposed slice of a ``[.., capacity, dim]`` buffer
makes a slow strided copy first (about 5x the matmul's time at 1.1K positions).

:func:`decode_attention` is registered with transformers as :data:`ATTENTION_NAME`. For one query
token it runs attention as two batched matmuls on the key/value heads (queries grouped per KV
head, so grouped-query models need no ``repeat_kv`` copy), in the cache's dtype, with the softmax
in float32; longer queries (prefill) go to transformers' SDPA path. When the forward is given
``cascade=<CascadeCache>``, one query token attends to its prompt's shared KV and its own generated
tokens separately (:mod:`manyways.backends.cascade`). The CPU flash-attention kernel
is slow at one query token, in bf16 most of all; see BENCHMARKS.md figure 3.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

logger = logging.getLogger(__name__)

ATTENTION_NAME = "manyways_decode"
GROW_MIN = 128


class GrowingLayer(DynamicLayer):
    """One layer's KV cache in preallocated buffers with spare capacity: keys stored transposed
    (``[rows, heads, dim, capacity]``, so ``query @ keys^T`` reads them with unit stride), values as
    ``[rows, heads, capacity, dim]``; ``keys``/``values`` are ``[rows, heads, length, dim]`` views of
    the filled positions."""

    def __init__(self, *, store_dtype: torch.dtype | None = None, max_len: int | None = None) -> None:
        super().__init__()
        self.store_dtype = store_dtype
        self.max_len = max_len
        self.length = 0
        self._kt: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record dtype and device; the buffers are allocated by the first ``update``."""
        self.dtype = self.store_dtype or key_states.dtype
        self.device = key_states.device
        self.is_initialized = True

    def _capacity(self) -> int:
        return 0 if self._v is None else self._v.shape[-2]

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        if needed <= self._capacity():
            return
        capacity = needed + max(GROW_MIN, needed // 4)
        if self.max_len is not None:
            capacity = max(needed, min(capacity, self.max_len))
        rows, heads, _, k_dim = key_states.shape
        new_kt = torch.empty((rows, heads, k_dim, capacity), dtype=self.dtype, device=self.device)
        new_v = torch.empty(
            (rows, heads, capacity, value_states.shape[-1]), dtype=self.dtype, device=self.device
        )
        if self.length:
            new_kt[..., : self.length].copy_(self.keys.transpose(-1, -2))
            new_v[:, :, : self.length].copy_(self.values)
        self._kt, self._v = new_kt, new_v

    def _expose(self) -> None:
        assert self._kt is not None and self._v is not None
        self.keys = self._kt[..., : self.length].transpose(-1, -2)
        self.values = self._v[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions after the filled ones; return views of everything filled."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(key_states, value_states, end)
        assert self._kt is not None and self._v is not None
        self._kt[..., self.length : end].copy_(key_states.transpose(-1, -2))
        self._v[:, :, self.length : end].copy_(value_states)
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Positions filled."""
        return self.length

    def _replace(self, keys_t: torch.Tensor, values: torch.Tensor) -> None:
        """Make ``keys_t``/``values`` (filled part only) the new, exactly-sized buffers."""
        self._kt, self._v = keys_t, values
        self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (filled part only)."""
        if self.length:
            keys_t = self.keys.transpose(-1, -2)
            self._replace(
                keys_t.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0)
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (filled part only; the next append regrows the buffer)."""
        if self.length:
            keys_t = self.keys.transpose(-1, -2)
            self._replace(keys_t.index_select(0, indices), self.values.index_select(0, indices))

    def crop(self, tokens_to_remove: int) -> None:
        """Not needed by the back-end; refused rather than half-supported."""
        raise NotImplementedError("GrowingLayer does not support crop")

    def reset(self) -> None:
        """Forget everything."""
        self._kt = self._v = None
        self.length = 0
        super().reset()


def make_cache(
    config: Any, *, store_dtype: torch.dtype | None = None, max_len: int | None = None
) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers are :class:`GrowingLayer`
    (other layer kinds, e.g. sliding-window, are kept as transformers builds them)."""
    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer(store_dtype=store_dtype, max_len=max_len) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache


def all_growing(config: Any) -> bool:
    """Whether every layer of :func:`make_cache`'s cache for ``config`` is a :class:`GrowingLayer`
    (what :func:`merge_left_padded` needs)."""
    return all(type(layer) is GrowingLayer for layer in make_cache(config).layers)


def merge_left_padded(parts: list[DynamicCache], config: Any) -> DynamicCache:
    """One cache holding the rows of ``parts`` (in order), each part's filled positions
    right-aligned to the longest part's length and zeros before them, so the rows decode together
    under left-padding masks. Every layer must be a :class:`GrowingLayer` (:func:`all_growing`)."""
    if not all(type(layer) is GrowingLayer for cache in parts for layer in cache.layers):
        raise TypeError("merge_left_padded needs GrowingLayer caches (see all_growing)")
    first = parts[0].layers
    merged = make_cache(config, store_dtype=first[0].store_dtype, max_len=first[0].max_len)
    for index, layer in enumerate(merged.layers):
        assert isinstance(layer, GrowingLayer)
        pieces = [cache.layers[index] for cache in parts]
        length = max(piece.length for piece in pieces)
        capacity = max(length, max(piece._capacity() for piece in pieces))
        template = pieces[0]
        assert template._kt is not None and template._v is not None
        rows = sum(piece.keys.shape[0] for piece in pieces)
        heads, k_dim = template._kt.shape[1], template._kt.shape[2]
        kt = template._kt.new_zeros((rows, heads, k_dim, capacity))
        v = template._v.new_zeros((rows, heads, capacity, template._v.shape[-1]))
        row = 0
        for piece in pieces:
            n, pad = piece.keys.shape[0], length - piece.length
            kt[row : row + n, ..., pad:length].copy_(piece.keys.transpose(-1, -2))
            v[row : row + n, :, pad:length].copy_(piece.values)
            row += n
        layer.lazy_initialization(template.keys, template.values)
        layer.length = length
        layer._replace(kt, v)
    return merged


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for ``query`` ``[rows, heads, q_len, dim]`` against the cache; returns
    ``[rows, q_len, heads, dim]`` in the query's dtype (transformers' attention-function contract)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    special = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
    from manyways.backends.cascade import cascade_attention, find_cascade

    found = None if special else find_cascade(kwargs, module)
    if found is not None:  # shared-prefix attention, decode or prefill (manyways.backends.cascade)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return cascade_attention(query, key, value, attention_mask, scale, *found).to(dtype), None
    if query.shape[2] != 1 or special:
        # prefill: SDPA, in float32 on CPU (its flash kernel is several times slower in bf16)
        work = torch.float32 if query.device.type == "cpu" else key.dtype
        # contiguous: on the cache's strided views SDPA falls back to its slow math kernel
        q, k, v = (t.to(work).contiguous() for t in (query, key, value))
        out, _ = sdpa_attention_forward(module, q, k, v, attention_mask, dropout, scaling, **kwargs)
        return out.to(dtype), None
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    q = query.to(key.dtype).reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [rows, kv_heads, group, length]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [rows, kv_heads, group, dim]
    return out.reshape(rows, 1, heads, value.shape[-1]).to(dtype), None


def register_decode_attention() -> str:
    """Register :func:`decode_attention` (with SDPA's boolean masks) under :data:`ATTENTION_NAME`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
