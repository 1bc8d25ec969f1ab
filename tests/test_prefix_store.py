"""Declared shared prefixes (``GenRequest.shared_prefix``): cascade attention over a prompt's
remainder (prefill) and its generated tokens on top of one copy of the prefix, and the
process-wide prefix store the hf back-end keeps them in (tiny model, float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from manyways.backends.cascade import cascade_attention, shared_cascade
from manyways.backends.prefix_store import PREFIX_STORE, PrefixStore, weights_fingerprint
from manyways.backends.protocol import GenRequest, check_request

MENU = "Heuristics:\n- work backward\n- split into parts\n- guess and check\nName the one used.\n"
TRACES = ["Start from 7 and undo each step.", "Split 24 into 20 and 4.", "Try 3, then 4: 4 works.", "x"]


def _sdpa(query, keys, values, mask, scale):
    scores = (query @ keys.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ values.float()).transpose(1, 2)


@pytest.mark.parametrize("fused", [True, False], ids=["cpu_flash_kernel", "matmul_form_as_on_gpu"])
def test_prefill_on_a_shared_prefix_equals_attention_over_the_replicated_prefix(fused: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    rows, kv, group, dim, prefix_len, width = 3, 2, 3, 8, 9, 5
    pk, pv = (torch.randn(1, kv, prefix_len, dim, generator=gen) for _ in range(2))
    cache = shared_cascade([(pk.transpose(-1, -2).contiguous(), pv)], rows, max_len=16)
    k, v = (torch.randn(rows, kv, width, dim, generator=gen) for _ in range(2))
    suffix_k, suffix_v = cache.update(k, v, 0)
    pad = [0, 2, 4]  # left padding of each row's remainder
    visible = torch.ones(rows, width, prefix_len + width, dtype=torch.bool)
    visible[:, :, prefix_len:] = torch.ones(width, width).tril().bool()
    for r, p in enumerate(pad):
        visible[r, :, prefix_len : prefix_len + p] = False
    mask = visible[:, None]
    query = torch.randn(rows, kv * group, width, dim, generator=gen)
    got = cascade_attention(query, suffix_k, suffix_v, mask, 0.3, cache.layers[0], cache, fused=fused)
    full_k = torch.cat([pk.expand(rows, -1, -1, -1), k], dim=2).repeat_interleave(group, dim=1)
    full_v = torch.cat([pv.expand(rows, -1, -1, -1), v], dim=2).repeat_interleave(group, dim=1)
    want = _sdpa(query, full_k, full_v, mask, 0.3)
    assert got.shape == (rows, width, kv * group, dim)
    assert torch.isfinite(got).all()  # padding queries see the prefix only: no NaN
    assert torch.allclose(got, want, atol=1e-6)
    # no mask given: the suffix part is causal (row 0 has no padding)
    one = shared_cascade([(pk.transpose(-1, -2).contiguous(), pv)], 1, max_len=16)
    one_k, one_v = one.update(k[:1], v[:1], 0)
    causal = cascade_attention(query[:1], one_k, one_v, None, 0.3, one.layers[0], one, fused=fused)
    assert torch.allclose(causal, want[:1], atol=1e-6)


def test_store_evicts_least_recently_used_beyond_its_budget() -> None:
    layer = (torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 8, 4))  # 2 x 32 floats = 256 bytes
    store = PrefixStore(max_bytes=600)
    store.put(("a",), [layer])
    store.put(("b",), [layer])
    assert store.get(("a",)) is not None  # a is now the most recent
    store.put(("c",), [layer])
    assert store.get(("b",)) is None and store.get(("a",)) is not None and len(store) == 2
    assert store.bytes == 512 and (store.hits, store.misses) == (2, 1)
    store.put(("huge",), [layer] * 3)  # larger than the whole budget: not kept
    assert store.get(("huge",)) is None and len(store) == 2


def test_fingerprint_tells_apart_models_that_differ_in_one_matrix() -> None:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    b = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b[0].weight.mul_(1 + 1e-6)  # a fine-tuning step moves every entry of a trained matrix
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_a_declared_prefix_must_start_the_last_message() -> None:
    with pytest.raises(ValueError, match="shared_prefix is not the start"):
        check_request(GenRequest("r", [{"role": "user", "content": "abc"}], (0,), shared_prefix="b"))
    check_request(GenRequest("r", [{"role": "user", "content": "abc"}], (0,), shared_prefix="ab"))


# ----------------------------------------------------------------------------- the back-end
@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path):
    from conftest import spread_hf_backend

    backend = spread_hf_backend(tiny_model_dir)
    return backend


def _requests(traces: list[str], declare: bool, tokens: int = 12) -> list[GenRequest]:
    return [
        GenRequest(
            f"j{i}",
            [{"role": "system", "content": "Classify."}, {"role": "user", "content": MENU + "\n" + t}],
            (i,),
            max_new_tokens=tokens,
            temperature=0.0,
            shared_prefix=MENU if declare else "",
        )
        for i, t in enumerate(traces)
    ]


def _texts(out) -> list[str]:
    return [samples[0].text for samples in out]


@pytest.fixture()
def query_lengths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The query length of every cascade attention call (> 1: a remainder prefilled on the prefix)."""
    import manyways.backends.cascade as cascade_module

    seen: list[int] = []
    inner = cascade_module.cascade_attention

    def counted(query, *args, **kwargs):
        seen.append(query.shape[2])
        return inner(query, *args, **kwargs)

    monkeypatch.setattr(cascade_module, "cascade_attention", counted)
    return seen


