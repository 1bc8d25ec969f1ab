"""The vLLM back-end: vLLM's offline engine (``vllm.LLM``) with prefix caching on.

vLLM seeds per request, not per sample, so every sample is sent as its own n=1 request with its
own seed: sample ``i`` then depends only on (prompt, seeds[i], parameters), and the prefix cache
makes the repeated prompts cheap. Prompts are chat-templated *and tokenized once* with the engine's
tokenizer and passed as token ids (vLLM's ``TokensPrompt``: ``{"prompt_token_ids": [...]}``) to
``LLM.generate`` with one ``SamplingParams`` per sample. Text would be tokenized again by vLLM
with special tokens, so a template that starts with a BOS (Llama 3's ``<|begin_of_text|>``) would
give the model two BOS tokens, unlike training (TRL tokenizes the template once). The engine and the
``SamplingParams`` factory can be injected, which is how the tests run without vLLM installed.
GPU: ``BackendConfig(kind="vllm", vllm={"gpu_memory_utilization": 0.85})``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from manyways.backends.config import BackendConfig, resolve_dtype
from manyways.backends.protocol import (
    FINISH_REASONS,
    BackendStats,
    GenRequest,
    GenSample,
    ProgressCallback,
    check_request,
    option_probs_from_top,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = "the vllm back-end needs vLLM: pip install 'manyways[vllm]'"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return vllm


def _structured_outputs_params(**kwargs: Any) -> Any:
    """``vllm.sampling_params.StructuredOutputsParams`` (vLLM >= 0.11; it replaced guided_json)."""
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(**kwargs)


class VLLMBackend:
    """Generation with an in-process vLLM engine."""

    name = "vllm"

    def __init__(
        self,
        engine: Any,
        model_id: str,
        *,
        sampling_params: Callable[..., Any] | None = None,
        structured_outputs: Callable[..., Any] | None = None,
    ) -> None:
        self.engine = engine
        self.model_id = model_id
        self.sampling_params = sampling_params or _import_vllm().SamplingParams
        # requests with a json_schema: SamplingParams(structured_outputs=StructuredOutputsParams(json=...))
        self.structured_outputs = structured_outputs or _structured_outputs_params
        self.tokenizer = engine.get_tokenizer()
        self.stats = BackendStats()

    @classmethod
    def from_config(cls, cfg: BackendConfig, model_id: str) -> VLLMBackend:
        """Start a ``vllm.LLM`` for ``model_id`` with ``cfg.vllm`` passed through."""
        vllm = _import_vllm()
        from manyways.models import resolve_model_path

        options = {"enable_prefix_caching": True, **cfg.vllm}
        options.setdefault("dtype", resolve_dtype(cfg.dtype, "cuda"))
        logger.info("starting vLLM for %s with %s", model_id, options)
        engine = vllm.LLM(model=resolve_model_path(model_id), **options)
        return cls(engine, model_id, sampling_params=vllm.SamplingParams)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The chat-templated prompt text, ready for the assistant's turn (for logs and checks)."""
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def prompt(self, messages: Sequence[dict[str, str]]) -> dict[str, list[int]]:
        """vLLM's ``TokensPrompt``: the chat template tokenized once, ready for the assistant's
        turn; the template's own BOS is the only one (no special tokens are added on top)."""
        ids = self.tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return {"prompt_token_ids": [int(i) for i in ids]}

    def _params(self, request: GenRequest, seed: int) -> Any:
        return self.sampling_params(
            n=1,
            seed=int(seed),
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_new_tokens,
            stop=list(request.stop) or None,
            **self._structured(request),
        )

    def _structured(self, request: GenRequest) -> dict[str, Any]:
        """vLLM's structured-output option for a request with a JSON schema (else nothing)."""
        if request.json_schema is None:
            return {}
        return {"structured_outputs": self.structured_outputs(json=request.json_schema)}

    def generate(
        self, requests: Sequence[GenRequest], progress: ProgressCallback | None = None
    ) -> list[list[GenSample]]:
        """One engine request per sample, all submitted in one ``LLM.generate`` call."""
        prompts: list[dict[str, list[int]]] = []
        params: list[Any] = []
        owner: list[int] = []
        for i, request in enumerate(requests):
            check_request(request)
            prompt = self.prompt(request.messages)
            for seed in request.seeds:
                prompts.append(prompt)
                params.append(self._params(request, seed))
                owner.append(i)
        outputs = self.engine.generate(prompts, params, use_tqdm=False) if prompts else []
        results: list[list[GenSample]] = [[] for _ in requests]
        for i, output in zip(owner, outputs, strict=True):
            sample = self._to_sample(output)
            results[i].append(sample)
            if progress is not None:
                progress(1, sample.completion_tokens)
        return results

    def _to_sample(self, output: Any) -> GenSample:
        completion = output.outputs[0]
        prompt_tokens = len(output.prompt_token_ids or [])
        cached = int(getattr(output, "num_cached_tokens", 0) or 0)
        self.stats.prompt_tokens_submitted += prompt_tokens
        self.stats.prefill_tokens_computed += prompt_tokens - min(cached, prompt_tokens)
        completion_tokens = len(completion.token_ids)
        self.stats.decode_tokens += completion_tokens
        finish = completion.finish_reason or "length"
        text = completion.text
        if "\ufffd" in text:
            finish = "decode_error"
        return GenSample(
            text, finish if finish in FINISH_REASONS else "length", prompt_tokens, completion_tokens
        )

    def next_token_logprobs(
        self, messages_list: Sequence[list[dict[str, str]]], top_k: int = 20
    ) -> list[dict[str, float]]:
        """The engine's ``top_k`` likeliest first tokens (decoded text -> log-probability)."""
        prompts = [self.prompt(m) for m in messages_list]
        params = self.sampling_params(n=1, temperature=0.0, max_tokens=1, logprobs=top_k)
        outputs = self.engine.generate(prompts, params, use_tqdm=False)
        out = []
        for output in outputs:
            first = output.outputs[0].logprobs[0]
            entry: dict[str, float] = {}
            for token_id, lp in first.items():
                text = lp.decoded_token if lp.decoded_token is not None else self.tokenizer.decode([token_id])
                entry[text] = max(entry.get(text, float("-inf")), float(lp.logprob))
            out.append(entry)
        return out

    def next_token_probs(
        self, messages_list: Sequence[list[dict[str, str]]], options: Sequence[str]
    ) -> list[dict[str, float]]:
        """P(option) from the top-20 first-token log-probabilities, renormalised over options."""
        return [option_probs_from_top(top, options) for top in self.next_token_logprobs(messages_list, 20)]

    def close(self) -> None:
        """Drop the engine (vLLM frees the GPU when it is garbage-collected)."""
        self.engine = None
