"""bf16 linear layers with weights packed once for oneDNN (manyways.backends.packed_linear): the
same outputs as torch's own linear, bit for bit, and the hf back-end's samples unchanged."""

from __future__ import annotations

import pytest
import torch

from conftest import spread_model
from manyways.backends import packed_linear

pytestmark = pytest.mark.skipif(
    not packed_linear.available(), reason="this torch build has no oneDNN bf16 linear (the layers stay plain)"
)


@pytest.mark.parametrize("rows", [1, 3, 80, 700])
@pytest.mark.parametrize(("out_features", "in_features", "bias"), [(96, 64, False), (64, 160, True)])
def test_packed_linear_equals_torch_linear_bitwise(
    rows: int, out_features: int, in_features: int, bias: bool
) -> None:
    gen = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 1, in_features, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        plain = layer(x)
        assert packed_linear.install(layer) == 1
        packed = layer(x)
    assert hasattr(layer, "_manyways_packed")  # the packed path ran
    assert packed.dtype == torch.bfloat16 and torch.equal(packed, plain)


def test_packed_copy_follows_in_place_weight_changes_and_autograd_falls_back() -> None:
    layer = torch.nn.Linear(32, 16, bias=False).to(torch.bfloat16)
    packed_linear.install(layer)
    x = torch.randn(4, 32).to(torch.bfloat16)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)  # an optimizer step would do this
        after = layer(x)
    assert torch.equal(after, torch.nn.functional.linear(x, layer.weight))
    assert not torch.equal(after, before)
    # with autograd the layer's own forward runs (the oneDNN op has no backward)
    out = layer(x.requires_grad_())
    out.sum().backward()
    assert layer.weight.grad is not None and torch.equal(out.detach(), after)
    # fp32 inputs and fp32 layers are left to torch
    fp32 = torch.nn.Linear(8, 8)
    assert packed_linear.install(fp32) == 0
    assert packed_linear.uninstall(layer) == 1 and "forward" not in layer.__dict__
    assert not hasattr(layer, "_manyways_packed")


def test_hf_backend_samples_are_the_same_with_packed_weights(tiny_model_dir) -> None:
    """Greedy and seeded sampling through prefill, cascade decode and the LM head, bf16."""
    from manyways.backends.hf import HFBackend
    from manyways.backends.protocol import GenRequest

    model, tokenizer = spread_model(tiny_model_dir)
    model = model.to(torch.bfloat16)
    prefix = [{"role": "system", "content": "Think step by step."}]
    requests = [
        GenRequest(
            f"r{i}",
            [*prefix, {"role": "user", "content": q}],
            seeds=(0, 1, 2),
            max_new_tokens=12,
            temperature=temperature,
        )
        for i, q in enumerate(["What is 2 + 3?", "Name a prime above 10."])
        for temperature in (0.0, 0.8)
    ]
    packed = HFBackend(model, tokenizer, model_id="tiny", batch_size=16)
    assert packed.packed_linears == sum(1 for m in model.modules() if type(m) is torch.nn.Linear)
    ours = packed.generate(requests)
    assert all(hasattr(m, "_manyways_packed") for m in model.modules() if type(m) is torch.nn.Linear)
    packed.close()  # the caller keeps the model: the wrappers and packed copies go with the back-end
    assert not any(hasattr(m, "_manyways_packed") or "forward" in m.__dict__ for m in model.modules())
    plain = HFBackend(model, tokenizer, model_id="tiny", batch_size=16, packed_linear=False)
    assert plain.packed_linears == 0
    theirs = plain.generate(requests)
    key = [[(s.text, s.finish_reason, s.completion_tokens) for s in r] for r in ours]
    assert key == [[(s.text, s.finish_reason, s.completion_tokens) for s in r] for r in theirs]
    assert len({s.text for r in ours for s in r}) > 2  # varied samples, not one repeated string


def test_grpo_generation_under_autocast_packs_once_per_call_and_matches_autocast(
    tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRL's generation with the trained fp32 model under CPU bf16 autocast: the wrapped
    ``generate`` casts and packs each linear weight once per call (anew at every call), gives
    autocast's tokens (greedy and seeded sampling) and leaves the trained weights in fp32."""
    from manyways.training import cache_casts_during_generation

    model, _ = spread_model(tiny_model_dir)
    model.eval()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])

    def run(sample: bool) -> list[int]:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=sample, top_k=0, max_new_tokens=10
            )
        return out[0].tolist()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = [run(False), run(True)]
    packs: list[tuple[int, ...]] = []
    real = packed_linear.pack
    monkeypatch.setattr(packed_linear, "pack", lambda w: packs.append(tuple(w.shape)) or real(w))
    assert cache_casts_during_generation(model, bf16=True) is True
    assert [run(False), run(True)] == expected
    assert len(set(expected[0][6:])) > 1  # the greedy continuation is not one repeated token
    assert len(packs) == 2 * len(linears)  # each weight once per generate call, not per step
    assert all(m.weight.dtype == torch.float32 for m in linears)  # the trained weights untouched


def _batch_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """A training forward's loss under bf16 autocast, as the trainer runs it (padded rows)."""
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@pytest.mark.parametrize("fused", [True, False])
def test_training_forward_reuses_generations_copies_bitwise_until_the_optimizer_steps(
    tiny_model_dir, fused: bool
) -> None:
    """GRPO on CPU: after a generation, the training forward and backward run from the bf16
    copies generation made (no cast of any linear weight), with bitwise autocast's loss and
    gradients; an optimizer step (fused AdamW too, which leaves the version counters alone) drops
    the copies, so the next forward casts the new weights, and the next generation makes them anew."""
    from manyways.loss_head import _generation_cast
    from manyways.training import cache_casts_during_generation

    ours, _ = spread_model(tiny_model_dir)
    plain, _ = spread_model(tiny_model_dir)  # the same weights, no wrapping
    linears = [m for m in ours.modules() if type(m) is torch.nn.Linear]
    assert cache_casts_during_generation(ours, bf16=True)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 8], [4, 4, 6, 11, 3, 9, 2, 12]])
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused) for m in (ours, plain)]
    for step in range(2):
        with torch.no_grad():
            ours.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=3)
        assert all(packed_linear.cached_copies(m) is not None for m in linears)
        # the completion loss head takes the LM head's copy (tied to the embedding here)
        head_cast = _generation_cast(ours)
        assert head_cast is not None and torch.equal(head_cast, ours.lm_head.weight.to(torch.bfloat16))
        with torch.profiler.profile(record_shapes=True) as prof:  # the forward only
            loss = _batch_loss(ours, ids)
        loss.backward()
        shapes = [list(m.weight.shape) for m in linears]
        casts = [
            e
            for e in prof.events()
            if e.name == "aten::_to_copy" and e.input_shapes[:1] in ([s] for s in shapes)
        ]
        reference = _batch_loss(plain, ids)
        reference.backward()
        assert torch.equal(loss, reference), step
        for (name, a), b in zip(ours.named_parameters(), plain.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), (step, name)
        assert casts == []  # no weight cast in the forward
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        assert all(packed_linear.cached_copies(m) is None for m in linears)
        assert _generation_cast(ours) is None
        for a, b in zip(ours.parameters(), plain.parameters(), strict=True):
            assert torch.equal(a, b)
    # after the step and before a generation: the layers' own forward (autocast casts), same loss
    assert torch.equal(_batch_loss(ours, ids), _batch_loss(plain, ids))
