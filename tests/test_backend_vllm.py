"""The vLLM back-end's request/response mapping, with a stand-in for ``vllm.LLM``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from manyways.backends import GenerationBackend, GenRequest
from manyways.backends.vllm import VLLMBackend


class StandInTokenizer:
    """Renders ``<role>content...<assistant>``; one token id per whitespace-separated word."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> Any:
        assert add_generation_prompt is True
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return {"input_ids": self.ids(text)} if tokenize else text

    def ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return f"tok{ids[0]}"


@dataclass
class Logprob:
    logprob: float
    decoded_token: str | None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[Completion]
    num_cached_tokens: int = 0


@dataclass
class StandInEngine:
    """Answers each prompt with a text naming its seed; a repeated prompt is fully cached but its
    last token, as vLLM's prefix cache would do."""

    calls: list[tuple[list[dict[str, list[int]]], Any]] = field(default_factory=list)
    seen: set[tuple[int, ...]] = field(default_factory=set)
    tokenizer: StandInTokenizer = field(default_factory=StandInTokenizer)

    def get_tokenizer(self) -> StandInTokenizer:
        return self.tokenizer

    def generate(self, prompts: list[Any], params: Any, use_tqdm: bool = True) -> list[RequestOutput]:
        assert all(set(p) == {"prompt_token_ids"} for p in prompts), "token-id prompts only"
        self.calls.append((prompts, params))
        if isinstance(params, dict):  # one params object for all prompts (judge path)
            return [self._judge(p) for p in prompts]
        return [self._sample(p, sp) for p, sp in zip(prompts, params, strict=True)]

    def _sample(self, prompt: dict[str, list[int]], sp: dict[str, Any]) -> RequestOutput:
        ids = list(prompt["prompt_token_ids"])
        cached = len(ids) - 1 if tuple(ids) in self.seen else 0
        self.seen.add(tuple(ids))
        n_tokens = min(sp["max_tokens"], 3 + sp["seed"] % 4)
        finish = "length" if n_tokens == sp["max_tokens"] else "stop"
        text = f"seed={sp['seed']} T={sp['temperature']}" + ("\ufffd" if sp["seed"] == 13 else "")
        return RequestOutput(ids, [Completion(text, list(range(n_tokens)), finish)], cached)

    def _judge(self, prompt: dict[str, list[int]]) -> RequestOutput:
        first = {
            7: Logprob(math.log(0.6), "A"),
            8: Logprob(math.log(0.2), " B"),
            9: Logprob(math.log(0.1), None),
        }
        return RequestOutput([1, 2], [Completion("A", [7], "length", [first])])


@pytest.fixture()
def engine() -> StandInEngine:
    return StandInEngine()


@pytest.fixture()
def backend(engine: StandInEngine) -> VLLMBackend:
    return VLLMBackend(engine, "m", sampling_params=lambda **kw: kw)


def _req(rid: str, seeds: tuple[int, ...], **kw) -> GenRequest:
    return GenRequest(rid, [{"role": "user", "content": f"question {rid} with words"}], seeds=seeds, **kw)


def test_one_engine_request_per_sample_with_its_seed(backend: VLLMBackend, engine: StandInEngine) -> None:
    assert isinstance(backend, GenerationBackend)
    requests = [
        _req("a", (3, 1, 2), max_new_tokens=50, temperature=0.9, top_p=0.8, stop=("\n\n",)),
        _req("b", (7,)),
    ]
    out = backend.generate(requests)
    assert len(engine.calls) == 1
    prompts, params = engine.calls[0]
    tok = engine.tokenizer
    a = {"prompt_token_ids": tok.ids("<user>question a with words<assistant>")}
    b = {"prompt_token_ids": tok.ids("<user>question b with words<assistant>")}
    assert prompts == [a] * 3 + [b]
    assert [p["seed"] for p in params] == [3, 1, 2, 7]
    assert all(p["n"] == 1 for p in params)
    assert params[0] == {
        "n": 1,
        "seed": 3,
        "temperature": 0.9,
        "top_p": 0.8,
        "max_tokens": 50,
        "stop": ["\n\n"],
    }
    assert params[3]["stop"] is None
    assert [s.text for s in out[0]] == ["seed=3 T=0.9", "seed=1 T=0.9", "seed=2 T=0.9"]
    assert [s.completion_tokens for s in out[0]] == [6, 4, 5]
    assert out[1][0].prompt_tokens == 4


