"""Compose the stages of one arm: each stage reads its declared inputs, writes its own directory.

Stages never import each other; this module alone knows which stage feeds which. The run's
resolved config is saved as ``<run>/config.yaml`` before any work starts, and a relaunch with a
different config is refused (naming the keys that differ) unless ``overwrite`` is set.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import yaml

from manyways.artifacts import ArtifactError, diff_keys, write_text_atomic
from manyways.config import Config, dump_config

log = logging.getLogger(__name__)

# stage -> the stages whose outputs it reads (all of them when finished) ...
INPUTS: dict[str, tuple[str, ...]] = {
    "generate": (),
    "verify": ("generate",),
    "score": ("generate", "verify"),
    "select": ("generate", "verify", "score"),
    "midtrain": ("select",),
    "rl": ("midtrain",),
    "evaluate": ("midtrain", "rl"),
    "validity": (),
    "analyze": ("select", "evaluate", "validity"),
    "report": ("evaluate", "analyze"),
}
# ... and those it cannot run without
REQUIRED: dict[str, tuple[str, ...]] = {
    "verify": ("generate",),
    "score": ("generate", "verify"),
    "select": ("generate", "verify", "score"),
    "midtrain": ("select",),
    "report": ("evaluate",),
}
ORDER = tuple(INPUTS)


# how a run is executed, not what it computes: a resumed run may change them
EXECUTION_KEYS = frozenset({"experiment.jobs"})


def save_run_config(cfg: Config, *, overwrite: bool = False) -> Path:
    """Write ``<run>/config.yaml``; refuse a different config already there unless overwriting."""
    path = cfg.run_dir / "config.yaml"
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        changed = [k for k in diff_keys(old, cfg.to_dict()) if k not in EXECUTION_KEYS]
        if changed and not overwrite:
            raise ArtifactError(
                f"{cfg.run_dir} was started with a different config (differs: {', '.join(changed)}); "
                "use --overwrite to recompute what depends on it, or another run.name"
            )
    write_text_atomic(path, dump_config(cfg))
    return path


def stage_module(name: str) -> Any:
    if name not in INPUTS:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")
    return importlib.import_module(f"manyways.stages.{name}")


def run_stage(
    name: str, cfg: Config, *, overwrite: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    """Run one stage of the run in ``cfg.run_dir``; its inputs must have finished."""
    save_run_config(cfg, overwrite=overwrite)
    inputs = {
        dep: cfg.run_dir / dep for dep in INPUTS[name] if (cfg.run_dir / dep / "manifest.json").is_file()
    }
    missing = [dep for dep in REQUIRED.get(name, ()) if dep not in inputs]
    if missing:
        raise ArtifactError(f"stage {name} needs {', '.join(missing)} first: run `manyways {missing[0]} ...`")
    return stage_module(name).run(
        cfg, cfg.run_dir / name, inputs=inputs, overwrite=overwrite, show_progress=show_progress
    )


def run_all(cfg: Config, *, overwrite: bool = False, show_progress: bool = True) -> None:
    """Every stage of one arm, in order; finished stages are skipped."""
    for name in ORDER:
        log.info("== stage %s", name)
        run_stage(name, cfg, overwrite=overwrite, show_progress=show_progress)
