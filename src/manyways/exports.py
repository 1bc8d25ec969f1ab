"""Export a run's data for other RL / SFT frameworks (``manyways export CONFIG [--out DIR]``).

Every RL row carries what our verifier needs to judge any answer type (gold, choices, tests,
entry point and, for code, the problem's ``code_prompt``, so a completion that gives only the
function body is judged as in :func:`manyways.verify.registry.verify_problem`). The README's
"Export" section has the full training command lines.

- ``rl_verl.parquet``: the RL problem set (``data.rl``, else ``data.train``) in verl's RL dataset
  layout (``verl/utils/dataset/rl_dataset.py``): ``data_source``, ``prompt`` (chat messages),
  ``ability``, ``reward_model`` {``style``: "rule", ``ground_truth``} and ``extra_info``
  {``split``, ``index``, ``problem_id``, ``answer_type``, ``choices``, ``tests``, ``entry_point``,
  ``code_prompt``}. Reward: :func:`manyways.verl_reward.compute_score`
  (``custom_reward_function.path=pkg://manyways.verl_reward``, ``custom_reward_function.name=compute_score``).
- ``rl_openrlhf.jsonl``: the same problems for OpenRLHF's ``PromptDataset``: ``{"input": messages,
  "label": JSON string (see :func:`openrlhf_label`), "datasource", "problem_id"}``. Reward:
  :mod:`manyways.openrlhf_reward`. Current OpenRLHF flags (dotted, since v0.10.2):
  ``--data.prompt_dataset rl_openrlhf.jsonl --data.input_key input --data.label_key label
  --data.apply_chat_template --reward.remote_url <path of manyways/openrlhf_reward.py>``.
  (Older OpenRLHF: ``--prompt_data``, ``--input_key``, ``--label_key``, ``--apply_chat_template``,
  ``--remote_rm_url``.)
- ``midtrain_trl.jsonl``: the run's mid-training data (``<run>/select/train.parquet``, when
  present) as TRL conversational prompt-completion lines ``{"prompt": [...], "completion":
  [assistant turn]}``, so a default ``SFTTrainer`` (``completion_only_loss``) trains on the
  completion only, as our ``midtrain`` does; the rows ``midtrain`` drops (no final assistant turn,
  empty answer, no prompt, longer than ``midtrain.max_length`` tokens under ``model.name``'s chat
  template) are dropped here too.
- ``manifest.json``: how many rows each file got and how many were dropped, by reason.

The prompts are the ones the ``rl`` stage trains on (:func:`manyways.heuristics.render_plain_messages`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from manyways.artifacts import write_json_atomic, write_parquet_atomic, write_text_atomic
from manyways.config import Config
from manyways.heuristics import render_plain_messages
from manyways.schema import MESSAGES_TYPE, Problem

log = logging.getLogger(__name__)

VERL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", MESSAGES_TYPE),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("split", pa.string()),
                    ("index", pa.int64()),
                    ("problem_id", pa.string()),
                    ("answer_type", pa.string()),
                    ("choices", pa.list_(pa.string())),
                    ("tests", pa.string()),
                    ("entry_point", pa.string()),
                    ("code_prompt", pa.string()),
                ]
            ),
        ),
    ]
)


def verification_fields(p: Problem) -> dict[str, Any]:
    """What :func:`manyways.verify.registry.verify_problem` reads besides the gold answer."""
    return {
        "answer_type": p.answer_type,
        "choices": p.choices,
        "tests": p.tests,
        "entry_point": p.metadata.get("entry_point"),
        "code_prompt": p.metadata.get("prompt"),
    }


def problem_from_fields(
    answer: str, fields: dict[str, Any], *, problem_id: str = "export", source: str = "export"
) -> Problem:
    """The :class:`Problem` (for verification; no question text) that exported fields stand for."""
    metadata = {
        k: fields[f] for k, f in (("entry_point", "entry_point"), ("prompt", "code_prompt")) if fields.get(f)
    }
    choices = fields.get("choices")
    return Problem(
        problem_id=problem_id,
        source=source,
        question="",
        answer=str(answer),
        answer_type=fields.get("answer_type") or "math",
        choices=list(choices) if choices is not None else None,
        tests=fields.get("tests"),
        metadata=metadata,
    )


def verl_records(problems: list[Problem], split: str = "train") -> list[dict[str, Any]]:
    """One verl RL row per problem."""
    return [
        {
            "data_source": p.source,
            "prompt": render_plain_messages(p.question),
            "ability": p.answer_type,
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {"split": split, "index": i, "problem_id": p.problem_id, **verification_fields(p)},
        }
        for i, p in enumerate(problems)
    ]


def openrlhf_label(p: Problem) -> str:
    """The ``label`` OpenRLHF hands to the reward function: a JSON object with the gold
    (``answer``), ``problem_id`` and :func:`verification_fields` (one string, so any dataset
    reader keeps it as is)."""
    return json.dumps(
        {"answer": p.answer, "problem_id": p.problem_id, **verification_fields(p)}, ensure_ascii=False
    )


def openrlhf_records(problems: list[Problem]) -> list[dict[str, Any]]:
    """One OpenRLHF prompt row per problem: chat messages as ``input``, the JSON label as ``label``."""
    return [
        {
            "input": render_plain_messages(p.question),
            "label": openrlhf_label(p),
            "datasource": p.source,
            "problem_id": p.problem_id,
        }
        for p in problems
    ]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def export_rl_problems(problems: list[Problem], out_dir: Path) -> list[Path]:
    verl = out_dir / "rl_verl.parquet"
    write_parquet_atomic(verl, pa.Table.from_pylist(verl_records(problems), schema=VERL_SCHEMA))
    return [verl, write_jsonl(out_dir / "rl_openrlhf.jsonl", openrlhf_records(problems))]


def trl_examples(
    rows: list[dict[str, Any]], tokenizer: Any, max_length: int
) -> tuple[list[dict], Counter[str]]:
    """The examples our ``midtrain`` stage would train on, with its drop counts (same functions)."""
    from manyways.stages.midtrain import check_examples, to_prompt_completion

    examples, counts = to_prompt_completion(rows)
    kept, _ = check_examples(examples, tokenizer, max_length, counts)
    return [{"prompt": ex["prompt"], "completion": ex["completion"]} for ex in kept], counts


def export_midtrain_data(cfg: Config, out_dir: Path) -> tuple[list[Path], dict[str, int]]:
    """The select stage's conversations as TRL prompt-completion lines; nothing when there are none."""
    path = cfg.run_dir / "select" / "train.parquet"
    if not path.is_file():
        log.info("no mid-training data at %s; skipping the TRL export", path)
        return [], {}
    from manyways.models import load_tokenizer

    rows = pq.read_table(path, columns=["messages"]).to_pylist()
    examples, counts = trl_examples(rows, load_tokenizer(cfg.model.name), cfg.midtrain.length_limit)
    dropped = sum(counts.values())
    if dropped:
        log.warning(
            "TRL export: %d of %d conversations dropped as midtrain drops them: %s",
            dropped,
            len(rows),
            dict(counts),
        )
    stats = {"rows": len(rows), "written": len(examples), **dict(counts)}
    return [write_jsonl(out_dir / "midtrain_trl.jsonl", examples)], stats


def load_rl_problem_set(cfg: Config) -> list[Problem]:
    from manyways.data import load_problems

    source = cfg.data.rl if cfg.data.rl is not None else cfg.data.train
    return list(load_problems(source, skip_bad=cfg.data.skip_bad).problems)


def export_all(cfg: Config, out_dir: Path | None = None) -> list[Path]:
    """Write every export of the run into ``out_dir`` (default ``<run>/export``); returns the files."""
    out = Path(out_dir) if out_dir is not None else cfg.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    problems = load_rl_problem_set(cfg)
    rl_paths = export_rl_problems(problems, out)
    trl_paths, trl_stats = export_midtrain_data(cfg, out)
    manifest = {"rl_problems": len(problems), "midtrain_trl": trl_stats}
    write_json_atomic(out / "manifest.json", manifest)
    paths = rl_paths + trl_paths
    log.info("exported %d RL problems and %d files to %s", len(problems), len(paths), out)
    return paths
