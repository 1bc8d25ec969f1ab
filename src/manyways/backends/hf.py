"""The transformers back-end: a custom decode loop that prefills shared prompt prefixes once.

For each batch (planned by :func:`manyways.backends.sampling.plan_batches`, filled up to its row
budget): for each group of its prompts that share a prefix (a heuristic's few-shot exemplars;
:func:`~manyways.backends.sampling.prefix_groups`) the prefix is prefilled once and each prompt's
remainder once on top of it (left-padded after the prefix, with explicit position ids); the
groups' caches are merged, left-padded to one length; then all sample rows decode together, each
prompt's KV kept once for all its samples (:mod:`manyways.backends.cascade`; with
``cascade=False``, or one sample per prompt, the cache is expanded to one row per sample);
finished rows leave the batch. A batch of one-sample prompts that declare the same shared prefix
(``GenRequest.shared_prefix``: the judge's menu) takes another path: the prefix's KV comes from
the process-wide :mod:`~manyways.backends.prefix_store` (prefilled once per model and process),
each prompt's remainder is prefilled into its own row on top of it and decoded there, all rows
reading the one copy of the prefix (cascade attention, prefill and decode;
:mod:`manyways.backends.hf_prefix`). Every sample draws from its own ``torch.Generator`` seeded with its
seed, so it does not depend on its batch-mates except through floating-point effects of padding
and batch shape (bit-identical in our fp32 CPU tests; in bf16 or on GPU a near-tie can
occasionally resolve differently). ``stats.prefill_tokens_computed`` counts
every position run through the model in a prefill, padding included.

Decoding uses :mod:`manyways.backends.kv_cache`: a KV cache written in place (no per-step copy of
the cache) and, while :meth:`HFBackend.generate` runs, the model's attention switched to
``decode_attention`` (matmul attention on the KV heads at one query token, softmax in float32);
the model's own attention setting is restored afterwards. ``kv_dtype`` (default: the model's
dtype) is the dtype the cache is stored and attention computed in.

A request with ``json_schema`` is decoded under grammar token masks (llguidance,
:mod:`manyways.backends.constrained`): its answer is a valid instance of the schema.

Next-token queries without sampling (the score stage's judge): :mod:`manyways.backends.hf_next_token`.

CPU: ``BackendConfig(kind="hf", threads=1)``; dtype auto is the faster of bf16 and fp32 for
generation at the model's shapes, measured once per machine (:mod:`manyways.dtype_auto`). In bf16
the linear layers' weights are packed once for oneDNN (:mod:`manyways.backends.packed_linear`,
``packed_linear``): the same outputs, without a weight reorder in every call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from manyways.backends import packed_linear as packed_linear_layers
from manyways.backends.cascade import CascadeCache, to_cascade
from manyways.backends.config import BackendConfig, resolve_dtype
from manyways.backends.hf_next_token import NextTokenMixin
from manyways.backends.hf_prefix import PREFILL_ROWS, DeclaredPrefixMixin
from manyways.backends.kv_cache import (
    all_growing,
    make_cache,
    merge_left_padded,
    register_decode_attention,
)
from manyways.backends.protocol import (
    BackendStats,
    GenRequest,
    GenSample,
    ProgressCallback,
    check_request,
    truncate_at_stop,
)
from manyways.backends.sampling import (
    plan_batches,
    prefix_groups,
    select_tokens,
    shared_prefix_len,
)

logger = logging.getLogger(__name__)

# Replicated prompt positions below which shared-prefix decode costs more than it saves: each step
# it adds ~0.2 ms of small ops per layer (measured on a 2-core AMD EPYC, SmolLM2-135M, fp32), the
# time to read ~2K positions' KV of one layer (1.5 KB each) at ~10 GB/s. Figure 3's short prompt (8
# samples x 143 tokens: 1K saved) decodes faster replicated, its 1.1K prompt (7.8K) and the demo's
# generate batch (20 prompts x 4 samples x ~220 tokens: 13K) with the cascade.
CASCADE_MIN_SAVED = 2048


@dataclass
class _Row:
    """One sample being decoded."""

    request: GenRequest
    generator: torch.Generator
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    stopped_by_string: bool = False
    matcher: Any = None  # grammar matcher when the request has a json_schema


@dataclass
class PlannedUnit:
    """A request, or a chunk of its seeds when it asks for more samples than a batch holds."""

    request_index: int
    request: GenRequest
    seeds: tuple[int, ...]
    tokens: list[int]
    declared: int = 0  # tokens of the request's declared shared prefix (GenRequest.shared_prefix)


def cache_keyword(model: Any) -> str:
    """The forward keyword for the KV cache: ``cache`` since transformers 5.24 (where
    ``past_key_values`` is deprecated), ``past_key_values`` before."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class HFBackend(DeclaredPrefixMixin, NextTokenMixin):
    """Generation with a transformers causal LM on CPU or GPU."""

    name = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        batch_size: int = 32,
        prefix_sharing: bool = True,
        kv_dtype: torch.dtype | None = None,
        decode_attention: bool = True,
        cascade: bool = True,
        packed_linear: bool = True,
    ) -> None:
        self.model = model.eval()
        # bf16 CPU linears with their weights packed once for oneDNN (manyways.backends.packed_linear)
        self.packed_linears = packed_linear_layers.install(model) if packed_linear else 0
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.batch_size = batch_size
        self.prefix_sharing = prefix_sharing
        self.device = next(model.parameters()).device
        self.kv_dtype = kv_dtype or next(model.parameters()).dtype
        self.decode_attention = decode_attention
        self.cascade = cascade  # shared-prefix decode attention (manyways.backends.cascade)
        self.prefill_rows = PREFILL_ROWS  # remainders prefilled together on a declared prefix
        self.cascade_min_saved = CASCADE_MIN_SAVED  # see _use_cascade
        self._store_dtype: torch.dtype | None = None  # kv_dtype while decode_attention is on
        self.stats = BackendStats()
        self.eos_ids = self._eos_ids()
        self._cache_kwarg = cache_keyword(model)
        self._mergeable = all_growing(model.config)  # prefix groups' caches can share one batch
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids))
        self._declared_tokens: dict[str, list[int]] = {}  # rendered head -> its tokens
        self._weights_key: str | None = None  # weights_fingerprint, computed on first use

    @classmethod
    def from_config(cls, cfg: BackendConfig, model_id: str) -> HFBackend:
        """Load ``model_id`` as ``cfg`` says (device, dtype, threads)."""
        from manyways.models import load_model_and_tokenizer

        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            torch.set_num_threads(cfg.threads)
        dtype = resolve_dtype(cfg.dtype, device, model=model_id)
        logger.info("loading %s on %s as %s (%d threads)", model_id, device, dtype, torch.get_num_threads())
        model, tokenizer = load_model_and_tokenizer(model_id, dtype=dtype, device=device)
        return cls(
            model,
            tokenizer,
            model_id=model_id,
            batch_size=cfg.batch_size,
            prefix_sharing=cfg.prefix_sharing,
            cascade=cfg.cascade_attention,
            packed_linear=cfg.packed_linear,
        )

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if value is not None:
                ids.update(value if isinstance(value, list) else [value])
        return {int(i) for i in ids}

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` under the chat template, ready for the assistant's turn."""
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ----------------------------------------------------------------- generate
    def generate(
        self, requests: Sequence[GenRequest], progress: ProgressCallback | None = None
    ) -> list[list[GenSample]]:
        """Samples per request in seed order; see the module docstring."""
        results: list[list[GenSample]] = [[] for _ in requests]
        for unit, samples in self._decode_planned(self.plan(requests), progress):
            results[unit.request_index].extend(samples)
        return results

    def plan(self, requests: Sequence[GenRequest]) -> list[list[PlannedUnit]]:
        """The batches :meth:`generate` decodes, in order: each a list of units (a request, or a
        ``batch_size`` slice of its seeds; ``unit.request_index`` is its place in ``requests``)."""
        units: list[PlannedUnit] = []
        for index, request in enumerate(requests):
            check_request(request)
            tokens = self.encode(request.messages)
            declared = self._declared_len(request, tokens)
            for start in range(0, request.n, self.batch_size):
                seeds = request.seeds[start : start + self.batch_size]
                units.append(PlannedUnit(index, request, seeds, tokens, declared))
        return self.plan_units(units)

    def plan_units(self, units: list[PlannedUnit]) -> list[list[PlannedUnit]]:
        """``units`` in batches of at most ``batch_size`` sample rows, as
        :func:`~manyways.backends.sampling.plan_batches` groups them (shared prefixes together)."""
        batches = plan_batches([u.tokens for u in units], [len(u.seeds) for u in units], self.batch_size)
        return [[units[i] for i in batch] for batch in batches]

    def _decode_planned(
        self, batches: list[list[PlannedUnit]], progress: ProgressCallback | None
    ) -> Iterator[tuple[PlannedUnit, list[GenSample]]]:
        """Each unit of ``batches`` with its samples, batch by batch (inference mode, and the
        back-end's attention while it runs)."""
        with torch.inference_mode(), self._attention():
            for chosen in batches:
                yield from zip(chosen, self._generate_batch(chosen, progress), strict=True)

    @contextmanager
    def _attention(self) -> Iterator[None]:
        """Run the model with ``decode_attention`` (when enabled and the model uses SDPA or eager
        attention), restoring its own attention setting afterwards."""
        config = self.model.config
        before = getattr(config, "_attn_implementation", None)
        if not self.decode_attention or before not in ("sdpa", "eager"):
            yield
            return
        self.model.set_attn_implementation(register_decode_attention())
        self._store_dtype = self.kv_dtype
        try:
            yield
        finally:
            self._store_dtype = None
            self.model.set_attn_implementation(before)

    def _generate_batch(
        self, units: list[PlannedUnit], progress: ProgressCallback | None
    ) -> list[list[GenSample]]:
        prefix = self._declared_prefix(units)
        if prefix is not None:
            return self._generate_on_prefix(units, prefix, progress)
        token_lists = [u.tokens for u in units]
        max_len = max(len(t) for t in token_lists) + max(u.request.max_new_tokens for u in units)
        groups = prefix_groups(token_lists) if self.prefix_sharing else [range(len(units))]
        if len(groups) > 1 and not self._mergeable:
            # a layer kind whose cache cannot be merged: decode each prefix group on its own
            return [out for g in groups for out in self._generate_batch([units[i] for i in g], progress)]
        if len(groups) > 1:
            caches, group_logits, masks, group_positions = zip(
                *(self._prefill([token_lists[i] for i in g], max_len) for g in groups), strict=True
            )
            width = max(m.shape[1] for m in masks)
            cache = merge_left_padded(list(caches), self.model.config)
            logits, positions = torch.cat(group_logits), torch.cat(group_positions)
            mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in masks])
        else:
            cache, logits, mask, positions = self._prefill(token_lists, max_len)
        rows, unit_of_row = self._rows(units)
        index = torch.tensor(unit_of_row, device=self.device)
        saved = sum((len(u.seeds) - 1) * len(u.tokens) for u in units)
        if self._use_cascade(len(rows), len(units), saved):  # one copy of each prompt's KV for its samples
            max_new = max(u.request.max_new_tokens for u in units)
            cache = to_cascade(cache, mask, unit_of_row, max_new)
        else:
            cache.batch_select_indices(index)
        self._decode(rows, cache, logits[index], mask[index], positions[index], progress)
        samples = [self._to_sample(row) for row in rows]
        grouped: list[list[GenSample]] = [[] for _ in units]
        for k, sample in zip(unit_of_row, samples, strict=True):
            grouped[k].append(sample)
        return grouped

    def _rows(self, units: list[PlannedUnit]) -> tuple[list[_Row], list[int]]:
        """One row per sample (its own seeded generator and, for a JSON schema, grammar matcher)
        and the unit each row belongs to."""
        rows: list[_Row] = []
        unit_of_row: list[int] = []
        for k, unit in enumerate(units):
            for seed in unit.seeds:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(int(seed) % 2**63)
                rows.append(_Row(unit.request, generator, len(unit.tokens)))
                if unit.request.json_schema is not None:
                    rows[-1].matcher = self._constraint().matcher(unit.request.json_schema)
                unit_of_row.append(k)
                self.stats.prompt_tokens_submitted += len(unit.tokens)
        return rows, unit_of_row

    def _left_pad(self, token_lists: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``token_lists`` right-aligned in ``[n, width]`` (pad id before) and their 0/1 mask."""
        n, dev = len(token_lists), self.device
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((n, width), dtype=torch.long, device=dev)
        for i, tokens in enumerate(token_lists):
            ids[i, width - len(tokens) :] = torch.tensor(tokens, device=dev)
            mask[i, width - len(tokens) :] = 1
        return ids, mask

    def _use_cascade(self, rows: int, prompts: int, saved_positions: int | None = None) -> bool:
        """Shared-prefix decode: on, decode attention active, every cache layer a GrowingLayer,
        some prompt with more than one sample, and (when ``saved_positions`` is given: the prompt
        positions the replicated cache would hold more than once) enough KV saved to pay for the
        cascade's extra small operations per layer (``cascade_min_saved``)."""
        if not (self.cascade and self._store_dtype is not None and self._mergeable and rows > prompts):
            return False
        return saved_positions is None or saved_positions >= self.cascade_min_saved

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        shared = {"cascade": cache} if isinstance(cache, CascadeCache) else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **{self._cache_kwarg: cache},
            use_cache=True,
            logits_to_keep=1,
            **shared,
        )
        return out.logits[:, -1, :]

    def _prefill(
        self, token_lists: list[list[int]], max_len: int
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill the shared prefix once and each remainder once; returns the cache (one row per
        prompt, room for ``max_len`` positions), the next-token logits, the attention mask and the
        next position of each prompt."""
        cache = make_cache(self.model.config, store_dtype=self._store_dtype, max_len=max_len)
        n = len(token_lists)
        prefix_len = shared_prefix_len(token_lists) if self.prefix_sharing and n > 1 else 0
        dev = self.device
        if prefix_len:
            prefix = torch.tensor([token_lists[0][:prefix_len]], device=dev)
            ones = torch.ones_like(prefix)
            self._forward(prefix, ones, torch.arange(prefix_len, device=dev)[None], cache)
            self.stats.prefill_tokens_computed += prefix_len
            cache.batch_repeat_interleave(n)
        rests = [t[prefix_len:] for t in token_lists]
        ids, rest_mask = self._left_pad(rests, max(len(r) for r in rests))
        mask = torch.cat([torch.ones((n, prefix_len), dtype=torch.long, device=dev), rest_mask], dim=1)
        positions = (prefix_len + rest_mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = self._forward(ids, mask, positions, cache)
        self.stats.prefill_tokens_computed += ids.numel()
        return cache, logits, mask, positions[:, -1] + 1

    def _decode(
        self,
        rows: list[_Row],
        cache: Any,
        logits: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        progress: ProgressCallback | None,
    ) -> None:
        active = list(range(len(rows)))
        while active:
            chosen = [rows[r] for r in active]
            if any(r.matcher is not None for r in chosen):
                self._constraint().mask_(logits, [r.matcher for r in chosen])
            tokens = select_tokens(
                logits,
                [r.request.temperature for r in chosen],
                [r.request.top_p for r in chosen],
                [r.generator for r in chosen],
            )
            keep = [
                k
                for k, (row, tok) in enumerate(zip(chosen, tokens.tolist(), strict=True))
                if not self._push(row, tok)
            ]
            self.stats.decode_tokens += len(active)
            if progress is not None:
                progress(len(active) - len(keep), len(active))
            if not keep:
                return
            if len(keep) < len(active):
                keep_index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(keep_index)
                mask, positions, tokens = mask[keep_index], positions[keep_index], tokens[keep_index]
                active = [active[k] for k in keep]
            mask = torch.cat(
                [mask, torch.ones((len(active), 1), dtype=mask.dtype, device=self.device)], dim=1
            )
            logits = self._forward(tokens[:, None], mask, positions[:, None], cache)
            positions = positions + 1

    def _push(self, row: _Row, token: int) -> bool:
        """Append ``token`` to ``row``; True when the row is finished."""
        row.tokens.append(token)
        request = row.request
        if row.matcher is not None:
            self._constraint().advance(row.matcher, token)
        if token in self.eos_ids:
            row.finish = "stop"
        elif request.stop and self._tail_has_stop(row.tokens, request.stop):
            row.finish, row.stopped_by_string = "stop", True
        elif len(row.tokens) >= request.max_new_tokens:
            row.finish = "length"
        return row.finish is not None

    def _tail_has_stop(self, tokens: list[int], stop: Sequence[str]) -> bool:
        window = max(len(s) for s in stop) + 2
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=False)
        return any(s and s in tail for s in stop)

    def _to_sample(self, row: _Row) -> GenSample:
        body = row.tokens[:-1] if row.tokens and row.tokens[-1] in self.eos_ids else row.tokens
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        if row.stopped_by_string:
            text, _ = truncate_at_stop(text, row.request.stop)
        finish = "decode_error" if "\ufffd" in text else (row.finish or "length")
        return GenSample(text, finish, row.prompt_tokens, len(row.tokens))

    def _constraint(self) -> Any:
        """Token masks for requests with a ``json_schema`` (llguidance; built on first use)."""
        from manyways.backends.constrained import constraint_for

        return constraint_for(self.tokenizer, self.eos_ids, int(self.model.config.vocab_size))

    def close(self) -> None:
        """Drop the model so its memory can be freed (its layers' packed weight copies too, should
        the caller keep the model)."""
        if self.model is not None and self.packed_linears:
            packed_linear_layers.uninstall(self.model)
        self.model = None
