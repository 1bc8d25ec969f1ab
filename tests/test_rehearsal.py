"""The rehearsal (manyways.rehearsal): the vLLM engine stand-in, the substitutions, and (slow)
the rehearsal of configs/paper_llama3b.yaml end to end."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from manyways.config import load_config
from manyways.models import TINY_POSITIONS
from manyways.rehearsal import engine as engine_mod
from manyways.rehearsal.engine import LLM, SamplingParams, TokensPrompt

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper_llama3b.yaml"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama stand-in whose template and tokenizer put a BOS first (untaught: fast)."""
    from manyways.rehearsal.models import build_stand_in

    return build_stand_in("llama_chat", tmp_path_factory.mktemp("m") / "llama", dtype="bfloat16", teach=False)


@pytest.fixture
def gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(engine_mod.GPU_DIR_ENV, str(tmp_path / "gpus"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(engine_mod, "GPU_WAIT_S", 0.5)
    return tmp_path / "gpus"


def test_stand_in_is_llama_bf16_with_one_bos_in_template(llama_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(llama_dir)
    assert config.model_type == "llama" and str(config.dtype).endswith("bfloat16")
    tok = AutoTokenizer.from_pretrained(llama_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith(tok.bos_token)
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id, tok.bos_token_id]  # like Llama 3: BOS added again


def test_sampling_params_refuse_what_vllm_refuses() -> None:
    with pytest.raises(TypeError):
        SamplingParams(best_of_everything=2)  # type: ignore[call-arg]
    for bad in ({"top_p": 0.0}, {"temperature": -1.0}, {"max_tokens": 0}, {"n": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_engine_refuses_unknown_args_missing_gpus_and_a_taken_gpu(
    llama_dir: Path, gpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(TypeError, match="unexpected keyword"):
        LLM(model=str(llama_dir), gpu_memory_utilisation=0.9)
    with pytest.raises(RuntimeError, match="tensor_parallel_size=2"):
        LLM(model=str(llama_dir), tensor_parallel_size=2)
    with pytest.raises(RuntimeError, match="pipeline_parallel_size=2 needs 2 GPUs"):
        LLM(model=str(llama_dir), pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=str(llama_dir), max_model_len=10**6)
    first = LLM(model=str(llama_dir), gpu_memory_utilization=0.9)
    with pytest.raises(RuntimeError, match="GPU 0 is already used by another engine"):
        LLM(model=str(llama_dir), gpu_memory_utilization=0.9)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    second = LLM(model=str(llama_dir))  # another GPU: fine
    assert (first.gpus, second.gpus) == (["0"], ["1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="sees 0"):
        LLM(model=str(llama_dir))


def test_engine_prompts_seeds_and_refusals(llama_dir: Path, gpus: Path) -> None:
    llm = LLM(model=str(llama_dir), max_model_len=64)
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    params = [SamplingParams(seed=s, temperature=1.0, max_tokens=5) for s in (1, 2, 1)]
    outs = llm.generate([TokensPrompt(ids), TokensPrompt(ids), TokensPrompt(ids)], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [ids] * 3
    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids  # per-request seed
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    assert all(len(o.outputs[0].token_ids) <= 5 for o in outs)
    assert llm.stats["double_bos"] == 0
    text_out = llm.generate(text, SamplingParams(seed=1, max_tokens=2))
    assert text_out[0].prompt_token_ids[:2] == [tok.bos_token_id] * 2 and llm.stats["double_bos"] == 1
    with pytest.raises(ValueError, match="longer than the maximum model length"):
        llm.generate(TokensPrompt(ids * 10), SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate(TokensPrompt([len(tok) + 5]), SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="cannot be empty"):
        llm.generate(TokensPrompt([]), SamplingParams(max_tokens=2))


def test_vllm_backend_runs_on_the_engine_with_per_sample_seeds(llama_dir: Path, gpus: Path) -> None:
    """The vllm back-end's own code on the stand-in: one request per seed, each sample depends
    only on its own seed (not on its batch-mates), finish reasons and token counts come back."""
    from manyways.backends.protocol import GenRequest
    from manyways.backends.vllm import VLLMBackend

    backend = VLLMBackend(LLM(model=str(llama_dir)), str(llama_dir), sampling_params=SamplingParams)
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    three = backend.generate([GenRequest("q", messages, (5, 6, 7), 6, 1.0, 0.95)])[0]
    alone = backend.generate([GenRequest("q", messages, (7,), 6, 1.0, 0.95)])[0]
    assert len(three) == 3 and three[2] == alone[0]
    assert all(s.finish_reason in ("stop", "length") and 0 < s.completion_tokens <= 6 for s in three)
    assert backend.engine.stats["requests"] == 4


def test_substitutions_keep_settings_and_the_budget_arithmetic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from manyways.data import load_problems
    from manyways.experiment import parse_arm
    from manyways.rehearsal import substitute

    built: list[tuple[str, str]] = []

    def fake_build(family: str, out_dir: Path, *, dtype: str) -> Path:
        built.append((family, dtype))
        out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir

    monkeypatch.setattr(substitute, "build_stand_in", fake_build)
    cfg = load_config(PAPER)
    rcfg, subs = substitute.rehearsal_config(cfg, tmp_path, substitute.Scale())
    q = subs.scale["questions"]
    # every hub model replaced by a local stand-in of its family, in the config's dtype
    assert set(subs.models) >= {cfg.model.name, cfg.score.model, cfg.experiment.teacher_model}
    assert all(Path(p).is_dir() for p in subs.models.values())
    assert ("llama_reward", "bfloat16") in built and ("qwen2_chat", "bfloat16") in built
    assert rcfg.score.scorer == "reward_model" and rcfg.generate.backend.kind == "vllm"
    # every hub dataset replaced by a local file the real preset reads, ceil(real / q) rows
    sources = {
        "train": rcfg.data.train,
        "rl": rcfg.data.rl,
        **{f"eval_{k}": v for k, v in rcfg.data.eval.items()},
    }
    for label, src in sources.items():
        info = subs.datasets[label]
        if src.kind == "humaneval":
            assert src.limit == info["rows"] == math.ceil(164 / q)
            continue
        assert src.data_files == info["file"] and info["rows"] == max(1, math.ceil(info["real_rows"] / q))
        loaded = load_problems(src)
        assert len(loaded.problems) == info["rows"] and not loaded.set_aside, label
        if label == "train":  # the budget arms need a correct trace for nearly every question
            assert {p.answer for p in loaded.problems} == {"7"}
    # the arms come from the config, and N x M stays the same for every budget arm
    assert rcfg.experiment.arms == cfg.experiment.arms
    budgets = {a: parse_arm(a) for a in cfg.experiment.arms if parse_arm(a).group(3)}
    assert budgets
    products = {
        int(m.group(3)) * rcfg.experiment.overrides[a]["select.budget_problems"] for a, m in budgets.items()
    }
    assert len(products) == 1
    # every step of every arm gets a valid config with the arm's overrides (as the run derives them)
    from manyways.experiment import arm_steps, derive_config

    for arm in rcfg.experiment.arms:
        for step in arm_steps(arm, rcfg):
            derive_config(rcfg, {**step.overrides, **rcfg.experiment.overrides.get(arm, {})})
    # untouched: learning rates, TRL batch settings, seeds, heuristics
    # the stand-in benchmarks share no question (nor 13-gram) with the stand-in training sets, so
    # decontamination leaves them whole and the recipe's analyze.benchmarks have traces to label
    from manyways.data.contamination import decontaminate
    from manyways.stages.evaluate import benchmarks, load_benchmark

    loaded = {name: load_benchmark(src, True) for name, src in benchmarks(rcfg).items()}
    kept, contamination = decontaminate(rcfg, loaded)
    assert all(r["excluded"] == 0 for r in contamination["benchmarks"].values()), contamination
    assert all(kept[b] for b in rcfg.analyze.benchmarks)
    # per-arm overrides fit the fake cluster too: the QwQ teacher's 4-GPU engines and 16K tokens
    teacher = rcfg.experiment.overrides["distill_rl"]
    real_engine = cfg.experiment.overrides["distill_rl"]["generate.backend.vllm"]
    assert real_engine["tensor_parallel_size"] > 1 and real_engine["max_model_len"] > TINY_POSITIONS
    # the engine options vLLM's LLM would be given: one GPU, the stand-ins' context, nothing added
    assert teacher["generate.backend.vllm"] == {
        **real_engine,
        "tensor_parallel_size": 1,
        "max_model_len": TINY_POSITIONS,
    }
    assert set(teacher["generate.backend.vllm"]) <= engine_mod.ENGINE_ARGS
    for section in ("generate", "evaluate"):
        engine = getattr(rcfg, section).backend.vllm
        assert engine.get("max_model_len", 0) <= TINY_POSITIONS and engine.get("tensor_parallel_size", 1) == 1
    assert teacher["generate.workers"] <= 2 and teacher["generate.max_new_tokens"] == 16384 // 32
    assert (rcfg.rl.learning_rate, rcfg.midtrain.learning_rate) == (
        cfg.rl.learning_rate,
        cfg.midtrain.learning_rate,
    )
    assert rcfg.midtrain.trl == {**cfg.midtrain.trl, "report_to": "none"}
    assert (rcfg.run.seed, rcfg.heuristics) == (cfg.run.seed, cfg.heuristics)
    assert rcfg.generate.max_new_tokens == cfg.generate.max_new_tokens // 32
    assert rcfg.analyze.max_traces == cfg.analyze.max_traces // 8 and rcfg.evaluate.samples == 64 // 8
    with pytest.raises(ValueError, match="does not divide"):
        substitute.question_factor(cfg, q + 1 if q > 1 else 7)
    # capped benchmark and RL rows, but the RL set keeps one optimizer step of the recipe's GRPO
    # batch on the 2 ranks: 16 per device x 4 accumulation x 2 / 16 generations = 8 prompts
    _, capped = substitute.rehearsal_config(cfg, tmp_path / "capped", substitute.Scale(max_eval_rl_rows=4))
    assert capped.datasets["rl"]["rows"] == 8 and all(
        v["rows"] <= 4 for k, v in capped.datasets.items() if k.startswith("eval_")
    )


def test_cli_rehearse_refuses_a_scale_that_breaks_the_budget_arms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from manyways.cli import main

    monkeypatch.chdir(tmp_path)
    assert (
        main(["experiment", str(PAPER), "--rehearse", "--rehearse-scale", "7", f"run.root={tmp_path}"]) == 2
    )
    assert "does not divide" in capsys.readouterr().err


# The arms `make test` rehearses: one of each kind the recipe has (RL from the base model, STaR,
# mid-trained at small n, the reasoning teacher, incorrect traces, both fixed budgets; the base
# model is evaluated and analysed in any case; the shared generation serves the largest n among
# them, 16). The recipe's other arms are the same code at another n:
# `make test-rehearsal` (MANYWAYS_REHEARSAL_ARMS=all) rehearses all 15, and the variable takes any
# comma-separated set.
REHEARSAL_ARMS = "vanilla_rl, star_rl, polya_n2, distill_rl, incorrect_n4, budget_16x463, budget_1x7408"


def rehearsal_arms() -> str | None:
    """The arms to rehearse: $MANYWAYS_REHEARSAL_ARMS, ``all`` (the config's own), or REHEARSAL_ARMS."""
    arms = os.environ.get("MANYWAYS_REHEARSAL_ARMS", REHEARSAL_ARMS)
    return None if arms.strip() == "all" else arms


@pytest.mark.slow
@pytest.mark.rehearsal
def test_rehearsal_of_the_paper_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rehearsal of configs/paper_llama3b.yaml: its arms (REHEARSAL_ARMS), evaluated and analysed, generation
    through the vllm back-end on Ray workers with fake GPUs, midtrain and rl on two processes; and
    every key the config file sets is read by some stage (in this process, a Ray worker or a rank)."""
    import json

    from manyways.keyuse import ENV_VAR, check_keys_read, reads_from_dir, record_reads
    from manyways.rehearsal import Scale, rehearse

    arms = rehearsal_arms()
    overrides = [f"run.root={tmp_path / 'runs'}"] + ([f"experiment.arms=[{arms}]"] if arms else [])
    cfg = load_config(PAPER, overrides)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "reads"))  # before Ray and the training ranks start
    with record_reads() as reads:
        summary = rehearse(cfg, workdir=tmp_path / "work", scale=Scale(samples=16, max_eval_rl_rows=4))
    reads.paths |= reads_from_dir(tmp_path / "reads").paths
    check_keys_read(PAPER, reads)  # raises naming every key nobody read
    report = summary["report"]
    for arm in cfg.experiment.arms:
        assert f"\n  {arm}\n" in report
        assert {"rl", "evaluate", "analyze"} <= set(summary["ran"][arm])
    assert {d.split("-")[0] for d in summary["launched"]} == {"midtrain", "rl"}
    # rl on CPU: the completion head packs each group's prompt once, under the recipe's bf16 and
    # gradient checkpointing, on both ranks; what runs unpacked is a layout with nothing to share
    # (a group's one row with zero advantage, split off by rl.skip_zero_advantage), never the
    # inputs or dropout
    rl_runs = [json.loads(m.read_text()) for m in (tmp_path / "work").glob("**/stages/rl-*/manifest.json")]
    forwards = [r["training_forwards"] for r in rl_runs]
    assert forwards and all(
        0 < f["shared"] == f["forwards"] - f["unshared_layout"] and f["zero_advantage_rows"] > 0
        for f in forwards
    ), forwards
    saved = json.loads((tmp_path / "work" / "rehearsal.json").read_text())
    assert saved["ran"] == json.loads(json.dumps(summary["ran"]))
    assert "== real run" in report
    assert os.environ.get(engine_mod.GPU_DIR_ENV) is None  # the environment is restored
    # engines ran on both fake GPUs, in processes other than this one (the Ray workers)
    holders = {p.name: p.read_text().strip() for p in (tmp_path / "work" / "gpus").glob("gpu*.lock")}
    assert set(holders) == {"gpu0.lock", "gpu1.lock"}
    assert str(os.getpid()) not in holders.values()


def test_report_puts_each_step_beside_the_real_runs_projection() -> None:
    """With manyways.plan's Plan (steps(arm) -> StageRun with an estimate; table()) the report
    shows, per arm and step, what ran and the real run's counts and GPU-hours."""
    from types import SimpleNamespace

    from manyways.rehearsal.run import format_report
    from manyways.rehearsal.substitute import Substitutions

    estimate = SimpleNamespace(count=478_272, unit="samples", tokens_out=191_000_000, gpu_hours=7.1)
    run = SimpleNamespace(estimate=estimate, arms=["polya_n1", "polya_n16"])
    plan = SimpleNamespace(steps=lambda arm: {"generate": run}, table=lambda: "TOTAL 500 GPU-h")
    ran = {
        "polya_n1": {
            "generate": {"dir": "generate-abc", "reused": True, "counts": {"rows": 1088, "h:x:correct": 3}}
        }
    }
    text = format_report(Substitutions(scale={"questions": 463}), ran, plan)
    line = next(ln for ln in text.splitlines() if "generate-abc" in ln)
    assert "reused" in line and "rows=1088" in line and "h:x" not in line
    assert "real: 478,272 samples, 191,000,000 tokens out, 7.1 GPU-h (shared by 2 arms)" in line
    assert text.rstrip().endswith("TOTAL 500 GPU-h")
    assert "not available" in format_report(Substitutions(), ran, None)


@pytest.mark.slow
def test_training_ranks_are_started_once_for_many_stages_and_a_failure_names_the_stage(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The rehearsal's 2-process training: the ranks run stage after stage without restarting;
    a stage that fails ends them with an error naming it and the log's tail; the next stage starts
    new ranks; close() ends them."""
    from manyways.rehearsal.run import AccelerateStages
    from test_stage_midtrain import make_select_dir, sft_row, tiny_cfg

    select = make_select_dir(tmp_path / "run", [sft_row(i) for i in range(4)])
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cfg = tiny_cfg(tmp_path, tiny_model_dir, "midtrain.max_steps=1", "midtrain.batch_size=1")
    with AccelerateStages(tmp_path / "w", env) as ranks:
        for name in ("a", "b"):
            manifest = ranks("midtrain", cfg, tmp_path / name, {"select": select}, False, False)
            assert manifest["counts"]["global_step"] == 1 and (tmp_path / name / "model").is_dir()
        assert ranks.starts == 1 and ranks.launched == ["a", "b"]
        with pytest.raises(RuntimeError, match=r"midtrain \(c\) on 2 processes failed \(exit"):
            ranks("midtrain", cfg, tmp_path / "c", {"select": tmp_path / "missing"}, False, False)
        ranks("midtrain", cfg, tmp_path / "d", {"select": select}, False, False)
        assert ranks.starts == 2
    assert ranks._proc is None and (tmp_path / "w" / "launch" / "queue-2" / "stop").exists()
