"""The Polya heuristic catalogue, the classification taxonomy, and chat-prompt rendering.

Inputs: a versioned YAML catalogue of generation heuristics (``configs/heuristics/polya_v2.yaml``,
64 heuristics, whose first 16 are ``polya_v1.yaml``'s, the default here and in the config:
``version``, ``description``, ``heuristics: [{id, name, marker, instruction, exemplars}]``) and a
taxonomy YAML (``configs/heuristics/taxonomy_v1.yaml``: ``version``, ``description``,
``heuristics: [{id, name, description}]``). Outputs: frozen dataclasses and chat message lists
(``[{"role": ..., "content": ...}]``) for the generate stage (heuristic and plain modes) and the
midtrain stage (question -> trace, heuristic scaffolding removed).

The loader validates strictly and every error names the file and the entry/field. Each
exemplar's solution must end its reasoning with ``\\boxed{answer}`` and mention the heuristic's
``marker`` phrase, which the instruction mentions too, so the exemplars visibly follow it.
An exemplar may carry ``check``: an arithmetic expression that recomputes the gold ``answer``
from the question independently of the solution (see ``manyways.arith``); the loader evaluates
it exactly and refuses the file if it differs from ``answer``. ``check`` is metadata: it is left
out of the content hash and of exemplar equality, so adding checks never changes a catalogue's
identity (``polya_v2``'s first 16 heuristics equal ``polya_v1``'s).

For one heuristic every rendered prompt shares the same prefix (system message + few-shot
turns); only the final user turn (the question) differs, so a back-end can prefill the prefix
once per heuristic and reuse its KV cache (see ``render_heuristic_prefix``).

Pure module: no torch, no I/O beyond reading the YAML. Try it on CPU::

    python -c "from manyways.heuristics import *; c = load_catalogue(); \
print(c.version, c.content_hash, [h.id for h in c.select(4)])"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from manyways.arith import ArithError, evaluate, parse_number

logger = logging.getLogger(__name__)

DEFAULT_CATALOGUE = "configs/heuristics/polya_v1.yaml"
DEFAULT_TAXONOMY = "configs/heuristics/taxonomy_v1.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]  # src/manyways/heuristics.py -> repository root

POLYA_FRAMING = (
    "Solve the math problem with Pólya's method: understand the problem, devise a plan, "
    "carry it out, and look back."
)
ANSWER_FORMAT = "Put the final answer in \\boxed{}."
PLAIN_SYSTEM = "Solve the math problem step by step. " + ANSWER_FORMAT

_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
_HEURISTIC_FIELDS = ("id", "name", "marker", "instruction", "exemplars")
_EXEMPLAR_FIELDS = ("question", "solution", "answer")
_EXEMPLAR_OPTIONAL = ("check",)
_TAXONOMY_FIELDS = ("id", "name", "description")
_TOP_FIELDS = ("version", "description", "heuristics")
MIN_EXEMPLARS = 2

Message = dict[str, str]


class CatalogueError(ValueError):
    """A heuristic catalogue or taxonomy file is malformed; the message names file and field."""


@dataclass(frozen=True)
class Exemplar:
    """One worked example: a question and a solution that follows the heuristic."""

    question: str
    solution: str
    answer: str
    check: str = field(default="", compare=False)


@dataclass(frozen=True)
class Heuristic:
    """One generation heuristic: what to tell the model, and examples that do it."""

    id: str
    name: str
    marker: str
    instruction: str
    exemplars: tuple[Exemplar, ...]


@dataclass(frozen=True)
class Catalogue:
    """A versioned, ordered list of generation heuristics."""

    version: str
    description: str
    heuristics: tuple[Heuristic, ...]
    source: str = field(default="", compare=False)

    @property
    def content_hash(self) -> str:
        """sha256 (16 hex chars) of the canonical JSON of the content; ``source`` and the
        exemplars' ``check`` expressions (metadata, not prompted) excluded."""
        content = dataclasses.asdict(self)
        content.pop("source")
        for heuristic in content["heuristics"]:
            for exemplar in heuristic["exemplars"]:
                exemplar.pop("check")
        return _canonical_hash(content)

    @property
    def ids(self) -> list[str]:
        """Heuristic ids in catalogue order."""
        return [h.id for h in self.heuristics]

    def get(self, heuristic_id: str) -> Heuristic:
        """The heuristic with this id; KeyError naming the known ids otherwise."""
        for heuristic in self.heuristics:
            if heuristic.id == heuristic_id:
                return heuristic
        raise KeyError(f"unknown heuristic id {heuristic_id!r} in {self.version}; known: {self.ids}")

    def select(self, n: int | None = None, ids: list[str] | None = None) -> list[Heuristic]:
        """The first ``n`` heuristics in catalogue order, or those named by ``ids`` (in that
        order); all of them when neither is given."""
        if n is not None and ids is not None:
            raise ValueError("select() takes n or ids, not both")
        if ids is not None:
            return self._select_ids(list(ids))
        if n is None:
            return list(self.heuristics)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"select(n={n!r}): n must be a positive integer")
        if n > len(self.heuristics):
            raise ValueError(
                f"select(n={n}): catalogue {self.version} has only {len(self.heuristics)} heuristics"
            )
        return list(self.heuristics[:n])

    def _select_ids(self, ids: list[str]) -> list[Heuristic]:
        if not ids:
            raise ValueError("select(ids=[]): no heuristic ids given")
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"select(ids=...): duplicate ids {duplicates}")
        unknown = [i for i in ids if i not in self.ids]
        if unknown:
            raise ValueError(f"select(ids=...): unknown heuristic ids {unknown} in {self.version}")
        return [self.get(i) for i in ids]


