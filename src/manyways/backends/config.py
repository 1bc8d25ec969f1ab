"""Configuration of a generation back-end and the factory that builds one lazily.

``BackendConfig`` is one section of a stage config (YAML ``backend:``). ``make_backend`` imports
only the module of the chosen kind, so a CPU install without vLLM can build every other kind.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from manyways.backends.protocol import GenerationBackend

logger = logging.getLogger(__name__)

BackendKind = Literal["hf", "vllm", "openai", "fake"]
DtypeChoice = Literal["auto", "float32", "bfloat16"]

DEFAULT_VLLM_OPTIONS: dict[str, Any] = {"enable_prefix_caching": True}


class BackendConfig(BaseModel):
    """Which back-end generates, on which model, and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: BackendKind = Field("hf", description="hf (transformers), vllm, openai (HTTP server) or fake.")
    model: str | None = Field(None, description="Model name or path; None means the run's model.")
    dtype: DtypeChoice = Field(
        "auto",
        description="auto = bfloat16 on CUDA; on CPU the faster of bfloat16 and float32 for generation "
        "at the model's shapes, measured once per machine and model (manyways.dtype_auto).",
    )
    device: str | None = Field(None, description="hf: torch device; None = cuda if available else cpu.")
    threads: int = Field(
        1,
        ge=1,
        description="hf: torch.set_num_threads. On small shared CPUs one thread is often much faster.",
    )
    batch_size: int = Field(32, ge=1, description="hf: sample rows decoded together in one forward.")
    prefix_sharing: bool = Field(
        True, description="hf: prefill the prompts' common token prefix once per batch."
    )
    cascade_attention: bool = Field(
        True,
        description="hf: keep one copy of a prompt's KV for all its samples and attend to it once per "
        "decode step (shared-prefix / cascade attention).",
    )
    packed_linear: bool = Field(
        True,
        description="hf, CPU, bf16: pack each linear layer's weight once for oneDNN instead of on every "
        "call (same outputs; faster decode; one more copy of the linear weights in memory).",
    )
    base_url: str = Field("http://127.0.0.1:8000/v1", description="openai: server root including /v1.")
    api_key_env: str | None = Field(
        None, description="openai: name of the environment variable holding the API key."
    )
    concurrency: int = Field(8, ge=1, description="openai: requests in flight at once.")
    max_retries: int = Field(4, ge=0, description="openai: retries on connection errors, 5xx and 429.")
    request_timeout_s: float = Field(300.0, gt=0, description="openai: timeout of one HTTP request.")
    vllm: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_VLLM_OPTIONS),
        description="vllm: keyword arguments passed through to vllm.LLM (tensor_parallel_size, ...).",
    )


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """Whether /proc/cpuinfo lists avx512_bf16 or amx_bf16 (fast bfloat16 matmuls on CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(choice: str, device: str, model: Any = None) -> str:
    """The concrete dtype name ("float32" | "bfloat16") for ``choice`` on ``device``. ``auto`` on
    CPU with a ``model`` (name, path or config) is the faster dtype for generation with its shapes
    (measured: :func:`manyways.dtype_auto.resolve_auto_dtype`); without one, the CPU's flags."""
    if choice != "auto":
        return choice
    if device.startswith("cuda"):
        return "bfloat16"
    if model is not None:
        from manyways.dtype_auto import resolve_auto_dtype

        try:
            return resolve_auto_dtype("generation", model, device=device)[0]
        except (OSError, ValueError) as exc:
            logger.warning("dtype auto: cannot read the shapes of %s (%s); deciding by CPU flags", model, exc)
    return "bfloat16" if cpu_supports_bf16() else "float32"


FAKE_ANSWERS_ENV = "MANYWAYS_FAKE_ANSWERS"


def fake_answers() -> dict[str, str]:
    """The gold answers the fake back-end answers from: a JSON object {question: answer} in the
    file ``$MANYWAYS_FAKE_ANSWERS`` (dry runs and tests whose later stages need correct traces,
    also in an experiment's worker processes); none without it."""
    import json
    import os

    path = os.environ.get(FAKE_ANSWERS_ENV)
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{FAKE_ANSWERS_ENV}={path}: cannot read a JSON object of answers ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{FAKE_ANSWERS_ENV}={path}: expected a JSON object {{question: answer string}}")
    return data


def make_backend(cfg: BackendConfig, default_model: str) -> GenerationBackend:
    """Build the back-end ``cfg`` names, importing its module only now."""
    model = cfg.model or default_model
    logger.info("building %s back-end for %s", cfg.kind, model)
    if cfg.kind == "fake":
        from manyways.backends.fake import FakeBackend

        return FakeBackend(fake_answers(), model_id=model)
    if cfg.kind == "hf":
        from manyways.backends.hf import HFBackend

        return HFBackend.from_config(cfg, model)
    if cfg.kind == "openai":
        from manyways.backends.openai import OpenAIBackend

        return OpenAIBackend.from_config(cfg, model)
    if cfg.kind == "vllm":
        from manyways.backends.vllm import VLLMBackend

        return VLLMBackend.from_config(cfg, model)
    raise ValueError(f"unknown back-end kind {cfg.kind!r}")
