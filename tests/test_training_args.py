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
