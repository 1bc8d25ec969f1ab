"""The completion-only bf16 loss head (manyways.loss_head): numerics against the plain paths, and
that it is the head a real SFT / GRPO step uses.

Tolerances. fp32 (no autocast): the same arithmetic as the plain path up to summation order, so
1e-5 (whole-model gradients: 1e-4, 100x below the bf16 tolerance). bf16 autocast: the head's matmuls round to bf16 (unit roundoff 2**-8 = 3.9e-3), as a plain
autocast LM head and TRL's CPU head do; the loss must agree within 1e-3 relative and every
gradient within 1e-2 relative (Frobenius norm of the difference over the norm of the reference).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from manyways.config import load_config
from manyways.loss_head import CompletionLogProbs, install_completion_head, use_loss_head
from manyways.prefix_sharing import bucket_length

BF16_GRAD_RTOL = 1e-2
FP32_GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-3


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def reference(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, temperature: float) -> tuple[Any, ...]:
    """log p(target), entropy and top-1 from the full fp32 logits."""
    logp = (h.float() @ w.float().t() / temperature).log_softmax(-1)
    return logp.gather(1, t[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1), logp.argmax(-1) == t


def run_head(fn: Any, h: torch.Tensor, w: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, ...]:
    """Outputs and the gradients of ``sum(a * logp + b * entropy)`` w.r.t. hidden and weight."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(h.shape[0], generator=gen), torch.randn(h.shape[0], generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp, ent, top1 = fn(h, w)
    (a * logp + b * ent).sum().backward()
    return logp.detach(), ent.detach(), top1, h.grad, w.grad


def head_inputs(n: int = 150, hidden: int = 64, vocab: int = 5000) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.1
    return h, w, torch.randint(0, vocab, (n,), generator=gen)


def ours(t: torch.Tensor, temperature: float, chunk: int = 2**24, keep: int = 2**30) -> Any:
    return lambda h, w: CompletionLogProbs.apply(h, w, t, 1 / temperature, True, True, chunk, keep)


def test_head_fp32_matches_the_full_log_softmax() -> None:
    h, w, t = head_inputs()
    ref = run_head(lambda h_, w_: reference(h_, w_, t, 0.7), h, w, autocast=False)
    got = run_head(ours(t, 0.7, chunk=40 * 5000), h, w, autocast=False)  # 4 row chunks
    assert torch.allclose(got[0], ref[0], atol=1e-5) and torch.allclose(got[1], ref[1], atol=1e-4)
    assert torch.equal(got[2], ref[2])
    assert rel(got[3], ref[3]) < 1e-5 and rel(got[4], ref[4]) < 1e-5


def test_head_bf16_within_bf16_tolerance_of_fp32_and_of_trl() -> None:
    from trl.kernels import ChunkedLogProbFunction

    h, w, t = head_inputs()
    ref = run_head(lambda h_, w_: reference(h_, w_, t, 0.7), h, w, autocast=False)
    got = run_head(ours(t, 0.7, chunk=40 * 5000), h, w, autocast=True)

    def trl(h_: torch.Tensor, w_: torch.Tensor) -> Any:
        out = ChunkedLogProbFunction.apply(h_, w_, None, t, 0.7, 2048, None, 1.0, ("log_probs", "entropy"))
        return out[0], out[1], None

    trl_bf16 = run_head(trl, h, w, autocast=True)
    assert rel(got[0], ref[0]) < LOSS_RTOL and rel(got[1], ref[1]) < LOSS_RTOL
    assert rel(got[0], trl_bf16[0]) < 1e-5  # the same bf16 logits as TRL's CPU head
    for mine, full, theirs in zip(got[3:], ref[3:], trl_bf16[3:], strict=True):
        assert 0 < rel(mine, full) < BF16_GRAD_RTOL  # rounded (bf16 really used), within tolerance
        assert rel(mine, theirs) < BF16_GRAD_RTOL


