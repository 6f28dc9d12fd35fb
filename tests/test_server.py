"""The OpenAI-compatible server over real HTTP (uvicorn on a free port) against the tiny MoE model.

Scripted generations (a stand-in ``generate``) pin what the model "writes" where random weights
cannot (thinking, tool calls); everything else runs the real model.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
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
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.runtime.prefill import PrefillCancelled
from mlx_qwen35.runtime.settings import GenerationSettings, Sampling
from mlx_qwen35.surfaces.server.guard import exposure_warning, host_allowed
from mlx_qwen35.surfaces.server.protocol import ApiError, image_source
from mlx_qwen35.surfaces.server.routes import ServerSettings, create_app, serve
from mlx_qwen35.surfaces.server.worker import Finished, GenerationJob, GenerationWorker, Started, Token

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

    def __init__(self, model_dir, *args: str, env: dict | None = None, log_dir=None, start_timeout: float = 60):
        """``model_dir`` None: serve's zero-config default; then ``log_dir`` holds the log."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model = [] if model_dir is None else ["--model", str(model_dir)]
        command = [sys.executable, "-m", "mlx_qwen35", "serve", *model, "--port", str(self.port), *args]
        log_dir = Path(log_dir) if model_dir is None else Path(model_dir).parent
        self.log = log_dir / f"serve-{self.port}.log"  # read it when a request fails with 500
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log.open("w"), env=env)
        deadline = time.time() + start_timeout
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


def scripted(text: str, delay: float = 0.0, finish: str = "stop"):
    """A stand-in for ``stream_generate`` that writes ``text`` one character per token, ending with ``finish``."""

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
                finish_reason=finish if n == len(text) else None,
            )

    return generate


def scripted_server(
    loaded, text: str, delay: float = 0.0, max_prompt_tokens: int | None = None, **settings
) -> RunningServer:
    worker = GenerationWorker(lambda: loaded, generate=scripted(text, delay), max_prompt_tokens=max_prompt_tokens)
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
            "not an image pillow can read",
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


@pytest.mark.parametrize(
    "path, body, where",
    [
        ("completions", {"prompt": "a\ud800b"}, "prompt"),
        ("completions", {"prompt": "hi", "stop": ["\udfff"]}, "stop.0"),
        ("chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        (
            "chat/completions",
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{"function": {"name": "\ud800", "arguments": "{"}}],
                    },
                    {"role": "user", "content": "y"},
                ]
            },
            "messages.0.tool_calls.0.function.name",
        ),
    ],
)
def test_lone_surrogates_get_400_naming_the_field(server, path, body, where):
    """JSON can escape half a UTF-16 pair; the tokenizer cannot take it and UTF-8 cannot send it back (once a 500)."""
    response = httpx.post(
        f"{server.url}/v1/{path}", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == where
    assert response.json()["error"]["message"].startswith(f"{where}: ") and "lone surrogate" in response.text


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
    running = scripted_server(loaded, "unused", allow_local_images=tmp_path)
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
    assert parts[1]["type"] == "image" and parts[1]["image"].size == (32, 32)
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


KEYED_ROUTES = ["/", "/index.html", "/chat.js", "/docs", "/redoc", "/openapi.json", "/v1/models"]


def test_api_key_guards_every_route_but_a_bare_liveness_probe(loaded):
    running = scripted_server(loaded, "ok", api_key="sesame")
    try:
        for path in KEYED_ROUTES:
            refused = httpx.get(f"{running.url}{path}")
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Basic"), path  # browsers ask for the key
            assert httpx.get(f"{running.url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(f"{running.url}{path}", headers={"Authorization": "Bearer sesame"}).status_code == 200
            assert httpx.get(f"{running.url}{path}", auth=("anyone", "sesame")).status_code == 200, path
            assert httpx.get(f"{running.url}{path}", auth=("sesame", "wrong")).status_code == 401, path
        assert chat(running.url).status_code == 401
        assert httpx.get(f"{running.url}/health").json() == {"status": "ok"}  # alive, and nothing more
        health = httpx.get(f"{running.url}/health", headers={"Authorization": "Bearer sesame"}).json()
        assert health["model"] == "scripted" and "queued" in health
    finally:
        running.close()


@pytest.mark.parametrize(
    "option, error",
    [
        (dict(api_key=" "), "--api-key is empty; give a key, or leave the option out to serve without one"),
        (dict(max_body_mb=float("nan")), "--max-body-mb must be a positive number of megabytes, got nan"),
        (dict(max_prompt_tokens=0), "--max-prompt-tokens must be at least 1, got 0"),
        (dict(allow_local_images=Path("/nowhere")), "--allow-local-images /nowhere: not a directory; give one"),
    ],
)
def test_bad_server_options_are_errors_before_the_model_loads(tmp_path, option, error):
    with pytest.raises(Qwen35Error) as refused:
        serve(str(tmp_path / "nowhere"), **option)  # the model does not exist: the options are checked first
    assert str(refused.value) == error


def test_an_empty_api_key_on_the_command_line_is_a_one_line_error(tmp_path):
    command = [sys.executable, "-m", "mlx_qwen35", "serve", "--model", str(tmp_path / "nowhere"), "--api-key", ""]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "error: --api-key is empty; give a key, or leave the option out to serve without one"
    ]


def test_requests_naming_a_foreign_host_are_refused(loaded):
    """DNS rebinding: a page on evil.example points its name at 127.0.0.1; the browser then sends Host: evil.example."""
    running = scripted_server(loaded, "ok", host="127.0.0.1")
    try:
        for host in ("evil.example", f"evil.example:{running.port}", "127.0.0.1.evil.example", "localhost.evil"):
            response = httpx.get(f"{running.url}/v1/models", headers={"Host": host})
            assert response.status_code == 403 and "not this server's address" in response.json()["error"]["message"]
        for host in (f"127.0.0.1:{running.port}", f"localhost:{running.port}", "LOCALHOST", "[::1]:80", "10.0.0.7"):
            assert httpx.get(f"{running.url}/v1/models", headers={"Host": host}).status_code == 200, host
        assert chat(running.url).status_code == 200
    finally:
        running.close()
    assert host_allowed("studio.local:8080", "studio.local") and not host_allowed("studio.local", "0.0.0.0")


def test_binding_beyond_localhost_without_a_key_warns():
    for host in ("0.0.0.0", "::", "192.168.1.20", "studio.local"):
        assert "without --api-key" in exposure_warning(host, None), host
        assert exposure_warning(host, "sesame") is None
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host, None) is None, host


