"""Entry point of one training stage on several processes (every rank runs this).

``ACCELERATE_USE_CPU=true python -m torch.distributed.run --standalone --nproc_per_node 2 -m
manyways.rehearsal.launch SPEC.json`` (also ``accelerate launch ... -m manyways.rehearsal.launch``) where
SPEC holds the stage name, the resolved config, the output directory and the inputs; the stage's
own ``run`` does the rest (rank 0 writes, the others wait), as in the recipe's multi-GPU launch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m manyways.rehearsal.launch SPEC.json", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    import torch

    torch.set_num_threads(1)
    from manyways.config import config_from_dict
    from manyways.pipeline import stage_module

    spec = json.loads(Path(args[0]).read_text())
    cfg = config_from_dict(spec["config"], origin=args[0])
    stage_module(spec["stage"]).run(
        cfg,
        Path(spec["out"]),
        inputs={k: Path(v) for k, v in spec["inputs"].items()},
        overwrite=spec["overwrite"],
        show_progress=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