def test_kept_and_recomputed_logits_give_the_same_gradients() -> None:
    h, w, t = head_inputs()
    kept = run_head(ours(t, 1.0, chunk=60 * 5000), h, w, autocast=True)
    recomputed = run_head(ours(t, 1.0, chunk=60 * 5000, keep=0), h, w, autocast=True)
    for a, b in zip(kept, recomputed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("row_chunks", [1, 3])
def test_weight_gradient_by_vocabulary_chunks_is_the_whole_product(
    monkeypatch: pytest.MonkeyPatch, row_chunks: int
) -> None:
    """The head's weight gradient written VOCAB_CHUNK vocabulary rows at a time (over one and over
    several row chunks) is bitwise the whole bf16 product cast to fp32 and summed over row chunks."""
    from manyways import loss_head

    gen = torch.Generator().manual_seed(1)
    gz = [torch.randn(40, 5000, generator=gen).to(torch.bfloat16) for _ in range(row_chunks)]
    h = [torch.randn(40, 64, generator=gen).to(torch.bfloat16) for _ in range(row_chunks)]
    whole = (gz[0].t() @ h[0]).float()
    for g, x in zip(gz[1:], h[1:], strict=True):
        whole.add_(g.t() @ x)
    monkeypatch.setattr(loss_head, "VOCAB_CHUNK", 1536)  # 4 chunks, the last one short
    out = torch.full((5000, 64), float("nan"))
    for i, (g, x) in enumerate(zip(gz, h, strict=True)):
        loss_head._add_weight_grad(out, g, x, first=i == 0)
    assert torch.equal(out, whole)


def test_a_ready_bf16_cast_of_the_weight_gives_the_same_outputs_and_gradients() -> None:
    """GRPO's generation hands the head its bf16 copy of the weight: bitwise what casting it gives."""
    h, w, t = head_inputs()

    def with_cast(h_: torch.Tensor, w_: torch.Tensor) -> Any:
        cast = w_.detach().to(torch.bfloat16)
        return CompletionLogProbs.apply(h_, w_, t, 1.0, True, True, 60 * 5000, 2**30, cast)

    for a, b in zip(
        run_head(with_cast, h, w, True), run_head(ours(t, 1.0, 60 * 5000), h, w, True), strict=True
    ):
        assert torch.equal(a, b)


def test_no_rows_gives_zero_gradients() -> None:
    h, w, t = head_inputs(n=0)
    logp, ent, top1, gh, gw = run_head(ours(t, 1.0), h, w, autocast=True)
    assert logp.shape == (0,) and gh.shape == (0, 64) and torch.count_nonzero(gw) == 0


# ---- model level: TRL's fused-head contract on the tiny model ------------------------------------


def tiny_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():  # logits of std ~1.6 instead of ~0.16: a loss away from log(vocab)
        model.get_output_embeddings().weight.mul_(10)
    return model


def sft_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Three sequences, one right-padded, the first 15 positions a prompt (label -100)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 40), generator=gen)
    attn = torch.ones_like(ids)
    attn[2, 28:] = 0
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :15] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def loss_and_grads(model: Any, batch: dict[str, torch.Tensor], autocast: bool, **kw: Any) -> tuple[Any, ...]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True])
def test_sft_completion_loss_and_gradients_match_the_plain_path(tiny_model_dir: Path, autocast: bool) -> None:
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model(tiny_model_dir)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    assert install_completion_head(model, outputs=("log_probs", "entropy", "is_top1"))
    batch = sft_batch(model.config.vocab_size)
    plain_loss, plain_grads = loss_and_grads(model, batch, autocast)  # transformers' own loss, all logits
    loss, grads = loss_and_grads(model, batch, autocast, fused_lm_head=True)
    tol = BF16_GRAD_RTOL if autocast else FP32_GRAD_RTOL
    assert abs(loss - plain_loss) / plain_loss < (LOSS_RTOL if autocast else 1e-5)
    assert grads.keys() == plain_grads.keys() and "model.embed_tokens.weight" in grads
    for name, grad in grads.items():
        assert rel(grad, plain_grads[name]) < tol, name


def test_fused_outputs_follow_trls_contract(tiny_model_dir: Path) -> None:
    """Zeros at ignored positions, label_mask, is_top1 and entropy as TRL's own head gives them."""
    from trl.trainer.utils import add_fused_lm_head

    trl_model, model = tiny_model(tiny_model_dir), tiny_model(tiny_model_dir)
    for m in (trl_model, model):
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
    install_completion_head(model, outputs=("log_probs", "entropy", "is_top1"))
    batch = sft_batch(model.config.vocab_size)
    with torch.no_grad():
        theirs, mine = trl_model(**batch, fused_lm_head=True), model(**batch, fused_lm_head=True)
    assert torch.equal(mine.label_mask, theirs.label_mask)
    assert torch.equal(mine.is_top1, theirs.is_top1)
    assert torch.allclose(mine.log_probs, theirs.log_probs, atol=1e-5)
    assert torch.allclose(mine.entropy, theirs.entropy, atol=1e-4)
    assert torch.count_nonzero(mine.log_probs[~mine.label_mask]) == 0


def test_models_the_head_does_not_cover_keep_trls(tiny_model_dir: Path) -> None:
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model(tiny_model_dir)
    with pytest.raises(RuntimeError, match="no TRL fused LM head"):
        install_completion_head(model)
    model.config.final_logit_softcapping = 30.0
    add_fused_lm_head(model)
    fused = model.forward
    assert install_completion_head(model) is False and model.forward == fused