def test_request_bodies_beyond_the_limit_get_413(loaded):
    assert ServerSettings(model_id="m").max_body_bytes == 64 * 2**20
    running = scripted_server(loaded, "ok", max_body_bytes=4096)
    padding = {"role": "user", "content": "x" * 5000}
    try:
        whole = httpx.post(f"{running.url}/v1/chat/completions", json={"messages": [padding]})
        assert whole.status_code == 413 and "limit of 0.00390625 MB" in whole.json()["error"]["message"]
        body = json.dumps({"messages": [padding]}).encode()
        chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))  # no Content-Length: counted as read
        streamed = httpx.post(
            f"{running.url}/v1/chat/completions", content=chunks, headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413 and "limit" in streamed.json()["error"]["message"]
        assert chat(running.url).status_code == 200
    finally:
        running.close()


def test_prompts_beyond_the_context_or_the_servers_limit_get_400(server, loaded):
    model, processor = loaded
    context = model.config.text.max_position_embeddings
    prompt = "Once upon a time " * (context // 4)
    length = len(processor.encode(prompt))
    assert length > context
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        f"the prompt is {length} tokens, more than the {context} of the model's context; shorten it"
    )
    running = scripted_server(loaded, "ok", max_prompt_tokens=5)
    try:
        response = chat(running.url)
        assert response.status_code == 400 and "more than the 5 of the server's --max-prompt-tokens" in response.text
    finally:
        running.close()


def test_top_k_beyond_the_vocabulary_keeps_every_token_and_leaves_sampling_working(server):
    """mlx-lm's compiled top-k raised mid-trace on it, leaving mx.random.state broken for every later request."""
    for top_k in (10_000, 20):
        response = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "Once upon", "max_tokens": 3, "temperature": 1.0, "top_k": top_k},
            timeout=60,
        )
        assert response.status_code == 200, response.text


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming ``width`` × ``height`` pixels (pillow refuses it at open, before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def image_chat(url: str, image_url: str) -> httpx.Response:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "What is it?"}]
    return chat(url, messages=[{"role": "user", "content": content}])


def test_a_decompression_bomb_is_a_400_naming_it(server):
    bomb = base64.b64encode(bomb_png(20000, 20000)).decode()
    response = image_chat(server.url, f"data:image/png;base64,{bomb}")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "too large to decode safely" in error["message"] and "400000000 pixels" in error["message"]
    assert error["param"] == "image_url"


def refusal(url: str, root: Path | None) -> str:
    """The message ``image_source`` refuses ``url`` with, the URL itself blanked out."""
    with pytest.raises(ApiError) as refused:
        image_source(url, root)
    assert refused.value.status == 400 and refused.value.param == "image_url"
    return refused.value.message.replace(repr(url[:200]), "URL")


