"""Which config keys the code reads: a key nobody reads is an error, not a silent no-op.

Two checks:

- :func:`shadowed_trl_keys` (run by config loading): a key of ``midtrain.trl`` / ``rl.trl`` that
  duplicates one of our typed keys (``rl.trl.num_generations`` vs ``rl.num_generations``). The
  pass-through wins in the trainer, so the typed key, its default and any ``key=value`` override
  of it would silently do nothing while other code (checks, the plan) reads it.
- :func:`record_reads` + :func:`unread_keys` (used by tests and the rehearsal): while the context
  is active every read of a config field, by any code except the config's own and the hashing of
  stage configs, is recorded with its dotted path (``generate.backend.vllm``); afterwards every
  key the YAML file sets must be among them. Pass-through mappings (``trl``, ``vllm``,
  ``options``) count as read when the mapping is; their keys are the receiving library's.

Other processes (accelerate ranks, Ray workers) record their own reads when
``$MANYWAYS_RECORD_READS`` names a directory (:func:`record_from_env`, started by ``import
manyways``); :func:`reads_from_dir` merges them. The rehearsal's check::

    os.environ[ENV_VAR] = str(workdir / "reads")   # before starting Ray / accelerate
    with record_reads() as reads:
        ... run the experiment ...
    reads.paths |= reads_from_dir(workdir / "reads").paths
    check_keys_read("configs/paper_llama3b.yaml", reads)
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# typed key -> the TRL argument it is passed as (manyways.stages.midtrain.sft_args / rl.grpo_args)
TRL_SPELLING: dict[str, dict[str, str]] = {
    "midtrain": {
        "epochs": "num_train_epochs",
        "max_steps": "max_steps",
        "learning_rate": "learning_rate",
        "batch_size": "per_device_train_batch_size",
        "grad_accum": "gradient_accumulation_steps",
        "max_length": "max_length",
        "save_steps": "save_steps",
        "padding_free": "padding_free",
    },
    "rl": {
        "num_generations": "num_generations",
        "batch_size": "per_device_train_batch_size",
        "grad_accum": "gradient_accumulation_steps",
        "beta": "beta",
        "loss_type": "loss_type",
        "scale_rewards": "scale_rewards",
        "epsilon": "epsilon",
        "epsilon_high": "epsilon_high",
        "temperature": "temperature",
        "max_completion_length": "max_completion_length",
        "learning_rate": "learning_rate",
        "epochs": "num_train_epochs",
        "max_steps": "max_steps",
        "save_steps": "save_steps",
        "use_vllm": "use_vllm",
        "vllm_mode": "vllm_mode",
    },
}


def shadowed_trl_keys(section: str, trl: dict[str, Any]) -> list[str]:
    """Messages for the ``<section>.trl`` keys that duplicate a typed key of the section."""
    spelled = {v: k for k, v in TRL_SPELLING.get(section, {}).items()}
    return [
        f"{section}.trl.{key} duplicates {section}.{spelled[key]} (the pass-through would silently win "
        f"over it): set {section}.{spelled[key]} instead"
        for key in trl
        if key in spelled
    ]


# ---------------------------------------------------------------- recording reads

_RECORDERS = {"getattribute", "model_dump", "model_copy"}
_IGNORED_MODULES = {"manyways.keyuse", "manyways.plan", "manyways.plan_estimates"}
# the config module's plumbing (loading, dumping, hashing) reads every key without using it
_CONFIG_PLUMBING = {
    "to_dict",
    "section_hash",
    "dump_config",
    "config_from_dict",
    "load_config",
    "apply_override",
}


def config_classes(root: type[BaseModel]) -> set[type[BaseModel]]:
    """Every pydantic model class reachable from ``root``'s field annotations."""
    seen: set[type[BaseModel]] = set()
    todo: list[Any] = [root]
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp not in seen:
                seen.add(tp)
                todo += [f.annotation for f in tp.model_fields.values()]
        else:
            todo += list(typing.get_args(tp))
    return seen


