"""The OpenAI-compatible server over real HTTP (uvicorn on a free port) against the tiny MoE model.

Scripted generations (a stand-in ``generate``) pin what the model "writes" where random weights
cannot (thinking, tool calls); everything else runs the real model.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from checkpoints import convert_tiny
from hypothesis import HealthCheck, given, settings
from mlx_lm.generate import GenerationResponse
from schemathesis.checks import not_a_server_error

from mlx_qwen35 import load
from mlx_qwen35.surfaces.server.routes import ServerSettings, create_app
from mlx_qwen35.surfaces.server.worker import GenerationWorker

MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """uvicorn serving ``create_app`` in a thread; ``url`` is its base address."""

    def __init__(self, worker: GenerationWorker, settings: ServerSettings):
        worker.start()
        self.worker = worker
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(worker, settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.worker.stop()


@pytest.fixture(scope="module")
def model_dir(tiny_moe_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("server") / "tiny-moe"
    convert_tiny(tiny_moe_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    """The model in this process: references for the served answers, and the processor of scripted servers."""
    return load(str(model_dir))


class ServerProcess:
    """``mlx-qwen35 serve`` in a subprocess: the real model path, with MLX alone in its own process."""

    def __init__(self, model_dir, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "mlx_qwen35",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
            *args,
        ]
        self.log = Path(model_dir).parent / f"serve-{self.port}.log"  # read it when a request fails with 500
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        deadline = time.time() + 60
        while True:
            assert self.process.poll() is None, self.log.read_text()
            assert time.time() < deadline, "server did not start"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(model_dir):
    running = ServerProcess(model_dir, "--max-tokens", str(MAX_TOKENS))
    yield running
    running.close()


def scripted(text: str, delay: float = 0.0):
    """A stand-in for ``stream_generate`` that writes ``text`` one character per token."""

    def generate(model, processor, prompt, **options):
        for n, char in enumerate(text, 1):
            time.sleep(delay)
            yield GenerationResponse(
                text=char,
                token=0,
                logprobs=None,
                from_draft=False,
                prompt_tokens=len(prompt),
                prompt_tps=1.0,
                generation_tokens=n,
                generation_tps=1.0,
                peak_memory=0.0,
                finish_reason="stop" if n == len(text) else None,
            )

    return generate


def scripted_server(loaded, text: str, delay: float = 0.0, **settings) -> RunningServer:
    worker = GenerationWorker(lambda: loaded, generate=scripted(text, delay))
    return RunningServer(worker, ServerSettings(model_id="scripted", **settings))


def chat(url: str, **body) -> httpx.Response:
    body.setdefault("messages", [{"role": "user", "content": "Hello"}])
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def sse_chunks(response: httpx.Response) -> list:
    lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_models_and_health(server):
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "tiny-moe"
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-moe"


def test_chat_non_streaming_is_the_models_greedy_reply(server, loaded):
    from mlx_qwen35 import generate

    reply = chat(server.url, temperature=0, max_tokens=6).json()
    assert "choices" in reply, reply
    model, processor = loaded
    expected = generate(model, processor, [{"role": "user", "content": "Hello"}], max_tokens=6, temp=0.0)
    choice = reply["choices"][0]
    # Thinking is on: everything the tiny model writes before any </think> is reasoning.
    assert (choice["message"]["reasoning_content"] or "") + (choice["message"]["content"] or "") == expected.strip()
    assert choice["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 6
    assert reply["usage"]["prompt_tokens"] > 5 and "cached_tokens" in reply["usage"]["prompt_tokens_details"]


def test_chat_streaming_equals_non_streaming(server):
    whole = chat(server.url, temperature=0, max_tokens=6, chat_template_kwargs={"enable_thinking": False}).json()
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        timeout=60,
        json={
            "messages": [{"role": "user", "content": "Hello"}],
            "temperature": 0,
            "max_tokens": 6,
            "stream": True,
            "chat_template_kwargs": {"enable_thinking": False},
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(response)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert whole["choices"][0]["message"]["reasoning_content"] is None
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_text_completion(server, loaded):
    from mlx_qwen35 import generate

    reply = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "Once upon", "max_tokens": 5, "temperature": 0}
    ).json()
    model, processor = loaded
    assert reply["choices"][0]["text"] == generate(model, processor, "Once upon", max_tokens=5, temp=0.0)


def test_max_tokens_is_capped_by_the_server(server):
    assert chat(server.url, max_tokens=10_000).json()["usage"]["completion_tokens"] <= MAX_TOKENS


def test_twenty_concurrent_requests_each_get_their_own_answer(server):
    prompts = [f"Count to {i}" for i in range(20)]
    expected = {}
    for p in prompts[:3]:  # sequential references for a few; all must agree with their own prompt
        expected[p] = chat(server.url, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=4).json()
    with ThreadPoolExecutor(20) as pool:
        replies = list(
            pool.map(
                lambda p: chat(server.url, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=4),
                prompts,
            )
        )
    assert all(r.status_code == 200 for r in replies)
    for p, r in zip(prompts, replies):
        assert r.json()["usage"]["completion_tokens"] == 4
        if p in expected:
            assert r.json()["choices"][0]["message"] == expected[p]["choices"][0]["message"]


def test_a_growing_chat_reuses_the_cache_and_answers_as_a_fresh_prefill(server, loaded):
    """OpenAI clients resend the whole history: the next request prefills only what follows the last prompt's reply start."""
    from mlx_qwen35 import generate

    model, processor = loaded
    options = dict(temperature=0, presence_penalty=1.5, max_tokens=4, chat_template_kwargs={"enable_thinking": False})
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    answer = chat(server.url, messages=first, **options).json()["choices"][0]["message"]["content"]
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And another?"}]
    reply = chat(server.url, messages=second, **options).json()

    ids, header = processor(first, enable_thinking=False).input_ids, processor.encode("<|im_start|>assistant\n")
    reply_start = max(i for i in range(len(ids)) if ids[i : i + len(header)] == header) + len(header)
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == reply_start > 0
    assert reply["usage"]["prompt_tokens"] == len(processor(second, enable_thinking=False).input_ids)
    # The penalty looks back over the cached history too, as it does over a fresh prompt.
    expected = generate(model, processor, second, max_tokens=4, temp=0.0, presence_penalty=1.5, enable_thinking=False)
    assert reply["choices"][0]["message"]["content"] == expected.strip()

    unrelated = [{"role": "user", "content": "Tell me about rivers."}]
    reply = chat(server.url, messages=unrelated, **options).json()
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    expected = generate(
        model, processor, unrelated, max_tokens=4, temp=0.0, presence_penalty=1.5, enable_thinking=False
    )
    assert reply["choices"][0]["message"]["content"] == expected.strip()


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"messages": []}), "messages"),
        (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), "role"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}), "temperature"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}), "n"),
        (json.dumps({"messages": [{"role": "system", "content": "only a system prompt"}]}), "No user query"),
        (
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
                        }
                    ]
                }
            ),
            "remote image URLs",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                        }
                    ]
                }
            ),
            "readable image",
        ),
        (
            json.dumps(
                {
                    "messages": [{"role": "user", "content": "hi"}],
                    "tools": [{"type": "function", "function": {"name": "f"}}],
                    "tool_choice": {"type": "function", "function": {"name": "g"}},
                }
            ),
            "tool_choice",
        ),
    ],
)
def test_bad_requests_get_400_with_a_message(server, body, fragment):
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


