"""GRPO's shared-prefix training forward (manyways.prefix_sharing): each group's prompt computed
once gives TRL's per-token log-probs, entropies and gradients, and steps aside where it must.

Tolerances as tests/test_loss_head.py: fp32 1e-5 on log-probs and 1e-4 on whole-model gradients
(the same arithmetic up to summation order), bf16 autocast 1e-3 and 1e-2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from manyways import prefix_sharing
from manyways.loss_head import forward_stats
from manyways.prefix_sharing import pack_groups
from test_loss_head import BF16_GRAD_RTOL, FP32_GRAD_RTOL, LOSS_RTOL, grpo_trainer, rel

PAD = 0
WIDTH, KEEP = 17, 8  # 9 prompt columns (left-padded) + 8 completion columns


def grpo_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's layout: two prompts (6 and 9 tokens, left-padded to 9) of three completions each, the
    completions right-padded (lengths 8, 5, 0 and 3, 8, 1; a zero-length one is fully masked)."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, vocab, (6, WIDTH), generator=gen)
    attn = torch.ones_like(ids)
    short, long_ = torch.randint(1, vocab, (6,), generator=gen), torch.randint(1, vocab, (9,), generator=gen)
    for r in range(3):
        ids[r, :3], attn[r, :3], ids[r, 3:9] = PAD, 0, short
        ids[r + 3, :9] = long_
    for r, n in enumerate((8, 5, 0, 3, 8, 1)):
        ids[r, 9 + n :], attn[r, 9 + n :] = PAD, 0
    return ids, attn


def logps_and_grads(trainer: Any, ids: torch.Tensor, attn: torch.Tensor, bf16: bool) -> tuple[Any, ...]:
    model = trainer.model
    model.zero_grad()
    gen = torch.Generator().manual_seed(5)
    adv = torch.randn(ids.shape[0], KEEP, generator=gen)
    ent_w = torch.randn(ids.shape[0], KEEP, generator=gen)
    logps, ent, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, KEEP, compute_entropy=True)
    mask = attn[:, -KEEP:]
    ((adv * logps + 0.1 * ent_w * ent) * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), ent.detach(), grads


@pytest.mark.parametrize(
    ("bf16", "attn", "checkpointing", "lora"),
    [
        (False, "sdpa", False, False),
        (True, "sdpa", False, False),
        (False, "eager", False, False),
        (True, "sdpa", True, False),
        (False, "sdpa", False, True),  # PEFT's forward passes extra None inputs
    ],
)
def test_shared_prefix_gives_the_plain_log_probs_and_gradients(
    tmp_path: Path, tiny_model_dir: Path, bf16: bool, attn: str, checkpointing: bool, lora: bool
) -> None:
    torch.manual_seed(0)
    stats = forward_stats()
    extra: dict[str, Any] = {"attn_implementation": attn}
    if lora:  # the rl stage's adapters (rl.lora, dropout 0); B not zero, as after training
        from manyways.config import LoraSection
        from manyways.training import lora_config

        extra["peft_config"] = lora_config(LoraSection(enabled=True, r=4, dropout=0.0))
    shared = grpo_trainer(
        tmp_path / "a", tiny_model_dir, bf16, "auto", shared_prefix=True, stats=stats, **extra
    )
    plain = grpo_trainer(tmp_path / "b", tiny_model_dir, bf16, "auto", **extra)
    if attn == "sdpa" and not checkpointing:
        # the packed groups run eager attention's arithmetic on CPU (small_attention_forward):
        # the reference runs it too, so that only the packing differs (sdpa's kernel keeps the
        # probabilities in fp32: in bf16 that alone moved the log-probs by 1.4e-3 relative here)
        plain.model.config._attn_implementation = "eager"
    if lora:
        for trainer in (shared, plain):
            torch.manual_seed(1)
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02)
    if checkpointing:  # the paper's recipe sets gradient_checkpointing: the layers rerun on the 4D mask
        for trainer in (shared, plain):
            trainer.model.gradient_checkpointing_enable()
            trainer.model.train()
    ids, mask = grpo_batch(shared.model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logps, ent, grads = logps_and_grads(shared, ids, mask, bf16)
        ref_logps, ref_ent, ref_grads = logps_and_grads(plain, ids, mask, bf16)
    assert stats["shared"] == stats["forwards"] == 1
    # 6 + 13 and 9 + 12 packed positions (padded to 21, then to its bucket, 24) against 6 rows x 17 columns
    assert (stats["positions"], stats["plain_positions"]) == (2 * 24, 6 * WIDTH)
    valid = mask[:, -KEEP:].bool()
    assert rel(logps[valid], ref_logps[valid]) < (LOSS_RTOL if bf16 else 1e-5)
    assert rel(ent[valid], ref_ent[valid]) < (LOSS_RTOL if bf16 else 1e-5)
    assert torch.count_nonzero(logps[~valid]) == 0 and torch.count_nonzero(ent[~valid]) == 0
    assert grads.keys() == ref_grads.keys() and grads
    assert any("lora_A" in n for n in grads) if lora else "model.embed_tokens.weight" in grads
    for name, grad in grads.items():
        assert rel(grad, ref_grads[name]) < (BF16_GRAD_RTOL if bf16 else FP32_GRAD_RTOL), name


def test_other_layouts_keep_the_plain_forward(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, attn = grpo_batch(1000)
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :-KEEP] = -100
    packed = pack_groups(ids, attn, labels, "sdpa")
    assert packed is not None and packed.attention_mask.shape == (2, 1, 24, 24)
    monkeypatch.setattr(prefix_sharing, "MAX_MASK_ELEMENTS", 2 * 21 * 21 - 1)  # long sequences: too large
    assert pack_groups(ids, attn, labels, "sdpa") is None
    monkeypatch.undo()
    assert pack_groups(ids, attn, labels, "flash_attention_2") is None  # no 4D mask there
    gap = attn.clone()
    gap[0, 11] = 0  # a completion whose mask is not ones then zeros
    assert pack_groups(ids, gap, labels.masked_fill(gap == 0, -100), "sdpa") is None
    distinct = ids.clone()
    distinct[:, 8] = torch.arange(6) + 1  # every row its own prompt: nothing to share
    assert pack_groups(distinct, attn, labels, "sdpa") is None
    early = labels.clone()
    early[:, 4] = ids[:, 4]  # a labelled column inside the prompt: the shared part ends there
    assert pack_groups(ids, attn, early, "sdpa") is not None
    # and through the trainer: the odd batch runs the plain forward, counted as not shared
    stats = forward_stats()
    trainer = grpo_trainer(tmp_path, tiny_model_dir, False, "auto", shared_prefix=True, stats=stats)
    ids, attn = grpo_batch(trainer.model.config.vocab_size)
    attn[0, 11] = 0
    with torch.no_grad():
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, KEEP)
    assert stats["forwards"] == 1 and stats["shared"] == 0 and stats["positions"] == 6 * WIDTH
    assert stats["unshared_layout"] == 1 and stats["unshared_inputs"] == stats["unshared_dropout"] == 0
    # the shortened shared part gives the plain log-probs too
    plain = grpo_trainer(tmp_path / "plain", tiny_model_dir, False, "auto")
    ids, attn = grpo_batch(trainer.model.config.vocab_size)
    with torch.no_grad():
        mine = trainer.model(input_ids=ids, attention_mask=attn, labels=early, fused_lm_head=True)
        theirs = plain.model(input_ids=ids, attention_mask=attn, labels=early, fused_lm_head=True)
    assert stats["shared"] == 1
    assert (
        torch.allclose(mine.log_probs, theirs.log_probs, atol=1e-5)
        and torch.count_nonzero(mine.log_probs) > 0
    )


def test_dropout_active_sees_training_mode_dropout_only(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.train()
    assert not prefix_sharing.dropout_active(model)  # no dropout anywhere
    model.config.attention_dropout = 0.1
    assert prefix_sharing.dropout_active(model)
    model.eval()  # the reference model's forward: no noise drawn
    assert not prefix_sharing.dropout_active(model)
    model.config.attention_dropout = 0.0
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.05))  # as LoRA's branch has
    model.train()
    assert prefix_sharing.dropout_active(model)
    model.model.layers[0].mlp.drop.p = 0.0
    assert not prefix_sharing.dropout_active(model)


@pytest.mark.parametrize(("heads", "kv_heads", "length"), [(9, 3, 37), (4, 4, 20), (8, 2, 64)])
@pytest.mark.parametrize("autocast", [False, True])
def test_small_attention_is_eager_attention(heads: int, kv_heads: int, length: int, autocast: bool) -> None:
    """The packed forward's CPU attention gives transformers' eager attention's outputs bit for bit
    and its gradients up to summation order (bit for bit without grouped query heads); a boolean
    or an additive mask, fp32 or bf16."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    class Module:
        num_key_value_groups = heads // kv_heads
        training = False

    gen = torch.Generator().manual_seed(length)
    dtype = torch.bfloat16 if autocast else torch.float32
    base = [torch.randn(2, h, length, 16, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads)]
    allowed = (torch.rand(2, 1, length, length, generator=gen) > 0.3) | torch.eye(length, dtype=torch.bool)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    grad = torch.randn(2, length, heads, 16, generator=gen).to(dtype)

    def run(fn: Any, mask: torch.Tensor) -> list[torch.Tensor]:
        q, k, v = (t.clone().requires_grad_() for t in base)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = fn(Module(), q, k, v, mask, scaling=0.25)
        out.backward(grad)
        return [out.detach(), q.grad, k.grad, v.grad]

    expected = run(eager_attention_forward, additive)
    for mask in (additive, allowed):
        out, *grads = run(prefix_sharing.small_attention_forward, mask)
        assert out.dtype == expected[0].dtype and torch.equal(out, expected[0])
        # the key/value gradients sum a group's query heads inside one product (fp32 accumulation)
        # where repeat_kv's backward adds the heads' products in the tensor's dtype: the same up to
        # that rounding (fp32: torch's default tolerance; bf16: a bf16 step at the tensor's scale)
        for ours, theirs in zip(grads, expected[1:], strict=True):
            assert ours.dtype == theirs.dtype
            if dtype == torch.bfloat16:
                step = 2**-7
                torch.testing.assert_close(ours, theirs, rtol=step, atol=step * theirs.abs().max().item())
            else:
                torch.testing.assert_close(ours, theirs)
            if heads == kv_heads:
                assert torch.equal(ours, theirs)