def test_local_image_files_are_off_by_default_and_say_nothing_about_the_disk(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "real.png")
    (tmp_path / "notes.txt").write_text("secret")
    urls = [
        str(tmp_path / "real.png"),
        str(tmp_path / "notes.txt"),
        str(tmp_path / "missing.png"),
        f"file://{tmp_path / 'real.png'}",
        "/proc/self/environ",
        "~/.bashrc",
        "../../etc/passwd",
        "real.png",
        "\ud800.png",
        "a\x00b",
    ]
    messages = {refusal(url, None) for url in urls}
    assert messages == {
        "local image files are off (URL); send the image as a data: URL, or start the server with --allow-local-images DIR"
    }
    assert "remote image URLs are not fetched" in refusal("https://example.com/a.png", None)
    assert "remote image URLs are not fetched" in refusal("ftp://example.com/a.png", None)


def test_allowed_local_images_come_only_from_inside_the_directory_after_symlinks(tmp_path):
    from PIL import Image

    root, outside = tmp_path / "allowed", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (8, 6), "red").save(root / "in.png")
    Image.new("RGB", (4, 2), "blue").save(root / "sub" / "deep.png")
    Image.new("RGB", (8, 8), "green").save(outside / "secret.png")
    (root / "notes.txt").write_text("not an image")
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "escape_dir").symlink_to(outside)
    (root / "inner.png").symlink_to(root / "in.png")
    (tmp_path / "root_link").symlink_to(root)
    settings = ServerSettings(model_id="m", allow_local_images=tmp_path / "root_link")
    allowed = settings.allow_local_images

    for url, size in [
        ("in.png", (8, 6)),
        ("sub/deep.png", (4, 2)),
        ("inner.png", (8, 6)),  # a symlink that stays inside
        (str(root / "in.png"), (8, 6)),
        (str(tmp_path / "root_link" / "in.png"), (8, 6)),  # the directory as given on the command line
        (f"file://{root / 'sub' / 'deep.png'}", (4, 2)),
        (f"file://localhost{root / 'in.png'}".replace(".png", "%2Epng"), (8, 6)),
    ]:
        assert image_source(url, allowed).size == size, url
    assert "not an image pillow can read" in image_source_error("notes.txt", allowed)

    refused = [
        str(outside / "secret.png"),  # exists, outside
        str(outside / "missing.png"),  # does not exist, outside
        "escape.png",  # a symlink out
        "escape_dir/secret.png",
        "escape_dir/missing.png",
        "../outside/secret.png",
        "sub/../in.png",  # '..' is refused even when it would land inside
        f"{root}/../outside/secret.png",
        f"file://{outside / 'secret.png'}",
        f"file://otherhost{root / 'in.png'}",
        "missing.png",
        "sub",  # a directory
        "/proc/self/environ",
        "~/in.png",
        "in.png\x00",
    ]
    assert {refusal(url, allowed) for url in refused} == {
        "image_url URL is not an image file inside the directory the server allows; give a path relative to it "
        "(or absolute, or a file:// URL) without '..', or send a data: URL"
    }
    with pytest.raises(Qwen35Error, match="not a directory"):
        ServerSettings(model_id="m", allow_local_images=root / "in.png")


def image_source_error(url: str, root: Path) -> str:
    with pytest.raises(ApiError) as refused:
        image_source(url, root)
    return refused.value.message


def test_page_responses_forbid_inline_script_and_remote_loads(server):
    from html.parser import HTMLParser

    response = httpx.get(f"{server.url}/")
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'" and policy["img-src"] == "'self' data:"
    assert "unsafe" not in response.headers["content-security-policy"]

    class InlineScript(HTMLParser):
        found: list = []

        def handle_starttag(self, tag, attrs):
            self.found += [name for name, _ in attrs if name.startswith("on")]
            self.found += ["inline <script>"] if tag == "script" and "src" not in dict(attrs) else []

    parser = InlineScript()
    parser.feed(response.text)
    assert parser.found == []  # the policy would block them: the page must not need them


def test_a_client_leaving_during_prefill_frees_the_worker(loaded):
    def slow_prefill(model, processor, prompt, should_stop=lambda: False, **options):
        for _ in range(2000):  # 20 s of "prefill" unless stopped
            if should_stop():
                raise PrefillCancelled("stopped")
            time.sleep(0.01)
        yield from scripted("late")(model, processor, prompt)

    worker = GenerationWorker(lambda: loaded, generate=slow_prefill)
    running = RunningServer(worker, ServerSettings(model_id="scripted"))
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{running.url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Go"}]},
                timeout=0.5,
            )
        deadline = time.time() + 10
        while running.worker.busy and time.time() < deadline:
            time.sleep(0.01)
        assert not running.worker.busy, "the worker kept prefilling for a client that left"
    finally:
        running.close()


