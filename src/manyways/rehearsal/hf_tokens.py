"""Our hf back-end's batched, prefix-sharing decode loop, fed token ids instead of messages.

The rehearsal engine (:mod:`manyways.rehearsal.engine`) receives prompts the way vLLM does --
token ids, each with its own seed -- and runs them through :class:`HFBackend`'s own batching,
prefill and per-sample seeded sampling; this subclass only changes the input (ids) and the
output (the completion's token ids and the raw finish reason, which vLLM reports).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from manyways.backends.hf import HFBackend, PlannedUnit, _Row
from manyways.backends.protocol import GenRequest


class TokenBackend(HFBackend):
    """:class:`HFBackend` with :meth:`generate_ids`."""

    def generate_ids(
        self, prompts: Sequence[list[int]], params: Sequence[Any], limits: Sequence[int]
    ) -> list[tuple[str, list[int], str]]:
        """(text, completion token ids, finish reason) per prompt; one sample each."""
        units = []
        for k, (ids, p, limit) in enumerate(zip(prompts, params, limits, strict=True)):
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            request = GenRequest(
                f"r{k}", [], (int(seed),), max(1, limit), p.temperature, p.top_p, tuple(p.stop or ())
            )
            units.append(PlannedUnit(k, request, request.seeds, list(ids)))
        results: list[Any] = [None] * len(units)
        for unit, samples in self._decode_planned(self.plan_units(units), None):
            results[unit.request_index] = samples[0]
        return results

    def _to_sample(self, row: _Row) -> Any:  # type: ignore[override]
        sample = super()._to_sample(row)
        return sample.text, list(row.tokens), row.finish or "length"