def test_packed_forward_runs_small_attention_on_cpu_sdpa_only_where_it_is_faster(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``sdpa`` on CPU the packed groups run small_attention_forward, and the model's own
    implementation is back afterwards; a group over SMALL_ATTENTION_ELEMENTS scores, gradient
    checkpointing, or an ``eager`` model keep the model's attention."""
    from transformers import AutoModelForCausalLM

    calls: list[int] = []
    inner = prefix_sharing.small_attention_forward
    monkeypatch.setattr(
        prefix_sharing, "small_attention_forward", lambda *a, **k: calls.append(1) or inner(*a, **k)
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    ids, mask = grpo_batch(model.config.vocab_size)
    labels = ids.clone()
    labels[:, : WIDTH - KEEP] = -100
    labels[mask == 0] = -100

    def forward(attn: str = "sdpa") -> int:
        calls.clear()
        packed = pack_groups(ids, mask, labels, attn)
        assert packed is not None
        prefix_sharing.shared_prefix_hidden(model.model, packed)
        assert model.config._attn_implementation == attn
        return len(calls)

    layers = model.config.num_hidden_layers
    assert forward() == layers
    monkeypatch.setattr(prefix_sharing, "SMALL_ATTENTION_ELEMENTS", 100)
    assert forward() == 0
    monkeypatch.undo()
    monkeypatch.setattr(
        prefix_sharing, "small_attention_forward", lambda *a, **k: calls.append(1) or inner(*a, **k)
    )
    model.gradient_checkpointing_enable()
    assert forward() == 0
    model.gradient_checkpointing_disable()
    model.config._attn_implementation = "eager"
    assert forward("eager") == 0


def test_packed_lengths_come_in_buckets() -> None:
    """A few lengths per power of two (so oneDNN reuses its per-shape kernels), never shorter,
    under 12.5% longer from 64 positions, under 8 more below."""
    lengths = range(1, 5000)
    buckets = {prefix_sharing.bucket_length(n) for n in lengths}
    for n in lengths:
        b = prefix_sharing.bucket_length(n)
        assert n <= b and (b < n * 1.125 if n >= 64 else b - n < 8), n
    assert len([b for b in buckets if 128 < b <= 256]) == 8
    assert prefix_sharing.bucket_length(232) == 240 and prefix_sharing.bucket_length(256) == 256
