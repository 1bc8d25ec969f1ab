"""``manyways.serve`` answers OpenAI-style requests from any back-end."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from manyways.backends import GenRequest
from manyways.backends.fake import FakeBackend
from manyways.serve import make_server

QUESTIONS = {"What is 3 plus 4?": "7"}
MESSAGES = [{"role": "user", "content": "Solve: What is 3 plus 4?"}]


@pytest.fixture()
def fake() -> FakeBackend:
    return FakeBackend(QUESTIONS, correct_rate=0.5, model_id="fake-7")


@pytest.fixture()
def base_url(fake: FakeBackend) -> Iterator[str]:
    server = make_server(fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_health_and_models(base_url: str) -> None:
    assert _get(f"{base_url}/health")["status"] == "ok"
    models = _get(f"{base_url}/v1/models")
    assert [m["id"] for m in models["data"]] == ["fake-7"]
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(f"{base_url}/v2/nothing")
    assert err.value.code == 404


def test_n_samples_use_consecutive_seeds(base_url: str, fake: FakeBackend) -> None:
    body = {"model": "x", "messages": MESSAGES, "n": 3, "seed": 5, "temperature": 0.7, "max_tokens": 64}
    status, answer = _post(f"{base_url}/v1/chat/completions", body)
    assert status == 200
    expected = FakeBackend(QUESTIONS).generate(
        [GenRequest("e", MESSAGES, seeds=(5, 6, 7), max_new_tokens=64)]
    )[0]
    assert [c["message"]["content"] for c in answer["choices"]] == [s.text for s in expected]
    assert [c["finish_reason"] for c in answer["choices"]] == [s.finish_reason for s in expected]
    assert answer["usage"]["completion_tokens"] == sum(s.completion_tokens for s in expected)
    assert answer["model"] == "fake-7"


def test_bad_requests_are_400_and_backend_errors_500(base_url: str, fake: FakeBackend) -> None:
    status, answer = _post(f"{base_url}/v1/chat/completions", b"{not json")
    assert status == 400 and "bad request" in answer["error"]["message"]
    status, _ = _post(f"{base_url}/v1/chat/completions", {"messages": []})
    assert status == 400
    fake.fail_times = fake.calls + 1
    status, answer = _post(f"{base_url}/v1/chat/completions", {"messages": MESSAGES})
    assert status == 500 and "FakeBackendError" in answer["error"]["message"]
    status, _ = _post(f"{base_url}/v1/chat/completions", {"messages": MESSAGES})
    assert status == 200  # the server keeps serving after a back-end failure


def test_top_logprobs(base_url: str, fake: FakeBackend) -> None:
    body = {"messages": MESSAGES, "max_tokens": 1, "logprobs": True, "top_logprobs": 4}
    status, answer = _post(f"{base_url}/v1/chat/completions", body)
    assert status == 200
    content = answer["choices"][0]["logprobs"]["content"][0]
    top = content["top_logprobs"]
    assert len(top) == 4
    assert top == sorted(top, key=lambda t: -t["logprob"])
    assert content["token"] == top[0]["token"] == answer["choices"][0]["message"]["content"]
    assert {t["token"]: t["logprob"] for t in top} == fake.next_token_logprobs([MESSAGES], 4)[0]
    probe = fake.generate([GenRequest("p", MESSAGES, seeds=(0,), max_new_tokens=1)])[0][0]
    assert answer["usage"]["prompt_tokens"] == probe.prompt_tokens > 0


def test_backend_without_logprobs_is_a_400() -> None:
    class NoLogprobs:
        name = "plain"
        model_id = "m"

        def generate(self, requests, progress=None):
            return [[] for _ in requests]

        def close(self) -> None:
            pass

    server = make_server(NoLogprobs())  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        body = {"messages": MESSAGES, "max_tokens": 1, "logprobs": True, "top_logprobs": 2}
        status, answer = _post(f"http://{host}:{port}/v1/chat/completions", body)
        assert status == 400 and "log-probabilities" in answer["error"]["message"]
        assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == "logprobs"
    finally:
        server.shutdown()
        server.server_close()
