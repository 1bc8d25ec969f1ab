"""Shared-prefix (cascade) attention: one copy of a shared prefix's KV for all the rows reading it.

The k samples of one prompt share the prompt's keys and values; the prompts of a judge's batch
share the heuristic menu in front of each trace (:func:`shared_cascade`: one prefix for every
row, each row's prompt remainder prefilled into its own suffix, on top of the prefix). :func:`to_cascade` turns a
prefilled cache (one row per prompt, :class:`~manyways.backends.kv_cache.GrowingLayer` layers)
into a :class:`CascadeCache`: each layer keeps the prompts' KV once (the *prefix*, ``[prompts,
kv_heads, ...]``) and a per-sample buffer for the generated tokens (the *suffix*, ``[rows, ...]``).
The model sees the suffix as its cache; its sequence length (and so the attention mask the model
builds) counts prefix + suffix, so positions and masks are those of the replicated cache.

:func:`cascade_attention` (called by :func:`~manyways.backends.kv_cache.decode_attention` when the
forward gets ``cascade=<the cache>``) computes attention in two parts and merges them with the
log-sum-exp rule (the idea of Hydragen and FlashInfer's cascade attention); a decode step (one
query token) joins the two parts' scores under one softmax instead (:func:`_decode_step`), on the
CPU in one call of a fused C kernel (:mod:`manyways.backends.cascade_kernel`; torch ops where it
cannot run):

- prefix part: the queries of all rows of one prompt are stacked (``[prompts, kv_heads, rows of
  the prompt * group, dim]``) and multiplied with that prompt's keys once, so a decode step reads
  the prompt's KV once instead of once per sample;
- suffix part: each row against its own generated tokens, as in the replicated path;
- merge: with ``o_i``, ``lse_i`` the normalised output and log-sum-exp of part i,
  ``out = (exp(lse_1 - M) o_1 + exp(lse_2 - M) o_2) / (exp(lse_1 - M) + exp(lse_2 - M))``,
  ``M = max(lse_1, lse_2)``, which equals softmax attention over the concatenation.

Numerics: the result is the same function as the replicated path's attention, but not the same
floating-point operations (two softmax sums and two value matmuls instead of one, then the merge),
so it is equal to rounding: in float32 within ~1e-6 relative, in bfloat16 within about two bf16
ulps of the attention output (each part's value matmul rounds to bf16 once, the merge is done in
float32). Sampled tokens are identical wherever the two largest probabilities (greedy) or the
cumulative sum at the drawn uniform (sampling) are not within that rounding of a tie. Tested in
``tests/test_cascade.py`` on the tiny model: float32 greedy equals ``model.generate`` and seeded
samples equal the replicated path's; in bfloat16 the random-weight model meets exact bf16 logit
ties within a few greedy steps, and the tokens differ only there (logits within 4 bf16 ulps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from manyways.backends.kv_cache import GrowingLayer


@dataclass(frozen=True)
class RowGroups:
    """Which prompt each decode row reads, and the rows of each prompt as a padded slot table."""

    prompt_of_row: torch.Tensor  # [rows] long
    slots: torch.Tensor  # [prompts, width] row index of each (prompt, slot); padding repeats a row
    slot_of_row: torch.Tensor  # [rows] flat index prompt * width + slot
    ordered: bool = False  # rows are prompt-major, every prompt has ``width`` rows: slots are 0..rows-1

    @classmethod
    def of(cls, prompt_of_row: list[int], prompts: int, device: torch.device | str) -> RowGroups:
        """The groups for rows reading prompts ``prompt_of_row`` (each in ``range(prompts)``, every
        prompt read by at least one row)."""
        members: list[list[int]] = [[] for _ in range(prompts)]
        if any(not 0 <= prompt < prompts for prompt in prompt_of_row):
            raise ValueError(f"a row reads a prompt outside range({prompts})")
        for row, prompt in enumerate(prompt_of_row):
            members[prompt].append(row)
        if any(not m for m in members):
            raise ValueError("every prompt of a cascade cache needs at least one row")
        width = max(len(m) for m in members)
        slots = [m + [m[0]] * (width - len(m)) for m in members]
        slot_of_row = [0] * len(prompt_of_row)
        for prompt, rows in enumerate(members):
            for slot, row in enumerate(rows):
                slot_of_row[row] = prompt * width + slot
        flat = [row for members in slots for row in members]
        return cls(
            torch.tensor(prompt_of_row, dtype=torch.long, device=device),
            torch.tensor(slots, dtype=torch.long, device=device),
            torch.tensor(slot_of_row, dtype=torch.long, device=device),
            ordered=flat == list(range(len(prompt_of_row))),
        )


class CascadeLayer(GrowingLayer):
    """A :class:`GrowingLayer` holding each row's generated tokens (the suffix), plus the prompts'
    keys (``prefix_kt``: ``[prompts, kv_heads, dim, prefix_len]``) and values (``prefix_v``:
    ``[prompts, kv_heads, prefix_len, dim]``) stored once."""

    def __init__(
        self,
        prefix_kt: torch.Tensor,
        prefix_v: torch.Tensor,
        *,
        store_dtype: torch.dtype,
        max_len: int | None,
    ) -> None:
        super().__init__(store_dtype=store_dtype, max_len=max_len)
        self.prefix_kt, self.prefix_v = prefix_kt, prefix_v  # read only: may be shared (PrefixStore)
        self.prefix_len = prefix_v.shape[-2]
        self.dtype, self.device, self.is_initialized = store_dtype, prefix_v.device, True
        self.unread = False  # an update whose attention has not run cascade_attention yet

    @classmethod
    def of(cls, prefix: GrowingLayer, *, max_len: int | None) -> CascadeLayer:
        """The cascade layer over the filled positions of a prefilled ``prefix`` layer."""
        assert prefix.keys is not None and prefix.values is not None
        kt, v = prefix.keys.transpose(-1, -2).contiguous(), prefix.values.contiguous()
        return cls(kt, v, store_dtype=prefix.dtype, max_len=max_len)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append to the suffix. Refuses when the previous step's attention did not go through
        :func:`cascade_attention` (a model that does not pass the forward's keyword arguments on to
        its attention would otherwise attend to the generated tokens only)."""
        if self.unread:
            raise RuntimeError(
                "this model's attention did not receive cascade=<CascadeCache>; "
                "decode it with cascade attention off (BackendConfig.cascade_attention: false)"
            )
        self.unread = True
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        """Prefix plus generated positions (what the model's positions and masks count)."""
        return self.prefix_len + self.length

    def select_prompts(self, indices: torch.Tensor) -> None:
        """Keep only the prompts ``indices`` of the prefix."""
        self.prefix_kt = self.prefix_kt.index_select(0, indices)
        self.prefix_v = self.prefix_v.index_select(0, indices)

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        if self._v is not None and self._v.shape[0] != key_states.shape[0]:
            raise ValueError("cascade suffix rows changed outside batch_select_indices")
        super()._reserve(key_states, value_states, needed)


