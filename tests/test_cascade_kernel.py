"""The fused cascade decode kernel (manyways.backends.cascade_kernel): the same attention as the
torch ops, built on first use, and the torch path whenever it cannot or must not run."""

from __future__ import annotations

import logging

import pytest
import torch

from manyways.backends import cascade_kernel
from manyways.backends.cascade import RowGroups, _decode_step, to_cascade
from manyways.backends.kv_cache import make_cache


@pytest.fixture(scope="module")
def lib():
    torch.set_num_threads(1)
    built = cascade_kernel.library()
    assert built is not None, "the kernel must build on the test machine (a C compiler is installed)"
    return built


def _reference(q, prompt_of_row, pkt, pv, pmask, skt, sv, smask, scale):
    """Attention in float64 from the same inputs: each row over its prompt's prefix + its suffix."""
    rows, kv_heads, group, dim = q.shape
    out = torch.empty(rows, kv_heads, group, dim, dtype=torch.float64)
    for r in range(rows):
        p = int(prompt_of_row[r])
        keys = torch.cat([pkt[p], skt[r]], dim=-1).double()  # [kv, dim, P+S]
        values = torch.cat([pv[p], sv[r]], dim=-2).double()  # [kv, P+S, dim]
        visible = torch.cat(
            [
                torch.ones(pkt.shape[-1], dtype=torch.bool) if pmask is None else pmask[p],
                torch.ones(skt.shape[-1], dtype=torch.bool) if smask is None else smask[r],
            ]
        )
        scores = torch.matmul(q[r].double(), keys) * scale  # [kv, group, P+S]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[r] = torch.matmul(torch.softmax(scores, dim=-1), values)
    return out


