"""Back-end config validation, dtype resolution, lazy factory and batch planning."""

from __future__ import annotations

import sys

import pytest
import torch
from pydantic import ValidationError

from manyways.backends import BackendConfig, make_backend
from manyways.backends import config as config_module
from manyways.backends.sampling import (
    plan_batches,
    prefix_groups,
    select_tokens,
    shared_prefix_len,
    top_p_filter,
)


def test_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(ValidationError, match="batchsize"):
        BackendConfig(kind="hf", batchsize=4)


def test_config_is_frozen_and_vllm_defaults_prefix_caching() -> None:
    cfg = BackendConfig()
    with pytest.raises(ValidationError):
        cfg.kind = "fake"
    assert cfg.vllm["enable_prefix_caching"] is True


def test_dtype_auto_follows_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_module.resolve_dtype("float32", "cuda") == "float32"
    assert config_module.resolve_dtype("auto", "cuda:0") == "bfloat16"
    monkeypatch.setattr(config_module, "cpu_supports_bf16", lambda: False)
    assert config_module.resolve_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(config_module, "cpu_supports_bf16", lambda: True)
    assert config_module.resolve_dtype("auto", "cpu") == "bfloat16"


def test_missing_vllm_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # behave as on a CPU install without vLLM
    with pytest.raises(ImportError, match=r"pip install 'manyways\[vllm\]'"):
        make_backend(BackendConfig(kind="vllm"), default_model="m")


def test_shared_prefix_leaves_one_token_per_prompt() -> None:
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4, 5]]) == 2
    assert shared_prefix_len([[7, 1], [8, 1]]) == 0


def test_plan_batches_fills_the_row_budget_and_prefix_groups_split_heuristics() -> None:
    heur_a = [[1, 1, 1, 1, 1, 1, 1, 1, q] for q in range(10, 14)]
    heur_b = [[1, 2, 2, 2, 2, 2, 2, 2, q] for q in range(10, 14)]
    tokens = [t for pair in zip(heur_b, heur_a, strict=True) for t in pair]  # interleaved
    batches = plan_batches(tokens, [4] * len(tokens), batch_size=16)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert [len(b) for b in batches] == [4, 4]  # 16 rows each: full batches
    [whole] = plan_batches(tokens, [4] * len(tokens), batch_size=64)  # both heuristics together
    groups = prefix_groups([tokens[i] for i in whole])
    assert [len(g) for g in groups] == [4, 4]  # one prefill group per few-shot prefix
    for g in groups:
        assert len({tokens[whole[i]][1] for i in g}) == 1
    assert prefix_groups([]) == [] and prefix_groups([[5]]) == [range(0, 1)]
    big = plan_batches([[1, 2]], [40], batch_size=16)
    assert big == [[0]]


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = top_p_filter(probs, 0.7)
    assert kept.tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_select_tokens_greedy_and_seeded() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(s) for s in (1, 1, 2)]
    greedy = select_tokens(logits, [0.0, 0.0, 0.0], [1.0] * 3, gens)
    assert greedy.tolist() == logits.argmax(dim=-1).tolist()
    same = logits[0].expand(3, 50)
    draws = [
        select_tokens(same, [1.0] * 3, [1.0] * 3, [torch.Generator().manual_seed(s) for s in (5, 5, 6)])
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])
    assert draws[0][0] == draws[0][1]


def test_select_tokens_mixes_greedy_and_sampled_rows() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    temps = [0.0, 0.8, 0.0, 1.2]

    def gens():
        return [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]

    mixed = select_tokens(logits, temps, [1.0] * 4, gens())
    sampled = select_tokens(logits, [0.5, 0.8, 0.5, 1.2], [1.0] * 4, gens())
    assert mixed[0] == logits[0].argmax() and mixed[2] == logits[2].argmax()
    assert mixed[1] == sampled[1] and mixed[3] == sampled[3]  # a greedy batch-mate changes no draw


def test_top_p_partial_sort_equals_full_sort() -> None:
    gen = torch.Generator().manual_seed(3)
    peaked = torch.softmax(torch.randn(4, 5000, generator=gen) * 6, dim=-1)
    flat = torch.softmax(torch.randn(2, 5000, generator=gen) * 0.1, dim=-1)
    for probs in (peaked, flat, torch.cat([peaked, flat])):
        limits = torch.full((probs.shape[0],), 0.9)
        got = top_p_filter(probs, limits)
        for row, want_row in zip(got, probs, strict=True):
            order = torch.sort(want_row, descending=True)
            before = torch.cumsum(order.values, 0) - order.values
            kept = set(order.indices[before < 0.9].tolist())
            assert set(torch.nonzero(row).flatten().tolist()) == kept
