"""The tied input embedding's gradient added into the LM head's buffer (manyways.tied_embedding):
the weight's gradient is the plain path's (torch's embedding backward, then autograd's sum), with
no vocabulary-sized embedding gradient of its own."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from manyways.loss_head import CompletionLogProbs
from manyways.tied_embedding import tied_embedding

VOCAB, HIDDEN = 300, 16


class TiedLM(torch.nn.Module):
    """An embedding, one layer, and the head on the same weight (as the completion head uses it)."""

    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN, padding_idx=padding_idx)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.3)
        self.layer = torch.nn.Linear(HIDDEN, HIDDEN)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def loss(
        self, ids: torch.Tensor, targets: torch.Tensor, tied: bool, head_grad: bool = True
    ) -> torch.Tensor:
        weight = self.embed.weight
        with tied_embedding(self, weight) if tied else nullcontext() as handoff:
            hidden = torch.tanh(self.layer(self.embed(ids)))
        assert (handoff is not None) == tied
        logp, _, _ = CompletionLogProbs.apply(
            hidden, weight, targets, 1.0, False, False, 2**24, 2**30, None, handoff
        )
        return -(logp.sum() if head_grad else 0 * hidden.sum())


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def grads(
    model: TiedLM, ids: torch.Tensor, targets: torch.Tensor, tied: bool, **kw: Any
) -> tuple[Any, list[str]]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids, targets, tied, **kw)
    ops = Ops()
    with ops:
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, ops.names


@pytest.mark.parametrize("repeats", [False, True])
def test_tied_weight_gets_the_plain_gradient_without_a_dense_embedding_gradient(repeats: bool) -> None:
    model = TiedLM()
    gen = torch.Generator().manual_seed(1)
    ids = (
        torch.randint(0, VOCAB, (24,), generator=gen)
        if repeats
        else torch.randperm(VOCAB, generator=gen)[:24]
    )
    targets = torch.randint(0, VOCAB, (24,), generator=gen)
    ours, ours_ops = grads(model, ids, targets, tied=True)
    plain, plain_ops = grads(model, ids, targets, tied=False)
    assert "aten.embedding_dense_backward.default" in plain_ops
    assert "aten.embedding_dense_backward.default" not in ours_ops
    assert ours.keys() == plain.keys()
    for name in ours:
        if repeats:  # a repeated token's rows are added one by one into the head's value
            torch.testing.assert_close(ours[name], plain[name], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(ours[name], plain[name]), name
    assert model.embed.forward.__func__ is torch.nn.Embedding.forward  # unwrapped after the forward


def test_padding_rows_get_no_gradient_and_a_head_without_gradient_still_gives_the_rows() -> None:
    model = TiedLM(padding_idx=3)
    ids = torch.tensor([3, 5, 3, 7, 9, 3])
    targets = torch.tensor([1, 2, 3, 4, 5, 6])
    ours, _ = grads(model, ids, targets, tied=True)
    plain, _ = grads(model, ids, targets, tied=False)
    torch.testing.assert_close(ours["embed.weight"], plain["embed.weight"], rtol=1e-6, atol=1e-7)
    # the loss does not reach the head: the embedding's rows alone, padding excluded
    ours, _ = grads(model, ids, targets, tied=True, head_grad=False)
    plain, _ = grads(model, ids, targets, tied=False, head_grad=False)
    assert torch.equal(ours["embed.weight"], plain["embed.weight"])


def test_untied_frozen_or_inference_forwards_keep_the_models_embedding() -> None:
    model = TiedLM()
    other = torch.nn.Parameter(torch.zeros(VOCAB, HIDDEN))
    with tied_embedding(model, other) as handoff:
        assert handoff is None and "forward" not in vars(model.embed)
    with torch.no_grad(), tied_embedding(model, model.embed.weight) as handoff:
        assert handoff is None
    model.embed.weight.requires_grad_(False)
    with tied_embedding(model, model.embed.weight) as handoff:
        assert handoff is None


def test_head_keeps_its_gradient_when_the_embedding_did_not_run() -> None:
    """inputs_embeds-style forwards: the head hands nothing over and returns its own gradient."""
    model = TiedLM()
    weight = model.embed.weight
    hidden = torch.randn(5, HIDDEN, requires_grad=True)
    targets = torch.tensor([1, 2, 3, 4, 5])
    with tied_embedding(model, weight) as handoff:
        pass  # the embedding is never called
    logp, _, _ = CompletionLogProbs.apply(
        hidden, weight, targets, 1.0, False, False, 2**24, 2**30, None, handoff
    )
    logp.sum().backward()
    assert weight.grad is not None and torch.count_nonzero(weight.grad) > 0