@dataclass(frozen=True)
class TaxonomyEntry:
    """One heuristic of the classification taxonomy."""

    id: str
    name: str
    description: str


@dataclass(frozen=True)
class Taxonomy:
    """The heuristics an LLM judge may assign to a reasoning trace."""

    version: str
    description: str
    entries: tuple[TaxonomyEntry, ...]
    source: str = field(default="", compare=False)

    @property
    def content_hash(self) -> str:
        """sha256 (16 hex chars) of the canonical JSON of the content; ``source`` excluded."""
        content = dataclasses.asdict(self)
        content.pop("source")
        return _canonical_hash(content)

    @property
    def ids(self) -> list[str]:
        """Entry ids in file order."""
        return [e.id for e in self.entries]


# ---------------------------------------------------------------------------------------------
# Loading and validation


def resolve_catalogue_path(path: str | Path = DEFAULT_CATALOGUE) -> Path:
    """``path`` as given if it exists, else (for a relative path) under the repository root."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    tried = [str(candidate)]
    if not candidate.is_absolute():
        from_root = REPO_ROOT / candidate
        if from_root.exists():
            return from_root
        tried.append(str(from_root))
    raise FileNotFoundError(f"heuristic file {str(path)!r} not found; tried {tried}")


def load_catalogue(path: str | Path = DEFAULT_CATALOGUE) -> Catalogue:
    """Read and validate a generation-heuristic catalogue; CatalogueError names file and field."""
    resolved = resolve_catalogue_path(path)
    raw = _read_top(resolved)
    entries = _require_list(raw, "heuristics", str(resolved))
    heuristics = tuple(_parse_heuristic(e, f"{resolved}: heuristics[{i}]") for i, e in enumerate(entries))
    _check_unique([h.id for h in heuristics], f"{resolved}: heuristics")
    catalogue = Catalogue(
        version=raw["version"],
        description=raw["description"],
        heuristics=heuristics,
        source=str(resolved),
    )
    logger.debug("loaded %s (%d heuristics) from %s", catalogue.version, len(heuristics), resolved)
    return catalogue


def load_taxonomy(path: str | Path = DEFAULT_TAXONOMY) -> Taxonomy:
    """Read and validate a classification taxonomy; CatalogueError names file and field."""
    resolved = resolve_catalogue_path(path)
    raw = _read_top(resolved)
    items = _require_list(raw, "heuristics", str(resolved))
    entries = []
    for i, item in enumerate(items):
        where = f"{resolved}: heuristics[{i}]"
        mapping = _require_mapping(item, where, _TAXONOMY_FIELDS)
        where = _entry_label(where, mapping)
        values = {k: _require_str(mapping, k, where) for k in _TAXONOMY_FIELDS}
        _check_id(values["id"], where)
        entries.append(TaxonomyEntry(**values))
    _check_unique([e.id for e in entries], f"{resolved}: heuristics")
    return Taxonomy(raw["version"], raw["description"], tuple(entries), source=str(resolved))


def _read_top(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{path}: not valid YAML: {exc}") from exc
    mapping = _require_mapping(raw, str(path), _TOP_FIELDS)
    for key in ("version", "description"):
        _require_str(mapping, key, str(path))
    return mapping


def _parse_heuristic(raw: Any, where: str) -> Heuristic:
    mapping = _require_mapping(raw, where, _HEURISTIC_FIELDS)
    where = _entry_label(where, mapping)
    values = {k: _require_str(mapping, k, where) for k in ("id", "name", "marker", "instruction")}
    _check_id(values["id"], where)
    marker = values["marker"].lower()
    if marker not in values["instruction"].lower():
        raise CatalogueError(f"{where}: field 'instruction' does not mention marker {values['marker']!r}")
    items = _require_list(mapping, "exemplars", where)
    if len(items) < MIN_EXEMPLARS:
        raise CatalogueError(
            f"{where}: field 'exemplars' has {len(items)} exemplar(s); at least {MIN_EXEMPLARS} are required"
        )
    exemplars = tuple(
        _parse_exemplar(item, f"{where}.exemplars[{j}]", values["marker"]) for j, item in enumerate(items)
    )
    return Heuristic(exemplars=exemplars, **values)


def _parse_exemplar(raw: Any, where: str, marker: str) -> Exemplar:
    mapping = _require_mapping(raw, where, _EXEMPLAR_FIELDS + _EXEMPLAR_OPTIONAL)
    answer = mapping.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        mapping = {**mapping, "answer": str(answer)}
    question, solution, answer = (_require_str(mapping, k, where) for k in _EXEMPLAR_FIELDS)
    check = _require_str(mapping, "check", where) if "check" in mapping else ""
    boxed = last_boxed(solution)
    if boxed is None:
        raise CatalogueError(f"{where}: field 'solution' has no \\boxed{{...}} final answer")
    if boxed.strip() != answer:
        raise CatalogueError(f"{where}: field 'solution' boxes {boxed!r} but field 'answer' is {answer!r}")
    if marker.lower() not in solution.lower():
        raise CatalogueError(f"{where}: field 'solution' does not mention marker {marker!r}")
    if check:
        _check_recomputation(check, answer, where)
    return Exemplar(question=question, solution=solution, answer=answer, check=check)


def _check_recomputation(check: str, answer: str, where: str) -> None:
    """``check`` must evaluate exactly to the numeric ``answer``."""
    gold = parse_number(answer)
    if gold is None:
        raise CatalogueError(f"{where}: field 'check' needs a numeric 'answer', got {answer!r}")
    try:
        value = evaluate(check)
    except ArithError as exc:
        raise CatalogueError(f"{where}: field 'check' {check!r}: {exc}") from exc
    if value != gold:
        raise CatalogueError(
            f"{where}: field 'check' {check!r} gives {value} but field 'answer' is {answer!r}"
        )


def _require_mapping(raw: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise CatalogueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise CatalogueError(f"{where}: unknown field(s) {unknown}; allowed: {list(allowed)}")
    return raw


def _require_str(mapping: dict[str, Any], key: str, where: str) -> str:
    if key not in mapping:
        raise CatalogueError(f"{where}: missing field {key!r}")
    value = mapping[key]
    if not isinstance(value, str) or not value.strip():
        raise CatalogueError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _require_list(mapping: dict[str, Any], key: str, where: str) -> list[Any]:
    if key not in mapping:
        raise CatalogueError(f"{where}: missing field {key!r}")
    value = mapping[key]
    if not isinstance(value, list) or not value:
        raise CatalogueError(f"{where}: field {key!r} must be a non-empty list")
    return value


def _entry_label(where: str, mapping: dict[str, Any]) -> str:
    entry_id = mapping.get("id")
    return f"{where} (id={entry_id!r})" if isinstance(entry_id, str) else where


def _check_id(value: str, where: str) -> None:
    if not _ID_PATTERN.match(value):
        raise CatalogueError(f"{where}: field 'id' {value!r} is not snake_case")


def _check_unique(ids: list[str], where: str) -> None:
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CatalogueError(f"{where}: duplicate id(s) {duplicates}")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for pos in range(begin, len(text)):
        if text[pos] == "{":
            depth += 1
        elif text[pos] == "}":
            if depth == 0:
                return text[begin:pos]
            depth -= 1
    return None


# ---------------------------------------------------------------------------------------------
# Prompt rendering


def heuristic_system_prompt(heuristic: Heuristic) -> str:
    """The system message for heuristic mode: Polya's phases, the heuristic, the answer format."""
    return f"{POLYA_FRAMING}\nHeuristic: {heuristic.name}. {heuristic.instruction}\n{ANSWER_FORMAT}"


