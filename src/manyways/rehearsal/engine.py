"""A stand-in for the part of vLLM's offline API that :mod:`manyways.backends.vllm` calls.

``LLM(model=..., **engine_args)``, ``LLM.get_tokenizer()``, ``LLM.generate(prompts, params,
use_tqdm=...)`` with text prompts or token-id prompts (``{"prompt_token_ids": [...]}``, what
``vllm.inputs.TokensPrompt`` is), one ``SamplingParams`` per prompt (or one for all) carrying its
own seed, and outputs with ``prompt_token_ids``, ``outputs[0].text / token_ids / finish_reason``
and ``num_cached_tokens``. Sampling runs on our hf back-end's decode loop, one seeded generator
per request, as vLLM seeds per request.

It refuses what vLLM refuses: unknown engine or sampling arguments (TypeError), out-of-range
sampling values, a prompt longer than ``max_model_len``, token ids outside the vocabulary, an
empty prompt, ``max_model_len`` beyond the model's positions, a tensor-parallel size larger than
the GPUs this process can see, and -- the one that matters on a cluster -- a GPU already held by
another engine (vLLM would fail with out-of-memory at ``gpu_memory_utilization`` 0.9): each
engine locks its GPUs (``CUDA_VISIBLE_DEVICES``; all of the node's when unset, as in CUDA) in
``MANYWAYS_REHEARSAL_GPU_DIR``. A text prompt is tokenized with special tokens, as vLLM does, so
a chat-templated text gets a second BOS; such prompts are counted in ``stats["double_bos"]``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GPU_DIR_ENV = "MANYWAYS_REHEARSAL_GPU_DIR"
GPU_COUNT_ENV = "MANYWAYS_REHEARSAL_NODE_GPUS"
ENGINE_ARGS = {
    "dtype",
    "enable_prefix_caching",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "max_model_len",
    "seed",
    "trust_remote_code",
    "enforce_eager",
    "max_num_seqs",
    "swap_space",
}
GPU_WAIT_S = 60.0  # a GPU freed by an exiting process is taken over, as vLLM would after a restart


@dataclass
class SamplingParams:
    """The fields of ``vllm.SamplingParams`` we use; unknown keywords raise TypeError."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: list[str] | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.n > 1:
            raise ValueError("the rehearsal engine takes n=1 requests only (the vllm back-end sends those)")
        if self.logprobs is not None:
            raise ValueError("the rehearsal engine does not return logprobs")


def TokensPrompt(prompt_token_ids: list[int]) -> dict[str, Any]:  # noqa: N802 (vLLM's name)
    """``vllm.inputs.TokensPrompt``: a TypedDict, i.e. a plain dict at run time."""
    return {"prompt_token_ids": list(prompt_token_ids)}


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    cumulative_logprob: float | None = None
    logprobs: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = True


def _visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES, or the node's when it is unset."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return [str(i) for i in range(int(os.environ.get(GPU_COUNT_ENV, "0")))]
    return [v for v in value.split(",") if v.strip()]


@dataclass
class _GpuClaim:
    ids: list[str]
    handles: list[Any] = field(default_factory=list)

    def take(self, utilisation: float) -> None:
        directory = os.environ.get(GPU_DIR_ENV)
        if not directory:
            return
        Path(directory).mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + GPU_WAIT_S
        for gpu in self.ids:
            handle = open(Path(directory) / f"gpu{gpu}.lock", "a+")  # noqa: SIM115 (held open)
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        handle.close()
                        self.release()
                        raise RuntimeError(
                            f"CUDA out of memory: GPU {gpu} is already used by another engine in pid "
                            f"{_holder(directory, gpu)} (gpu_memory_utilization={utilisation}); each "
                            "engine needs GPUs of its own"
                        ) from None
                    time.sleep(0.5)
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            self.handles.append(handle)

    def release(self) -> None:
        for handle in self.handles:
            handle.close()
        self.handles = []


def _holder(directory: str, gpu: str) -> str:
    try:
        return (Path(directory) / f"gpu{gpu}.lock").read_text().strip() or "?"
    except OSError:
        return "?"


