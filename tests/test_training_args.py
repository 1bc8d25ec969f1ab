"""TRL/transformers argument spelling across versions (``manyways.training.trainer_kwargs``)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from manyways.config import Config
from manyways.training import trainer_kwargs


@dataclasses.dataclass
class NewArgs:  # transformers >= 5.24: the old name is a deprecated alias
    activation_checkpointing: bool | None = None
    gradient_checkpointing: bool | None = None
    learning_rate: float = 1.0


@dataclasses.dataclass
class OldArgs:
    gradient_checkpointing: bool = False
    learning_rate: float = 1.0


def test_renamed_arguments_take_the_installed_spelling_and_the_user_wins() -> None:
    defaults = {"activation_checkpointing": False, "learning_rate": 1e-5}
    user = {"gradient_checkpointing": True}
    assert trainer_kwargs(NewArgs, defaults, user) == {
        "activation_checkpointing": True,
        "learning_rate": 1e-5,
    }
    assert trainer_kwargs(OldArgs, defaults, user) == {"gradient_checkpointing": True, "learning_rate": 1e-5}
    assert trainer_kwargs(OldArgs, {"activation_checkpointing": False}, {}) == {
        "gradient_checkpointing": False
    }


def test_stage_arguments_build_without_deprecation_warnings(tmp_path: Path) -> None:
    from manyways.stages.midtrain import sft_args
    from manyways.stages.rl import grpo_args

    cfg = Config.model_validate(
        {
            "midtrain": {"trl": {"gradient_checkpointing": True}},
            "rl": {"trl": {"gradient_checkpointing": True}},
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        sft = sft_args(cfg, tmp_path, False)
        grpo = grpo_args(cfg, tmp_path, [1.0], False)
    assert sft.gradient_checkpointing is True and grpo.gradient_checkpointing is True


def test_generation_casts_each_weight_once_per_generate_call(tiny_model_dir: Path) -> None:
    """accelerate wraps ``forward`` in its own autocast region; inside one outer region (our
    wrapper) the bf16 weight casts are cached across decode steps instead of redone at each."""
    import functools

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from manyways.training import cache_casts_during_generation

    def casts_and_tokens(wrap: bool) -> tuple[int, list[int]]:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
        forward = model.forward

        @functools.wraps(forward)
        def autocast_forward(*args, **kwargs):  # what accelerate's prepare_model does
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(*args, **kwargs)

        model.forward = autocast_forward
        if wrap:
            assert cache_casts_during_generation(model, bf16=True) is True
            assert cache_casts_during_generation(model, bf16=True) is False  # never wrapped twice
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
        casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
        linears.append(sum(isinstance(m, torch.nn.Linear) for m in model.modules()))
        return casts, out[0].tolist()

    linears: list[int] = []

    plain_casts, plain_tokens = casts_and_tokens(wrap=False)
    cached_casts, cached_tokens = casts_and_tokens(wrap=True)
    assert cached_tokens == plain_tokens
    # without the outer region every linear layer's weight is cast again at each of the 12 steps
    assert plain_casts - cached_casts >= linears[0] * (12 - 2)
    assert cache_casts_during_generation(torch.nn.Linear(2, 2), bf16=False) is False
