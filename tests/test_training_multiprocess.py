"""midtrain and rl under a 2-process launch on CPU (gloo), the multi-process path of the recipe's
DeepSpeed/FSDP launches: the manifest and sample log count what *all* ranks did, not rank 0's part.

(``accelerate launch --cpu --num_processes 2`` starts one process only; ``--multi_gpu`` on a
machine without CUDA starts two, and the trainer's ``use_cpu`` makes them talk over gloo.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_stage_midtrain import make_select_dir, sft_row
from test_stage_rl import rl_cfg

HERE = Path(__file__).parent


def _launch(which: str, root: Path) -> list[dict[str, int]]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)]),
    }
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(HERE / "_multiprocess_train.py"), which, str(root)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    # each rank writes its own file (a line each on the shared stdout once came out interleaved)
    files = sorted(root.glob("counts-rank*.json"))
    assert [f.name for f in files] == ["counts-rank0.json", "counts-rank1.json"], done.stdout[-2000:]
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.slow
def test_two_process_midtrain_logs_every_ranks_batches(tmp_path: Path) -> None:
    make_select_dir(tmp_path / "run", [sft_row(i) for i in range(8)])
    counts = _launch("midtrain", tmp_path)
    assert counts[0] == counts[1] and counts[0]["global_step"] == 2
    steps = [json.loads(line) for line in (tmp_path / "run/midtrain/samples.jsonl").read_text().splitlines()]
    # the overwrite rerun replaced the first run (rank 0 alone deleted it): one log of 2 steps
    assert [s["step"] for s in steps] == [1, 2]
    ids = [i for s in steps for i in s["ids"]]
    assert all(len(s["ids"]) == 4 for s in steps)  # 2 ranks x batch 2 per optimizer step
    assert sorted(ids) == sorted(f"p{i}|decompose|0" for i in range(8))  # disjoint, all seen
    stage = json.loads((tmp_path / "run/midtrain/stage.json").read_text())
    assert stage["config"]["midtrain"]["learning_rate"] == 2e-3


@pytest.mark.slow
def test_two_process_rl_counts_every_ranks_completions(tmp_path: Path) -> None:
    rl_cfg(tmp_path, "unused", 8)  # writes the 8 problems both ranks read: tmp_path/rl.jsonl
    counts = _launch("rl", tmp_path)
    assert counts[0] == counts[1]
    # 2 steps x 4 completions per rank x 2 ranks; fake verdicts cycle correct/incorrect/none/timeout
    assert counts[0]["completions"] == 16 and counts[0]["status_correct"] == 4
    # rl.shared_prefix: in each step, each rank's 3 rows with an advantage shared one prompt in
    # their training forward; the unanswered row (advantage 0, rl.skip_zero_advantage) ran alone
    # without autograd: nothing to share in one row
    forwards = counts[0]["training_forwards"]
    assert forwards["forwards"] == 8 and forwards["shared"] == forwards["unshared_layout"] == 4
    assert forwards["policy_rows"] == 16 and forwards["zero_advantage_rows"] == 4
    assert 0 < forwards["positions"] < forwards["plain_positions"]


@pytest.mark.slow
def test_two_process_rl_with_one_rank_all_zero_advantage(tmp_path: Path) -> None:
    """rl.skip_zero_advantage under DDP: rank 0's groups are all wrong (no row to train: the zero
    anchor's forward and backward join rank 1's gradient all-reduce); the run must not hang."""
    rl_cfg(tmp_path, "unused", 8)
    counts = _launch("rl_zero", tmp_path)
    assert counts[0] == counts[1] and counts[0]["global_step"] == 2
    forwards = counts[0]["training_forwards"]
    # rank 0: 2 steps x 4 rows; rank 1: its unanswered row in each step
    assert forwards["policy_rows"] == 16 and forwards["zero_advantage_rows"] == 8 + 2
    # rank 0: one packed forward without autograd per step (the anchor's is not counted); rank 1:
    # its 3 rows packed, the unanswered row alone
    assert forwards["forwards"] == 2 + 4 and forwards["shared"] == 2 + 2


@pytest.mark.slow
def test_two_process_rl_in_bf16_reuses_generations_copies_and_keeps_ranks_equal(tmp_path: Path) -> None:
    """bf16 autocast under DDP: the training forwards run from the bf16 copies generation made
    (packed_linear.CachedCastLinear), whose weight gradients reach DDP's all-reduce through
    autograd like any other, so both ranks end with the same weights (the clip factor goes to
    each rank's fused AdamW, and the tied embedding's gradient through the head's buffer)."""
    rl_cfg(tmp_path, "unused", 8)
    counts = _launch("rl_bf16", tmp_path)
    assert counts[0]["global_step"] == counts[1]["global_step"] == 2
    assert counts[0]["reused_copies"] > 0 and counts[1]["reused_copies"] > 0
    assert counts[0]["weights_sum"] == counts[1]["weights_sum"]
    assert counts[0]["weights_abs_sum"] == counts[1]["weights_abs_sum"]
    assert counts[0]["weights_abs_sum"] != counts[0]["initial_abs_sum"]  # it trained
