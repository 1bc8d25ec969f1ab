"""Each RL export read back the way its framework reads it, scored by the reward we ship for it,
gives the same verdicts as our own :func:`verify_problem` on math, choice and code (body-only and
full-function) completions.

Neither installs cheaply here: verl's ``verl/__init__.py`` imports its ``DataProto`` (tensordict)
and its requirements pin ``numpy<2`` and need ray, hydra-core and tensordict; OpenRLHF's
``openrlhf/datasets/__init__.py`` sits in a package whose requirements pin ``flash-attn==2.8.3``
and ``deepspeed`` (CUDA builds). So the readers below are minimal transcriptions of their code
paths, with the upstream files cited:

- verl (volcengine/verl, main of 2026-01-29): ``verl/utils/dataset/rl_dataset.py``
  (``RLHFDataset._read_files_and_tokenize`` reads parquet with ``datasets.load_dataset``,
  ``__getitem__`` defaults ``extra_info`` and lifts its ``index``),
  ``verl/utils/import_utils.py`` (``load_module``: ``pkg://`` or a file path),
  ``verl/trainer/ppo/reward.py`` (``get_custom_reward_fn``: ``reward_kwargs`` merged in as
  keywords) and ``verl/experimental/reward_loop/reward_manager/naive.py`` (``run_single``: the
  keyword call, ``num_turns`` / ``rollout_reward_scores`` added to ``extra_info``,
  ``reward_router_address`` / ``reward_model_tokenizer`` passed with a reward router).
- OpenRLHF (OpenRLHF/OpenRLHF, main of 2026-08-13): ``openrlhf/datasets/prompts_dataset.py``
  (``preprocess_data``: chat template over ``input``, ``label`` as is),
  ``openrlhf/utils/agent.py`` (``SingleTurnAgentExecutor``: the reward file loaded with
  ``importlib``, ``reward_func([query], [prompt], [label])`` with ``query`` the decode of prompt +
  response tokens with ``skip_special_tokens=False``).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

import manyways.openrlhf_reward
import manyways.verl_reward
from manyways import sandbox
from manyways.exports import export_rl_problems
from manyways.schema import Problem
from manyways.verify.registry import verify_problem

CODE_PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
PROBLEMS = [
    Problem("m1", "toy", "What is 6 * 7?", "42"),
    Problem("m2", "toy", "What is half of 9?", "\\frac{9}{2}"),
    Problem("c1", "musr", "Who did it?", "B", "choice", choices=["Ann", "Bo", "Cy"]),
    Problem(
        "h1",
        "humaneval",
        CODE_PROMPT,
        "",
        "code",
        tests="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        metadata={"entry_point": "add", "prompt": CODE_PROMPT},
    ),
]
MATH_CHOICE = {
    "m1": ["6 * 7 = \\boxed{42}", "\\boxed{41}", "no idea"],
    "m2": ["Half of 9 is \\boxed{4.5}", "\\boxed{4}"],
    "c1": ["Answer: B", "Answer: Cy", "Answer: Bo"],
}
CODE = {
    "h1": [
        "    return a + b\n",  # body only: needs the prompt
        "```python\ndef add(a, b):\n    return a + b\n```",  # full function
        "    return a - b\n",
    ]
}
needs_bwrap = pytest.mark.skipif(sandbox.bwrap_path() is None, reason="bubblewrap is not installed")


def _expected(cases: dict[str, list[str]]) -> list[float]:
    by_id = {p.problem_id: p for p in PROBLEMS}
    return [1.0 if verify_problem(by_id[pid], c).correct else 0.0 for pid, cs in cases.items() for c in cs]


# ----------------------------------------------------------------------------------------- verl
def verl_load_module(module_path: str) -> Any:
    """verl/utils/import_utils.py ``load_module``."""
    if module_path.startswith("pkg://"):
        return importlib.import_module(module_path[len("pkg://") :].replace("/", "."))
    spec = importlib.util.spec_from_file_location(
        f"custom_module_{hash(os.path.abspath(module_path))}", module_path
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def verl_rows(path: Path, cache: Path) -> dict[str, dict[str, Any]]:
    """RLHFDataset: parquet through ``datasets``, ``extra_info`` defaulted, ``index`` lifted."""
    frame = datasets.load_dataset("parquet", data_files=str(path), cache_dir=str(cache))["train"]
    rows = {}
    for i in range(len(frame)):
        row = frame[i]
        if row.get("extra_info") is None:
            row["extra_info"] = {}
        row["index"] = row["extra_info"].get("index", 0)
        rows[row["extra_info"]["problem_id"]] = row
    return rows


def verl_score(fn: Any, reward_kwargs: dict[str, Any], row: dict[str, Any], response: str) -> float:
    """The naive reward manager's call through get_custom_reward_fn's partial (router keywords on)."""
    extra_info = copy.deepcopy(row.get("extra_info", {}))
    extra_info["num_turns"] = None
    extra_info["rollout_reward_scores"] = {}
    kwargs = {
        "data_source": row["data_source"],
        "solution_str": response,
        "ground_truth": row["reward_model"]["ground_truth"],
        "extra_info": extra_info,
        "reward_router_address": "127.0.0.1:9",
        "reward_model_tokenizer": None,
    }
    return fn(**{**kwargs, **reward_kwargs})


def _verl_scores(tmp_path: Path, cases: dict[str, list[str]], module_path: str) -> list[float]:
    export_rl_problems(PROBLEMS, tmp_path)
    rows = verl_rows(tmp_path / "rl_verl.parquet", tmp_path / "cache")
    fn = verl_load_module(module_path).compute_score
    return [verl_score(fn, {"timeout_s": 10}, rows[pid], c) for pid, cs in cases.items() for c in cs]


@pytest.mark.parametrize("module_path", ["pkg://manyways.verl_reward", manyways.verl_reward.__file__])
def test_verl_math_and_choice(tmp_path: Path, module_path: str) -> None:
    assert _verl_scores(tmp_path, MATH_CHOICE, module_path) == _expected(MATH_CHOICE) == [
        1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0
    ]  # fmt: skip


@needs_bwrap
def test_verl_code_body_only_and_full_function(tmp_path: Path) -> None:
    assert _verl_scores(tmp_path, CODE, manyways.verl_reward.__file__) == _expected(CODE) == [1.0, 1.0, 0.0]


# -------------------------------------------------------------------------------------- OpenRLHF
def openrlhf_prompts(path: Path, cache: Path, tokenizer: Any) -> list[tuple[str, Any]]:
    """PromptDataset with --data.input_key input --data.label_key label --data.apply_chat_template."""
    frame = datasets.load_dataset("json", data_files=str(path), cache_dir=str(cache))["train"]
    out = []
    for data in frame:
        chat = copy.deepcopy(data["input"])
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        out.append((prompt, data["label"]))
    return out


def _openrlhf_scores(tmp_path: Path, cases: dict[str, list[str]], tokenizer: Any) -> list[float]:
    export_rl_problems(PROBLEMS, tmp_path)
    prompts = openrlhf_prompts(tmp_path / "rl_openrlhf.jsonl", tmp_path / "cache", tokenizer)
    by_id = dict(zip([p.problem_id for p in PROBLEMS], prompts, strict=True))
    spec = importlib.util.spec_from_file_location("reward_func", manyways.openrlhf_reward.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scores = []
    for pid, cs in cases.items():
        prompt, label = by_id[pid]
        prompt_ids = tokenizer(text=prompt, add_special_tokens=False)["input_ids"]
        for response in cs:
            action_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            query = tokenizer.decode(prompt_ids + action_ids, skip_special_tokens=False)
            out = module.reward_func([query], [prompt], [label])
            assert set(out) == {"rewards", "scores", "extra_logs"}
            assert out["scores"].tolist() == out["rewards"].tolist()
            # openrlhf/trainer/ppo_utils/samples_generator.py: how the executor's output is consumed
            assert torch.tensor([out["rewards"]]).shape == (1,)
            assert all(isinstance(v.flatten()[0].item(), float) for v in out["extra_logs"].values())
            scores.append(float(out["rewards"].flatten()[0].item()))
    return scores


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from manyways.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_openrlhf_math_and_choice(tmp_path: Path, tokenizer: Any) -> None:
    assert _openrlhf_scores(tmp_path, MATH_CHOICE, tokenizer) == _expected(MATH_CHOICE)


@needs_bwrap
def test_openrlhf_code_body_only_and_full_function(tmp_path: Path, tokenizer: Any) -> None:
    assert _openrlhf_scores(tmp_path, CODE, tokenizer) == _expected(CODE) == [1.0, 1.0, 0.0]


def test_exported_fields_rebuild_the_problem_for_every_type(tmp_path: Path) -> None:
    """Without a sandbox too: both readers rebuild exactly what verify_problem reads."""
    from manyways.openrlhf_reward import problem_from_label
    from manyways.verl_reward import problem_from_verl

    export_rl_problems(PROBLEMS, tmp_path)
    rows = verl_rows(tmp_path / "rl_verl.parquet", tmp_path / "cache")
    frame = datasets.load_dataset(
        "json", data_files=str(tmp_path / "rl_openrlhf.jsonl"), cache_dir=str(tmp_path / "c2")
    )
    labels = {r["problem_id"]: r["label"] for r in frame["train"]}

    def key(p: Problem) -> tuple:
        return (
            p.answer,
            p.answer_type,
            p.choices,
            p.tests,
            p.metadata.get("entry_point"),
            p.metadata.get("prompt"),
        )

    for p in PROBLEMS:
        row = rows[p.problem_id]
        assert key(
            problem_from_verl(row["data_source"], row["reward_model"]["ground_truth"], row["extra_info"])
        ) == key(p)
        assert key(problem_from_label(labels[p.problem_id])) == key(p)


def test_openrlhf_response_cut_and_plain_labels() -> None:
    from manyways.openrlhf_reward import response_text

    prompt = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert response_text(prompt + "so \\boxed{4}<|im_end|>\n<|endoftext|>", prompt) == "so \\boxed{4}"
    assert response_text("    return a + b\n</s>", "") == "    return a + b"
    out = manyways.openrlhf_reward.reward_func(["x \\boxed{4}", "x \\boxed{5}"], ["x", "x"], ["4", "4"])
    assert out["rewards"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 queries, 1 prompts"):
        manyways.openrlhf_reward.reward_func(["a", "b"], ["a"], ["1", "2"])


def test_verl_compute_score_takes_timeout_keyword_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import manyways.verify.registry as registry

    seen: list[float | None] = []
    real = registry.verify_problem
    monkeypatch.setattr(
        registry, "verify_problem", lambda p, c, timeout_s=None: seen.append(timeout_s) or real(p, c)
    )
    score = manyways.verl_reward.compute_score
    assert score("toy", "\\boxed{42}", "42", {"timeout_s": 3}, timeout_s=7, unused_kwarg=1) == 1.0
    assert score("toy", "\\boxed{42}", "42", {"timeout_s": 3}) == 1.0
    assert score("toy", "\\boxed{42}", "42") == 1.0
    assert seen == [7.0, 3.0, None]


def test_readme_export_commands_name_our_files_keys_and_reward_modules(tmp_path: Path) -> None:
    import json
    import re
    import subprocess
    import sys

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Export to verl, OpenRLHF and TRL")[1].split("\n## ")[0]
    verl = section.split("python3 -m verl.trainer.main_ppo")[1].split("```")[0]
    openrlhf = section.split("python3 -m openrlhf.cli.train_ppo_ray")[1].split("```")[0]
    paths = export_rl_problems(PROBLEMS, tmp_path)
    names = {p.name for p in paths}
    assert re.search(r"data\.train_files=\S+/(\S+)", verl)[1] in names
    module = re.search(r"custom_reward_function\.path=(\S+)", verl)[1]
    name = re.search(r"custom_reward_function\.name=(\S+)", verl)[1]
    assert callable(getattr(verl_load_module(module), name))
    assert re.search(r"--data\.prompt_dataset \S+/(\S+)", openrlhf)[1] in names
    row = json.loads((tmp_path / "rl_openrlhf.jsonl").read_text().splitlines()[0])
    assert {
        re.search(r"--data\.input_key (\S+)", openrlhf)[1],
        re.search(r"--data\.label_key (\S+)", openrlhf)[1],
    } <= set(row)
    snippet = re.search(r'--reward\.remote_url \$\(python -c "([^"]+)"\)', openrlhf)[1]
    path = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, check=True
    ).stdout.strip()
    spec = importlib.util.spec_from_file_location("reward_func", path)
    reward_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward_module)
    assert path.endswith(".py") and callable(reward_module.reward_func)
