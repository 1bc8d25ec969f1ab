"""Shared-prefix (cascade) decode attention: the attention itself against the replicated path, the
row/prompt bookkeeping, and the hf back-end's samples with and without it (tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from manyways.backends.cascade import CascadeLayer, RowGroups, cascade_attention, to_cascade
from manyways.backends.kv_cache import decode_attention, make_cache

PREFIX = "You solve problems by working backward. Example: 10 apples, ate 3, left 7.\n"
OTHER = "You solve problems by splitting them into parts. Example: 2 boxes of 4 is 8.\n"
QUESTIONS = ["What is 2+3?", "A train leaves at noon; when does it arrive?", "Compute 17*23.", "Hi"]


class _Attn(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True
    layer_idx = 0


def _prefilled(prompts: int, length: int, pad: list[int], dtype: torch.dtype, gen: torch.Generator):
    """A one-layer prefilled cache (``prompts`` rows, left padding ``pad[i]``) and its mask."""
    cache = make_cache(_config(), store_dtype=dtype, max_len=64)
    k, v = (torch.randn(prompts, 2, length, 8, generator=gen).to(dtype) for _ in range(2))
    cache.update(k, v, 0)
    mask = torch.ones(prompts, length, dtype=torch.long)
    for i, p in enumerate(pad):
        mask[i, :p] = 0
    return cache, mask


def _check_against_replicated(dtype: torch.dtype, atol: float) -> None:
    gen = torch.Generator().manual_seed(3)
    prompt_of_row = [0, 1, 1, 1, 0, 2]  # uneven rows per prompt, interleaved
    cache, mask = _prefilled(3, 11, [0, 4, 2], dtype, gen)
    ref = make_cache(_config(), store_dtype=dtype, max_len=64)
    ref.update(cache.layers[0].keys.clone(), cache.layers[0].values.clone(), 0)
    ref.batch_select_indices(torch.tensor(prompt_of_row))
    cascade = to_cascade(cache, mask, prompt_of_row, max_new_tokens=8)
    row_mask = mask[torch.tensor(prompt_of_row)]
    for step in range(3):
        k, v = (torch.randn(6, 2, 1, 8, generator=gen).to(dtype) for _ in range(2))
        suffix_k, suffix_v = cascade.update(k, v, 0)
        full_k, full_v = ref.update(k, v, 0)
        row_mask = torch.cat([row_mask, torch.ones(6, 1, dtype=torch.long)], dim=1)
        attn_mask = row_mask.bool()[:, None, None, :]
        query = torch.randn(6, 6, 1, 8, generator=gen).to(dtype)
        got = cascade_attention(query, suffix_k, suffix_v, attn_mask, 0.3, cascade.layers[0], cascade)
        got_none = cascade_attention(query, suffix_k, suffix_v, None, 0.3, cascade.layers[0], cascade)
        want, _ = decode_attention(_Attn(), query, full_k, full_v, attn_mask, scaling=0.3)
        assert suffix_k.shape[-2] == step + 1 and cascade.get_seq_length() == 12 + step
        assert torch.allclose(got.reshape(6, 1, 6, 8).float(), want.float(), atol=atol), step
        assert torch.equal(got, got_none)  # the suffix is never padded: the mask is the prefix's


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=1, hidden_size=48, num_attention_heads=6, num_key_value_heads=2)


def test_cascade_attention_equals_replicated_attention_fp32() -> None:
    _check_against_replicated(torch.float32, atol=1e-6)


def test_cascade_attention_equals_replicated_attention_bf16_within_rounding() -> None:
    # two bf16 roundings of partial outputs (|out| <= max |v| ~ 3) instead of one: a few bf16 ulps
    _check_against_replicated(torch.bfloat16, atol=3 * 2**-7)


def test_row_groups_map_rows_to_prompt_slots() -> None:
    groups = RowGroups.of([1, 0, 1, 1], 2, "cpu")
    assert groups.slots.tolist() == [[1, 1, 1], [0, 2, 3]]  # prompt 0 padded with its own row
    assert groups.slot_of_row.tolist() == [3, 0, 4, 5]
    with pytest.raises(ValueError, match="at least one row"):
        RowGroups.of([0, 0], 2, "cpu")


def test_finished_rows_leave_and_unread_prompts_are_dropped() -> None:
    gen = torch.Generator().manual_seed(4)
    cache, mask = _prefilled(3, 5, [0, 0, 1], torch.float32, gen)
    first_keys = cache.layers[0].keys.clone()
    cascade = to_cascade(cache, mask, [0, 0, 1, 2, 2], max_new_tokens=4)
    cascade.update(*(torch.randn(5, 2, 1, 8, generator=gen) for _ in range(2)), 0)
    cascade.batch_select_indices(torch.tensor([1, 3, 4]))  # prompt 1's only row finished
    layer = cascade.layers[0]
    assert isinstance(layer, CascadeLayer) and layer.prefix_kt.shape[0] == 2
    assert torch.equal(layer.prefix_kt.transpose(-1, -2), first_keys[[0, 2]])
    assert cascade.prefix_mask.tolist() == [[True] * 5, [False] + [True] * 4]
    assert cascade.groups.prompt_of_row.tolist() == [0, 1, 1]
    assert layer.keys.shape[0] == 3 and layer.get_seq_length() == 6
    with pytest.raises(NotImplementedError):
        cascade.batch_repeat_interleave(2)
    # an attention that never saw the cascade (its model drops the forward's keyword arguments)
    with pytest.raises(RuntimeError, match="did not receive cascade"):
        cascade.update(*(torch.randn(3, 2, 1, 8, generator=gen) for _ in range(2)), 0)
    with pytest.raises(TypeError, match="GrowingLayer"):
        from transformers import DynamicCache

        to_cascade(DynamicCache(config=_config()), mask, [0, 1, 2], 1)


# ----------------------------------------------------------------------------- the back-end
@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path):
    from conftest import spread_hf_backend

    backend = spread_hf_backend(tiny_model_dir)
    backend.cascade_min_saved = 0  # the tests' short prompts: take the cascade path whenever it applies
    return backend


def _msgs(prefix: str, question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prefix + question}]


@pytest.fixture()
def cascade_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the cascade attention (so a test knows the path ran)."""
    import manyways.backends.cascade as cascade_module

    calls: list[int] = []
    inner = cascade_module.cascade_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return inner(*args, **kwargs)

    monkeypatch.setattr(cascade_module, "cascade_attention", counted)
    return calls


