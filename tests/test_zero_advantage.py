"""GRPO rows with zero advantage skip the backward (manyways.zero_advantage): the loss, gradients
and logged metrics of the plain run, fewer rows through autograd, and the optimizer's step on an
all-zero micro-batch unchanged. fp32 throughout, so the tolerances are float rounding (1e-5 on the
loss, 1e-4 relative on whole-model gradients, as in tests/test_loss_head.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from manyways import zero_advantage
from manyways.loss_head import forward_stats
from test_loss_head import FP32_GRAD_RTOL, grpo_trainer, rel


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def grpo_inputs(vocab: int, advantages: list[float]) -> dict[str, Any]:
    """One group of 4: the same 6-token prompt (left-padded layout of TRL), 8 completion tokens,
    the second completion ended after 5."""
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, vocab, (1, 6), generator=gen).repeat(4, 1)
    completion = torch.randint(0, vocab, (4, 8), generator=gen)
    completion_mask = torch.ones_like(completion)
    completion_mask[1, 5:] = 0
    return {
        "prompt_ids": prompt,
        "prompt_mask": torch.ones_like(prompt),
        "completion_ids": completion,
        "completion_mask": completion_mask,
        "advantages": torch.tensor(advantages),
        "num_items_in_batch": completion_mask.sum(),
    }


def loss_and_grads(trainer: Any, inputs: dict[str, Any]) -> tuple[float, dict[str, Any], int]:
    """The loss, each trainable weight's gradient (None if it got none) and the elements the
    forward saved for the backward (activations and kept logits; the weights themselves excluded)."""
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train() otherwise
    model.zero_grad(set_to_none=True)
    weights = {p.data_ptr() for p in model.parameters()}
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += 0 if t.data_ptr() in weights else t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {
        n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }
    return loss.item(), grads, saved[0]


@pytest.mark.parametrize(
    ("head", "shared_prefix", "old_logps"),
    [("auto", True, False), ("auto", False, False), ("trl", False, False), ("auto", True, True)],
)
@pytest.mark.parametrize("advantages", [[0.7, 0.0, -0.7, 0.0], [0.0, 0.0, 0.0, 0.0]])
def test_split_forward_gives_the_plain_loss_gradients_and_metrics(
    tmp_path: Path,
    tiny_model_dir: Path,
    head: str,
    shared_prefix: bool,
    old_logps: bool,
    advantages: list[float],
) -> None:
    """Our completion head (packed or not), TRL's head (the GPU default), and old-policy log-probs
    given (num_iterations > 1, vLLM's importance sampling: the ratio is then not 1)."""
    plain = grpo_trainer(tmp_path / "plain", tiny_model_dir, False, head, shared_prefix=shared_prefix)
    stats = forward_stats()
    split = grpo_trainer(
        tmp_path / "split", tiny_model_dir, False, head, shared_prefix=shared_prefix, stats=stats
    )
    assert zero_advantage.install(split, stats)
    inputs = grpo_inputs(split.model.config.vocab_size, advantages)
    if old_logps:
        gen = torch.Generator().manual_seed(5)
        inputs["old_per_token_logps"] = -3.0 + 0.3 * torch.randn(4, 8, generator=gen)
    loss, grads, saved = loss_and_grads(plain, inputs)
    split_loss, split_grads, split_saved = loss_and_grads(split, inputs)

    assert split_loss == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert grads.keys() == split_grads.keys()
    for name, grad in grads.items():
        assert split_grads[name] is not None, name  # every weight gets a gradient, as in the plain run
        if not any(advantages):  # nothing to learn: exactly zero, as the plain run's
            assert torch.count_nonzero(split_grads[name]) == 0 and torch.count_nonzero(grad) == 0, name
        else:
            assert rel(split_grads[name], grad) < FP32_GRAD_RTOL, name
    for key in ("entropy", "clip_ratio/region_mean"):  # logged from all four rows in both runs
        assert split._metrics["train"][key][-1] == pytest.approx(plain._metrics["train"][key][-1], rel=1e-5)
    # the zero-advantage rows kept nothing for a backward (2 of 4 rows, or all and the anchor's 2 tokens)
    trained = sum(1 for a in advantages if a != 0)
    assert stats["policy_rows"] == 4 and stats["zero_advantage_rows"] == 4 - trained
    assert split_saved < (0.7 if trained else 0.1) * saved
    if (
        head == "auto" and shared_prefix
    ):  # the frozen rows' forward packed like any other, the anchor not counted
        assert stats["forwards"] == stats["shared"] == (2 if trained else 1)


def test_no_split_where_it_would_not_be_exact(tmp_path: Path, tiny_model_dir: Path) -> None:
    with_kl = grpo_trainer(tmp_path / "kl", tiny_model_dir, False, "auto", beta=0.1)
    stats = forward_stats()
    assert zero_advantage.unsupported_reason(with_kl).startswith("beta > 0")
    assert zero_advantage.install(with_kl, stats) is False
    assert stats["policy_rows"] == stats["zero_advantage_rows"] == 0
    off = forward_stats()
    assert (
        zero_advantage.install(
            grpo_trainer(tmp_path / "off", tiny_model_dir, False, "auto"), off, enabled=False
        )
        is False
    )
    assert off["policy_rows"] == off["zero_advantage_rows"] == 0
    other = grpo_trainer(tmp_path / "loss", tiny_model_dir, False, "auto")
    other.loss_type = "something_new"
    assert "loss_type" in zero_advantage.unsupported_reason(other)


def test_no_split_without_autograd(tmp_path: Path, tiny_model_dir: Path) -> None:
    stats = forward_stats()
    trainer = grpo_trainer(tmp_path, tiny_model_dir, False, "auto", stats=stats)
    zero_advantage.install(trainer, stats)
    with torch.no_grad():  # evaluation: nothing to save, one forward as TRL's
        trainer.compute_loss(trainer.model, grpo_inputs(trainer.model.config.vocab_size, [0.0] * 4))
    assert stats["policy_rows"] == 0 and stats["forwards"] == 1


def test_rl_stage_skips_the_backward_and_keeps_the_optimizer_step(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A first step whose group is all wrong, a second with mixed rewards. SGD's weight decay moves
    the weights on the zero-gradient step too (a weight without a gradient would not move): the
    final weights of the run with the skip are the plain run's."""
    import manyways.verify.registry as registry
    from manyways.stages import rl
    from manyways.verify import Verdict
    from test_stage_rl import rl_cfg, weights

    calls: list[int] = []

    def verdicts(pairs: list[Any], *, timeout_s: float | None = None) -> list[Verdict]:
        calls.append(len(pairs))
        if len(calls) == 1:
            return [Verdict("incorrect", False, "y")] * len(pairs)
        return [Verdict("correct" if i % 2 else "incorrect", bool(i % 2), "x") for i in range(len(pairs))]

    monkeypatch.setattr(registry, "verify_many", verdicts)
    runs = {}
    for skip in (True, False):
        calls.clear()
        root = tmp_path / f"skip_{skip}"
        root.mkdir()
        cfg = rl_cfg(
            root,
            tiny_model_dir,
            4,
            f"rl.skip_zero_advantage={str(skip).lower()}",
            "rl.trl={optim: sgd, weight_decay: 0.1}",
        )
        with caplog.at_level(logging.INFO, logger="manyways.stages.rl"):
            manifest = rl.run(cfg, cfg.run_dir / "rl", show_progress=False)
        runs[skip] = (manifest, weights(cfg.run_dir / "rl" / "model"))
    (on, on_weights), (off, off_weights) = runs[True], runs[False]
    assert on["training_forwards"]["policy_rows"] == 8 and on["training_forwards"]["zero_advantage_rows"] == 4
    assert off["training_forwards"]["zero_advantage_rows"] == 0
    assert on["training_forwards"]["shared"] == 2  # the frozen group's forward packed too
    assert "no training forward was packed" not in caplog.text
    assert "4 of 8 completions had zero advantage" in caplog.text
    before = weights(tiny_model_dir)
    assert any(not torch.equal(before[k], on_weights[k]) for k in before)
    for key, value in off_weights.items():
        assert torch.allclose(on_weights[key], value, rtol=1e-4, atol=1e-6), key
