"""Adherence scorers: how well a (correct) trace follows the heuristic it was prompted with.

Three scorers share one small protocol (:class:`Scorer`: ``identity`` and ``score(items)``):

- :class:`JudgeScorer`: an LLM judge is shown the heuristic (name + instruction), the question
  and the solution and asked "Does the solution follow this heuristic? Answer Yes or No."; the
  score is P(Yes) from the back-end's ``next_token_probs`` (renormalised over Yes/No), never
  parsed from free text. Plain-mode traces (no heuristic) score 0 without a model call.
- :class:`RewardModelScorer`: a Hugging Face sequence-classification reward model (``num_labels``
  1, e.g. the Skywork-Reward family) reads the conversation user = heuristic instruction +
  question, assistant = solution through its tokenizer's chat template; the score is the logit.
- :class:`ConstantScorer`: 0 for everything (selection then falls back to its tie-break).

:class:`ScoreCache` keeps scores in a small sqlite file keyed by sha256(scorer identity,
heuristic id, question, completion), so re-scoring the same text costs nothing.
:func:`make_scorer` builds the scorer a :class:`~manyways.config.ScoreSection` names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from manyways.heuristics import Heuristic

if TYPE_CHECKING:
    from manyways.config import ScoreSection

log = logging.getLogger(__name__)

# in every judge score cache key; "-exact": scores from before the hf back-end scored each
# conversation alone on CPU (manyways.backends.hf_next_token) depended on their batch
JUDGE_PROMPT_VERSION = "adherence-v1-exact"
# in every reward-model cache key; "exact": scored one trace per forward off CUDA, as the judge
REWARD_MODEL_SCORING_VERSION = "exact"
JUDGE_SYSTEM = "You are a careful grader of math solutions. Answer with a single word: Yes or No."
JUDGE_QUESTION = "Does the solution follow this heuristic? Answer Yes or No."


@dataclass(frozen=True)
class ScoreItem:
    """One trace to score: the heuristic it was asked to follow (None in plain mode)."""

    heuristic: Heuristic | None
    question: str
    completion: str


class Scorer(Protocol):
    """What the score stage calls; ``identity`` names the scorer in cache keys and rows."""

    name: str
    identity: str

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        """One score per item, in order (higher = follows the heuristic better)."""
        ...

    def close(self) -> None:
        """Release models / connections."""
        ...


def judge_messages(item: ScoreItem) -> list[dict[str, str]]:
    """The judge conversation for one trace with a heuristic."""
    if item.heuristic is None:
        raise ValueError("judge_messages: a plain-mode trace has no heuristic to judge")
    h = item.heuristic
    user = (
        f"Heuristic: {h.name}. {h.instruction}\n\n"
        f"Problem:\n{item.question.strip()}\n\n"
        f"Solution:\n{item.completion.strip()}\n\n"
        f"{JUDGE_QUESTION}"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def reward_model_messages(item: ScoreItem) -> list[dict[str, str]]:
    """The reward model's conversation: heuristic instruction + question, then the solution."""
    prompt = item.question.strip()
    if item.heuristic is not None:
        prompt = f"{item.heuristic.instruction}\n\n{prompt}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": item.completion}]


class JudgeScorer:
    """P(Yes) of an LLM judge behind any generation back-end."""

    name = "judge"

    def __init__(self, backend: Any, batch_size: int = 8) -> None:
        self.backend = backend
        self.batch_size = batch_size
        self.identity = judge_identity(backend.name, backend.model_id)

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        out = [0.0] * len(items)
        todo = [i for i, it in enumerate(items) if it.heuristic is not None]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            probs = self.backend.next_token_probs([judge_messages(items[i]) for i in batch], ["Yes", "No"])
            for i, p in zip(batch, probs, strict=True):
                out[i] = float(p["Yes"])
        return out

    def close(self) -> None:
        self.backend.close()


class ConstantScorer:
    """Score 0 for every trace: selection falls back to its deterministic tie-break."""

    name = "none"
    identity = "none"

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        return [0.0] * len(items)

    def close(self) -> None:
        """Nothing to release."""


def model_identity(name_or_path: str) -> str:
    """A model's name plus, for a local directory, a digest of its files' names, sizes and mtimes,
    so a cache never serves scores of different weights saved at the same path."""
    path = Path(name_or_path)
    if not path.is_dir():
        return name_or_path
    stats = sorted(
        (str(p.relative_to(path)), p.stat().st_size, int(p.stat().st_mtime))
        for p in path.rglob("*")
        if p.is_file()
    )
    digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:12]
    return f"{path.resolve()}@{digest}"


def judge_identity(backend_kind: str, model: str) -> str:
    """Cache identity of a judge: prompt version, back-end kind and model (with its files' digest)."""
    return f"judge:{JUDGE_PROMPT_VERSION}:{backend_kind}:{model_identity(model)}"


def reward_model_identity(model: str, max_tokens: int) -> str:
    """Cache identity of a reward model: the model (with its files' digest) and the truncation."""
    return f"reward_model:{REWARD_MODEL_SCORING_VERSION}:{model_identity(model)}:{max_tokens}"