class CascadeCache(DynamicCache):
    """A cache of :class:`CascadeLayer` (every layer) with the row -> prompt map they share and the
    prompts' padding mask (``prefix_mask``: ``[prompts, prefix_len]`` bool, True = attend)."""

    def __init__(self, layers: list[CascadeLayer], prefix_mask: torch.Tensor, prompt_of_row: list[int]):
        super().__init__()
        self.layers = list(layers)
        self.prefix_mask = prefix_mask.bool()
        self.prefix_padded = not bool(self.prefix_mask.all())  # some prompt's prefix is left-padded
        self.groups = RowGroups.of(prompt_of_row, prefix_mask.shape[0], prefix_mask.device)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Not needed by the back-end; refused rather than half-supported."""
        raise NotImplementedError("CascadeCache rows are set by to_cascade")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices``; prompts no row reads any more are dropped from the prefix."""
        prompt_of_row = self.groups.prompt_of_row.index_select(0, indices).tolist()
        used = sorted(set(prompt_of_row))
        if len(used) < self.prefix_mask.shape[0]:
            keep = torch.tensor(used, dtype=torch.long, device=self.prefix_mask.device)
            for layer in self.layers:
                layer.select_prompts(keep)
            self.prefix_mask = self.prefix_mask.index_select(0, keep)
            self.prefix_padded = not bool(self.prefix_mask.all())
            renumber = {p: i for i, p in enumerate(used)}
            prompt_of_row = [renumber[p] for p in prompt_of_row]
        self.groups = RowGroups.of(prompt_of_row, len(used), self.prefix_mask.device)
        for layer in self.layers:
            layer.batch_select_indices(indices)


def to_cascade(
    cache: DynamicCache, prefix_mask: torch.Tensor, prompt_of_row: list[int], max_new_tokens: int
) -> CascadeCache:
    """The cascade form of a prefilled ``cache`` (one row per prompt, every layer a
    :class:`GrowingLayer`; see :func:`~manyways.backends.kv_cache.all_growing`) for rows reading
    prompts ``prompt_of_row``; ``prefix_mask`` is the prefill's attention mask (0 = padding)."""
    if not all(type(layer) is GrowingLayer for layer in cache.layers):
        raise TypeError("to_cascade needs GrowingLayer caches (see kv_cache.all_growing)")
    layers = [CascadeLayer.of(layer, max_len=max_new_tokens) for layer in cache.layers]
    return CascadeCache(layers, prefix_mask, prompt_of_row)