def _both_paths(backend, requests):
    backend.cascade = True
    shared = backend.generate(requests)
    backend.cascade = False
    try:
        replicated = backend.generate(requests)
    finally:
        backend.cascade = True
    return [[s.text for s in r] for r in shared], [[s.text for s in r] for r in replicated]


@pytest.mark.slow
def test_greedy_samples_equal_model_generate(backend, cascade_calls: list[int]) -> None:
    from manyways.backends.protocol import GenRequest

    messages = [_msgs(PREFIX, q) for q in QUESTIONS[:3]]
    requests = [
        GenRequest(f"g{i}", m, seeds=(0, 1, 2), max_new_tokens=16, temperature=0.0)
        for i, m in enumerate(messages)
    ]
    out = backend.generate(requests)
    assert cascade_calls and max(cascade_calls) == 9  # 3 prompts x 3 rows decoded on shared KV
    for m, samples in zip(messages, out, strict=True):
        ids = torch.tensor([backend.encode(m)])
        ref = backend.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16
        )
        want = backend.tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
        assert [s.text for s in samples] == [want] * 3
    assert len({r[0].text for r in out}) == 3


@pytest.mark.slow
def test_seeded_samples_identical_to_replicated_path(backend, cascade_calls: list[int]) -> None:
    from manyways.backends.protocol import GenRequest

    # two few-shot prefixes (merged, left-padded groups), rows finishing at different steps
    pairs = [
        (PREFIX, QUESTIONS[0]),
        (PREFIX, QUESTIONS[1]),
        (OTHER * 2, QUESTIONS[2]),
        (OTHER * 2, QUESTIONS[3]),
    ]
    requests = [
        GenRequest(
            f"s{i}", _msgs(p, q), seeds=(7, 8, 9, 10), max_new_tokens=6 + 5 * i, temperature=0.9, top_p=0.95
        )
        for i, (p, q) in enumerate(pairs)
    ]
    shared, replicated = _both_paths(backend, requests)
    assert cascade_calls and max(cascade_calls) == 16 and min(cascade_calls) == 4  # rows left
    assert shared == replicated
    assert all(len(set(r)) > 1 for r in shared)  # the seeds differ: a real sampling test


