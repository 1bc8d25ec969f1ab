"""``manyways serve`` driven by the real ``openai`` client, every answer parsed strictly with its types."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai  # the dev extra installs it
import pytest
from openai.types import Completion, ErrorObject, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from manyways.backends import GenRequest, GenSample
from manyways.backends.fake import FakeBackend
from manyways.serve import make_server

QUESTIONS = {"What is 3 plus 4?": "7"}
MESSAGES = [{"role": "user", "content": "Solve: What is 3 plus 4?"}]


class ReasoningFake(FakeBackend):
    """A fake whose samples carry reasoning and, for one seed, a decode error."""

    def generate(self, requests, progress=None):  # type: ignore[no-untyped-def]
        rows = super().generate(requests, progress)
        out = []
        for request, row in zip(requests, rows, strict=True):
            out.append(
                [
                    GenSample(
                        s.text,
                        "decode_error" if seed == 99 else s.finish_reason,
                        s.prompt_tokens,
                        s.completion_tokens,
                        reasoning="thinking...",
                    )
                    for seed, s in zip(request.seeds, row, strict=True)
                ]
            )
        return out


@pytest.fixture()
def fake() -> FakeBackend:
    return ReasoningFake(QUESTIONS, correct_rate=0.5, model_id="fake-7")


@pytest.fixture()
def base_url(fake: FakeBackend) -> Iterator[str]:
    server = make_server(fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def client(base_url: str) -> Any:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=30)


def _raw(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _sse(raw: bytes, kind: Any) -> list[Any]:
    """Server-sent events, every ``data:`` payload validated strictly, ending in ``[DONE]``."""
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    return [kind.model_validate_json(e[len("data: ") :], strict=True) for e in events[:-1]]


def _expected(seeds: tuple[int, ...], max_tokens: int = 64, messages=MESSAGES) -> list[GenSample]:
    backend = ReasoningFake(QUESTIONS, correct_rate=0.5)
    request = GenRequest("e", messages, seeds=seeds, max_new_tokens=max_tokens, temperature=1.0)
    return backend.generate([request])[0]


def test_chat_completion_parses_strictly_and_matches_the_backend(client: Any, base_url: str) -> None:
    body = {"model": "fake-7", "messages": MESSAGES, "n": 2, "seed": 5, "max_tokens": 64}
    status, raw = _raw(f"{base_url}/v1/chat/completions", body)
    assert status == 200
    answer = ChatCompletion.model_validate_json(raw, strict=True)
    expected = _expected((5, 6))
    assert [c.message.content for c in answer.choices] == [s.text for s in expected]
    assert answer.choices[0].message.reasoning == "thinking..."  # type: ignore[attr-defined]
    via_client = client.chat.completions.create(**body)
    assert [c.message.content for c in via_client.choices] == [s.text for s in expected]
    assert via_client.usage.prompt_tokens == expected[0].prompt_tokens


def test_raw_streams_parse_strictly(base_url: str) -> None:
    body = {"messages": MESSAGES, "n": 2, "seed": 5, "max_tokens": 64, "stream": True}
    status, raw = _raw(f"{base_url}/v1/chat/completions", body)
    assert status == 200
    chunks = _sse(raw, ChatCompletionChunk)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == 0)
    assert text == _expected((5, 6))[0].text
    body = {"prompt": "Say hi", "seed": 1, "stream": True, "stream_options": {"include_usage": True}}
    status, raw = _raw(f"{base_url}/v1/completions", body)
    chunks = _sse(raw, Completion)
    assert status == 200 and chunks[-1].usage is not None and chunks[-1].choices == []


def test_streaming_with_the_real_client(client: Any) -> None:
    stream = client.chat.completions.create(
        model="fake-7",
        messages=MESSAGES,
        n=2,
        seed=5,
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    for c in chunks:  # every chunk also parses strictly
        ChatCompletionChunk.model_validate_json(c.model_dump_json(), strict=True)
    text = {0: "", 1: ""}
    finish = {}
    for c in chunks[:-1]:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    expected = _expected((5, 6))
    assert [text[0], text[1]] == [s.text for s in expected]
    assert [finish[0], finish[1]] == [s.finish_reason for s in expected]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(
        s.completion_tokens for s in expected
    )


def test_completions_endpoint_plain_and_streamed(client: Any, base_url: str) -> None:
    prompts = ["Solve: What is 3 plus 4?", "Say hi"]
    status, raw = _raw(
        f"{base_url}/v1/completions", {"model": "fake-7", "prompt": prompts, "n": 2, "seed": 1}
    )
    assert status == 200
    answer = Completion.model_validate_json(raw, strict=True)
    expected = [s for p in prompts for s in _expected((1, 2), 256, [{"role": "user", "content": p}])]
    assert [c.text for c in answer.choices] == [s.text for s in expected]
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    streamed = list(client.completions.create(model="fake-7", prompt=prompts[0], seed=1, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected[0].text
    assert streamed[-1].choices[0].finish_reason == expected[0].finish_reason


def test_content_parts_and_null(client: Any) -> None:
    parts = [{"type": "text", "text": "Solve:"}, {"type": "text", "text": "What is 3 plus 4?"}]
    messages = [{"role": "system", "content": None}, {"role": "user", "content": parts}]
    answer = client.chat.completions.create(model="fake-7", messages=messages, seed=3, max_tokens=64)
    as_text = [{"role": "system", "content": ""}, {"role": "user", "content": "Solve:\nWhat is 3 plus 4?"}]
    assert answer.choices[0].message.content == _expected((3,), 64, as_text)[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="fake-7",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        )
    assert "only text parts" in err.value.body["message"]


def test_finish_reason_is_openais(base_url: str) -> None:
    status, raw = _raw(f"{base_url}/v1/chat/completions", {"messages": MESSAGES, "seed": 99})
    assert status == 200
    choice = ChatCompletion.model_validate_json(raw, strict=True).choices[0]
    assert choice.finish_reason == "stop"
    assert json.loads(raw)["choices"][0]["manyways_finish_reason"] == "decode_error"


def test_models_have_created(client: Any, base_url: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-7"]
    assert client.models.retrieve("fake-7").created == models.data[0].created
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=10) as r:
        raw = json.loads(r.read())
    Model.model_validate_json(json.dumps(raw["data"][0]), strict=True)
    assert raw["data"][0]["created"] > 0


def test_logprobs_without_top_logprobs(client: Any, base_url: str, fake: FakeBackend) -> None:
    answer = client.chat.completions.create(model="fake-7", messages=MESSAGES, max_tokens=1, logprobs=True)
    status, raw = _raw(f"{base_url}/v1/chat/completions", {"messages": MESSAGES, "logprobs": True})
    assert status == 200
    assert (
        ChatCompletion.model_validate_json(raw, strict=True).choices[0].logprobs.content[0].top_logprobs == []
    )
    entry = answer.choices[0].logprobs.content[0]
    best, logprob = max(fake.next_token_logprobs([MESSAGES], 1)[0].items(), key=lambda kv: kv[1])
    assert (entry.token, entry.logprob, entry.top_logprobs) == (best, logprob, [])
    assert answer.usage.prompt_tokens > 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES, "n": 0}, "n"),
        ({"messages": MESSAGES, "n": -2}, "n"),
        ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": MESSAGES, "logprobs": True, "max_tokens": 5}, "max_tokens"),
        ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ],
)
def test_bad_requests_are_openai_errors(client: Any, base_url: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="fake-7", **body)
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == param
    status, raw = _raw(f"{base_url}/v1/chat/completions", body)
    assert status == 400 and set(json.loads(raw)) == {"error"}
    ErrorObject.model_validate_json(json.dumps(json.loads(raw)["error"]), strict=True)


def test_unknown_route_is_an_openai_404(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="fake-7", input="x")
    assert "no route" in err.value.body["message"]
