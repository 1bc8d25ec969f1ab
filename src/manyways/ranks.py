"""Multi-process launches (accelerate, torchrun, DeepSpeed) of the training stages: which rank this
is, collectives that sum or gather what every rank saw, and a stage directory opened so that only
rank 0 deletes. Every rank must call the collectives at the same point; in a single process they
return their input.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any


def process_rank() -> int:
    """This process's global rank in a multi-process launch (accelerate, torchrun, deepspeed set
    ``RANK``); 0 in a single process."""
    return int(os.environ.get("RANK", "0") or 0)


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``: accelerate, torchrun, deepspeed);
    1 in a single process. Readable before torch.distributed is initialised."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _world() -> tuple[Any, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_world_size()
    return None, 1


def gather_lists(values: list[Any]) -> list[Any]:
    """Every process's ``values`` concatenated in rank order (a collective: all ranks must call it);
    ``values`` itself in a single process."""
    dist, world = _world()
    if world == 1:
        return list(values)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, list(values))
    return [v for part in gathered for v in part]


def sum_over_processes(counts: dict[str, int]) -> dict[str, int]:
    """Counters summed over all processes (a collective: all ranks must call it)."""
    dist, world = _world()
    if world == 1:
        return dict(counts)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, dict(counts))
    total: Counter[str] = Counter()
    for part in gathered:
        total.update(part)
    return dict(total)


def open_stage(stage: Any, overwrite: bool, timeout_s: float = 600.0) -> bool:
    """``StageDir.open`` safe under a multi-process launch: with ``overwrite`` only rank 0 may
    delete the old directory; the other ranks wait until rank 0 wrote this config's stage file."""
    from manyways.artifacts import STAGE_FILE

    if overwrite and process_rank() != 0:
        path, deadline = stage.path / STAGE_FILE, time.monotonic() + timeout_s
        while True:
            try:
                if json.loads(path.read_text()).get("fingerprint") == stage.fingerprint:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {process_rank()}: rank 0 did not open {stage.path} in {timeout_s}s")
            time.sleep(0.2)
        return stage.open(False)
    return stage.open(overwrite)
