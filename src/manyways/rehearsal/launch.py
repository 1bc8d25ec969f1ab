"""The training ranks of a rehearsal (every rank runs this; :class:`manyways.rehearsal.run.AccelerateStages`
starts them).

``ACCELERATE_USE_CPU=true python -m torch.distributed.run --standalone --nproc_per_node 2 -m
manyways.rehearsal.launch --serve QUEUE_DIR``: the ranks stay alive for a sequence of stages (a
rehearsal runs ~30 of them; starting two processes that import torch, transformers and TRL took
~20 s each time) and run ``QUEUE_DIR/0000.json``, ``0001.json``, ... in order as the driver writes
them. Each spec holds the stage name, the resolved config, the output directory and the inputs;
the stage's own ``run`` does the rest (rank 0 writes, the others wait), as in the recipe's
multi-GPU launch. After all ranks finished one, rank 0 writes ``NNNN.done``. A failing stage ends
the processes (the driver reads the log); a ``stop`` file ends them cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

POLL_S = 0.2


def run_spec(spec_path: Path) -> None:
    from manyways.config import config_from_dict
    from manyways.pipeline import stage_module

    spec = json.loads(spec_path.read_text())
    cfg = config_from_dict(spec["config"], origin=str(spec_path))
    stage_module(spec["stage"]).run(
        cfg,
        Path(spec["out"]),
        inputs={k: Path(v) for k, v in spec["inputs"].items()},
        overwrite=spec["overwrite"],
        show_progress=False,
    )


def serve(queue: Path, rank: str) -> int:
    """Run the queue's specs in order until ``queue/stop`` appears."""
    from accelerate import PartialState

    state = PartialState()  # joins the process group once, for every stage
    index = 0
    while True:
        spec = queue / f"{index:04d}.json"
        while not spec.exists():
            if (queue / "stop").exists():
                return 0
            time.sleep(POLL_S)
        logging.getLogger(__name__).info("rank %s: stage spec %s", rank, spec.name)
        run_spec(spec)
        state.wait_for_everyone()
        if state.is_main_process:
            (queue / f"{index:04d}.done").touch()
        index += 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--serve":
        print("usage: python -m manyways.rehearsal.launch --serve QUEUE_DIR", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    import torch

    torch.set_num_threads(1)
    return serve(Path(args[1]), rank)


if __name__ == "__main__":
    sys.exit(main())
