"""Heuristic composition: an LLM judge labels which taxonomy heuristics a trace uses.

The judge sees the 64-heuristic taxonomy (one line per id, first, so every prompt shares that
prefix) and one whole solution trace, and answers with a JSON list of ids, e.g.
``["decompose", "carry_out"]``. Each request carries the answer's JSON schema (``judge_schema``):
back-ends that constrain decoding (hf through llguidance, vLLM structured outputs, OpenAI-compatible
``response_format``) can only produce a valid answer; the token budget is the schema's longest
answer. The parser stays strict for back-ends that cannot constrain: the answer (whitespace and an
optional Markdown code fence aside) must be a JSON list of 1..8 distinct known ids; anything else
is a failed parse with a reason, counted and never turned into an empty label set. A trace too
long for the judge's context is a ``too_long`` failure, not a truncated trace.

``label_traces(backend, taxonomy, traces)`` runs the judge (greedy by default) and
``summarize_labels(labels)`` gives the share of parsed traces combining >= 2 heuristics, the
parse-failure rate and the most frequent combinations.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from manyways.artifacts import unit_seed
from manyways.backends.protocol import GenerationBackend, GenRequest
from manyways.heuristics import Taxonomy
from manyways.metrics import bootstrap_ci

log = logging.getLogger(__name__)

MIN_LABELS = 1
MAX_LABELS = 8
LOW_RECALL = 0.5  # below this the report says composition numbers are noise
FAILURE_EXAMPLE_CHARS = 200
_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)

JUDGE_SYSTEM = (
    "You classify the problem-solving heuristics used in a solution. "
    "Answer with a JSON list of heuristic ids and nothing else."
)


@dataclass(frozen=True)
class ParsedLabels:
    """The judge's labels of one trace: ``ids`` when parsed, else ``error`` says why not."""

    ids: tuple[str, ...] | None
    error: str | None = None
    raw: str = ""  # the judge's answer (kept so failures can be inspected)

    @property
    def ok(self) -> bool:
        return self.ids is not None


def judge_schema(ids: Sequence[str], max_labels: int = MAX_LABELS) -> dict[str, Any]:
    """The JSON schema of a judge answer: 1..``max_labels`` distinct ids of the taxonomy."""
    return {
        "type": "array",
        "items": {"type": "string", "enum": list(ids)},
        "minItems": MIN_LABELS,
        "maxItems": min(max_labels, len(ids)),
        "uniqueItems": True,
    }


def judge_token_budget(schema: dict[str, Any]) -> int:
    """Tokens for the schema's longest valid answer: one per ASCII character (a byte-level BPE
    token is at least one byte) plus end-of-sequence and one spare."""
    from manyways.backends.constrained import longest_answer

    return len(longest_answer(schema)) + 2


def judge_prefix(taxonomy: Taxonomy, max_labels: int = MAX_LABELS) -> str:
    """The fixed start of every judge prompt's user message for this menu: the menu, then the
    instruction. Requests declare it (``GenRequest.shared_prefix``) so back-ends that keep
    prefixes prefill it once for every trace and batch."""
    menu = "\n".join(f"- {e.id}: {e.description}" for e in taxonomy.entries)
    if max_labels == 1:
        instruction = (
            "Which one of the heuristics above does the solution below follow? Answer with a JSON "
            f'list holding its id, for example ["{taxonomy.ids[0]}"], and nothing else.'
        )
    else:
        instruction = (
            f"Which of the heuristics above does the solution below use? Answer with a JSON list of "
            f"{MIN_LABELS} to {max_labels} ids from the list, in the order of the list, for example "
            f'["{taxonomy.ids[0]}", "{taxonomy.ids[-1]}"], and nothing else.'
        )
    return f"Heuristics (id: description):\n{menu}\n\n{instruction}\n"


def judge_messages(
    taxonomy: Taxonomy, trace: str, question: str | None = None, max_labels: int = MAX_LABELS
) -> list[dict[str, str]]:
    """The judge prompt. The taxonomy menu and the instruction come first (:func:`judge_prefix`),
    so every trace's prompt shares one long prefix (prefilled once by back-ends that keep
    prefixes); then the problem and the whole trace (never cut: a trace too long for the judge
    is counted, see ``label_traces``)."""
    parts = [judge_prefix(taxonomy, max_labels)]
    if question:
        parts.append(f"Problem:\n{question.strip()}\n")
    parts.append(f"Solution:\n{trace.strip()}\n")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": "\n".join(parts)}]


def parse_labels(
    text: str, known_ids: Sequence[str] | set[str], max_labels: int = MAX_LABELS
) -> ParsedLabels:
    """Strictly parse a judge answer; see the module docstring for what is accepted."""
    body = text.strip()
    fenced = _FENCE_RE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body:
        return ParsedLabels(None, "empty")
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return ParsedLabels(None, "not_json")
    if not isinstance(value, list):
        return ParsedLabels(None, "not_a_list")
    if not all(isinstance(v, str) for v in value):
        return ParsedLabels(None, "non_string_item")
    if not MIN_LABELS <= len(value) <= max_labels:
        return ParsedLabels(None, "wrong_length")
    if len(set(value)) != len(value):
        return ParsedLabels(None, "duplicate_ids")
    known = set(known_ids)
    if any(v not in known for v in value):
        return ParsedLabels(None, "unknown_id")
    return ParsedLabels(tuple(value))


def _prompt_tokens(backend: GenerationBackend, messages: list[dict[str, str]]) -> int:
    """Prompt length in tokens: exact where the back-end can encode, else chars / 3 (generous)."""
    encode = getattr(backend, "encode", None)
    if callable(encode):
        return len(encode(messages))
    return sum(len(m["content"]) for m in messages) // 3 + 16


