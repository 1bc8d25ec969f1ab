"""Config loading: every YAML validates, overrides apply, unknown keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from manyways.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert any(p.name == "tiny_cpu.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    cfg = load_config(path)
    assert cfg.run.name
    # frozen: a resolved config cannot be mutated by a stage
    with pytest.raises(ValidationError):
        cfg.run.name = "other"  # type: ignore[misc]


def test_overrides_apply_with_yaml_values(repo_root):
    cfg = load_config(
        repo_root / "configs/tiny_cpu.yaml",
        ["generate.samples=2", 'generate.stop=["\\n\\n"]', "heuristics.ids=[work_backward]"],
    )
    assert cfg.generate.samples == 2
    assert cfg.generate.stop == ["\n\n"]
    assert cfg.heuristics.ids == ["work_backward"]


def test_unknown_key_in_file_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("generate:\n  sampels: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert "generate.sampels" in str(exc.value) and str(p) in str(exc.value)


def test_unknown_override_is_named(repo_root):
    with pytest.raises(ConfigError, match="verify.timeout"):
        load_config(repo_root / "configs/tiny_cpu.yaml", ["verify.timeout=3"])


def test_bad_value_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("generate:\n  samples: zero\n")
    with pytest.raises(ConfigError, match="generate.samples"):
        load_config(p)


@pytest.mark.parametrize(
    ("given", "expected"), [("batch", "batch"), ("none", "none"), ("true", "group"), ("false", "none")]
)
def test_scale_rewards_takes_trls_spellings(given, expected):
    assert load_config(None, [f"rl.scale_rewards={given}"]).rl.scale_rewards == expected


def test_a_scale_rewards_typo_fails_at_load_not_after_a_generation():
    with pytest.raises(ConfigError, match="rl.scale_rewards"):
        load_config(None, ["rl.scale_rewards=grp"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["generate.samples"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_section_hash_tracks_only_its_sections(repo_root):
    a = load_config(repo_root / "configs/tiny_cpu.yaml")
    b = load_config(repo_root / "configs/tiny_cpu.yaml", ["evaluate.samples=3"])
    assert a.section_hash("generate") == b.section_hash("generate")
    assert a.section_hash("evaluate") != b.section_hash("evaluate")


def test_paper_recipe_passes_only_real_trl_options(repo_root):
    """The GPU recipe cannot run here, but its TRL options must exist in the installed TRL."""
    import dataclasses

    from trl import GRPOConfig, SFTConfig

    cfg = load_config(repo_root / "configs/paper_llama3b.yaml")
    assert cfg.model.name == "meta-llama/Llama-3.2-3B-Instruct"
    assert cfg.rl.num_generations == 16 and cfg.rl.max_completion_length == 3072
    assert cfg.rl.beta == 0.0 and cfg.evaluate.samples == 64 and cfg.midtrain.max_length == 2048
    for section, trl_cls in ((cfg.midtrain.trl, SFTConfig), (cfg.rl.trl, GRPOConfig)):
        fields = {f.name for f in dataclasses.fields(trl_cls)}
        assert set(section) <= fields, sorted(set(section) - fields)
    assert set(cfg.data.eval) >= {
        "math500",
        "aime2024",
        "aime2025",
        "amc23",
        "hmmt",
        "olympiadbench",
        "humaneval",
    }
