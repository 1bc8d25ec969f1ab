"""Exports read back with the layout each target expects; the verl reward calls our verifier."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manyways.config import Config, load_config
from manyways.exports import export_all
from manyways.heuristics import render_plain_messages
from manyways.schema import SFT_SCHEMA
from manyways.verl_reward import compute_score


def _cfg(tmp_path: Path, *overrides: str) -> Config:
    path = tmp_path / "rl.jsonl"
    rows = [
        {"question": "What is 6 * 7?", "answer": "42", "id": "m1"},
        {"question": "What is half of 9?", "answer": "4.5", "id": "m2"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(
        None,
        [
            f"run.root={tmp_path}",
            "run.name=run",
            f"data.rl={{kind: local, path: {path}, fields: {{problem_id: id}}, source: toy}}",
            *overrides,
        ],
    )


def test_verl_parquet_has_the_nested_layout(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    paths = export_all(cfg, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["rl_openrlhf.jsonl", "rl_verl.parquet"]  # no select data yet
    table = pq.read_table(tmp_path / "out" / "rl_verl.parquet")
    schema = table.schema
    assert schema.field("data_source").type == pa.string()
    assert schema.field("prompt").type == pa.list_(
        pa.struct([("role", pa.string()), ("content", pa.string())])
    )
    assert schema.field("reward_model").type == pa.struct(
        [("style", pa.string()), ("ground_truth", pa.string())]
    )
    info = schema.field("extra_info").type
    assert {info.field(n).type for n in ("split", "problem_id")} == {pa.string()}
    assert info.field("index").type == pa.int64()
    rows = table.to_pylist()
    assert [r["reward_model"] for r in rows] == [
        {"style": "rule", "ground_truth": "42"},
        {"style": "rule", "ground_truth": "4.5"},
    ]
    assert rows[0]["prompt"] == render_plain_messages("What is 6 * 7?")
    assert rows[1]["extra_info"]["index"] == 1 and rows[1]["extra_info"]["problem_id"] == "m2"
    assert rows[0]["extra_info"]["split"] == "train" and rows[0]["ability"] == "math"
    assert rows[0]["data_source"] == "toy"


def _sft_row(messages: list[dict[str, str]], pid: str) -> dict:
    return {
        "messages": messages,
        "problem_id": pid,
        "heuristic_id": "h",
        "sample_idx": 0,
        "variant": "best",
        "correct": True,
        "score": 1.0,
    }


GOOD = [{"role": "user", "content": "What is 6 * 7?"}, {"role": "assistant", "content": "\\boxed{42}"}]
LONG = [{"role": "user", "content": "What is 6 * 7? " * 80}, {"role": "assistant", "content": "\\boxed{42}"}]
NO_ANSWER = [{"role": "user", "content": "What is 6 * 7?"}]
EMPTY = [{"role": "user", "content": "What is 6 * 7?"}, {"role": "assistant", "content": "  "}]


def _with_select(tmp_path: Path, tiny_model_dir: Path) -> Config:
    cfg = _cfg(tmp_path, f"model.name={tiny_model_dir}", "midtrain.max_length=200")
    select = cfg.run_dir / "select"
    select.mkdir(parents=True)
    rows = [_sft_row(GOOD, "m1"), _sft_row(LONG, "m1"), _sft_row(NO_ANSWER, "m2"), _sft_row(EMPTY, "m2")]
    pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), select / "train.parquet")
    return cfg


def test_openrlhf_and_trl_jsonl(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _with_select(tmp_path, tiny_model_dir)
    paths = export_all(cfg)
    assert {p.name for p in paths} == {"rl_verl.parquet", "rl_openrlhf.jsonl", "midtrain_trl.jsonl"}
    assert all(p.parent == cfg.run_dir / "export" for p in paths)
    lines = [json.loads(x) for x in (cfg.run_dir / "export" / "rl_openrlhf.jsonl").read_text().splitlines()]
    labels = [json.loads(x["label"]) for x in lines]
    assert [x["answer"] for x in labels] == ["42", "4.5"] and labels[0]["answer_type"] == "math"
    assert lines[0]["input"][-1] == {"role": "user", "content": "What is 6 * 7?"}
    assert lines[0]["datasource"] == "toy"
    trl = [json.loads(x) for x in (cfg.run_dir / "export" / "midtrain_trl.jsonl").read_text().splitlines()]
    assert trl == [{"prompt": GOOD[:1], "completion": GOOD[1:]}]  # what midtrain trains on, nothing else
    manifest = json.loads((cfg.run_dir / "export" / "manifest.json").read_text())
    assert manifest["rl_problems"] == 2
    assert manifest["midtrain_trl"] == {
        "rows": 4,
        "written": 1,
        "dropped_too_long": 1,
        "dropped_no_assistant_turn": 1,
        "dropped_empty_assistant_turn": 1,
    }


def test_trl_export_trains_on_the_completion_only_in_a_default_sft_trainer(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """TRL's own SFTTrainer (default SFTConfig) masks everything but the assistant's completion."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from manyways.models import load_tokenizer

    torch.set_num_threads(1)
    cfg = _with_select(tmp_path, tiny_model_dir)
    export_all(cfg)
    data = datasets.load_dataset(
        "json", data_files=str(cfg.run_dir / "export" / "midtrain_trl.jsonl"), cache_dir=str(tmp_path / "c")
    )["train"]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    args = SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[], use_cpu=True)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    if "labels" in row:  # TRL >= 1.x builds the labels (-100 where no loss) itself
        trained = [t for t in row["labels"] if t != -100]
    else:
        trained = [t for t, m in zip(row["input_ids"], row["completion_mask"], strict=True) if m]
    assert "boxed{42}" in tokenizer.decode(trained)
    assert "6 * 7" not in tokenizer.decode(trained)  # the user's turn is not trained on


def test_verl_compute_score_uses_our_verifier(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    export_all(cfg, tmp_path / "out")
    row = pq.read_table(tmp_path / "out" / "rl_verl.parquet").to_pylist()[1]
    gold, info = row["reward_model"]["ground_truth"], row["extra_info"]
    assert compute_score(row["data_source"], "Half of 9 is \\boxed{\\frac{9}{2}}", gold, info) == 1.0
    assert compute_score(row["data_source"], "\\boxed{4}", gold, info) == 0.0
    assert compute_score(row["data_source"], "no idea", gold, info) == 0.0
    assert compute_score("toy", "6*7 = \\boxed{42}", "42") == 1.0
    assert compute_score("toy", "\\boxed{42}", "42", None, reward_router_address="x", anything=1) == 1.0
