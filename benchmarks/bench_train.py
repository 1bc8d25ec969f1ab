"""Figures 7-8: SFT tokens/s of our midtrain trainer and the GRPO step's time split.

7. ``manyways.stages.midtrain.build_trainer`` (our configuration: bf16 autocast where the CPU has
   it) against a plain TRL ``SFTTrainer`` in fp32 without packing, same model, data and steps,
   ABAB; also each as a fraction of the 6N-FLOP-per-token bound at the measured fp32 and bf16
   matmul rates: the run's (best of spaced samples at its start) and, for the target, the bf16
   rate measured right before each round's run (:func:`paired_bound_shares`, the median of the
   rounds' shares). Examples are the polya_v1 exemplar solutions as SFT conversations. A third
   variant, interleaved with the two, is our trainer with TRL's own LM head
   (``midtrain.loss_head=trl``): ``loss_head_speedup`` in the details is ours / that (issue 16
   item 3, :mod:`manyways.loss_head`). ``attention_layer`` in the details: one layer's attention,
   forward and backward, over the first batch's examples packed in one row, transformers' sdpa with
   the block mask against the per-sequence attention the midtrain stage uses on CPU
   (:mod:`manyways.packed_attention`), interleaved.
8. ``manyways.stages.rl.build_trainer`` for ``fig8_steps`` GRPO steps (10): time outside
   generation / time in generation (TRL's ``_generate_single_turn`` timed) per step, the median
   over steps 2-10 (the first excluded: allocation, first kernels). Until 2026-12-04 the run was 5
   steps; the details keep that window's median (``ratio_steps_2_5``) and the later steps'
   (``ratio_steps_6_on``): on CPU the first steps also build oneDNN's kernels for each new length
   bucket (:func:`manyways.prefix_sharing.bucket_length`), which on the development VM costs page
   faults too, so a 5-step run measured mostly warm-up. The same run with ``rl.loss_head=trl``
   follows; its ratio is a detail (``ratio_with_trl_head``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bounds import matmul_rate, train_tokens_per_s_bound
from common import Figure, interleave, median_spread, meets, ratio_samples
from transformers import TrainerCallback

from manyways.config import load_config
from manyways.models import DEFAULT_MODEL, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)

CONFIG = "configs/tiny_cpu.yaml"


class StepClock(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def sft_examples(n: int) -> list[dict[str, Any]]:
    """``n`` conversational prompt/completion examples from the catalogue's exemplars."""
    from manyways.heuristics import load_catalogue, render_plain_messages

    exemplars = [e for h in load_catalogue().heuristics for e in h.exemplars]
    return [
        {
            "prompt": render_plain_messages(e.question),
            "completion": [{"role": "assistant", "content": e.solution}],
            "sample_id": f"ex{i}",
        }
        for i, e in enumerate(exemplars[:n])
    ]


def ours_sft_trainer(
    examples: list[dict[str, Any]], steps: int, batch: int, work: Path, loss_head: str = "auto"
) -> Any:
    """The midtrain stage's trainer (its own config: bf16 autocast if available) for the figure."""
    from manyways.stages.midtrain import build_trainer

    cfg = load_config(
        CONFIG,
        [
            f"run.root={work}",
            f"midtrain.max_steps={steps}",
            f"midtrain.batch_size={batch}",
            "midtrain.save_steps=100000",
            'midtrain.trl.save_strategy="no"',  # no 1.6 GB final checkpoint (not timed anyway)
            "midtrain.log_samples=false",
            f"midtrain.loss_head={loss_head}",
        ],
    )
    return build_trainer(cfg, work / "midtrain", examples, load_tokenizer(DEFAULT_MODEL))


def ours_sft(
    examples: list[dict[str, Any]], steps: int, batch: int, work: Path, loss_head: str = "auto"
) -> list[float]:
    """Step times of the midtrain stage's trainer."""
    trainer = ours_sft_trainer(examples, steps, batch, work, loss_head)
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    return clock.times