def shared_cascade(prefix: list[tuple[torch.Tensor, torch.Tensor]], rows: int, max_len: int) -> CascadeCache:
    """A cascade cache in which ``rows`` rows share one prefix (``prefix``: per layer, keys^T
    ``[1, kv_heads, dim, P]`` and values ``[1, kv_heads, P, dim]``, never written to) and each
    row's own positions (its prompt's remainder, then its generated tokens: up to ``max_len``)
    go to its suffix."""
    layers = [CascadeLayer(kt, v, store_dtype=v.dtype, max_len=max_len) for kt, v in prefix]
    mask = torch.ones((1, prefix[0][1].shape[-2]), dtype=torch.bool, device=prefix[0][1].device)
    return CascadeCache(layers, mask, [0] * rows)


def row_slices(cache: CascadeCache, width: int, spans: list[tuple[int, int, int]]) -> list[CascadeCache]:
    """Caches that prefill parts of one shared-prefix ``cache`` in place: for each ``(first, stop,
    chunk_width)``, rows ``first:stop`` write their ``chunk_width`` positions at the right end of
    the first ``width`` suffix positions of ``cache`` (views of its buffers, which are allocated
    here, zeroed: the positions left of a chunk are padding, masked, never NaN). Prefill each, then
    :func:`finish_row_slices`. Only for caches with one prefix (:func:`shared_cascade`)."""
    if cache.prefix_mask.shape[0] != 1:
        raise ValueError("row_slices needs a cache whose rows share one prefix")
    rows = cache.groups.prompt_of_row.shape[0]
    for layer in cache.layers:
        assert isinstance(layer, CascadeLayer)
        capacity = max(width, layer.max_len or width)
        kv_heads, dim = layer.prefix_v.shape[1], layer.prefix_v.shape[-1]
        layer._kt = torch.zeros((rows, kv_heads, dim, capacity), dtype=layer.dtype, device=layer.device)
        layer._v = torch.zeros((rows, kv_heads, capacity, dim), dtype=layer.dtype, device=layer.device)
    parts = []
    for first, stop, chunk_width in spans:
        layers = []
        for layer in cache.layers:
            assert isinstance(layer, CascadeLayer) and layer._kt is not None and layer._v is not None
            view = CascadeLayer(layer.prefix_kt, layer.prefix_v, store_dtype=layer.dtype, max_len=None)
            offset = width - chunk_width
            view._kt = layer._kt[first:stop, ..., offset:]
            view._v = layer._v[first:stop, :, offset:]
            layers.append(view)
        parts.append(CascadeCache(layers, cache.prefix_mask, [0] * (stop - first)))
    return parts


def finish_row_slices(cache: CascadeCache, width: int) -> None:
    """Mark the first ``width`` suffix positions of every row of ``cache`` filled (after its
    :func:`row_slices` were prefilled), ready to decode."""
    for layer in cache.layers:
        assert isinstance(layer, CascadeLayer)
        layer.length = width
        layer.unread = False
        layer._expose()


