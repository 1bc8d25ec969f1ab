"""Issue 12 defect 1: trainable weights stay fp32 when the model was saved in bf16.

A bf16 weight of 0.02 plus an update of 1e-6 is still 0.02 (bf16 keeps 8 significant bits), so a
midtrain or GRPO step at lr 1e-6 on bf16 weights leaves nearly every weight unchanged. Both
training stages must load the trainable weights in fp32 (bf16 only as the trainer's autocast).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from manyways.training import MasterWeightsCallback

LAYER = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model saved in bfloat16 (its config says so, as Llama-3.2-3B's does)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def _moved_fraction(before_dir: Path, after_dir: Path) -> float:
    from safetensors.torch import load_file

    before = load_file(str(before_dir / "model.safetensors"))[LAYER]
    after = load_file(str(after_dir / "model.safetensors"))[LAYER]
    assert before.dtype == torch.bfloat16
    return (after.float() != before.float()).float().mean().item()


def test_midtrain_step_at_lr_1e6_on_a_bf16_model_moves_fp32_weights(
    tmp_path: Path, bf16_model_dir: Path
) -> None:
    from manyways.stages import midtrain
    from test_stage_midtrain import make_select_dir, sft_row, tiny_cfg

    torch.set_num_threads(1)
    cfg = tiny_cfg(
        tmp_path,
        bf16_model_dir,
        "model.dtype=bfloat16",
        "midtrain.learning_rate=1e-6",
        "midtrain.max_steps=1",
        "midtrain.batch_size=2",
    )
    select = make_select_dir(cfg.run_dir, [sft_row(i) for i in range(2)])
    manifest = midtrain.run(cfg, cfg.run_dir / "midtrain", inputs={"select": select}, show_progress=False)

    assert manifest["counts"]["global_step"] == 1 and manifest["bf16"] is True
    assert manifest["trainable_dtypes"] == ["float32"] and manifest["fp32_masters"] == "weights"
    # in bf16 only the few weights below ~2.5e-4 in magnitude could move by 1e-6
    assert _moved_fraction(bf16_model_dir, cfg.run_dir / "midtrain" / "model") > 0.5


def test_rl_step_at_lr_1e6_on_a_bf16_model_moves_fp32_weights(
    tmp_path: Path, bf16_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import manyways.verify.registry as registry
    from manyways.stages import rl
    from test_stage_rl import fake_verify_many, rl_cfg

    torch.set_num_threads(1)
    monkeypatch.setattr(registry, "verify_many", fake_verify_many)
    cfg = rl_cfg(
        tmp_path, bf16_model_dir, 4, "model.dtype=bfloat16", "rl.learning_rate=1e-6", "rl.max_steps=1"
    )
    manifest = rl.run(cfg, cfg.run_dir / "rl", show_progress=False)

    assert manifest["counts"]["global_step"] == 1 and manifest["bf16"] is True
    assert manifest["trainable_dtypes"] == ["float32"] and manifest["fp32_masters"] == "weights"
    assert _moved_fraction(bf16_model_dir, cfg.run_dir / "rl" / "model") > 0.5


class _Args:
    deepspeed = None


def test_master_weights_callback_refuses_bf16_trainable_weights() -> None:
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="not float32"):
        MasterWeightsCallback().on_step_begin(_Args(), None, None, model=model)
    deepspeed = _Args()
    deepspeed.deepspeed = "ds.json"  # the DeepSpeed engine keeps fp32 masters in its optimizer
    callback = MasterWeightsCallback()
    callback.on_step_begin(deepspeed, None, None, model=model)
    assert callback.summary() == {"trainable_dtypes": ["bfloat16"], "fp32_masters": "deepspeed optimizer"}