@pytest.mark.slow
def test_one_sample_per_prompt_keeps_the_replicated_path(backend, cascade_calls: list[int]) -> None:
    from manyways.backends.protocol import GenRequest

    backend.generate([GenRequest("one", _msgs(PREFIX, QUESTIONS[0]), seeds=(1,), max_new_tokens=4)])
    assert cascade_calls == []


def _greedy_logits(backend, requests, cascade: bool, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The logits of every decode step (rows in order) of a greedy run."""
    import manyways.backends.hf as hf_module

    seen: list[torch.Tensor] = []
    inner = hf_module.select_tokens

    def spy(logits, *args):
        seen.append(logits.float().clone())
        return inner(logits, *args)

    monkeypatch.setattr(hf_module, "select_tokens", spy)
    backend.cascade = cascade
    try:
        backend.generate(requests)
    finally:
        backend.cascade = True
        monkeypatch.setattr(hf_module, "select_tokens", inner)
    return seen


@pytest.mark.slow
def test_bf16_greedy_tokens_differ_only_at_bf16_ties(backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 cannot be bit-identical (see the cascade module's docstring). Greedy decoding of the
    tiny random model in bf16 meets exact ties within a few steps (two tokens with the same bf16
    logit), where either choice is right; up to the first divergence every step's logits agree
    within 4 bf16 ulps at the logits' magnitude (<= 8: ulp 1/16), and the tokens differ only
    where the replicated path's top-2 gap is within that difference."""
    from manyways.backends.hf import HFBackend
    from manyways.backends.protocol import GenRequest

    model = backend.model.to(torch.bfloat16)
    try:
        bf16 = HFBackend(model, backend.tokenizer, model_id="tiny", batch_size=16)
        requests = [
            GenRequest(f"b{i}", _msgs(PREFIX, q), seeds=(0, 1), max_new_tokens=24, temperature=0.0)
            for i, q in enumerate(QUESTIONS[:3])
        ]
        shared = _greedy_logits(bf16, requests, True, monkeypatch)
        replicated = _greedy_logits(bf16, requests, False, monkeypatch)
    finally:
        backend.model.to(torch.float32)
    assert torch.equal(shared[0], replicated[0])  # the first token comes from the same prefill
    compared = 0
    for ours, theirs in zip(shared, replicated, strict=False):
        diff = (ours - theirs).abs().amax(dim=-1)
        assert theirs.abs().max() <= 8 and diff.max() <= 4 / 16
        top = theirs.topk(2, dim=-1).values
        differs = ours.argmax(-1) != theirs.argmax(-1)
        assert ((top[:, 0] - top[:, 1])[differs] <= diff[differs]).all()
        compared += 1
        if differs.any():
            break
    assert compared >= 2


def test_short_shared_prompts_decode_replicated(backend, cascade_calls: list[int]) -> None:
    """Below ``cascade_min_saved`` replicated prompt positions the cascade's extra ops cost more
    than the KV it saves: the back-end decodes replicated (the default threshold)."""
    from manyways.backends.hf import CASCADE_MIN_SAVED
    from manyways.backends.protocol import GenRequest

    request = GenRequest("s", _msgs(PREFIX, QUESTIONS[0]), seeds=(0, 1, 2), max_new_tokens=3, temperature=0.0)
    saved = 2 * len(backend.encode(request.messages))
    backend.cascade_min_saved = saved + 1
    try:
        backend.generate([request])
        assert cascade_calls == []
        backend.cascade_min_saved = saved
        backend.generate([request])
        assert cascade_calls
    finally:
        backend.cascade_min_saved = 0
    assert CASCADE_MIN_SAVED > saved  # so with the default these prompts decode replicated