@pytest.mark.slow
def test_declared_prefix_greedy_equals_model_generate(backend, query_lengths: list[int]) -> None:
    PREFIX_STORE.clear()
    requests = _requests(TRACES, declare=True)
    out = backend.generate(requests)
    assert max(query_lengths) > 1 and 1 in query_lengths  # prefill and decode both on the prefix
    for request, text in zip(requests, _texts(out), strict=True):
        ids = torch.tensor([backend.encode(request.messages)])
        ref = backend.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
        )
        assert text == backend.tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert len(set(_texts(out))) > 1
    assert _texts(backend.generate(_requests(TRACES, declare=False))) == _texts(out)  # the replicated path


@pytest.mark.slow
def test_the_prefix_is_prefilled_once_per_process_and_reused(backend, tiny_model_dir: Path) -> None:
    from manyways.backends.hf import HFBackend
    from manyways.models import load_model_and_tokenizer

    PREFIX_STORE.clear()
    backend.batch_size = 2  # two batches in one call
    try:
        before = backend.stats.prefill_tokens_computed
        first = backend.generate(_requests(TRACES, declare=True))
        computed_first = backend.stats.prefill_tokens_computed - before
    finally:
        backend.batch_size = 16
    assert (PREFIX_STORE.misses, PREFIX_STORE.hits, len(PREFIX_STORE)) == (1, 1, 1)
    requests = _requests(TRACES, declare=True)
    lengths = [len(backend.encode(r.messages)) for r in requests]
    prefix_len = backend._declared_len(requests[0], backend.encode(requests[0].messages))
    assert prefix_len > 20
    before = backend.stats.prefill_tokens_computed
    again = backend.generate(requests)  # one batch, the prefix from the store: only the remainders
    assert backend.stats.prefill_tokens_computed - before == len(TRACES) * (max(lengths) - prefix_len)
    from manyways.backends.sampling import plan_batches

    batches = plan_batches([backend.encode(r.messages) for r in requests], [1] * len(TRACES), 2)
    rests = sum(len(b) * (max(lengths[i] for i in b) - prefix_len) for b in batches)
    assert len(batches) == 2 and computed_first == prefix_len + rests  # the prefix once, not per batch
    assert _texts(again) == _texts(first) and PREFIX_STORE.hits == 2
    # a request decoded alone gets the same answer as in a batch
    alone = backend.generate(_requests(TRACES, declare=True)[1:2])
    assert _texts(alone) == _texts(first)[1:2]
    # another model with other weights does not read this model's prefix
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32", device="cpu")
    other = HFBackend(model, tokenizer, model_id="tiny", batch_size=16)
    other.generate(_requests(TRACES[:2], declare=True))
    assert len(PREFIX_STORE) == 2 and PREFIX_STORE.misses == 2


@pytest.mark.slow
def test_remainders_prefilled_in_length_sorted_chunks_give_the_same_answers(backend) -> None:
    traces = [TRACES[0] * 6, TRACES[1], TRACES[2] * 3, TRACES[3], TRACES[1] * 4]  # mixed lengths
    requests = _requests(traces, declare=True)
    PREFIX_STORE.clear()
    backend.generate(requests[:1])  # the prefix into the store: below only remainders are prefilled
    lengths = [len(backend.encode(r.messages)) for r in requests]
    start = backend._declared_len(requests[0], backend.encode(requests[0].messages))
    rests = sorted(n - start for n in lengths)
    counted = []
    for rows in (len(traces), 2):
        backend.prefill_rows = rows
        try:
            before = backend.stats.prefill_tokens_computed
            counted.append(
                (_texts(backend.generate(requests)), backend.stats.prefill_tokens_computed - before)
            )
        finally:
            backend.prefill_rows = 8
    (one_chunk, padded), (chunked, computed) = counted
    assert padded == len(traces) * rests[-1]
    assert computed == 2 * rests[1] + 2 * rests[3] + rests[4] < padded  # each chunk to its own longest
    assert chunked == one_chunk  # and the answers come back in request order
    for request, text in zip(requests, chunked, strict=True):
        ids = torch.tensor([backend.encode(request.messages)])
        ref = backend.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
        )
        assert text == backend.tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
