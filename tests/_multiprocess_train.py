"""Run by tests/test_training_multiprocess.py under a 2-process launch (one copy per rank):
``python _multiprocess_train.py {midtrain|rl|rl_zero|rl_bf16} ROOT`` (rl_zero: rank 0's completions
all wrong, so its micro-batches have zero advantage while rank 1's train; rl_bf16: bf16 autocast,
the training forwards from generation's kept bf16 copies, with each rank's final weights); writes each rank's manifest counts to ROOT/counts-rank{RANK}.json."""

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
        extra = ["model.dtype=bfloat16"] if which == "rl_bf16" else []
        cfg = rl_cfg(scratch, model, 8, f"run.root={root}", shared, "rl.max_steps=2", *extra)
        if which == "rl_bf16":  # the training forwards from generation's bf16 copies, under DDP
            from manyways.backends import packed_linear

            trainers, reused, apply = [], [0], packed_linear.CachedCastLinear.apply
            packed_linear.CachedCastLinear.apply = lambda *a: (
                reused.__setitem__(0, reused[0] + 1) or apply(*a)
            )
            build = rl.build_trainer

            def built(*a, **k):  # the trainer, and its weights before training
                trainers.append(build(*a, **k))
                initial.append(
                    sum(float(p.detach().double().abs().sum()) for p in trainers[-1][0].model.parameters())
                )
                return trainers[-1]

            initial: list[float] = []
            rl.build_trainer = built
        m = rl.run(cfg, cfg.run_dir / "rl", show_progress=False)
        if which == "rl_bf16":  # every rank's weights after training, and how often the copies served
            model_ = trainers[0][0].model
            params = torch.cat([p.detach().double().flatten() for p in model_.parameters()])
            m["counts"] = {
                **m["counts"],
                "reused_copies": reused[0],
                "weights_sum": float(params.sum()),
                "weights_abs_sum": float(params.abs().sum()),
                "initial_abs_sum": initial[0],
            }
    # one file per rank: both ranks share the launcher's stdout, where their lines can interleave
    out = root / f"counts-rank{os.environ.get('RANK', '0')}.json"
    out.write_text(
        json.dumps({**m["counts"], "training_forwards": m.get("training_forwards")}, sort_keys=True)
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