# ---- GRPO per-token log-probs ----------------------------------------------------------------------


def grpo_trainer(
    tmp_path: Path, model_dir: Path, bf16: bool, mode: str, beta: float = 0.0, **head: Any
) -> Any:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        temperature=0.7,
        bf16=bf16,
        use_cpu=True,
        report_to="none",
        beta=beta,
    )
    model = tiny_model(model_dir)
    if attn := head.pop("attn_implementation", None):
        model.set_attn_implementation(attn)
    peft_config = head.pop("peft_config", None)
    torch.manual_seed(0)  # LoRA's initial adapters: the same in every trainer built here
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "What is 1 + 1?"}] * 4),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )
    assert use_loss_head(trainer, mode, **head) == ("completion" if mode != "trl" else "trl")
    return trainer


@pytest.mark.parametrize("bf16", [False, True])
def test_grpo_per_token_logps_match_the_plain_path(tmp_path: Path, tiny_model_dir: Path, bf16: bool) -> None:
    trainer = grpo_trainer(tmp_path, tiny_model_dir, bf16, "auto")
    model = trainer.model
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (4, 30), generator=gen)
    attn = torch.ones_like(ids)
    attn[1, 26:] = 0  # a completion that ended early
    keep = 10
    adv = torch.randn(4, keep, generator=gen)

    def grads_of(logps: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        (adv * logps * attn[:, -keep:]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logps, ent, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, keep, compute_entropy=True)
    grads = grads_of(logps)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, -keep - 1 : -1].float() / 0.7
    plain_all = logits.log_softmax(-1)
    plain = plain_all.gather(-1, ids[:, -keep:, None]).squeeze(-1)
    plain_ent = -(plain_all.exp() * plain_all).sum(-1)
    plain_grads = grads_of(plain)
    valid = attn[:, -keep:].bool()
    assert rel(logps[valid], plain[valid]) < (LOSS_RTOL if bf16 else 1e-5)
    if bf16:
        assert rel(ent[valid], plain_ent[valid]) < LOSS_RTOL
    else:  # lse - E[z] vs -sum p log p: fp32 cancellation where the entropy is small
        assert torch.allclose(ent[valid], plain_ent[valid], atol=1e-4)
    assert torch.count_nonzero(logps[~valid]) == 0
    for name, grad in grads.items():
        assert rel(grad, plain_grads[name]) < (BF16_GRAD_RTOL if bf16 else FP32_GRAD_RTOL), name


def test_loss_head_modes(tmp_path: Path, tiny_model_dir: Path) -> None:
    trainer = grpo_trainer(tmp_path, tiny_model_dir, False, "trl")
    assert not getattr(trainer.model.forward, "_manyways_completion_head", False)
    with pytest.raises(ValueError, match="loss_head must be one of"):
        use_loss_head(trainer, "fast")
    trainer.args.cast_lm_head_to_fp32 = True
    assert use_loss_head(trainer, "auto") == "trl"
    with pytest.raises(ValueError, match="cast_lm_head_to_fp32"):
        use_loss_head(trainer, "completion")


