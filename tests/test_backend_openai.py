"""The OpenAI-compatible client against real HTTP servers started here (``manyways.serve``)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from manyways.backends import BackendConfig, GenerationBackend, GenRequest, make_backend
from manyways.backends.fake import FAKE_VOCAB, FakeBackend
from manyways.backends.openai import BackendRequestError, BackendUnavailableError, OpenAIBackend
from manyways.backends.protocol import option_probs_from_top
from manyways.serve import make_server

QUESTIONS = {f"What is {i} times 3?": str(3 * i) for i in range(6)}


def _requests(seeds: tuple[int, ...] = (1, 2, 3), **kw) -> list[GenRequest]:
    return [GenRequest(q, [{"role": "user", "content": q}], seeds=seeds, **kw) for q in QUESTIONS]


@contextmanager
def serving(backend) -> Iterator[str]:
    server = make_server(backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _client(url: str, **kw) -> OpenAIBackend:
    kw.setdefault("backoff_s", 0.01)
    return OpenAIBackend(url, "served", **kw)


def test_client_over_served_fake_equals_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBackend(QUESTIONS, correct_rate=0.5, length_rate=0.2)
    direct = FakeBackend(QUESTIONS, correct_rate=0.5, length_rate=0.2).generate(_requests(max_new_tokens=12))
    seen: list[tuple[int, int]] = []
    with serving(fake) as url:
        client = _client(url, concurrency=4)
        assert isinstance(client, GenerationBackend)
        got = client.generate(_requests(max_new_tokens=12), progress=lambda n, t: seen.append((n, t)))
    assert got == direct
    assert sum(n for n, _ in seen) == 3 * len(QUESTIONS)
    assert client.stats.prompt_tokens_submitted == sum(s.prompt_tokens for r in direct for s in r)


def test_retries_a_server_that_fails_first() -> None:
    fake = FakeBackend(QUESTIONS, fail_times=2)
    with serving(fake) as url:
        out = _client(url, max_retries=3).generate(_requests(seeds=(9,))[:1])
    assert fake.calls == 3  # two HTTP 500s, then an answer
    assert len(out[0]) == 1 and out[0][0].text


def test_gives_up_with_the_url_after_retries() -> None:
    fake = FakeBackend(QUESTIONS, fail_times=100)
    with serving(fake) as url:
        with pytest.raises(BackendUnavailableError, match=f"{url}/chat/completions.*3 tries"):
            _client(url, max_retries=2).generate(_requests(seeds=(9,))[:1])
    assert fake.calls == 3


def test_dead_port_names_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}/v1/chat/completions"):
        _client(url, max_retries=1).generate(_requests(seeds=(1,))[:1])
    client = _client(url, max_retries=1, concurrency=1)
    tries = []
    original = client.post
    client.post = lambda payload: tries.append(1) or original(payload)  # type: ignore[method-assign]
    with pytest.raises(BackendUnavailableError):
        client.generate(_requests(seeds=tuple(range(10))))
    assert len(tries) < 10  # the samples not yet started are dropped, not each retried


def test_a_server_that_never_answers_times_out_per_request_and_is_retried() -> None:
    """``request_timeout_s`` (from the backend config) bounds each HTTP request; a hung server is
    retried like a dead one and then named."""
    with socket.socket() as listener:  # accepts connections (the kernel's backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        cfg = BackendConfig(kind="openai", base_url=url, max_retries=1, request_timeout_s=0.3)
        client = make_backend(cfg, "m")
        assert isinstance(client, OpenAIBackend) and client.request_timeout_s == 0.3
        client.backoff_s = 0.01
        with pytest.raises(BackendUnavailableError, match=r"did not answer after 2 tries: .*timed out"):
            client.generate(_requests(seeds=(1,))[:1])


def test_client_errors_are_not_retried() -> None:
    fake = FakeBackend(QUESTIONS)
    with serving(fake) as url:
        with pytest.raises(BackendRequestError, match="HTTP 400"):
            _client(url, max_retries=3).post({"messages": []})
    assert fake.calls == 0


def test_next_token_probs_through_server_match_fake() -> None:
    fake = FakeBackend()
    conversations = [[{"role": "user", "content": f"Grade {i}: A, B or C?"}] for i in range(3)]
    with serving(fake) as url:
        got = _client(url).next_token_probs(conversations, ["A", "B", "C"])
    want = fake.next_token_probs(conversations, ["A", "B", "C"])
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w)
    assert len(FAKE_VOCAB) <= 20  # all fake tokens fit in the top 20 the client asks for


def test_option_mapping_from_top_tokens() -> None:
    top = {" A": -1.0, "A": -2.0, "B": -1.5, "Yes": -0.1, "\n": -3.0, "1": -0.5}
    probs = option_probs_from_top(top, ["A", "B", "C"])
    import math

    a, b = math.exp(-1.0) + math.exp(-2.0), math.exp(-1.5)
    assert probs["A"] == pytest.approx(a / (a + b))
    assert probs["C"] == 0.0
    # "1" is a prefix of both "1" and "10": it counts for the exact match only
    assert option_probs_from_top({"1": -0.1}, ["1", "10"]) == {"1": 1.0, "10": 0.0}


def test_make_backend_reads_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = BackendConfig(kind="openai", base_url="http://127.0.0.1:1/v1", api_key_env="MANYWAYS_TEST_KEY")
    with pytest.raises(ValueError, match="MANYWAYS_TEST_KEY"):
        make_backend(cfg, "m")
    monkeypatch.setenv("MANYWAYS_TEST_KEY", "secret")
    backend = make_backend(cfg, "m")
    assert isinstance(backend, OpenAIBackend) and backend.api_key == "secret"


@pytest.mark.slow
def test_client_over_served_hf_equals_hf(tiny_model_dir: Path) -> None:
    from manyways.backends.hf import HFBackend
    from manyways.models import load_model_and_tokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32", device="cpu")
    hf = HFBackend(model, tokenizer, model_id="tiny", batch_size=8)
    requests = _requests(seeds=(4, 5), max_new_tokens=6, temperature=1.0)[:3]
    direct = hf.generate(requests)
    with serving(hf) as url:
        got = _client(url, concurrency=3).generate(requests)
    assert [[s.text for s in r] for r in got] == [[s.text for s in r] for r in direct]
    assert [[s.prompt_tokens for s in r] for r in got] == [[s.prompt_tokens for s in r] for r in direct]


def test_the_schema_travels_as_response_format_and_serve_reads_it() -> None:
    from manyways.composition import judge_schema
    from manyways.serve import BadRequest, request_from_body

    schema = judge_schema(["decompose", "carry_out"])
    client = _client("http://127.0.0.1:9/v1")
    payload = client._payload(
        GenRequest("r", [{"role": "user", "content": "q"}], (1,), json_schema=schema), 1
    )
    assert payload["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema},
    }
    assert "response_format" not in client._payload(
        GenRequest("r", [{"role": "user", "content": "q"}], (1,)), 1
    )
    served = request_from_body({"messages": [{"role": "user", "content": "q"}], **payload})
    assert served.json_schema == schema
    assert request_from_body({"messages": [{"role": "user", "content": "q"}]}).json_schema is None
    with pytest.raises(BadRequest, match="response_format"):
        request_from_body(
            {"messages": [{"role": "user", "content": "q"}], "response_format": {"type": "json_object"}}
        )


@pytest.mark.slow
def test_served_hf_answers_in_the_schema(tiny_model_dir: Path) -> None:
    from manyways.composition import judge_schema, parse_labels

    torch.set_num_threads(1)
    served = make_backend(BackendConfig(kind="hf", dtype="float32", threads=1), str(tiny_model_dir))
    ids = ["decompose", "carry_out", "restate"]
    try:
        with serving(served) as url:
            out = _client(url).generate(
                [
                    GenRequest(
                        "j",
                        [{"role": "user", "content": "label"}],
                        (1, 2),
                        40,
                        1.0,
                        json_schema=judge_schema(ids),
                    )
                ]
            )
    finally:
        served.close()
    assert all(parse_labels(s.text, ids).ok for s in out[0]), [s.text for s in out[0]]