class RewardModelScorer:
    """The logit of a ``num_labels=1`` sequence-classification reward model."""

    name = "reward_model"

    def __init__(
        self,
        model_path: str,
        *,
        batch_size: int = 8,
        max_tokens: int = 2048,
        device: str | None = None,
        dtype: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from manyways.backends.config import resolve_dtype
        from manyways.models import resolve_model_path

        path = resolve_model_path(model_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, resolve_dtype(dtype, self.device))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype).to(
            self.device
        )
        self.model.eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward model {model_path!r} has num_labels={self.model.config.num_labels}; need 1"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.identity = reward_model_identity(path, max_tokens)

    def _encode(self, item: ScoreItem) -> list[int]:
        text = self.tokenizer.apply_chat_template(reward_model_messages(item), tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids[: self.max_tokens])

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        import torch

        from manyways.backends.hf_next_token import batch_invariant_step

        out: list[float] = []
        step = batch_invariant_step(self.device, self.batch_size)  # cached scores: see that function
        for start in range(0, len(items), step):
            encoded = [{"input_ids": self._encode(it)} for it in items[start : start + step]]
            batch = self.tokenizer.pad(encoded, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits
            out.extend(float(v) for v in logits[:, 0].float().cpu())
        return out

    def close(self) -> None:
        self.model = None


class ScoreCache:
    """Scores by content hash in one sqlite file (safe across threads and processes)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL NOT NULL)")
        self._db.commit()

    @staticmethod
    def key(identity: str, heuristic_id: str | None, question: str, completion: str) -> str:
        blob = json.dumps([identity, heuristic_id, question, completion], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT key, score FROM scores WHERE key IN ({marks})", chunk)
                found.update({k: float(s) for k, s in rows})
        return found

    def put_many(self, items: dict[str, float]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)", list(items.items()))
            self._db.commit()

    def close(self) -> None:
        self._db.close()


def score_with_cache(
    scorer: Scorer, cache: ScoreCache | None, items: Sequence[ScoreItem]
) -> tuple[list[float], int]:
    """Scores of ``items`` (cached ones looked up, the rest computed and stored); and the hit count."""
    keys = [
        ScoreCache.key(scorer.identity, it.heuristic.id if it.heuristic else None, it.question, it.completion)
        for it in items
    ]
    cached = cache.get_many(keys) if cache is not None else {}
    missing = [i for i, k in enumerate(keys) if k not in cached]
    fresh = scorer.score([items[i] for i in missing]) if missing else []
    new = {keys[i]: s for i, s in zip(missing, fresh, strict=True)}
    if cache is not None and new:
        cache.put_many(new)
    scores = {**cached, **new}
    return [scores[k] for k in keys], len(items) - len(missing)


class LazyScorer:
    """The scorer a config names, with its identity known up front and its model loaded only on
    the first call that is not served by the cache."""

    def __init__(self, section: ScoreSection, base_model: str) -> None:
        self.section = section
        self.base_model = base_model
        self.name = section.scorer
        self.identity = scorer_identity(section, base_model)
        self._scorer: Scorer | None = None

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        if self._scorer is None:
            self._scorer = make_scorer(self.section, self.base_model)
            if self._scorer.identity != self.identity:
                log.warning(
                    "scorer identity %r differs from the cache identity %r",
                    self._scorer.identity,
                    self.identity,
                )
        return self._scorer.score(items)

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None


def _judge_model(section: ScoreSection, base_model: str) -> str:
    return section.backend.model or section.model or base_model


def scorer_identity(section: ScoreSection, base_model: str) -> str:
    """The cache identity of the scorer ``section`` names, without loading any model."""
    from manyways.models import resolve_model_path

    if section.scorer == "none":
        return ConstantScorer.identity
    if section.scorer == "judge":
        model = _judge_model(section, base_model)
        return judge_identity(section.backend.kind, model)
    if not section.model:
        raise ValueError("score.scorer=reward_model needs score.model (e.g. a Skywork-Reward checkpoint)")
    return reward_model_identity(resolve_model_path(section.model), section.max_tokens)


def make_scorer(section: ScoreSection, base_model: str) -> Scorer:
    """The scorer ``section.scorer`` names, loading its model now."""
    if section.scorer == "none":
        return ConstantScorer()
    if section.scorer == "judge":
        from manyways.backends.config import make_backend

        backend = make_backend(
            section.backend.model_copy(update={"model": None}), _judge_model(section, base_model)
        )
        return JudgeScorer(backend, batch_size=section.batch_size)
    if section.scorer == "reward_model":
        if not section.model:
            raise ValueError("score.scorer=reward_model needs score.model (e.g. a Skywork-Reward checkpoint)")
        return RewardModelScorer(
            section.model,
            batch_size=section.batch_size,
            max_tokens=section.max_tokens,
            device=section.device,
            dtype=section.dtype,
        )
    raise ValueError(f"unknown scorer {section.scorer!r}")