def _model_context(backend: GenerationBackend) -> int | None:
    config = getattr(getattr(backend, "model", None), "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def label_traces(
    backend: GenerationBackend,
    taxonomy: Taxonomy,
    traces: Sequence[str],
    *,
    questions: Sequence[str | None] | None = None,
    seed: int = 0,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    constrain: bool = True,
    context_tokens: int | None = None,
    max_labels: int = MAX_LABELS,
) -> list[ParsedLabels]:
    """Ask the judge about each trace (one sample each) and parse its answers strictly.

    ``constrain`` sends the answer's JSON schema with each request (back-ends that can constrain
    then always answer in it); ``max_new_tokens`` defaults to the schema's longest answer. A
    trace whose prompt plus answer would exceed ``context_tokens`` is not sent: it is labelled
    ``too_long`` (a failure, counted) rather than cut.
    """
    qs = list(questions) if questions is not None else [None] * len(traces)
    schema = judge_schema(taxonomy.ids, max_labels)
    budget = max_new_tokens or judge_token_budget(schema)
    out: list[ParsedLabels | None] = [None] * len(traces)
    context_tokens = context_tokens or _model_context(backend)
    requests = []
    shared = judge_prefix(taxonomy, max_labels)
    for i, (t, q) in enumerate(zip(traces, qs, strict=True)):
        messages = judge_messages(taxonomy, t, q, max_labels)
        if context_tokens is not None and _prompt_tokens(backend, messages) + budget > context_tokens:
            out[i] = ParsedLabels(None, "too_long")
            continue
        seeds = (unit_seed(seed, f"judge-{i}", "composition", 0),)
        requests.append(
            GenRequest(
                f"judge-{i}",
                messages,
                seeds,
                budget,
                temperature,
                json_schema=schema if constrain else None,
                shared_prefix=shared,
            )
        )
    results = backend.generate(requests) if requests else []
    for request, samples in zip(requests, results, strict=True):
        parsed = parse_labels(samples[0].text, taxonomy.ids, max_labels)
        out[int(request.request_id.split("-")[1])] = ParsedLabels(parsed.ids, parsed.error, samples[0].text)
    return [lab for lab in out if lab is not None]


def summarize_labels(labels: Sequence[ParsedLabels], top: int = 10) -> dict[str, object]:
    """Parse-failure rate, share of parsed traces with >= 2 heuristics, frequent combinations."""
    parsed = [lab.ids for lab in labels if lab.ids is not None]
    failures = Counter(lab.error for lab in labels if lab.ids is None)
    combos = Counter(" + ".join(sorted(ids)) for ids in parsed)
    singles = Counter(h for ids in parsed for h in ids)
    n = len(labels)
    return {
        "traces": n,
        "parsed": len(parsed),
        "parse_failures": n - len(parsed),
        "parse_failure_rate": (n - len(parsed)) / n if n else None,
        "failure_reasons": dict(sorted(failures.items())),
        "multi_heuristic_share": sum(len(ids) >= 2 for ids in parsed) / len(parsed) if parsed else None,
        "mean_heuristics": sum(len(ids) for ids in parsed) / len(parsed) if parsed else None,
        "top_combinations": [{"combination": c, "count": k} for c, k in combos.most_common(top)],
        "top_heuristics": [{"heuristic": h, "count": k} for h, k in singles.most_common(top)],
        "failure_examples": [lab.raw[:FAILURE_EXAMPLE_CHARS] for lab in labels if lab.ids is None][:3],
    }


def multi_share_ci(labels: Sequence[ParsedLabels], seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of the multi-heuristic share over parsed traces (None if none)."""
    values = [float(len(lab.ids) >= 2) for lab in labels if lab.ids is not None]
    return list(bootstrap_ci(values, seed=seed)) if values else None


def new_combinations(
    after: Sequence[ParsedLabels], reference: Sequence[ParsedLabels], top: int = 10
) -> list[dict[str, Any]]:
    """Combinations (>= 2 ids) in ``after``'s labels that no ``reference`` label set contains.

    A trace labelled {a, b, c} contributes its pairs and larger subsets; a subset is new when no
    reference trace was labelled with all of its ids together (the paper's "Bolzano + Decompose"
    after RL, never together in mid-training). Counted per trace, most frequent first.
    """
    seen = [set(lab.ids) for lab in reference if lab.ids is not None]
    counts: Counter[str] = Counter()
    for lab in after:
        if lab.ids is None or len(lab.ids) < 2:
            continue
        ids = sorted(lab.ids)
        for size in range(2, len(ids) + 1):
            for combo in itertools.combinations(ids, size):
                if not any(set(combo) <= ref for ref in seen):
                    counts[" + ".join(combo)] += 1
    return [{"combination": c, "count": k} for c, k in counts.most_common(top)]


def judge_validity(labels: Sequence[ParsedLabels], known: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Recall of the known heuristic on exemplars whose heuristic we know, and the share of
    exemplars labelled with >= 2 heuristics. ``known[i]``: the taxonomy ids that count as a hit."""
    if len(labels) != len(known):
        raise ValueError(f"{len(labels)} labels for {len(known)} exemplars")
    hits = [bool(lab.ids and set(lab.ids) & set(k)) for lab, k in zip(labels, known, strict=True)]
    parsed = [lab for lab in labels if lab.ids is not None]
    n = len(labels)
    recall = sum(hits) / n if n else None
    return {
        "exemplars": n,
        "parsed": len(parsed),
        "recall": recall,
        "multi_label_share": sum(len(lab.ids or ()) >= 2 for lab in parsed) / len(parsed) if parsed else None,
        "low_recall": recall is not None and recall < LOW_RECALL,
    }
