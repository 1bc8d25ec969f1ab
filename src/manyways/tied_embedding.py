"""The tied input embedding's gradient added into the LM head's, without a vocabulary-sized tensor.

With tied embeddings (the 135M default, Llama 3.2, Qwen2.5 small models) one ``[V, H]`` weight is
both the input embedding and the LM head, so autograd sums two gradients into it: the head's
(dense, computed by :class:`manyways.loss_head.CompletionLogProbs`) and the embedding's, which
torch's ``embedding_dense_backward`` builds as a fresh zero ``[V, H]`` fp32 matrix with the
looked-up rows added in (113 MB at a 49K x 576 vocabulary) before autograd adds it into the head's.
Where the training forward is ours (the completion loss head), :func:`tied_embedding` routes the
embedding's rows straight into the head's gradient buffer instead: the head's backward, which runs
first, hands its fp32 buffer over (:class:`Handoff`) instead of returning it, and the embedding's
backward (:class:`TiedEmbedding`), which runs last, adds its rows into that buffer
(``index_add_``) and returns it as the weight's one gradient. Autograd, DDP and the optimizer see
one ordinary dense gradient. Same values as torch's path up to float summation order where a
token repeats in the batch (tested); ``padding_idx`` rows get no gradient, as ``nn.Embedding``'s.

Why it matters beyond the arithmetic: on the development VM a first touch of memory the host has
reclaimed costs ~6 us a page, and the fresh 113 MB matrix, placed anew as the heap's free blocks
fragment, cost up to 0.15 s in a GRPO step (``benchmarks/bench_train.py`` figure 8 notes).

Only for a plain ``nn.Embedding`` (no ``max_norm``, ``scale_grad_by_freq`` or ``sparse``) whose
weight is the head's, under autograd; anything else runs the model's own embedding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class Handoff:
    """The head's weight gradient, from the head's backward to the embedding's."""

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None
        self.embedding_ran = False  # the forward went through TiedEmbedding (else the head returns its own)


class TiedEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward adds the rows into the head's handed-over
    gradient (or into zeros when the head handed none) and returns it as ``weight``'s gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, handoff: Handoff
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.handoff, ctx.shape, ctx.dtype = padding_idx, handoff, weight.shape, weight.dtype
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        handoff: Handoff = ctx.handoff
        out, handoff.grad = handoff.grad, None
        if out is None:  # the head computed no gradient for the weight (e.g. no labelled rows)
            out = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad.device)
        flat, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:
            keep = flat != ctx.padding_idx
            flat, rows = flat[keep], rows[keep]
        out.index_add_(0, flat, rows.to(out.dtype))
        return None, out, None, None


def _plain_embedding(module: Any) -> bool:
    return (
        type(module) is torch.nn.Embedding
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    )


@contextmanager
def tied_embedding(model: Any, head_weight: torch.Tensor) -> Iterator[Handoff | None]:
    """For the duration of one training forward of ``model``, its input embedding as
    :class:`TiedEmbedding` when it is a plain ``nn.Embedding`` tied to ``head_weight`` and autograd
    is recording; yields the :class:`Handoff` to give the head's backward, else None."""
    embedding = model.get_input_embeddings()
    if (
        not torch.is_grad_enabled()
        or not head_weight.requires_grad
        or not _plain_embedding(embedding)
        or embedding.weight is not head_weight
        or "forward" in vars(embedding)  # someone else's wrapper: leave it alone
    ):
        yield None
        return
    handoff = Handoff()

    def forward(ids: torch.Tensor) -> torch.Tensor:
        handoff.embedding_ran = True
        return TiedEmbedding.apply(ids, embedding.weight, embedding.padding_idx, handoff)

    embedding.forward = forward
    try:
        yield handoff
    finally:
        del embedding.forward