def _part(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of float32 ``scores`` over ``values``: (output in the values' dtype,
    log-sum-exp of the scores in float32). A query whose scores are all masked (a left-padding
    position of a prefill) gets output 0 and log-sum-exp -inf, so the merge gives it the other
    part alone instead of NaN."""
    peak = scores.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(scores - peak)
    total = weights.sum(dim=-1, keepdim=True)  # >= 1 unless every score is masked (then 0)
    out = torch.matmul((weights / total.clamp(min=1.0)).to(values.dtype), values)
    return out, (peak + torch.log(total)).squeeze(-1)


def cascade_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    layer: CascadeLayer,
    cache: CascadeCache,
    *,
    fused: bool | None = None,
) -> torch.Tensor:
    """Attention of each row's queries (``query``: ``[rows, heads, q_len, dim]``; one token when
    decoding, a prompt's remainder when prefilling on top of a shared prefix) over its prompt's
    prefix and its own suffix (``key``/``value``: ``[rows, kv_heads, suffix, dim]``, the new tokens
    included). ``attention_mask`` covers prefix + suffix (``[rows, 1, q_len, prefix + suffix]``,
    boolean or additive) or is None (then the suffix part is causal). Returns ``[rows, q_len, heads,
    dim]`` in the values' dtype (transformers' attention-function layout). A prefill (``q_len`` >
    1) uses torch's fused CPU flash kernel on the CPU and the matmul form elsewhere (``fused``
    overrides: the tests run both on the CPU)."""
    layer.unread = False
    rows, heads, q_len, dim = query.shape
    kv_heads, prompts, suffix = key.shape[1], layer.prefix_kt.shape[0], key.shape[2]
    group = heads // kv_heads
    if q_len == 1:
        return _decode_step(query, key, value, attention_mask, scale, layer, cache)
    span = group * q_len  # the query rows of one KV head: (query head in group, position)
    flash = query.device.type == "cpu" if fused is None else fused  # the fused kernel: _flash_part
    work = torch.float32 if flash else key.dtype
    q = query.to(work).reshape(rows, kv_heads, span, dim)
    groups = cache.groups
    width = groups.slots.shape[1]
    # prefix: the rows of one prompt stacked as extra query positions of that prompt
    qp = q.index_select(0, groups.slots.reshape(-1)).reshape(prompts, width, kv_heads, span, dim)
    qp = qp.transpose(1, 2).reshape(prompts, kv_heads, width * span, dim)
    if flash:
        keep = cache.prefix_mask[:, None, None, :] if cache.prefix_padded else None
        o1, lse1 = _flash_part(qp, layer.prefix_kt.transpose(-1, -2), layer.prefix_v, keep, scale)
    else:
        s1 = torch.matmul(qp, layer.prefix_kt).float() * scale  # [prompts, kv_heads, width*span, prefix]
        s1 = s1.masked_fill(~cache.prefix_mask[:, None, None, :], float("-inf"))
        o1, lse1 = _part(s1, layer.prefix_v)
    o1 = o1.reshape(prompts, kv_heads, width, span, dim).transpose(1, 2).reshape(-1, kv_heads, span, dim)
    lse1 = lse1.reshape(prompts, kv_heads, width, span).transpose(1, 2).reshape(-1, kv_heads, span)
    o1, lse1 = o1.index_select(0, groups.slot_of_row), lse1.index_select(0, groups.slot_of_row)
    # suffix: each row against its own tokens (a prompt's remainder and/or generated tokens)
    visible = _suffix_visibility(attention_mask, layer.prefix_len, q_len, suffix, q.device)
    if flash:  # visible as [rows, 1, span, suffix]: the group's heads are stacked as positions
        keep = None if visible is None else visible.repeat(1, 1, group, 1)
        o2, lse2 = _flash_part(q, key, value, keep, scale)
    else:
        s2 = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [rows, kv_heads, span, suffix]
        if visible is not None:
            s2 = s2.reshape(rows, kv_heads, group, q_len, suffix).masked_fill(
                ~visible[:, :, None], float("-inf")
            )
        o2, lse2 = _part(s2.reshape(rows, kv_heads, span, suffix), value)
    peak = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - peak)[..., None], torch.exp(lse2 - peak)[..., None]
    out = ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(value.dtype)
    return out.reshape(rows, kv_heads, group, q_len, -1).reshape(rows, heads, q_len, -1).transpose(1, 2)


def _decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    layer: CascadeLayer,
    cache: CascadeCache,
) -> torch.Tensor:
    """:func:`cascade_attention` for one query token per row, in as few operations as the math
    allows (a decode step calls it once per layer; each small op costs ~10 us on a CPU): the prefix
    part's scores (each prompt's KV read once, for all its rows) and the suffix part's are joined
    per row and go through one softmax, whose two slices weigh each part's values, so no
    log-sum-exp merge is needed; no row gather when the rows are prompt-major with equal counts
    (``RowGroups.ordered``). Every row sees at least one prefix position and its own newest token,
    so no part is empty."""
    rows, heads, _, dim = query.shape
    kv_heads, prompts = key.shape[1], layer.prefix_kt.shape[0]
    group = heads // kv_heads
    q = query.to(key.dtype).reshape(rows, kv_heads, group, dim)
    fused = _fused_decode_step(q, key, value, attention_mask, scale, layer, cache)
    if fused is not None:
        return fused.reshape(rows, 1, heads, dim)
    groups = cache.groups
    width = groups.slots.shape[1]
    qp = q if groups.ordered else q.index_select(0, groups.slots.reshape(-1))
    qp = qp.reshape(prompts, width, kv_heads, group, dim).transpose(1, 2)
    qp = qp.reshape(prompts, kv_heads, width * group, dim)
    s1 = torch.matmul(qp, layer.prefix_kt).float() * scale  # [prompts, kv_heads, width*group, prefix]
    if cache.prefix_padded:
        s1 = s1.masked_fill(~cache.prefix_mask[:, None, None, :], float("-inf"))
    prefix = s1.shape[-1]
    s1 = (
        s1.reshape(prompts, kv_heads, width, group, prefix)
        .transpose(1, 2)
        .reshape(-1, kv_heads, group, prefix)
    )
    if not groups.ordered:
        s1 = s1.index_select(0, groups.slot_of_row)
    s2 = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [rows, kv_heads, group, suffix]
    if attention_mask is not None:
        part = attention_mask[..., layer.prefix_len :]  # [rows, 1, 1, suffix]
        s2 = s2.masked_fill(~part, float("-inf")) if part.dtype == torch.bool else s2 + part.float()
    probs = torch.softmax(torch.cat([s1, s2], dim=-1), dim=-1)
    p1, p2 = probs[..., :prefix].to(layer.prefix_v.dtype), probs[..., prefix:].to(value.dtype)
    if not groups.ordered:
        p1 = p1.index_select(0, groups.slots.reshape(-1))
    p1 = p1.reshape(prompts, width, kv_heads, group, prefix).transpose(1, 2)
    o1 = torch.matmul(p1.reshape(prompts, kv_heads, width * group, prefix), layer.prefix_v)
    o1 = o1.reshape(prompts, kv_heads, width, group, dim).transpose(1, 2).reshape(-1, kv_heads, group, dim)
    if not groups.ordered:
        o1 = o1.index_select(0, groups.slot_of_row)
    out = o1.float() + torch.matmul(p2, value).float()
    return out.to(value.dtype).reshape(rows, 1, heads, dim)


def _fused_decode_step(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    layer: CascadeLayer,
    cache: CascadeCache,
) -> torch.Tensor | None:
    """:func:`_decode_step` through the fused CPU kernel (:mod:`manyways.backends.cascade_kernel`),
    ``[rows, kv_heads, group, dim]``; None when the kernel is off or unavailable, or the inputs are
    not its kind (a GPU, another dtype, more than one torch thread, an additive mask)."""
    from manyways.backends import cascade_kernel

    keys_t = key.transpose(-1, -2)
    if not cascade_kernel.usable(q, keys_t, value, layer.prefix_kt, layer.prefix_v):
        return None
    suffix_mask = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
            return None
        suffix_mask = attention_mask[:, 0, 0, layer.prefix_len :]  # [rows or 1, suffix]
    lib = cascade_kernel.library()  # None when switched off or not buildable
    if lib is None:
        return None
    prefix_mask = cache.prefix_mask if cache.prefix_padded else None
    return cascade_kernel.cascade_decode(
        lib, q, cache.groups.prompt_of_row, layer.prefix_kt, layer.prefix_v, prefix_mask,
        keys_t, value, suffix_mask, scale,
    )  # fmt: skip


def _suffix_visibility(
    attention_mask: torch.Tensor | None, prefix_len: int, q_len: int, suffix: int, device: torch.device
) -> torch.Tensor | None:
    """Which suffix positions each query sees, ``[rows or 1, 1, q_len, suffix]`` bool (None: all):
    the attention mask's suffix part, or causal when there is no mask and more than one query."""
    if attention_mask is not None:
        part = attention_mask[..., prefix_len:]
        return part if part.dtype == torch.bool else part > float("-inf")
    if q_len == 1:
        return None
    return torch.ones((q_len, suffix), dtype=torch.bool, device=device).tril(suffix - q_len)[None, None]


def _flash_part(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp through torch's fused CPU flash-attention kernel
    (float32; a prefill's many queries would otherwise materialise a [queries, keys] score matrix
    per layer); ``visible`` (bool, broadcastable to the scores) masks keys. A query that sees no key
    gets output 0 and log-sum-exp -inf (the kernel reports 0 for it)."""
    mask = None
    if visible is not None:
        mask = torch.zeros(visible.shape, dtype=torch.float32, device=query.device)
        mask = mask.masked_fill(~visible, float("-inf"))
    q, k, v = (t.to(torch.float32).contiguous() for t in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale
    )
    if visible is not None:
        seen = visible.any(dim=-1).expand(lse.shape)
        lse = lse.masked_fill(~seen, float("-inf"))
        out = out.masked_fill(~seen[..., None], 0.0)
    return out, lse


def find_cascade(kwargs: dict[str, Any], module: Any) -> tuple[CascadeLayer, CascadeCache] | None:
    """The cascade layer of ``module`` when the forward was given ``cascade=<CascadeCache>``."""
    cache = kwargs.get("cascade")
    if not isinstance(cache, CascadeCache):
        return None
    return cache.layers[module.layer_idx], cache
