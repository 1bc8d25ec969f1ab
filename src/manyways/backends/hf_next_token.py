"""The hf back-end's next-token queries: what a judge or scorer asks without sampling.

:class:`NextTokenMixin` gives :class:`~manyways.backends.hf.HFBackend` ``next_token_probs`` (P of
each option's first token right after the assistant turn opens, renormalised over the options:
the score stage's adherence judge) and ``next_token_logprobs`` (the likeliest first tokens), both
from forward passes over the conversations. It uses the back-end's model, tokenizer, ``encode``,
``_left_pad``, ``_forward``, ``device`` and ``batch_size``.

On CPU each conversation is its own forward pass, unpadded, so its probabilities do not depend on
which other conversations share the call: the score stage caches scores by content and computes
only the cache's misses, so with left-padded batches a trace's judge score depended on which
other traces happened to be missing from the cache (in bf16 the demo's judge scored one trace
0.06 apart, 0.38 against 0.44, alone and in a batch of 8: enough to change which trace
``select`` keeps, and so an arm's numbers between two runs of the same code). It cost ~10% on
one thread (24 judge prompts, 1.97 against 1.80 s, AMX machine, bf16). On CUDA the
conversations are left-padded into batches of ``batch_size`` as before, where batching is most
of the speed: there a score can depend on its batch at the dtype's rounding.
:func:`batch_invariant_step` is that rule; the reward-model scorer follows it too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from manyways.backends.protocol import renormalise

logger = logging.getLogger(__name__)


def batch_invariant_step(device: Any, batch_size: int) -> int:
    """Conversations per forward pass for scores that are cached by content: 1 (unpadded, so a
    score does not depend on the others in its call) except on CUDA, where ``batch_size``."""
    return batch_size if torch.device(device).type == "cuda" else 1


class NextTokenMixin:
    """Next-token probabilities for :class:`~manyways.backends.hf.HFBackend` (see the module)."""

    model: Any
    tokenizer: Any
    device: Any
    batch_size: int
    _left_pad: Any

    def _next_logits(self, messages_list: Sequence[list[dict[str, str]]]) -> torch.Tensor:
        """Next-token logits (float32, [conversations, vocab]) after the assistant turn opens."""
        from transformers import DynamicCache

        token_lists = [self.encode(m) for m in messages_list]
        out = []
        step = batch_invariant_step(self.device, self.batch_size)
        with torch.inference_mode():
            for start in range(0, len(token_lists), step):
                chunk = token_lists[start : start + step]
                ids, mask = self._left_pad(chunk, max(len(t) for t in chunk))
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
                cache = DynamicCache(config=self.model.config)
                out.append(self._forward(ids, mask, positions, cache).float())
        return torch.cat(out, dim=0)

    def option_token_ids(self, options: Sequence[str]) -> list[int]:
        """The first token id of each option as it would start the assistant's reply."""
        ids = []
        for option in options:
            tokens = self.tokenizer(option, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise ValueError(f"option {option!r} has no tokens")
            ids.append(int(tokens[0]))
        if len(set(ids)) < len(ids):
            logger.warning("options %s share a first token; their probabilities will be equal", list(options))
        return ids

    def next_token_probs(
        self, messages_list: Sequence[list[dict[str, str]]], options: Sequence[str]
    ) -> list[dict[str, float]]:
        """P(first token of each option), renormalised over the options; one forward pass."""
        ids = self.option_token_ids(options)
        probs = torch.softmax(self._next_logits(messages_list), dim=-1)[:, ids]
        return [renormalise(dict(zip(options, row.tolist(), strict=True))) for row in probs]

    def next_token_logprobs(
        self, messages_list: Sequence[list[dict[str, str]]], top_k: int
    ) -> list[dict[str, float]]:
        """The ``top_k`` likeliest first tokens (decoded text -> log-probability)."""
        logprobs = torch.log_softmax(self._next_logits(messages_list), dim=-1)
        values, ids = torch.topk(logprobs, k=top_k, dim=-1)
        out = []
        for vals, toks in zip(values.tolist(), ids.tolist(), strict=True):
            entry: dict[str, float] = {}
            for v, t in zip(vals, toks, strict=True):
                entry.setdefault(self.tokenizer.decode([t]), v)
            out.append(entry)
        return out