class CancelDuringPrefill:
    """The model (loaded on the worker's thread), setting a job's ``cancelled`` during its ``at``-th forward pass."""

    def __init__(self, model_dir: Path, at: int):
        self.model_dir, self.at, self.calls, self.job = model_dir, at, 0, None

    def load(self):
        self._model, processor = load(str(self.model_dir))
        return self, processor

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.job is not None and self.calls == self.at:
            self.job.cancelled.set()
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.mark.parametrize("chat_prompt", [True, False], ids=["chat", "raw"])
def test_a_cancelled_prefill_stops_at_the_next_chunk_and_the_cache_stays_sound(model_dir, loaded, chat_prompt):
    """A chat prompt is prefilled by the ConversationCache up to the reply start, a raw one by stream_generate."""
    from mlx_qwen35 import generate

    model, processor = loaded
    counting = CancelDuringPrefill(model_dir, at=2)
    worker = GenerationWorker(counting.load)
    worker.start()
    text = "Once upon a time there was a river. " * 12
    prompt = [{"role": "user", "content": text}] if chat_prompt else text
    options = dict(max_tokens=4, temp=0.0, prefill_step_size=16, enable_thinking=False)
    settings = GenerationSettings(
        sampling=Sampling(temp=0.0), max_tokens=4, prefill_step_size=16, enable_thinking=False
    )  # the same, as the worker takes them
    assert len(processor.encode(text)) >= 10 * 16
    events: queue.Queue = queue.Queue()

    def run(prompt) -> list:
        job = GenerationJob(prompt=prompt, settings=settings, emit=events.put)
        counting.job, counting.calls = job, 0
        worker.submit(job)
        received = []
        while not isinstance(event := events.get(timeout=120), Finished):
            received.append(event)
        counting.job = None
        return received

    try:
        counting.at = 2
        received = run(prompt)
        assert not [e for e in received if not isinstance(e, Started)]  # no token, no failure
        assert counting.calls == 2  # the chunk in flight finished; the next one never ran
        counting.at = 0
        for again in (prompt, [{"role": "user", "content": "Hello there"}]):  # as from a fresh cache
            answer = "".join(e.text for e in run(again) if isinstance(e, Token))
            assert answer == generate(model, processor, again, **options)
    finally:
        worker.stop()


def test_page_is_served(server):
    response = httpx.get(f"{server.url}/")
    assert response.status_code == 200 and "mlx-qwen35" in response.text


FUZZ_EXAMPLES = int(os.environ.get("MLX_QWEN35_FUZZ_EXAMPLES", "12"))  # per operation; bounded for CI


def test_openapi_schema_fuzzed_without_server_errors(server):
    """Schema-generated requests (derandomised) get no 5xx, and the server answers as before afterwards."""

    def greedy() -> tuple[str, str]:
        text = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "Once upon", "max_tokens": 6, "temperature": 0}
        )
        reply = chat(server.url, temperature=0, max_tokens=6, chat_template_kwargs={"enable_thinking": False})
        return text.json()["choices"][0]["text"], reply.json()["choices"][0]["message"]["content"]

    before = greedy()
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def no_server_error(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        no_server_error()
    assert greedy() == before


GOOD_CALL = "<tool_call>\n<function=f>\n</function>\n</tool_call>"
BAD_CALL = "<tool_call>\n{not xml}\n</tool_call>"


@pytest.mark.parametrize(
    "reply, answer",
    [
        (f"Hm.\n</think>\n\nFirst.\n\n{GOOD_CALL}\nThen more.", "First.\n\nThen more."),
        (f"Hm.\n</think>\n\nFirst.\n\n{BAD_CALL}\nThen more.", f"First.\n\n{BAD_CALL}\n\nThen more."),
        (f"Hm.\n</think>\n\n{BAD_CALL}", BAD_CALL),
    ],
    ids=["call-between-texts", "malformed-call-between-texts", "malformed-call-alone"],
)
def test_the_server_answers_what_the_conversation_keeps(reply, answer):
    """One rule for a malformed call (it stays as text, where it was) in the API's reply and in a chat's history."""
    from mlx_qwen35.processing.output import OutputParser
    from mlx_qwen35.runtime.conversation import assistant_message
    from mlx_qwen35.surfaces.server.routes import ChatReply

    served = ChatReply(thinking=True, tools=None)
    deltas = [d for i in range(0, len(reply), 5) for d in served.feed(reply[i : i + 5])] + served.finish()
    parser = OutputParser(thinking=True)
    parser.feed(reply)
    parser.finish()
    kept = assistant_message(parser.pieces)
    assert "".join(d.get("content", "") for d in deltas) == served.content == kept["content"] == answer
    assert served.reasoning == kept["reasoning_content"] == "Hm."


def test_the_api_reports_the_installed_packages_version(monkeypatch):
    """One source for the version: the installed metadata (pyproject.toml's), read by the package and the API alike."""
    import importlib.metadata

    import mlx_qwen35

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9" if name == "mlx-qwen35" else real(name))
    assert mlx_qwen35.__version__ == create_app(None, ServerSettings(model_id="m")).version == "9.9.9"
