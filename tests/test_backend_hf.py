"""The transformers back-end's decode loop against ``model.generate`` on the tiny model (fp32).

The tiny model's weights are re-drawn with a larger spread so greedy decoding produces varied
tokens instead of one repeated token; otherwise equality with ``generate`` would prove little.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from conftest import spread_model
from manyways.backends import GenerationBackend, GenRequest
from manyways.backends.hf import HFBackend, cache_keyword
from manyways.backends.sampling import plan_batches, prefix_groups

PREFIX_A = "You solve problems by working backward. Example: 10 apples, ate 3, left 7.\n"
PREFIX_B = "You solve problems by splitting them into parts. Example: 2 boxes of 4 is 8.\n"
pytestmark = pytest.mark.slow  # loads the tiny random-weight model

QUESTIONS = ["What is 2+3?", "A train leaves at noon; when does it arrive?", "Compute 17*23.", "Hi"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    model, tokenizer = spread_model(tiny_model_dir)
    return model, tokenizer


@pytest.fixture()
def backend(model_and_tokenizer) -> HFBackend:
    model, tokenizer = model_and_tokenizer
    return HFBackend(model, tokenizer, model_id="tiny", batch_size=16)


def _msgs(prefix: str, question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prefix + question}]


def _greedy_reference(backend: HFBackend, messages: list[dict[str, str]], max_new: int) -> str:
    ids = torch.tensor([backend.encode(messages)])
    out = backend.model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new
    )
    return backend.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_is_a_generation_backend(backend: HFBackend) -> None:
    assert isinstance(backend, GenerationBackend)


def test_cache_keyword_follows_the_model_signature() -> None:
    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):  # transformers >= 5.24
            return input_ids

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return input_ids

    assert cache_keyword(New()) == "cache"
    assert cache_keyword(Old()) == "past_key_values"


def test_generation_uses_no_deprecated_cache_keyword(backend: HFBackend) -> None:
    request = GenRequest("r", _msgs(PREFIX_A, QUESTIONS[0]), seeds=(0, 1), max_new_tokens=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.generate([request])
    assert not [w for w in caught if "past_key_values" in str(w.message)]


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_greedy_equals_model_generate(backend: HFBackend, prefix_sharing: bool) -> None:
    backend.prefix_sharing = prefix_sharing
    messages = [_msgs(PREFIX_A, q) for q in QUESTIONS] + [_msgs(PREFIX_B, QUESTIONS[0])]
    requests = [
        GenRequest(f"r{i}", m, seeds=(0,), max_new_tokens=24, temperature=0.0) for i, m in enumerate(messages)
    ]
    out = backend.generate(requests)
    texts = [row[0].text for row in out]
    assert texts == [_greedy_reference(backend, m, 24) for m in messages]
    assert len(set(texts)) == len(texts)  # the outputs are not degenerate
    # random weights sometimes emit half of a multi-byte character: that is a decode_error
    assert all(row[0].finish_reason in ("length", "decode_error") for row in out)
    assert all(row[0].completion_tokens == 24 for row in out)
    assert [r[0].finish_reason == "decode_error" for r in out] == ["\ufffd" in t for t in texts]


def test_max_new_tokens_and_prompt_tokens(backend: HFBackend) -> None:
    messages = _msgs(PREFIX_A, QUESTIONS[1])
    sample = backend.generate([GenRequest("r", messages, seeds=(3,), max_new_tokens=7, temperature=1.0)])[0][
        0
    ]
    assert sample.completion_tokens == 7 and sample.finish_reason == "length"
    assert sample.prompt_tokens == len(backend.encode(messages))


def test_stop_string_cuts_text(backend: HFBackend) -> None:
    messages = _msgs(PREFIX_A, QUESTIONS[2])
    full = backend.generate([GenRequest("r", messages, seeds=(0,), max_new_tokens=24, temperature=0.0)])[0][0]
    stop = full.text[10:13]
    assert stop.strip()
    cut = backend.generate(
        [GenRequest("r", messages, seeds=(0,), max_new_tokens=24, temperature=0.0, stop=(stop,))]
    )
    sample = cut[0][0]
    assert sample.finish_reason == "stop"
    assert sample.text == full.text[: full.text.index(stop)]
    assert sample.completion_tokens < 24


def test_seeds_reproducible_and_distinct(backend: HFBackend) -> None:
    messages = _msgs(PREFIX_B, QUESTIONS[0])
    req = GenRequest("r", messages, seeds=(1, 2, 3, 1), max_new_tokens=16, temperature=1.0)
    first = [s.text for s in backend.generate([req])[0]]
    again = [s.text for s in backend.generate([req])[0]]
    assert first == again
    assert first[0] == first[3]
    assert len({first[0], first[1], first[2]}) == 3


def test_sample_does_not_depend_on_batch_mates(backend: HFBackend) -> None:
    target = GenRequest(
        "t", _msgs(PREFIX_A, QUESTIONS[3]), seeds=(11, 12), max_new_tokens=16, temperature=1.0, top_p=0.9
    )
    alone = backend.generate([target])[0]
    others = [
        GenRequest(f"o{i}", _msgs(p, q), seeds=(5, 6, 7), max_new_tokens=9 + i, temperature=0.8)
        for i, (p, q) in enumerate(
            [(PREFIX_A, QUESTIONS[0]), (PREFIX_A, QUESTIONS[1]), (PREFIX_B, QUESTIONS[2])]
        )
    ]
    crowded = backend.generate([others[0], target, *others[1:]])[1]
    assert [s.text for s in alone] == [s.text for s in crowded]


def test_prompts_of_two_heuristics_decode_in_one_merged_batch(backend: HFBackend) -> None:
    long_a, long_b = PREFIX_A * 4, PREFIX_B * 4  # long few-shot prefixes that differ early
    messages = [_msgs(long_a, q) for q in QUESTIONS[:2]] + [_msgs(long_b, q) for q in QUESTIONS[1:]]
    tokens = [backend.encode(m) for m in messages]
    [batch] = plan_batches(tokens, [2] * len(tokens), backend.batch_size)
    assert len(prefix_groups([tokens[i] for i in batch])) == 2  # the merge path runs
    greedy = backend.generate(
        [
            GenRequest(f"g{i}", m, seeds=(0,), max_new_tokens=16, temperature=0.0)
            for i, m in enumerate(messages)
        ]
    )
    assert [r[0].text for r in greedy] == [_greedy_reference(backend, m, 16) for m in messages]
    backend._mergeable = False  # a model whose cache layers cannot merge: groups decode apart
    apart = backend.generate(
        [
            GenRequest(f"g{i}", m, seeds=(0,), max_new_tokens=16, temperature=0.0)
            for i, m in enumerate(messages)
        ]
    )
    backend._mergeable = True
    assert [r[0].text for r in apart] == [r[0].text for r in greedy]
    sampled = [GenRequest(f"s{i}", m, seeds=(5, 6), max_new_tokens=12) for i, m in enumerate(messages)]
    together = backend.generate(sampled)
    alone = [backend.generate([r])[0] for r in sampled]
    assert [[s.text for s in r] for r in together] == [[s.text for s in r] for r in alone]
    before = backend.stats.prefill_tokens_computed
    backend.generate(sampled)
    shared_prefill = backend.stats.prefill_tokens_computed - before
    assert shared_prefill < 0.6 * sum(len(t) for t in tokens)  # each prefix once, not per prompt


def test_prefix_sharing_cuts_prefill(backend: HFBackend) -> None:
    requests = [
        GenRequest(f"{p[:8]}{q}", _msgs(p, q), seeds=(1, 2, 3, 4), max_new_tokens=4, temperature=1.0)
        for p in (PREFIX_A, PREFIX_B)
        for q in QUESTIONS
    ]
    shared = backend.generate(requests)
    stats = backend.stats
    prompt_lens = [len(backend.encode(r.messages)) for r in requests]
    assert stats.prompt_tokens_submitted == 4 * sum(prompt_lens)
    assert stats.prefill_ratio < 0.5
    plain = HFBackend(backend.model, backend.tokenizer, model_id="tiny", batch_size=16, prefix_sharing=False)
    unshared = plain.generate(requests)
    # prefix sharing computes fewer prompt tokens than prefilling each prompt once (no padding)
    assert stats.prefill_tokens_computed < sum(prompt_lens) <= plain.stats.prefill_tokens_computed
    assert [[s.text for s in r] for r in shared] == [[s.text for s in r] for r in unshared]


def test_requests_larger_than_a_batch_keep_seed_order(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    small = HFBackend(model, tokenizer, model_id="tiny", batch_size=3)
    big = HFBackend(model, tokenizer, model_id="tiny", batch_size=32)
    req = GenRequest(
        "r", _msgs(PREFIX_A, QUESTIONS[0]), seeds=tuple(range(7)), max_new_tokens=8, temperature=1.0
    )
    assert [s.text for s in small.generate([req])[0]] == [s.text for s in big.generate([req])[0]]


def test_progress_reports_every_sample_and_token(backend: HFBackend) -> None:
    seen: list[tuple[int, int]] = []
    req = GenRequest("r", _msgs(PREFIX_A, QUESTIONS[0]), seeds=(1, 2, 3), max_new_tokens=6, temperature=1.0)
    out = backend.generate([req], progress=lambda n, t: seen.append((n, t)))
    assert sum(n for n, _ in seen) == 3
    assert sum(t for _, t in seen) == sum(s.completion_tokens for s in out[0]) == backend.stats.decode_tokens


def test_next_token_probs_match_one_forward_pass(backend: HFBackend) -> None:
    conversations = [
        _msgs(PREFIX_A, "Answer A or B."),
        _msgs(PREFIX_B, "Is it A or B? Reply with one letter."),
    ]
    probs = backend.next_token_probs(conversations, ["A", "B"])
    for messages, p in zip(conversations, probs, strict=True):
        ids = torch.tensor([backend.encode(messages)])
        with torch.no_grad():
            logits = backend.model(input_ids=ids).logits[0, -1]
        a, b = backend.option_token_ids(["A", "B"])
        full = torch.softmax(logits, dim=-1)
        assert p["A"] == pytest.approx(float(full[a] / (full[a] + full[b])), rel=1e-4)
        assert sum(p.values()) == pytest.approx(1.0)
    top = backend.next_token_logprobs(conversations, 5)
    assert all(len(t) <= 5 and max(t.values()) <= 0 for t in top)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_probs_do_not_depend_on_the_other_conversations(model_and_tokenizer, dtype) -> None:
    """The score cache computes only its misses, so the batch a trace is judged in depends on what
    else was cached: a judge score must be the same alone as next to a longer conversation (exactly,
    or select's choice between close traces would depend on the cache's history)."""
    import copy

    model, tokenizer = model_and_tokenizer
    backend = HFBackend(copy.deepcopy(model).to(dtype), tokenizer, model_id="tiny", batch_size=16)
    short = _msgs(PREFIX_A, "Answer A or B.")
    longer = _msgs(PREFIX_B, "Is it A or B? " + "Think about the trains and the apples first. " * 12)
    alone = backend.next_token_probs([short], ["A", "B"])[0]
    together = backend.next_token_probs([longer, short, longer], ["A", "B"])
    assert together[1] == alone
    assert together[0] == together[2] == backend.next_token_probs([longer], ["A", "B"])[0]
    top_alone = backend.next_token_logprobs([short], 5)[0]
    assert backend.next_token_logprobs([longer, short], 5)[1] == top_alone


# ------------------------------------------------------------- decode cache and attention
def _cache_pair(store_dtype: torch.dtype | None = None):
    from transformers.cache_utils import DynamicLayer

    from manyways.backends.kv_cache import GrowingLayer

    return GrowingLayer(store_dtype=store_dtype, max_len=400), DynamicLayer()


def test_growing_layer_matches_dynamic_layer_through_growth_and_row_changes() -> None:
    gen = torch.Generator().manual_seed(1)
    ours, ref = _cache_pair()

    def step(rows: int, positions: int) -> None:
        k, v = (torch.randn(rows, 3, positions, 8, generator=gen) for _ in range(2))
        got, want = ours.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    step(1, 150)  # prefix: past GROW_MIN, so the first append regrows
    ours.batch_repeat_interleave(4)
    ref.batch_repeat_interleave(4)
    step(4, 30)
    for _ in range(150):  # past the regrown capacity (308) once more
        step(4, 1)
    keep = torch.tensor([0, 3])
    ours.batch_select_indices(keep)
    ref.batch_select_indices(keep)
    for _ in range(5):
        step(2, 1)
    assert ours.get_seq_length() == ref.get_seq_length() == 335
    assert ours._capacity() <= 400  # never past the max_len hint


def test_growing_layer_stores_in_its_dtype() -> None:
    ours, _ = _cache_pair(torch.float32)
    keys, values = ours.update(torch.randn(2, 1, 3, 4, dtype=torch.bfloat16), torch.randn(2, 1, 3, 4))
    assert keys.dtype == values.dtype == torch.float32


@pytest.mark.parametrize("q_len", [1, 5])
def test_decode_attention_matches_transformers_sdpa(q_len: int) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from manyways.backends.kv_cache import decode_attention

    class Module(torch.nn.Module):
        num_key_value_groups = 3
        is_causal = True

    gen = torch.Generator().manual_seed(2)
    query = torch.randn(2, 6, q_len, 8, generator=gen)
    key, value = (torch.randn(2, 2, 20, 8, generator=gen) for _ in range(2))
    mask = torch.ones(2, 1, q_len, 20, dtype=torch.bool)
    mask[0, :, :, :7] = False  # a left-padded row
    got, _ = decode_attention(Module(), query, key, value, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(Module(), query, key, value, mask, scaling=0.3)
    assert got.shape == want.shape == (2, q_len, 6, 8)
    assert torch.allclose(got, want, atol=1e-5)


def test_decode_paths_agree_and_restore_model_attention(backend: HFBackend) -> None:
    messages = [_msgs(PREFIX_A, q) for q in QUESTIONS]
    requests = [
        GenRequest(f"r{i}", m, seeds=(5, 6), max_new_tokens=8 + 4 * i, temperature=0.8)
        for i, m in enumerate(messages)
    ]
    fast = backend.generate(requests)
    assert backend.model.config._attn_implementation == "sdpa"
    backend.decode_attention = False
    plain = backend.generate(requests)
    assert [[s.text for s in r] for r in fast] == [[s.text for s in r] for r in plain]
