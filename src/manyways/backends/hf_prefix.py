"""The hf back-end's declared shared prefixes (``GenRequest.shared_prefix``: the judge's menu).

:class:`DeclaredPrefixMixin` gives :class:`~manyways.backends.hf.HFBackend` the path a batch of
one-sample prompts that declare the same prefix takes: the prefix's KV from the process-wide
:mod:`~manyways.backends.prefix_store` (prefilled once per model and process), each prompt's
remainder prefilled on top of it into its own row (shortest first, ``prefill_rows`` at a time, each
chunk padded only to its own longest, in place into the batch's one cache), then decoded with
every row reading the one copy of the prefix (cascade attention). The split is the declared prefix,
so it does not depend on which prompts share a batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from manyways.backends.cascade import finish_row_slices, row_slices, shared_cascade
from manyways.backends.kv_cache import make_cache
from manyways.backends.prefix_store import PREFIX_STORE, PrefixLayers, weights_fingerprint
from manyways.backends.protocol import GenRequest, GenSample, ProgressCallback
from manyways.backends.sampling import common_prefix_len

if TYPE_CHECKING:
    from manyways.backends.hf import PlannedUnit

PREFILL_ROWS = 8  # prompt remainders prefilled in one forward on a declared shared prefix


class DeclaredPrefixMixin:
    """Declared-prefix generation for :class:`~manyways.backends.hf.HFBackend` (see the module);
    it calls the back-end's ``_use_cascade``, ``_left_pad``, ``_forward``, ``_rows``, ``_decode``
    and ``_to_sample``."""

    model: Any
    device: Any
    prefix_sharing: bool
    prefill_rows: int
    stats: Any
    _store_dtype: torch.dtype | None
    _declared_tokens: dict[str, list[int]]
    _weights_key: str | None

    def _declared_len(self, request: GenRequest, tokens: list[int]) -> int:
        """How many of ``tokens`` (the whole prompt) are the request's declared shared prefix: the
        tokens the prompt shares with its messages cut after ``shared_prefix`` (so a token merged
        across the boundary is left out); 0 when none is declared."""
        if not request.shared_prefix:
            return 0
        last = request.messages[-1]
        head = [*request.messages[:-1], {**last, "content": request.shared_prefix}]
        key = repr(head)
        if key not in self._declared_tokens:
            if len(self._declared_tokens) >= 64:
                self._declared_tokens.clear()
            self._declared_tokens[key] = self.encode(head)
        return min(common_prefix_len(self._declared_tokens[key], tokens), len(tokens) - 1)

    def _declared_prefix(self, units: list[PlannedUnit]) -> list[int] | None:
        """The declared prefix every unit of the batch shares, when the batch can decode with it
        (one sample per prompt, cascade attention available); None otherwise."""
        first = units[0]
        if not (first.declared and self.prefix_sharing and self._use_cascade(2, 1)):
            return None
        prefix = first.tokens[: first.declared]
        for unit in units:
            if (
                len(unit.seeds) != 1
                or unit.declared != first.declared
                or unit.tokens[: unit.declared] != prefix
            ):
                return None
        return prefix

    def _generate_on_prefix(
        self, units: list[PlannedUnit], prefix: list[int], progress: ProgressCallback | None
    ) -> list[list[GenSample]]:
        """A batch of one-sample prompts that share a declared prefix: the prefix's KV once (from
        the process-wide store when this model prefilled it before), each prompt's remainder
        prefilled on top of it into its row's own cache (cascade attention), then decoded.
        Remainders are prefilled shortest first, ``prefill_rows`` at a time, each chunk padded only
        to its own longest (in place, into the batch's one cache), so a batch of traces of mixed
        lengths does not pay for padding every row to the longest."""
        order = sorted(range(len(units)), key=lambda i: (len(units[i].tokens), i))
        units = [units[i] for i in order]
        n, start = len(units), len(prefix)
        rests = [u.tokens[start:] for u in units]
        width = max(len(r) for r in rests)
        max_new = max(u.request.max_new_tokens for u in units)
        cache = shared_cascade(self._prefix_kv(prefix), n, width + max_new)
        ids, rest_mask = self._left_pad(rests, width)
        mask = torch.cat([torch.ones((n, start), dtype=torch.long, device=self.device), rest_mask], dim=1)
        positions = (start + rest_mask.cumsum(dim=1) - 1).clamp(min=0)
        spans = [
            (first, min(first + self.prefill_rows, n), len(rests[min(first + self.prefill_rows, n) - 1]))
            for first in range(0, n, self.prefill_rows)
        ]
        logits = []
        for part, (first, stop, chunk) in zip(row_slices(cache, width, spans), spans, strict=True):
            cut = slice(width - chunk, width)
            part_mask = torch.cat([mask[first:stop, :start], rest_mask[first:stop, cut]], dim=1)
            logits.append(self._forward(ids[first:stop, cut], part_mask, positions[first:stop, cut], part))
            self.stats.prefill_tokens_computed += (stop - first) * chunk
        finish_row_slices(cache, width)
        rows, _ = self._rows(units)
        self._decode(rows, cache, torch.cat(logits), mask, positions[:, -1] + 1, progress)
        out: list[list[GenSample]] = [[] for _ in units]
        for k, row in zip(order, rows, strict=True):
            out[k] = [self._to_sample(row)]
        return out

    def _prefix_kv(self, prefix: list[int]) -> PrefixLayers:
        """Keys^T and values of ``prefix`` per layer (one row), from :data:`PREFIX_STORE` or
        prefilled now and stored there."""
        if self._weights_key is None:
            self._weights_key = weights_fingerprint(self.model)
        key = (self._weights_key, str(self._store_dtype), str(self.device), tuple(prefix))
        found = PREFIX_STORE.get(key)
        if found is not None:
            return found
        cache = make_cache(self.model.config, store_dtype=self._store_dtype, max_len=len(prefix))
        ids = torch.tensor([prefix], device=self.device)
        self._forward(ids, torch.ones_like(ids), torch.arange(len(prefix), device=self.device)[None], cache)
        self.stats.prefill_tokens_computed += len(prefix)
        layers = [
            (layer.keys.transpose(-1, -2).contiguous(), layer.values.contiguous()) for layer in cache.layers
        ]
        PREFIX_STORE.put(key, layers)
        return layers