class LLM:
    """``vllm.LLM`` on the hf back-end: a real tokenizer, a real (tiny) model, real sampling."""

    def __init__(self, model: str, **engine_args: Any) -> None:
        unknown = sorted(set(engine_args) - ENGINE_ARGS)
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {unknown}")
        util = float(engine_args.get("gpu_memory_utilization", 0.9))
        if not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util}")
        tp = int(engine_args.get("tensor_parallel_size", 1))
        pp = int(engine_args.get("pipeline_parallel_size", 1))
        gpus = _visible_gpus()
        if len(gpus) < tp * pp:
            raise RuntimeError(
                f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} needs {tp * pp} GPUs but "
                f"this process sees {len(gpus)} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        self.gpus = gpus[: tp * pp]
        self._claim = _GpuClaim(self.gpus)
        self._claim.take(util)
        try:
            self._load(model, engine_args)
        except Exception:
            self._claim.release()
            raise
        self.stats = {"requests": 0, "double_bos": 0, "text_prompts": 0, "token_prompts": 0}
        log.info("rehearsal engine for %s on fake GPU(s) %s", model, self.gpus)

    def _load(self, model: str, args: dict[str, Any]) -> None:
        from manyways.backends.config import BackendConfig
        from manyways.rehearsal.hf_tokens import TokenBackend

        dtype = {"bfloat16": "bfloat16", "float32": "float32", "auto": "auto"}.get(
            str(args.get("dtype", "auto"))
        )
        if dtype is None:
            raise ValueError(f"dtype {args.get('dtype')!r} is not supported by the rehearsal engine")
        self.backend = TokenBackend.from_config(BackendConfig(kind="hf", dtype=dtype, device="cpu"), model)
        positions = int(getattr(self.backend.model.config, "max_position_embeddings", 0) or 0)
        self.max_model_len = int(args.get("max_model_len") or positions)
        if positions and self.max_model_len > positions:
            raise ValueError(
                f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                f"max_model_len (max_position_embeddings={positions} in the model's config.json)"
            )
        self.vocab_size = len(self.backend.tokenizer)

    def get_tokenizer(self) -> Any:
        return self.backend.tokenizer

    def _prompt_ids(self, prompt: Any) -> list[int]:
        tok = self.backend.tokenizer
        if isinstance(prompt, str):
            self.stats["text_prompts"] += 1
            ids = list(tok(prompt)["input_ids"])  # vLLM adds special tokens to text prompts
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            self.stats["token_prompts"] += 1
            ids = [int(t) for t in prompt["prompt_token_ids"]]
        else:
            raise TypeError(f"unsupported prompt type {type(prompt).__name__}: use str or TokensPrompt")
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary (vocab size {self.vocab_size})")
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {len(ids)}) is longer than the maximum model length "
                f"of {self.max_model_len}."
            )
        bos = tok.bos_token_id
        if bos is not None and ids[:2] == [bos, bos]:
            self.stats["double_bos"] += 1
        return ids

    def generate(
        self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """One output per prompt, in order; ``sampling_params`` is one or one per prompt."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling params must be SamplingParams, got {type(p).__name__}")
        ids = [self._prompt_ids(p) for p in prompts]
        limits = [
            min(p.max_tokens or 16, self.max_model_len - len(i)) for p, i in zip(params, ids, strict=True)
        ]
        done = self.backend.generate_ids(ids, params, limits)
        outputs = []
        for k, (prompt, prompt_ids, (text, tokens, finish)) in enumerate(
            zip(prompts, ids, done, strict=True)
        ):
            self.stats["requests"] += 1
            outputs.append(
                RequestOutput(
                    str(k),
                    prompt if isinstance(prompt, str) else None,
                    prompt_ids,
                    [CompletionOutput(0, text, tokens, finish)],
                )
            )
        return outputs

    def __del__(self) -> None:
        claim = getattr(self, "_claim", None)
        if claim is not None:
            claim.release()