def render_heuristic_prefix(heuristic: Heuristic, *, n_exemplars: int = 2) -> list[Message]:
    """The part of every heuristic prompt before the question: system + few-shot turns.

    Identical for all questions of one heuristic, so a back-end can cache it."""
    if isinstance(n_exemplars, bool) or not 0 <= n_exemplars <= len(heuristic.exemplars):
        raise ValueError(
            f"n_exemplars={n_exemplars!r}: heuristic {heuristic.id!r} has "
            f"{len(heuristic.exemplars)} exemplars"
        )
    messages: list[Message] = [{"role": "system", "content": heuristic_system_prompt(heuristic)}]
    for exemplar in heuristic.exemplars[:n_exemplars]:
        messages.append({"role": "user", "content": _question_turn(exemplar.question)})
        messages.append({"role": "assistant", "content": exemplar.solution})
    return messages


def render_heuristic_messages(question: str, heuristic: Heuristic, *, n_exemplars: int = 2) -> list[Message]:
    """Chat messages for heuristic mode: the shared prefix, then the question as the last user turn."""
    prefix = render_heuristic_prefix(heuristic, n_exemplars=n_exemplars)
    return [*prefix, {"role": "user", "content": _question_turn(question)}]


def render_plain_messages(question: str) -> list[Message]:
    """Chat messages for plain mode: a step-by-step system line with the boxed-answer convention."""
    return [
        {"role": "system", "content": PLAIN_SYSTEM},
        {"role": "user", "content": _question_turn(question)},
    ]


def render_sft_messages(question: str, trace: str, *, system: str | None = None) -> list[Message]:
    """Mid-training example: the plain question as the user turn, the trace as the assistant turn.

    The heuristic instruction and exemplars are removed, so the model learns to produce the
    heuristic's behaviour from the question alone. ``system`` optionally prepends a system
    message (e.g. ``PLAIN_SYSTEM``, to match the prompt used later for RL and evaluation)."""
    if not trace.strip():
        raise ValueError("render_sft_messages: empty trace")
    messages: list[Message] = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": _question_turn(question)})
    messages.append({"role": "assistant", "content": trace.strip()})
    return messages


def _question_turn(question: str) -> str:
    text = question.strip()
    if not text:
        raise ValueError("empty question")
    return text


def prompt_hash(messages: list[Message]) -> str:
    """sha256 (16 hex chars) of the canonical JSON of a message list."""
    return _canonical_hash(messages)


def _canonical_hash(content: Any) -> str:
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