def test_finish_reasons_and_decode_errors(backend: VLLMBackend) -> None:
    out = backend.generate([_req("a", (0, 13), max_new_tokens=3)])[0]
    assert [s.finish_reason for s in out] == ["length", "decode_error"]


def test_stats_count_prefix_cache_hits(backend: VLLMBackend) -> None:
    backend.generate([_req("a", (1, 2, 3, 4))])
    stats = backend.stats
    assert stats.prompt_tokens_submitted == 4 * 4
    assert stats.prefill_tokens_computed == 4 + 3 * 1  # first prompt in full, then only the last token
    assert stats.decode_tokens == sum(3 + s % 4 for s in (1, 2, 3, 4))


def test_progress_counts_samples(backend: VLLMBackend) -> None:
    seen: list[tuple[int, int]] = []
    backend.generate([_req("a", (1, 2)), _req("b", (3,))], progress=lambda n, t: seen.append((n, t)))
    assert sum(n for n, _ in seen) == 3


def test_next_token_probs_from_logprobs(backend: VLLMBackend, engine: StandInEngine) -> None:
    probs = backend.next_token_probs([[{"role": "user", "content": "A or B?"}]], ["A", "B", "C"])[0]
    _, params = engine.calls[-1]
    assert params == {"n": 1, "temperature": 0.0, "max_tokens": 1, "logprobs": 20}
    assert probs["A"] == pytest.approx(0.75) and probs["B"] == pytest.approx(0.25) and probs["C"] == 0.0


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_model_dir) -> Any:
    """The tiny model's tokenizer made Llama-3-like: a BOS that encoding text adds, and a chat
    template that starts with that BOS."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


@dataclass
class TokenizingEngine(StandInEngine):
    """Tokenizes what it gets as vLLM does: text with special tokens (a BOS on top), token ids as
    they are. Records the ids each request ran on."""

    ran_on: list[list[int]] = field(default_factory=list)
    real: Any = None

    def get_tokenizer(self) -> Any:
        return self.real

    def generate(self, prompts: list[Any], params: Any, use_tqdm: bool = True) -> list[RequestOutput]:
        out = []
        for p, sp in zip(prompts, params, strict=True):
            ids = self.real(p).input_ids if isinstance(p, str) else list(p["prompt_token_ids"])
            self.ran_on.append(ids)
            out.append(self._sample({"prompt_token_ids": ids}, sp))
        return out


def test_prompts_reach_the_engine_as_one_tokenization_with_one_bos(bos_tokenizer: Any) -> None:
    engine = TokenizingEngine(real=bos_tokenizer)
    backend = VLLMBackend(engine, "m", sampling_params=lambda **kw: kw)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    backend.generate([GenRequest("a", messages, seeds=(1, 2))])

    expected = bos_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)[
        "input_ids"
    ]
    assert expected.count(bos_tokenizer.bos_token_id) == 1 and expected[0] == bos_tokenizer.bos_token_id
    assert (
        bos_tokenizer(backend.render(messages)).input_ids[:2] == [bos_tokenizer.bos_token_id] * 2
    )  # text: 2 BOS
    assert engine.ran_on == [expected, expected]


def test_a_json_schema_becomes_vllm_structured_outputs(engine: StandInEngine) -> None:
    backend = VLLMBackend(
        engine, "m", sampling_params=lambda **kw: kw, structured_outputs=lambda **kw: ("structured", kw)
    )
    schema = {"type": "array", "items": {"type": "string", "enum": ["a"]}}
    with_schema = backend._params(_req("a", (1,), json_schema=schema), 1)
    assert with_schema["structured_outputs"] == ("structured", {"json": schema})
    assert "structured_outputs" not in backend._params(_req("b", (1,)), 1)