def test_grpo_reference_model_gets_the_head_too(tmp_path: Path, tiny_model_dir: Path) -> None:
    trainer = grpo_trainer(tmp_path, tiny_model_dir, False, "auto", beta=0.1)
    assert trainer.ref_model is not None
    assert getattr(trainer.ref_model.forward, "_manyways_completion_head", False)
    ids = torch.randint(0, trainer.model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        ref = trainer.ref_model(input_ids=ids, labels=labels, fused_lm_head=True)
        logits = trainer.ref_model(input_ids=ids).logits[:, 5:-1] / 0.7
    plain = logits.log_softmax(-1).gather(-1, ids[:, 6:, None]).squeeze(-1)
    assert torch.allclose(ref.log_probs[:, 5:], plain, atol=1e-5)


# ---- the hook is active in a real training step ------------------------------------------------------


class HeadProjections(TorchDispatchMode):
    """Counts logits computed: every matmul whose output is vocabulary-wide (>= 1024 columns; the
    tiny model's other layers are at most 128 wide). TRL's head and a plain head both pass here,
    whether they call ``lm_head`` (a forward hook would see only that) or use its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []
        self.elements = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = getattr(func, "overloadpacket", None)
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm) and out.shape[-1] >= 1024:
            self.rows.append(out.numel() // out.shape[-1])
            self.elements += out.numel()
        return out


def count_head_work(trainer: Any, scored: Any) -> tuple[HeadProjections, HeadProjections, list[int]]:
    """Wrap the trainer's loss and backward in counters; ``scored(inputs)`` = positions the loss
    needs, recorded per call."""
    forward, backward, needed = HeadProjections(), HeadProjections(), []
    compute_loss, accel_backward = trainer.compute_loss, trainer.accelerator.backward

    def counted_loss(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        needed.append(int(scored(inputs)))
        with forward:
            return compute_loss(model, inputs, *args, **kwargs)

    def counted_backward(loss: Any, **kwargs: Any) -> Any:
        with backward:
            return accel_backward(loss, **kwargs)

    trainer.compute_loss, trainer.accelerator.backward = counted_loss, counted_backward
    return forward, backward, needed


@pytest.mark.parametrize(("head", "lora"), [("auto", False), ("trl", False), ("auto", True)])
def test_sft_step_scores_only_the_completion(
    tmp_path: Path, tiny_model_dir: Path, head: str, lora: bool
) -> None:
    from manyways.models import load_tokenizer
    from manyways.stages import midtrain

    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            f"model.name={tiny_model_dir}",
            "model.dtype=bfloat16",
            "midtrain.max_steps=1",
            "midtrain.batch_size=2",
            f"midtrain.loss_head={head}",
            'midtrain.trl.save_strategy="no"',
            "midtrain.log_samples=false",
            f"midtrain.lora.enabled={str(lora).lower()}",
        ],
    )
    examples = [
        {
            "prompt": [{"role": "user", "content": f"What is {i} + {i}? Think it through with care."}],
            "completion": [{"role": "assistant", "content": f"{i} + {i} = {2 * i}."}],
            "sample_id": str(i),
        }
        for i in range(2)
    ]
    trainer = midtrain.build_trainer(cfg, tmp_path / "midtrain", examples, load_tokenizer(tiny_model_dir))
    forward, backward, needed = count_head_work(trainer, lambda x: (x["labels"][:, 1:] != -100).sum())
    all_positions: list[int] = []
    inner = trainer.compute_loss

    def also_all(model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
        all_positions.append(inputs["input_ids"][:, 1:].numel())
        return inner(model, inputs, *a, **k)

    trainer.compute_loss = also_all
    trainer.train()
    vocab = trainer.model.config.vocab_size
    assert len(needed) == 1 and 0 < needed[0] < all_positions[0]
    if head == "auto":  # CPU: the completion head, logits of the completion tokens only (zero rows
        # up to a bucket: prefix_sharing.bucket_length), once
        assert forward.elements == bucket_length(needed[0]) * vocab and backward.elements == 0
    else:  # TRL's CPU head: every position, recomputed in the backward
        assert forward.elements == all_positions[0] * vocab == backward.elements


@pytest.mark.parametrize("lora", [False, True])
def test_grpo_step_scores_only_the_completion(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, lora: bool
) -> None:
    import manyways.verify.registry as registry
    from manyways.stages import rl
    from manyways.verify import Verdict

    monkeypatch.setattr(
        registry,
        "verify_many",
        lambda pairs, **kw: [Verdict("correct", i % 2 == 0, "x") for i in range(len(pairs))],
    )
    path = tmp_path / "rl.jsonl"
    path.write_text(
        "".join(
            json.dumps({"question": f"{i}+2?", "answer": str(i + 2), "id": f"r{i}"}) + "\n" for i in range(2)
        )
    )
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            f"model.name={tiny_model_dir}",
            "model.dtype=bfloat16",
            f"data.rl={{kind: local, path: {path}, fields: {{problem_id: id}}}}",
            "rl.max_steps=1",
            "rl.max_completion_length=8",
            "rl.num_generations=4",
            "rl.batch_size=4",
            'rl.trl.save_strategy="no"',
            f"rl.lora.enabled={str(lora).lower()}",
            "rl.lora.dropout=0",  # LoRA's dropout would make the shared prefix step aside
        ],
    )
    problems, _ = rl.load_rl_problems(cfg)
    trainer, _ = rl.build_trainer(cfg, tmp_path / "rl", str(tiny_model_dir), problems)
    forward, backward, needed = count_head_work(trainer, lambda x: x["completion_mask"].sum())
    trainer.train()
    vocab = trainer.model.config.vocab_size
    assert len(needed) == 1 and needed[0] > 0
    assert forward.elements == bucket_length(needed[0]) * vocab and backward.elements == 0
    # rl.shared_prefix (default): the group's 4 rows shared one prompt, computed once
    stats = trainer.manyways_forward_stats
    assert stats["forwards"] >= 1 and stats["shared"] == stats["forwards"]
    assert 0 < stats["positions"] < stats["plain_positions"]