def _inputs(rows, prompts, kv_heads, group, dim, P, S, dtype, *, capacity=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q = rand(rows, kv_heads, group, dim)
    prompt_of_row = torch.tensor([r * prompts // rows for r in range(rows)][::-1], dtype=torch.long)
    pkt, pv = rand(prompts, kv_heads, dim, P), rand(prompts, kv_heads, P, dim)
    cap = capacity or S
    # the suffix as the cache holds it: views of buffers with spare capacity
    skt = rand(rows, kv_heads, dim, cap)[..., :S]
    sv = rand(rows, kv_heads, cap, dim)[:, :, :S]
    pmask = torch.ones(prompts, P, dtype=torch.bool)
    for p in range(prompts):
        pmask[p, : (3 * p) % max(P - 1, 1)] = False  # left padding, every prompt keeps a position
    smask = torch.rand(rows, S, generator=gen) > 0.3
    smask[:, -1] = True
    return q, prompt_of_row, pkt, pv, pmask, skt, sv, smask


@pytest.mark.parametrize(
    "rows,prompts,kv_heads,group,dim,P,S",
    [
        (6, 3, 2, 3, 64, 221, 41),  # the default model's head shape, tails on both parts
        (5, 2, 1, 7, 80, 16, 1),  # group 7 (two blocks a pass), a dimension tail, one suffix token
        (4, 4, 3, 12, 16, 37, 64),  # group above 8: the generic specialisation
        (3, 1, 2, 1, 8, 5, 3),  # fewer positions than one vector
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_a_float64_reference(lib, rows, prompts, kv_heads, group, dim, P, S, dtype) -> None:
    q, por, pkt, pv, pmask, skt, sv, smask = _inputs(
        rows, prompts, kv_heads, group, dim, P, S, dtype, capacity=S + 9
    )
    got = cascade_kernel.cascade_decode(lib, q, por, pkt, pv, pmask, skt, sv, smask, 0.37)
    want = _reference(q, por, pkt, pv, pmask, skt, sv, smask, 0.37)
    assert got.dtype == dtype and got.shape == q.shape
    if dtype == torch.float32:
        assert torch.allclose(got.double(), want, atol=2e-6, rtol=1e-5)
    else:  # float32 inside, one rounding to bf16 at the end: within half a bf16 ulp (+ float32 noise)
        assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


def test_masks_are_honoured_and_none_means_all_visible(lib) -> None:
    q, por, pkt, pv, pmask, skt, sv, smask = _inputs(4, 2, 2, 3, 64, 40, 20, torch.float32)
    masked = cascade_kernel.cascade_decode(lib, q, por, pkt, pv, pmask, skt, sv, smask, 0.2)
    assert torch.allclose(masked.double(), _reference(q, por, pkt, pv, pmask, skt, sv, smask, 0.2), atol=2e-6)
    # a hidden position whose value is huge changes nothing
    pv_big, sv_big = pv.clone(), sv.clone()
    pv_big[0, :, 0] = 1e30
    sv_big.masked_fill_(~smask[:, None, :, None], 1e30)
    pmask[0, 0] = False
    a = cascade_kernel.cascade_decode(lib, q, por, pkt, pv, pmask, skt, sv, smask, 0.2)
    b = cascade_kernel.cascade_decode(lib, q, por, pkt, pv_big, pmask, skt, sv_big, smask, 0.2)
    assert torch.equal(a, b)
    unmasked = cascade_kernel.cascade_decode(lib, q, por, pkt, pv, None, skt, sv, None, 0.2)
    want = _reference(q, por, pkt, pv, None, skt, sv, None, 0.2)
    assert torch.allclose(unmasked.double(), want, atol=2e-6)
    # one mask row broadcast over all rows
    row = smask[:1]
    broadcast = cascade_kernel.cascade_decode(lib, q, por, pkt, pv, None, skt, sv, row, 0.2)
    assert torch.allclose(
        broadcast.double(), _reference(q, por, pkt, pv, None, skt, sv, row.expand(4, -1), 0.2), atol=2e-6
    )


def test_a_tail_at_the_very_end_of_its_storage_is_read_safely(lib) -> None:
    # contiguous keys, P not a multiple of 16: the last key row's tail ends the storage exactly
    q, por, pkt, pv, pmask, skt, sv, smask = _inputs(3, 3, 2, 3, 64, 19, 7, torch.bfloat16)
    skt = skt.contiguous()
    got = cascade_kernel.cascade_decode(lib, q, por, pkt, pv, pmask, skt, sv, smask, 0.5)
    want = _reference(q, por, pkt, pv, pmask, skt, sv, smask, 0.5)
    assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


def _decode_inputs(dtype):
    """A one-layer cascade cache (3 prompts, left-padded, 6 rows out of prompt order) after a few
    generated tokens, and the decode step's arguments."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, hidden_size=192, num_attention_heads=6, num_key_value_heads=2)
    gen = torch.Generator().manual_seed(1)
    cache = make_cache(config, store_dtype=dtype, max_len=64)
    cache.update(*(torch.randn(3, 2, 30, 32, generator=gen).to(dtype) for _ in range(2)), 0)
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, :7], mask[2, :3] = 0, 0
    prompt_of_row = [2, 0, 1, 1, 0, 2]
    cascade = to_cascade(cache, mask, prompt_of_row, max_new_tokens=40)
    for _ in range(19):
        k, v = cascade.update(*(torch.randn(6, 2, 1, 32, generator=gen).to(dtype) for _ in range(2)), 0)
        cascade.layers[0].unread = False  # as the step's attention would
    attn = torch.cat([mask[torch.tensor(prompt_of_row)], torch.ones(6, 19, dtype=torch.long)], 1).bool()
    query = torch.randn(6, 6, 1, 32, generator=gen).to(dtype)
    return query, k, v, attn[:, None, None, :], cascade


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.bfloat16, 3 * 2**-7)])
def test_decode_step_takes_the_kernel_and_agrees_with_the_torch_ops(lib, dtype, atol, monkeypatch) -> None:
    query, k, v, attn, cascade = _decode_inputs(dtype)
    calls = []
    inner = cascade_kernel.cascade_decode
    monkeypatch.setattr(cascade_kernel, "cascade_decode", lambda *a, **kw: calls.append(1) or inner(*a, **kw))
    fused = _decode_step(query, k, v, attn, 0.25, cascade.layers[0], cascade)
    assert calls == [1]
    monkeypatch.setenv("MANYWAYS_CASCADE_KERNEL", "0")
    plain = _decode_step(query, k, v, attn, 0.25, cascade.layers[0], cascade)
    assert calls == [1]  # off: the torch ops ran
    # the torch ops round scores and probabilities to bf16 before their matmuls; the kernel does not
    assert torch.allclose(fused.float(), plain.float(), atol=atol)


def test_more_threads_or_an_additive_mask_take_the_torch_ops(lib, monkeypatch) -> None:
    query, k, v, attn, cascade = _decode_inputs(torch.float32)
    calls = []
    monkeypatch.setattr(cascade_kernel, "cascade_decode", lambda *a, **kw: calls.append(1))
    additive = torch.zeros(attn.shape).masked_fill(~attn, float("-inf"))
    _decode_step(query, k, v, additive, 0.25, cascade.layers[0], cascade)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    _decode_step(query, k, v, attn, 0.25, cascade.layers[0], cascade)
    assert calls == []


def test_a_missing_compiler_falls_back_with_one_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr(cascade_kernel, "_state", {})
    monkeypatch.setattr(cascade_kernel, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="manyways.backends.cascade_kernel"):
        assert cascade_kernel.library() is None
        assert cascade_kernel.library() is None
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no C compiler" in warnings[0].getMessage()


def test_a_failing_build_names_the_compiler_and_keeps_no_library(tmp_path) -> None:
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fake: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="fake: cannot compile"):
        cascade_kernel.build(str(fake), tmp_path / "kernels")
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_built_once_per_source_and_reused(tmp_path) -> None:
    first = cascade_kernel.build(target_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cascade_kernel.build(target_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp


def test_rows_must_read_prompts_of_the_prefix() -> None:
    with pytest.raises(ValueError, match="outside range"):
        RowGroups.of([0, 2], 2, "cpu")


def test_kernels_live_under_the_manyways_cache_root(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MANYWAYS_CACHE", str(tmp_path))
    assert cascade_kernel.kernel_dir() == tmp_path / "kernels"
