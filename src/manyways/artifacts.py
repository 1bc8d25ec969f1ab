"""Artifacts you can trust: atomic shards, completion markers, manifests written last.

A stage writes under its own directory::

    <stage_dir>/stage.json               fingerprint + the config it was started with
    <stage_dir>/shards/part-00000.parquet  (+ part-00000.done, written after the shard)
    <stage_dir>/manifest.json            written last: "this stage is done"

A relaunch skips finished shards. A relaunch with a different config into the same directory is
refused with the keys that differ, unless ``overwrite`` is set. Seeds per unit of work come from
hashlib, never from Python's salted ``hash()``, so output does not depend on sharding or order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from manyways import __version__

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGE_FILE = "stage.json"


class ArtifactError(RuntimeError):
    """An artifact is missing, unfinished, or would be overwritten by a different config."""


def unit_seed(global_seed: int, problem_id: str, heuristic_id: str | None, sample_idx: int) -> int:
    """A 63-bit seed for one sample, stable across processes, shard counts and orders."""
    key = f"{global_seed}\x1f{problem_id}\x1f{heuristic_id or ''}\x1f{sample_idx}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & ((1 << 63) - 1)


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    data = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:length]


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str))


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def git_commit() -> str | None:
    """The commit of the manyways checkout, when running from one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for k in sorted(set(old) | set(new)):
            keys += diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return keys
    return [] if old == new else [prefix.rstrip(".") or "<root>"]


def read_manifest(stage_dir: Path) -> dict[str, Any]:
    """The manifest of a finished stage; ArtifactError if the stage has not finished."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{stage_dir} is not a finished stage (no {MANIFEST})")
    return json.loads(path.read_text())


def is_finished(stage_dir: Path) -> bool:
    return (Path(stage_dir) / MANIFEST).is_file()


class StageDir:
    """The output directory of one stage run, with resume and config-change refusal."""

    def __init__(self, path: Path, stage: str, config: dict[str, Any], inputs: dict[str, Path] | None = None):
        self.path = Path(path)
        self.stage = stage
        self.config = config
        self.inputs = {k: Path(v) for k, v in (inputs or {}).items()}
        self.input_hashes = {k: read_manifest(v)["fingerprint"] for k, v in self.inputs.items()}
        self.fingerprint = stable_hash({"stage": stage, "config": config, "inputs": self.input_hashes})
        self.started = time.time()

    @property
    def shard_dir(self) -> Path:
        return self.path / "shards"

    def open(self, overwrite: bool = False) -> bool:
        """Prepare the directory; True when the stage already finished with this config."""
        stage_file = self.path / STAGE_FILE
        if stage_file.is_file():
            old = json.loads(stage_file.read_text())
            if old.get("fingerprint") != self.fingerprint:
                if not overwrite:
                    changed = diff_keys(old.get("config"), self.config)
                    changed += [f"input:{k}" for k in diff_keys(old.get("inputs"), self.input_hashes) if k]
                    raise ArtifactError(
                        f"{self.path} holds a {self.stage} run with a different config "
                        f"(differs: {', '.join(changed) or 'inputs'}); use --overwrite or another run name"
                    )
                log.warning("overwriting %s (config changed)", self.path)
                shutil.rmtree(self.path)
            elif is_finished(self.path):
                return True
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            stage_file,
            {
                "stage": self.stage,
                "fingerprint": self.fingerprint,
                "config": self.config,
                "inputs": self.input_hashes,
            },
        )
        return False

    def shard_path(self, index: int) -> Path:
        return self.shard_dir / f"part-{index:05d}.parquet"

    def shard_done(self, index: int) -> bool:
        return self.shard_path(index).with_suffix(".done").is_file() and self.shard_path(index).is_file()

    def write_shard(self, index: int, table: pa.Table, counters: dict[str, int] | None = None) -> None:
        """Write one shard atomically, then its completion marker (with its counters)."""
        path = self.shard_path(index)
        write_parquet_atomic(path, table)
        write_json_atomic(path.with_suffix(".done"), {"rows": table.num_rows, "counters": counters or {}})

    def shard_counters(self, index: int) -> dict[str, int]:
        return json.loads(self.shard_path(index).with_suffix(".done").read_text()).get("counters", {})

    def finish(self, counts: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write manifest.json (last): the stage is done."""
        manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "config_hash": stable_hash(self.config),
            "inputs": {
                k: {"path": str(v), "fingerprint": self.input_hashes[k]} for k, v in self.inputs.items()
            },
            "package_version": __version__,
            "git_commit": git_commit(),
            "counts": counts,
            "wall_s": round(time.time() - self.started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **_dtype_decisions(self.started),
            **(extra or {}),
        }
        write_json_atomic(self.path / MANIFEST, manifest)
        return manifest


def _dtype_decisions(started: float) -> dict[str, Any]:
    """``dtype: auto`` decisions this stage used (manyways.dtype_auto), with their measurements."""
    from manyways.dtype_auto import decisions_since

    decisions = decisions_since(started)
    return {"dtype_decisions": decisions} if decisions else {}


def read_table(stage_dir: Path, subdir: str = "shards") -> pa.Table:
    """All shards of a finished stage, concatenated in shard order."""
    read_manifest(stage_dir)
    files = sorted((Path(stage_dir) / subdir).glob("part-*.parquet"))
    if not files:
        raise ArtifactError(f"{stage_dir} has no shards")
    return pa.concat_tables([pq.read_table(f) for f in files])


def append_metrics(run_dir: Path, stage: str, metrics: dict[str, Any]) -> None:
    """Append namespaced metrics (``stage/key``) as one JSON line to ``metrics.jsonl``."""
    record = {"time": time.time(), "stage": stage, **{f"{stage}/{k}": v for k, v in metrics.items()}}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def chunks(items: list[Any], size: int) -> Iterable[tuple[int, list[Any]]]:
    """(index, chunk) pairs of ``size`` items: the deterministic shard layout."""
    for i in range(0, len(items), size):
        yield i // size, items[i : i + size]