def plain_sft(examples: list[dict[str, Any]], steps: int, batch: int, work: Path) -> list[float]:
    """Step times of a plain TRL SFTTrainer: fp32, no packing, same data, steps and batch.

    glibc's default allocator behaviour is restored first: ``ours`` (run earlier in the same
    process) turns on :func:`manyways.training.keep_cpu_allocations`, which is process-wide.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from manyways.training import keep_cpu_allocations

    keep_cpu_allocations(False)

    args = SFTConfig(
        output_dir=str(work / "plain"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        bf16=False,
        use_cpu=True,
        packing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=1234,
        dataloader_num_workers=0,
    )
    data = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=load_tokenizer(DEFAULT_MODEL)
    )
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    return clock.times


def tokens_per_example(examples: list[dict[str, Any]]) -> float:
    """Mean tokens of an example (prompt + completion under the chat template)."""
    lengths = example_lengths(examples)
    return sum(lengths) / len(lengths)


def attention_layer_ms(
    lengths: list[int], repeats: int, inner: int = 9, model: str = DEFAULT_MODEL, bf16: bool | None = None
) -> dict[str, float]:
    """One decoder layer's attention, forward and backward, over a padding-free row of sequences of
    ``lengths`` at ``model``'s shapes under bf16 autocast where training uses it: transformers'
    sdpa with the row's block mask against :mod:`manyways.packed_attention`, interleaved; medians in ms."""
    from transformers import AutoConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from manyways import packed_attention
    from manyways.training import use_bf16

    config = AutoConfig.from_pretrained(resolve_model_path(model))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    total = sum(lengths)
    if bf16 is None:  # as the midtrain stage decides (dtype: auto)
        bf16 = use_bf16("auto", resolve_model_path(model))
    dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(1, h, total, dim, generator=gen) for h in (heads, kv_heads, kv_heads)]
    grad = torch.randn(1, total, heads, dim, generator=gen).to(dtype)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    mask = packed_attention.block_causal_mask(tuple(lengths))[None, None]

    class Module:
        num_key_value_groups = heads // kv_heads
        is_causal = True
        training = True

    def run(fn: Any) -> float:
        times = []
        for _ in range(inner):
            q, k, v = (t.to(dtype).requires_grad_() for t in base)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out, _ = fn(Module(), q, k, v, mask, scaling=dim**-0.5, position_ids=positions)
            out.backward(grad)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e3

    runs = interleave(
        {
            "sdpa": lambda: run(sdpa_attention_forward),
            "per_sequence": lambda: run(packed_attention.packed_attention_forward),
        },
        repeats,
    )
    return {
        "sdpa_ms": median_spread(runs["sdpa"])[0],
        "per_sequence_ms": median_spread(runs["per_sequence"])[0],
        "speedup": median_spread(ratio_samples(runs["sdpa"], runs["per_sequence"]))[0],
        "lengths": lengths,
        "dtype": str(dtype).removeprefix("torch."),
    }


def example_lengths(examples: list[dict[str, Any]]) -> list[int]:
    """Tokens of each example (prompt + completion under the chat template)."""
    tok = load_tokenizer(DEFAULT_MODEL)
    texts = [tok.apply_chat_template(e["prompt"] + e["completion"], tokenize=False) for e in examples]
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


PAIRED_BOUND_SAMPLES = 4  # bf16 matmul timings before each round's run (the best is its bound)


def paired_bound_shares(tokens_per_s: list[float], bf16_rates: list[float], n_params: int) -> list[float]:
    """Each round's SFT tokens/s as a share of the 6N bound at the bf16 matmul rate measured right
    before it. On a shared machine a neighbour takes the matmul units for minutes at a time (the
    same code ran 127 and 210-235 tokens/s on the AMX machine within a day): a share against a bound
    from another moment measures the neighbour; paired, both sides see the same machine."""
    if len(tokens_per_s) != len(bf16_rates):
        raise ValueError(f"{len(tokens_per_s)} rounds of tokens/s but {len(bf16_rates)} bound samples")
    return [t / train_tokens_per_s_bound(n_params, r) for t, r in zip(tokens_per_s, bf16_rates, strict=True)]


