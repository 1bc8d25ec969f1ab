"""A config key nobody reads is an error, not a silent no-op.

``shadowed_trl_keys`` runs at config loading; ``record_reads`` records which keys a run reads
(the rehearsal of ``configs/paper_llama3b.yaml`` uses it; here a small real run of
``configs/tiny_cpu.yaml``), and a static check finds typed fields no code mentions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from manyways import experiment
from manyways.backends.fake import FakeBackend
from manyways.backends.hf import HFBackend
from manyways.config import Config, ConfigError, load_config
from manyways.data import load_problems
from manyways.keyuse import check_keys_read, config_classes, record_reads, unread_keys, yaml_keys

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "override",
    [
        "rl.trl.num_generations=8",
        "midtrain.trl.max_length=4096",
        "midtrain.trl.num_train_epochs=2",
        "midtrain.trl.padding_free=false",
    ],
)
def test_a_trl_key_that_duplicates_a_typed_key_is_an_error(override):
    with pytest.raises(ConfigError, match=r"duplicates (rl|midtrain)\.\w+.*instead"):
        load_config(None, [override])
    load_config(None, ["midtrain.trl.lr_scheduler_type=cosine", "rl.trl.report_to=[wandb]"])


def test_record_reads_counts_uses_not_validation_or_hashing():
    from manyways.stages import evaluate, generate

    with record_reads() as reads:
        cfg = load_config(ROOT / "configs" / "paper_llama3b.yaml")
        generate.stage_config(cfg)  # hashing is not a use
        evaluate.stage_config(cfg)
        assert cfg.generate.samples == 4
        assert cfg.data.eval["hmmt"].fields.question == "problem"
        cfg.generate.backend.vllm  # noqa: B018 - a read of a pass-through mapping
    assert {"generate.samples", "data.eval.hmmt.fields.question", "generate.backend.vllm"} <= reads.paths
    assert "generate.max_new_tokens" not in reads.paths and "data.eval.hmmt.name" not in reads.paths
    data = {"generate": {"samples": 4, "max_new_tokens": 9, "backend": {"vllm": {"x": 1}}}}
    assert yaml_keys(data, cfg) == ["generate.samples", "generate.max_new_tokens", "generate.backend.vllm"]
    assert unread_keys(data, cfg, reads) == ["generate.max_new_tokens"]
    # the patched classes are restored
    assert "__getattribute__" not in Config.__dict__


def test_every_typed_field_is_mentioned_by_some_code():
    """A field no code names (as an attribute, keyword or key) cannot be read by any stage."""
    names: set[str] = set()
    for path in (ROOT / "src" / "manyways").rglob("*.py"):
        if path.name in ("keyuse.py", "plan.py", "plan_estimates.py") and path.parent.name == "manyways":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    unused = {
        f"{cls.__name__}.{name}"
        for cls in config_classes(Config)
        for name in cls.model_fields
        if name not in names
    }
    assert unused == set()


@pytest.mark.slow
def test_every_key_of_the_cpu_config_is_read_by_a_run(tmp_path, tiny_model_dir, monkeypatch):
    """A real (tiny) run of configs/tiny_cpu.yaml reads every key the file sets."""
    path = ROOT / "configs" / "tiny_cpu.yaml"
    overrides = [
        f"run.root={tmp_path}",
        f"model.name={tiny_model_dir}",
        f"experiment.teacher_model={tiny_model_dir}",
        "experiment.jobs=1",  # stages in this process, where the reads are recorded (and faked)
        f"score.cache_dir={tmp_path / 'scores'}",  # an empty score cache: the judge is really built
        "experiment.arms=[distill_rl]",  # the longest arm, and the one that reads teacher_model
        "data.train.size=3",
        "data.eval.arithmetic.size=2",
        "heuristics.n=1",
        "generate.samples=2",
        "generate.max_new_tokens=64",  # room for the fake's boxed answer
        "midtrain.max_steps=1",
        "rl.max_steps=1",
        "rl.max_completion_length=8",
        "evaluate.samples=2",
        "evaluate.max_new_tokens=8",
        "analyze.kernels=[ngram]",
        "analyze.max_traces=1",
    ]
    cfg = load_config(path, overrides)
    golds = {p.question: p.answer for p in load_problems(cfg.data.train).problems}
    real_from_config = HFBackend.from_config.__func__

    def built_then_faked(cls, backend_cfg, model):
        """The real hf back-end is built (reading its keys); a fake that knows the golds answers,
        so that a random tiny model still yields correct traces to mid-train on."""
        real_from_config(cls, backend_cfg, model)
        return FakeBackend(golds, correct_rate=0.5, model_id=model)

    monkeypatch.setattr(HFBackend, "from_config", classmethod(built_then_faked))
    with record_reads() as reads:
        cfg = load_config(path, overrides)
        experiment.run_experiment(cfg, show_progress=False)
    check_keys_read(path, reads)


def test_reads_in_another_process_are_recorded_through_the_environment(tmp_path):
    """accelerate ranks and Ray workers are other processes: $MANYWAYS_RECORD_READS makes each
    write what it read, and reads_from_dir merges them."""
    import os
    import subprocess
    import sys

    from manyways.keyuse import ENV_VAR, reads_from_dir

    code = (
        "from manyways.config import load_config\n"
        f"cfg = load_config({str(ROOT / 'configs' / 'tiny_cpu.yaml')!r})\n"
        "cfg.rl.num_generations; cfg.run_dir\n"
    )
    env = {**os.environ, ENV_VAR: str(tmp_path / "reads"), "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    # a worker killed without atexit (os._exit) still left its reads, written a second after them
    killed = code + "cfg.evaluate.samples\nimport os, time\ntime.sleep(3)\nos._exit(0)\n"
    subprocess.run([sys.executable, "-c", killed], check=True, env=env, timeout=120)
    assert len(list((tmp_path / "reads").glob("reads-*.json"))) == 2
    reads = reads_from_dir(tmp_path / "reads")
    assert {"rl.num_generations", "run.root", "evaluate.samples"} <= reads.paths
    assert "rl.max_steps" not in reads.paths
