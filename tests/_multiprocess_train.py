"""Run by tests/test_training_multiprocess.py under a 2-process launch (one copy per rank):
``python _multiprocess_train.py {midtrain|rl|rl_zero} ROOT`` (rl_zero: rank 0's completions
all wrong, so its micro-batches have zero advantage while rank 1's train); writes each rank's manifest counts to ROOT/counts-rank{RANK}.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from manyways.models import build_tiny_model  # noqa: E402
from manyways.verify import Verdict  # noqa: E402
from test_stage_midtrain import tiny_cfg  # noqa: E402
from test_stage_rl import fake_verify_many, rl_cfg  # noqa: E402


def main(which: str, root: Path) -> None:
    torch.set_num_threads(1)
    model = build_tiny_model()
    if which == "midtrain":
        from manyways.stages import midtrain

        select = root / "run" / "select"  # written by the test before the launch
        for overwrite, lr in ((False, "1e-3"), (True, "2e-3")):  # the rerun replaces the first run
            cfg = tiny_cfg(
                root, model, "midtrain.max_steps=2", "midtrain.batch_size=2", f"midtrain.learning_rate={lr}"
            )
            m = midtrain.run(
                cfg,
                cfg.run_dir / "midtrain",
                inputs={"select": select},
                overwrite=overwrite,
                show_progress=False,
            )
    else:
        import manyways.verify.registry as registry
        from manyways.stages import rl

        registry.verify_many = fake_verify_many
        if which == "rl_zero" and os.environ.get("RANK", "0") == "0":  # rank 0's groups all wrong
            registry.verify_many = lambda pairs, **kw: [Verdict("incorrect", False, "y")] * len(pairs)
        scratch = root / f"rank{os.environ.get('RANK', '0')}"  # rl_cfg writes a problem file there
        scratch.mkdir(exist_ok=True)
        shared = f"data.rl={{kind: local, path: {root / 'rl.jsonl'}, fields: {{problem_id: id}}}}"
        cfg = rl_cfg(scratch, model, 8, f"run.root={root}", shared, "rl.max_steps=2")
        m = rl.run(cfg, cfg.run_dir / "rl", show_progress=False)
    # one file per rank: both ranks share the launcher's stdout, where their lines can interleave
    out = root / f"counts-rank{os.environ.get('RANK', '0')}.json"
    out.write_text(
        json.dumps({**m["counts"], "training_forwards": m.get("training_forwards")}, sort_keys=True)
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
