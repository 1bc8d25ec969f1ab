"""The openai back-end keeps a reasoning server's chain of thought (vLLM's ``reasoning`` /
``reasoning_content`` fields, served here by a stand-in with vLLM's answer shape)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from manyways.backends import GenRequest
from manyways.backends.fake import FakeBackend
from manyways.backends.openai import OpenAIBackend, sample_from_answer
from manyways.backends.protocol import GenSample
from manyways.serve import make_server


def _answer(message: dict[str, Any], finish: str) -> dict[str, Any]:
    # vLLM's ChatCompletionResponse (vllm/entrypoints/openai/protocol.py): the reasoning parser
    # puts the chain of thought in message.reasoning (reasoning_content before vLLM PR #27752, still used by SGLang and DeepSeek).
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 50, "total_tokens": 57},
    }


@contextmanager
def canned_server(answer: dict[str, Any]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _one(url: str) -> GenSample:
    request = GenRequest("r", [{"role": "user", "content": "2+2?"}], seeds=(0,))
    return OpenAIBackend(url, "m", backoff_s=0.01).generate([request])[0][0]


def test_reasoning_is_kept_apart_from_the_answer() -> None:
    answer = _answer({"content": "\\boxed{4}", "reasoning": "2 and 2 make 4."}, "stop")
    with canned_server(answer) as url:
        sample = _one(url)
    assert (sample.text, sample.reasoning, sample.finish_reason) == ("\\boxed{4}", "2 and 2 make 4.", "stop")
    assert (sample.prompt_tokens, sample.completion_tokens) == (7, 50)


def test_answer_cut_while_reasoning_is_the_reasoning_not_empty() -> None:
    for key in ("reasoning", "reasoning_content"):
        answer = _answer({"content": None, key: "Let me think: 2 and 2 ma"}, "length")
        with canned_server(answer) as url:
            sample = _one(url)
        assert sample.text == sample.reasoning == "Let me think: 2 and 2 ma"
        assert sample.finish_reason == "length"


def test_plain_answer_has_no_reasoning() -> None:
    sample = sample_from_answer(_answer({"content": "4"}, "stop"))
    assert (sample.text, sample.reasoning) == ("4", "")
    assert sample_from_answer(_answer({"content": None}, "length")).text == ""


def test_decode_error_survives_a_trip_through_manyways_serve() -> None:
    fake = FakeBackend({"What is 1 plus 1?": "2"}, decode_error_rate=1.0)
    request = GenRequest("r", [{"role": "user", "content": "What is 1 plus 1?"}], seeds=(3,))
    server = make_server(fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        got = OpenAIBackend(url, "m", backoff_s=0.01).generate([request])[0][0]
    finally:
        server.shutdown()
        server.server_close()
    assert got == FakeBackend({"What is 1 plus 1?": "2"}, decode_error_rate=1.0).generate([request])[0][0]
    assert got.finish_reason == "decode_error"
