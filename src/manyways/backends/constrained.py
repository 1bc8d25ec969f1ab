"""Grammar-constrained decoding for the hf back-end, through llguidance's token masks.

A :class:`~manyways.backends.protocol.GenRequest` with ``json_schema`` set is decoded so that its
answer is a valid instance of that schema: before each sampled token, the row's llguidance matcher
fills a bitmask of allowed tokens and every other logit becomes ``-inf``; once the grammar is
complete only an end-of-sequence token is allowed. Library: ``llguidance`` (3 MB wheel, no torch or
CUDA dependency, runs on CPU; xgrammar pulls in triton and outlines-core needs outlines' regex
index per schema).

One schema shape gets an exact grammar of our own, because llguidance (like xgrammar and OpenAI's
strict mode) ignores ``uniqueItems``: an array of ``enum`` strings with ``uniqueItems``, ``minItems``
and ``maxItems`` (the composition judge's answer) is compiled to a Lark grammar whose items appear
in the enum's order, each at most once, so every answer is distinct by construction. Any other
schema goes through llguidance's own JSON-schema compiler.

``longest_answer(schema)`` gives the longest valid answer of that shape, from which the judge's
token budget is set (one ASCII character is at most one token).
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

_EXTRA_HINT = "constrained decoding on the hf back-end needs llguidance: pip install llguidance"


def _import_llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError as err:
        raise ImportError(_EXTRA_HINT) from err
    return llguidance


def enum_list_shape(schema: dict[str, Any]) -> tuple[list[str], int, int] | None:
    """(choices, min, max) when ``schema`` is an array of distinct enum strings, else None."""
    items = schema.get("items") if isinstance(schema, dict) else None
    if schema.get("type") != "array" or not isinstance(items, dict) or not schema.get("uniqueItems"):
        return None
    choices = items.get("enum")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        return None
    low = int(schema.get("minItems", 0))
    high = int(schema.get("maxItems", len(choices)))
    return choices, low, min(high, len(choices))


def longest_answer(schema: dict[str, Any]) -> str:
    """The longest answer our grammar accepts for an enum-list schema (compact JSON)."""
    shape = enum_list_shape(schema)
    if shape is None:
        raise ValueError("longest_answer supports arrays of distinct enum strings only")
    choices, _, high = shape
    longest = sorted(choices, key=lambda c: len(json.dumps(c)), reverse=True)[:high]
    return "[" + ", ".join(json.dumps(c) for c in longest) + "]"


def ordered_subset_lark(choices: list[str], low: int, high: int) -> str:
    """Lark grammar: a JSON list of ``low``..``high`` of ``choices``, in their order, no repeats.

    Rule ``t_i_c`` is what may follow item ``i`` as the ``c``-th item: the closing bracket (when
    ``c >= low``) or a comma and a later item.
    """
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= minItems <= maxItems, got {low}, {high}")
    lit = [json.dumps(json.dumps(c)) for c in choices]  # a Lark string literal of the JSON string
    lines = ['start: "[" (' + " | ".join(f"{lit[i]} t_{i}_1" for i in range(len(choices))) + ")"]
    for c in range(1, high + 1):
        for i in range(len(choices)):
            alts = ['"]"'] if c >= low else []
            if c < high:
                alts += [f'", " {lit[j]} t_{j}_{c + 1}' for j in range(i + 1, len(choices))]
            lines.append(f"t_{i}_{c}: " + (" | ".join(alts) if alts else '"]"'))
    return "\n".join(lines) + "\n"


def schema_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar (JSON text) for ``schema``."""
    llg = _import_llguidance()
    shape = enum_list_shape(schema)
    if shape is not None:
        return llg.LLMatcher.grammar_from_lark(ordered_subset_lark(*shape))
    return llg.LLMatcher.grammar_from_json_schema(schema)


class SchemaConstraint:
    """Token masks for one tokenizer; ``matcher(schema)`` starts a fresh matcher per sample."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], vocab_size: int):
        llg = _import_llguidance()
        self._llg = llg
        self.eos_id = min(eos_ids)
        self.tokenizer = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=self.eos_id)
        self.vocab_size = vocab_size
        self._templates: dict[str, Any] = {}  # schema -> a compiled matcher at its start state

    def matcher(self, schema: dict[str, Any]) -> Any:
        """A fresh matcher: a copy of the schema's compiled one (compiling the judge's 64-id
        grammar takes ~0.7 s on CPU, a copy ~0.1 ms)."""
        key = json.dumps(schema, sort_keys=True)
        if key not in self._templates:
            m = self._llg.LLMatcher(self.tokenizer, schema_grammar(schema))
            if m.is_error():
                raise ValueError(f"schema could not be compiled: {m.get_error()}")
            self._templates[key] = m
        return self._templates[key].deep_copy()

    def mask_(self, logits: torch.Tensor, matchers: list[Any | None]) -> None:
        """Set the logits of tokens the row's grammar forbids to -inf, in place."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        lt = self._llg.torch
        bitmask = lt.allocate_token_bitmask(len(rows), self.vocab_size)
        for k, i in enumerate(rows):
            lt.fill_next_token_bitmask(matchers[i], bitmask, k)
        sub = logits[rows].float()
        lt.apply_token_bitmask_inplace(sub, bitmask.to(sub.device))
        logits[rows] = sub.to(logits.dtype)

    def advance(self, matcher: Any, token: int) -> None:
        """Feed the sampled token; a token the grammar rejects is a bug, so it raises."""
        if not matcher.consume_token(token):
            raise RuntimeError(f"constrained decoding: token {token} rejected ({matcher.get_error()})")


@functools.lru_cache(maxsize=4)
def _cached(tokenizer_id: int, tokenizer: Any, eos: tuple[int, ...], vocab: int) -> SchemaConstraint:
    return SchemaConstraint(tokenizer, set(eos), vocab)


def constraint_for(tokenizer: Any, eos_ids: set[int], vocab_size: int) -> SchemaConstraint:
    """One :class:`SchemaConstraint` per tokenizer (building the token trie takes a moment)."""
    return _cached(id(tokenizer), tokenizer, tuple(sorted(eos_ids)), vocab_size)
