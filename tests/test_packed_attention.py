"""Per-sequence attention for padding-free batches (manyways.packed_attention): the masked sdpa
result, and a fallback to sdpa wherever the per-sequence path would not be exact."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from manyways import packed_attention as pa


class Module:
    """What the attention functions read from a transformers attention module."""

    num_key_value_groups = 3
    is_causal = True
    training = True


LENGTHS = [23, 9, 1, 15]


def positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def qkv(total: int, dtype: torch.dtype = torch.float32, batch: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(batch, 6, total, 8), (batch, 2, total, 8), (batch, 2, total, 8)]  # GQA: 3 queries per key
    return [(torch.randn(s, generator=gen) * 2).to(dtype).requires_grad_() for s in shapes]


def attend(fn, tensors, mask, **kwargs):
    out, _ = fn(Module(), *tensors, mask, scaling=8**-0.5, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.float().backward(grad)
    return out.detach().float(), [t.grad.float() for t in tensors]


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([0, 1, 2, 0, 1, 0], [3, 2, 1]),
        ([0, 1, 2, 3], [4]),
        ([0, 0, 0], [1, 1, 1]),
        ([1, 2, 3], None),  # does not start a sequence
        ([0, 1, 3, 4], None),  # a gap is not a packing
        ([0, 1, 1], None),
    ],
)
def test_segment_lengths_reads_packed_position_ids(ids: list[int], expected: list[int] | None) -> None:
    assert pa.segment_lengths(torch.tensor([ids]), len(ids)) == expected


def test_segment_lengths_needs_one_row_of_the_query_length() -> None:
    assert pa.segment_lengths(None, 3) is None
    assert pa.segment_lengths(torch.tensor([[0, 1, 2]] * 2), 3) is None
    assert pa.segment_lengths(torch.tensor([[0, 1, 2]]), 4) is None


def test_block_causal_mask_keeps_each_sequence_to_itself() -> None:
    mask = pa.block_causal_mask((2, 3))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_per_sequence_attention_equals_masked_sdpa_in_fp32() -> None:
    total = sum(LENGTHS)
    mask = pa.block_causal_mask(tuple(LENGTHS))[None, None]
    before = pa.stats()
    ours = attend(pa.packed_attention_forward, qkv(total), mask, position_ids=positions(LENGTHS))
    assert pa.stats()["packed"] == before["packed"] + 1
    ref = attend(sdpa_attention_forward, qkv(total), mask, position_ids=positions(LENGTHS))
    assert ours[0].shape == (1, total, 6, 8)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_is_as_close_to_fp32_as_sdpa_in_bf16() -> None:
    """The scores and softmax run in fp32 (autocast off inside): in bf16 the output and gradients are
    no further from the fp32 result than sdpa's own bf16 kernel is."""
    total = sum(LENGTHS)
    mask = pa.block_causal_mask(tuple(LENGTHS))[None, None]
    pos = positions(LENGTHS)
    ref = attend(sdpa_attention_forward, qkv(total), mask, position_ids=pos)

    def error(fn) -> list[float]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = attend(fn, qkv(total, torch.bfloat16), mask, position_ids=pos)
        return [
            ((a - b).norm() / b.norm()).item() for a, b in zip([out, *grads], [ref[0], *ref[1]], strict=True)
        ]

    ours, sdpa = error(pa.packed_attention_forward), error(sdpa_attention_forward)
    assert all(o <= 1.25 * s + 1e-3 for o, s in zip(ours, sdpa, strict=True)), (ours, sdpa)
    assert max(ours) < 0.02


@pytest.mark.parametrize(
    "case", ["padding_mask", "two_rows", "dropout", "no_position_ids", "too_long", "one_sequence_with_a_mask"]
)
def test_anything_but_a_plain_packing_falls_back_to_sdpa(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    total = sum(LENGTHS)
    mask = pa.block_causal_mask(tuple(LENGTHS))[None, None].clone()
    kwargs = {"position_ids": positions(LENGTHS)}
    batch = 1
    if case == "padding_mask":
        mask[..., -1] = False  # the last position is padding: not the packing's mask
    elif case == "two_rows":
        batch, mask = 2, mask.expand(2, 1, total, total)
        kwargs["position_ids"] = kwargs["position_ids"].expand(2, -1)
    elif case == "dropout":
        kwargs["dropout"] = 0.1
    elif case == "no_position_ids":
        kwargs.pop("position_ids")
    elif case == "too_long":
        monkeypatch.setattr(pa, "MAX_SEQUENCE", max(LENGTHS) - 1)
    elif case == "one_sequence_with_a_mask":
        kwargs["position_ids"] = torch.arange(total)[None]  # the mask says 4 sequences, the ids 1
    seen = {}

    def spy(*args, **kw):
        seen["called"] = True
        return sdpa_attention_forward(*args, **kw)

    monkeypatch.setattr("transformers.integrations.sdpa_attention.sdpa_attention_forward", spy)
    before = pa.stats()
    torch.manual_seed(0)
    pa.packed_attention_forward(Module(), *qkv(total, batch=batch), mask, scaling=8**-0.5, **kwargs)
    assert seen == {"called": True}
    assert pa.stats()["fallback"] == before["fallback"] + 1 and pa.stats()["packed"] == before["packed"]


def test_a_model_trains_with_it_and_saves_a_standard_config(tmp_path, tiny_model_dir) -> None:
    """The model-level switch: the tiny model's loss and gradients on a packed row match sdpa's,
    and a saved model does not name the custom attention."""
    import json

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(0))
    results = []
    for packed in (False, True):
        if packed:
            assert pa.use_packed_attention(model)
            assert model.config._attn_implementation == pa.NAME
        model.zero_grad(set_to_none=True)
        before = pa.stats()["packed"]
        out = model(input_ids=ids, position_ids=positions(LENGTHS), labels=ids, use_cache=False)
        out.loss.backward()
        assert (pa.stats()["packed"] > before) == packed
        results.append((out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_sdpa, grads_sdpa), (loss_packed, grads_packed) = results
    assert loss_packed == pytest.approx(loss_sdpa, rel=1e-5)
    for name, grad in grads_sdpa.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())
    assert not pa.use_packed_attention(model)  # already switched: nothing to do
    model.save_pretrained(tmp_path / "saved")
    assert pa.NAME not in (tmp_path / "saved" / "config.json").read_text()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"]