def figure_7(repeats: int, sizes: dict[str, int], bounds: dict[str, float], n_params: int) -> Figure:
    """SFT tokens/s, ours / plain TRL fp32, and fractions of the 6N bound."""
    steps, batch = sizes["fig7_steps"], sizes["fig7_batch"]
    examples = sft_examples(steps * batch)
    per_step = tokens_per_example(examples) * batch
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = interleave(
            {
                # the bf16 matmul rate right before each round's "ours" (paired_bound_shares)
                "bf16_rate": lambda: matmul_rate("bfloat16", samples=PAIRED_BOUND_SAMPLES, spacing_s=0.25)[0],
                "ours": lambda: ours_sft(examples, steps, batch, work),
                "plain": lambda: plain_sft(examples, steps, batch, work),
                "ours_trl_head": lambda: ours_sft(examples, steps, batch, work, "trl"),
            },
            repeats,
        )
    # first step excluded (optimizer state allocation, oneDNN warm-up)
    bf16_rates = runs.pop("bf16_rate")
    rate = {k: [per_step / median_spread(t[1:] or t)[0] for t in v] for k, v in runs.items()}
    paired, paired_spread = median_spread(paired_bound_shares(rate["ours"], bf16_rates, n_params))
    ratio, spread = median_spread(ratio_samples(rate["ours"], rate["plain"]))
    ours = median_spread(rate["ours"])[0]
    head_speedup, head_spread = median_spread(ratio_samples(rate["ours"], rate["ours_trl_head"]))
    fp32_bound = train_tokens_per_s_bound(n_params, bounds["peak_fp32_flops"])
    bf16_bound = train_tokens_per_s_bound(n_params, bounds["peak_bf16_flops"])
    detail = {
        "ours_tokens_per_s": ours,
        "plain_tokens_per_s": median_spread(rate["plain"])[0],
        "ours_fraction_of_fp32_bound": ours / fp32_bound,
        "ours_fraction_of_bf16_bound": ours / bf16_bound,
        # each round's tokens/s over the bound from the bf16 rate measured right before it
        "ours_fraction_of_bf16_bound_paired": paired,
        "ours_fraction_of_bf16_bound_paired_spread": paired_spread,
        "bf16_rates_paired": bf16_rates,
        "plain_fraction_of_fp32_bound": median_spread(rate["plain"])[0] / fp32_bound,
        "ours_trl_head_tokens_per_s": median_spread(rate["ours_trl_head"])[0],
        "loss_head_speedup": head_speedup,
        "loss_head_speedup_spread": head_spread,
        "tokens_per_step": per_step,
        # a padding-free step's attention: its first batch's examples as one row (manyways.packed_attention)
        "attention_layer": attention_layer_ms(example_lengths(examples[:batch]), repeats),
        "workload": f"{steps} steps x batch {batch}, {len(examples)} exemplar conversations",
    }
    met = ratio >= 2 and ours / fp32_bound >= 0.45 and paired >= 0.15
    return Figure(
        7,
        "SFT tokens/s, midtrain trainer / plain TRL fp32",
        ratio,
        ">= 2x; >= 45% of fp32 6N bound; >= 15% of bf16 bound (paired)",
        met,
        spread,
        "TRL SFTTrainer fp32, no packing",
        detail,
    )


def rl_trainer(steps: int, completion_tokens: int, work: Path, loss_head: str = "auto") -> Any:
    """The rl stage's trainer on the demo config, from the base model, for the figure."""
    from manyways.stages.rl import build_trainer, load_rl_problems

    cfg = load_config(
        CONFIG,
        [
            f"run.root={work}",
            f"rl.max_steps={steps}",
            "rl.save_steps=100000",
            'rl.trl.save_strategy="no"',
            f"rl.max_completion_length={completion_tokens}",
            f"rl.loss_head={loss_head}",
        ],
    )
    problems, _ = load_rl_problems(cfg)
    trainer, _ = build_trainer(cfg, work / "rl", resolve_model_path(DEFAULT_MODEL), problems)
    return trainer