@dataclass
class Reads:
    """Dotted paths read while recording (filled when the context exits)."""

    paths: set[str] = field(default_factory=set)
    _raw: dict[tuple[int, str], Any] = field(default_factory=dict)  # (id, field) -> object read
    _roots: dict[int, Any] = field(default_factory=dict)
    _copies: dict[int, tuple[Any, Any, frozenset[str]]] = field(
        default_factory=dict
    )  # copy -> (copy, original, updated)
    on_new: Callable[[], None] | None = None  # called after each first read of a field


def _validator_codes(classes: set[type[BaseModel]]) -> set[Any]:
    """Code objects of the classes' pydantic validators (their reads check, they do not use)."""
    codes = set()
    for cls in classes:
        decorators = cls.__pydantic_decorators__
        for group in (decorators.model_validators, decorators.field_validators):
            codes |= {getattr(d.func, "__code__", None) for d in group.values()}
    return codes - {None}


def _counted(frame: Any, validators: set[Any], depth: int = 8) -> bool:
    """Whether a read from ``frame`` is a use: no caller within ``depth`` frames is pydantic,
    the config's or the plan's own code, a validator, or a stage's ``stage_config`` (which
    hashes, not uses)."""
    while frame is not None and depth > 0:
        module = frame.f_globals.get("__name__", "")
        if module == __name__ and frame.f_code.co_name in _RECORDERS:  # a property read inside a read
            frame = frame.f_back
            continue
        if (
            module in _IGNORED_MODULES
            or module.startswith("pydantic")
            or (module == "manyways.config" and frame.f_code.co_name in _CONFIG_PLUMBING)
            or frame.f_code.co_name == "stage_config"
            or frame.f_code in validators
        ):
            return False
        frame, depth = frame.f_back, depth - 1
    return True


def _paths_of(root: Any, prefix: str, out: dict[int, str]) -> None:
    out[id(root)] = prefix
    for name in type(root).model_fields:
        value = object.__getattribute__(root, name)
        children = value.items() if isinstance(value, dict) else [(None, value)]
        for key, child in children:
            if isinstance(child, BaseModel):
                path = f"{prefix}.{name}" if key is None else f"{prefix}.{name}.{key}"
                _paths_of(child, path.lstrip("."), out)


def _resolved(reads: Reads) -> set[str]:
    """The dotted paths of the recorded reads (objects mapped through their Config roots)."""
    ids: dict[int, str] = {}
    for root in list(reads._roots.values()):
        _paths_of(root, "", ids)
    paths = set()
    for (_, name), obj in list(reads._raw.items()):
        # a model_copy(update=...) of a config object reads its original's keys, except those updated
        while id(obj) not in ids and id(obj) in reads._copies:
            _, original, updated = reads._copies[id(obj)]
            obj = None if name in updated else original
        if obj is not None and id(obj) in ids:
            paths.add(f"{ids[id(obj)]}.{name}".lstrip("."))
    return paths


