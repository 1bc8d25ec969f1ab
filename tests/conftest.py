"""Shared fixtures: an isolated cache, the tiny random model, offline Hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A 2-layer random-weight SmolLM2-architecture model with the real tokenizer (cached)."""
    from manyways.models import build_tiny_model

    return build_tiny_model()


def spread_model(model_dir: Path):
    """(model, tokenizer): the tiny model in fp32 with its matrices redrawn at a larger spread
    (0.15, seeded) than the init, so greedy decoding gives varied tokens; one torch thread."""
    import torch

    from manyways.models import load_model_and_tokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer(str(model_dir), dtype="float32", device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return model, tokenizer


def spread_hf_backend(model_dir: Path):
    """An hf back-end on :func:`spread_model`."""
    from manyways.backends.hf import HFBackend

    model, tokenizer = spread_model(model_dir)
    return HFBackend(model, tokenizer, model_id="tiny", batch_size=16)