def vary_rewards(trainer: Any) -> None:
    """Make every group's rewards differ (bench only): odd rows get 1 more than the verifier gave
    (an unjudgeable completion counts as 0 here).
    The base model's 48-token completions are all wrong, so with the verifier's rewards alone every
    advantage is 0 and the stage skips the backward (``rl.skip_zero_advantage``): the figure would
    time steps that do not train."""
    inner = trainer._calculate_rewards

    def varied(*args: Any, **kwargs: Any) -> Any:
        rewards = inner(*args, **kwargs)
        odd = torch.arange(rewards.shape[0], device=rewards.device) % 2
        rewards[:, 0] = rewards[:, 0].nan_to_num(0.0) + odd  # an unjudgeable row would stay at 0
        return rewards

    trainer._calculate_rewards = varied


def grpo_split(
    sizes: dict[str, int], loss_head: str, train_every_row: bool = True
) -> tuple[list[float], list[float], Any, dict[str, int]]:
    """Step times and generation times of a few GRPO steps of the rl stage's trainer, its number
    of completions per group and its forward counters (``training_forwards``)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = rl_trainer(sizes["fig8_steps"], sizes["fig8_completion"], Path(tmp), loss_head)
        if train_every_row:
            vary_rewards(trainer)
        clock, gen_times = StepClock(), []
        inner = trainer._generate_single_turn

        def timed_generate(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            gen_times.append(time.perf_counter() - start)
            return out

        trainer._generate_single_turn = timed_generate
        trainer.add_callback(clock)
        trainer.train()
    return clock.times, gen_times, trainer.args.num_generations, dict(trainer.manyways_forward_stats)


def outside_ratios(step_s: list[float], gen_s: list[float]) -> list[float]:
    """(step - generation) / generation per step, the first (warm-up) excluded."""
    return [(step - gen) / gen for step, gen in list(zip(step_s, gen_s, strict=False))[1:]]


def figure_8(sizes: dict[str, int]) -> Figure:
    """GRPO: time outside generation / generation time per step (first step excluded)."""
    step_s, gen_s, group, forwards = grpo_split(sizes, "auto")
    ratios = outside_ratios(step_s, gen_s)  # steps 2, 3, ...
    value, spread = median_spread(ratios)
    trl_step_s, trl_gen_s, _, _ = grpo_split(sizes, "trl")  # TRL's LM head, run after (not ABAB)
    # the verifier's own rewards: all wrong, every advantage 0, no backward (rl.skip_zero_advantage)
    zero_step_s, zero_gen_s, _, zero_forwards = grpo_split(sizes, "auto", train_every_row=False)
    return Figure(
        8,
        "GRPO step: time outside generation / generation time",
        value,
        "<= 0.35",
        meets(value, 0.35, higher_is_better=False),
        spread,
        "-",
        {
            "step_s": step_s,
            "generation_s": gen_s,
            "ratios": ratios,
            "ratio_steps_2_5": median_spread(ratios[:4])[0],
            "ratio_steps_6_on": median_spread(ratios[4:])[0] if ratios[4:] else None,
            "ratio_with_trl_head": median_spread(outside_ratios(trl_step_s, trl_gen_s))[0],
            "trl_head_step_s": trl_step_s,
            "trl_head_generation_s": trl_gen_s,
            "training_forwards": forwards,
            "ratio_with_zero_advantages": median_spread(outside_ratios(zero_step_s, zero_gen_s))[0],
            "zero_advantage_step_s": zero_step_s,
            "zero_advantage_generation_s": zero_gen_s,
            "zero_advantage_training_forwards": zero_forwards,
            "config": CONFIG,
            "completion_tokens": sizes["fig8_completion"],
            "group": group,
        },
    )