@contextmanager
def record_reads(root: type[BaseModel] | None = None) -> Iterator[Reads]:
    """Record the config fields read inside the block (see the module docstring)."""
    if root is None:
        from manyways.config import Config as root
    classes = config_classes(root)
    reads = Reads()
    fields = {cls: frozenset(cls.model_fields) for cls in classes}
    validators = _validator_codes(classes)

    def getattribute(self: Any, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in fields.get(type(self), ()) and _counted(sys._getframe(1), validators):
            if (id(self), name) not in reads._raw:
                reads._raw[(id(self), name)] = self
                if reads.on_new is not None:
                    reads.on_new()
            if type(self) is root:
                reads._roots[id(self)] = self
        return value

    def model_dump(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _counted(sys._getframe(1), validators):
            reads._raw.update({(id(self), name): self for name in fields[type(self)]})
        return BaseModel.model_dump(self, *args, **kwargs)

    def model_copy(self: Any, *, update: dict[str, Any] | None = None, deep: bool = False) -> Any:
        copy = BaseModel.model_copy(self, update=update, deep=deep)
        reads._copies[id(copy)] = (copy, self, frozenset(update or ()))
        return copy

    patches = {"__getattribute__": getattribute, "model_dump": model_dump, "model_copy": model_copy}
    saved = {cls: {attr: cls.__dict__.get(attr) for attr in patches} for cls in classes}
    for cls in classes:
        for attr, func in patches.items():
            setattr(cls, attr, func)
    try:
        yield reads
    finally:
        for cls, old in saved.items():
            for attr, func in old.items():
                if func is None:
                    delattr(cls, attr)
                else:
                    setattr(cls, attr, func)
        reads.paths |= _resolved(reads)


def yaml_keys(data: dict[str, Any], cfg: BaseModel) -> list[str]:
    """The dotted keys a YAML mapping sets, down to typed leaves; a pass-through mapping
    (``trl``, ``vllm``, ``options``) is one key."""
    out: list[str] = []

    def walk(node: dict[str, Any], obj: Any, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            child = object.__getattribute__(obj, key) if isinstance(obj, BaseModel) else obj.get(key)
            if isinstance(value, dict) and isinstance(child, BaseModel):
                walk(value, child, path + ".")
            elif (
                isinstance(value, dict)
                and isinstance(child, dict)
                and any(isinstance(v, BaseModel) for v in child.values())
            ):
                walk(value, child, path + ".")
            else:
                out.append(path)

    walk(data, cfg, "")
    return out


def unread_keys(data: dict[str, Any], cfg: BaseModel, reads: Reads) -> list[str]:
    """The keys of YAML ``data`` (validated as ``cfg``) that no recorded read touched. A ``kind``
    (the discriminator of sources and back-ends) counts as read when its object is: the code
    dispatches on the object's class (``isinstance``) rather than reading the field."""

    def read(key: str) -> bool:
        if key in reads.paths:
            return True
        parent, _, last = key.rpartition(".")
        return last == "kind" and any(p.startswith(parent + ".") for p in reads.paths)

    return [k for k in yaml_keys(data, cfg) if not read(k)]


def check_keys_read(path: str | Path, reads: Reads) -> None:
    """Raise :class:`ConfigError` naming every key of the YAML file at ``path`` that no recorded
    read touched (call after a run inside :func:`record_reads`)."""
    import yaml

    from manyways.config import ConfigError, load_config

    data = yaml.safe_load(Path(path).read_text()) or {}
    unread = unread_keys(data, load_config(path), reads)
    if unread:
        raise ConfigError(f"{path}: keys no stage read (remove them or fix the code): {', '.join(unread)}")


# ---------------------------------------------------------------- other processes

ENV_VAR = "MANYWAYS_RECORD_READS"
_ENV_RECORDING: list[Any] = []  # the one recording of this process, when started from the env


def record_from_env() -> bool:
    """When ``$MANYWAYS_RECORD_READS`` names a directory, record this process's reads into
    ``<dir>/reads-<pid>.json`` (a second after new reads, and at exit), so that reads in
    subprocesses (accelerate ranks, Ray workers) count too. Called by ``import manyways``."""
    directory = os.environ.get(ENV_VAR)
    if not directory or _ENV_RECORDING:
        return False
    context = record_reads()
    reads = context.__enter__()
    target = Path(directory) / f"reads-{os.getpid()}.json"
    dirty, lock = threading.Event(), threading.Lock()

    def flush() -> None:
        with lock:
            dirty.clear()
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_text(json.dumps(sorted(_resolved(reads))))
            os.replace(tmp, target)

    def flusher() -> None:  # a worker killed without running atexit loses at most a second
        while True:
            dirty.wait()
            time.sleep(1.0)
            flush()

    reads.on_new = dirty.set
    _ENV_RECORDING.append(context)
    threading.Thread(target=flusher, name="manyways-keyuse", daemon=True).start()
    atexit.register(flush)
    return True


def reads_from_dir(directory: str | Path) -> Reads:
    """The union of the reads recorded by every process into ``directory``."""
    reads = Reads()
    for path in sorted(Path(directory).glob("reads-*.json")):
        reads.paths |= set(json.loads(path.read_text()))
    return reads