def test_image_parts_reach_the_processor(loaded, tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(path)
    png = base64.b64encode(path.read_bytes()).decode()
    _, processor = loaded
    seen = []

    def fake_call(messages, **kwargs):
        seen.append(messages)
        raise ValueError("stop here")  # the processor's answer is not this test's business

    original = type(processor).__dict__.get("__call__")
    type(processor).__call__ = lambda self, *a, **k: fake_call(*a, **k)
    running = scripted_server(loaded, "unused")
    try:
        content = [
            {"type": "text", "text": "What colour?"},
            {"type": "image_url", "image_url": {"url": str(path)}},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        ]
        assert chat(running.url, messages=[{"role": "user", "content": content}]).status_code == 400
    finally:
        running.close()
        if original is None:
            del type(processor).__call__
        else:
            type(processor).__call__ = original
    parts = seen[0][0]["content"]
    assert parts[0] == {"type": "text", "text": "What colour?"}
    assert parts[1] == {"type": "image", "image": str(path)}
    assert parts[2]["type"] == "image" and parts[2]["image"].size == (32, 32)


def test_thinking_goes_to_reasoning_content_and_tool_calls_are_parsed(loaded):
    text = (
        "Let me look it up.\n</think>\n\nChecking.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    running = scripted_server(loaded, text)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                },
            },
        }
    ]
    try:
        reply = chat(running.url, tools=tools).json()
        with httpx.stream(
            "POST",
            f"{running.url}/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "Weather?"}], "tools": tools, "stream": True},
        ) as response:
            chunks = sse_chunks(response)
    finally:
        running.close()
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"] == "Let me look it up."
    assert message["content"] == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Paris", "days": 3})
    ]
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Let me look it up."
    streamed_calls = [call for d in deltas for call in d.get("tool_calls") or []]
    assert [c["function"]["name"] for c in streamed_calls] == ["get_weather"] and streamed_calls[0]["index"] == 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_cancelled_stream_frees_the_model(loaded):
    running = scripted_server(loaded, "x" * 2000, delay=0.01)  # 20 s if nobody stops it
    try:
        with httpx.stream(
            "POST",
            f"{running.url}/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "Go"}], "stream": True},
        ) as response:
            for line in response.iter_lines():
                if '"x"' in line:  # the first generated token (as reasoning: thinking is on)
                    break  # leaving the block closes the connection mid-stream
        started = time.perf_counter()
        deadline = started + 5
        while running.worker.busy and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert not running.worker.busy, "the worker kept generating for a client that left"
        assert time.perf_counter() - started < 2
    finally:
        running.close()


def test_api_key_is_required_when_set(loaded):
    running = scripted_server(loaded, "ok", api_key="sesame")
    try:
        assert httpx.get(f"{running.url}/v1/models").status_code == 401
        assert httpx.get(f"{running.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{running.url}/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert httpx.get(f"{running.url}/health").status_code == 200
    finally:
        running.close()


def test_official_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny-moe"]
    reply = client.chat.completions.create(
        model="tiny-moe", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model="tiny-moe", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    text = client.completions.create(model="tiny-moe", prompt="Hello", max_tokens=3, temperature=0)
    assert text.usage.completion_tokens == 3


def test_page_is_served(server):
    response = httpx.get(f"{server.url}/")
    assert response.status_code == 200 and "mlx-qwen35" in response.text


def test_openapi_schema_fuzzed_without_server_errors(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        def no_server_error(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        no_server_error()
