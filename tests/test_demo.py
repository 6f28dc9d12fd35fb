"""``mlx-qwen35 demo``, the README's first command: builds once into the user cache, then reuses it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_server import ServerProcess

from mlx_qwen35.surfaces.demo import DEMO_SERVED_NAME, DEMO_VERSION


def run_demo(cache_home, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "XDG_STATE_HOME": str(Path(cache_home) / "state")}
    return subprocess.run(
        [sys.executable, "-m", "mlx_qwen35", "demo", "--max-tokens", "12", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One user cache for the tests that need the demo built, not how it is built."""
    return tmp_path_factory.mktemp("demo-cache")


def test_demo_builds_once_and_generates(tmp_path):
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "building the demo checkpoint" in first.stdout and "NOT Qwen's model" in first.stdout
    assert re.search(r"generation: 12 tokens, [\d.]+ tokens/s", first.stdout)
    built = sorted(p.name for p in (tmp_path / "mlx-qwen35" / "demo").iterdir())
    assert built == [f"v{DEMO_VERSION}"], built  # no staging directories left behind

    second = run_demo(tmp_path)
    assert second.returncode == 0, second.stderr
    assert "building the demo checkpoint" not in second.stdout
    # Same checkpoint and greedy decoding (stream_generate defaults to temp 0): the same text both times.
    assert (
        first.stdout.split("assistant: ", 1)[1].split("\n")[0]
        == second.stdout.split("assistant: ", 1)[1].split("\n")[0]
    )


def test_demo_says_where_its_model_is_and_models_lists_it(tmp_path):
    """The path the demo prints is one that ``generate`` accepts and ``models`` lists, with its size and fit."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path / "home")}
    demo = run_demo(tmp_path / "cache")
    assert demo.returncode == 0, demo.stderr
    [path] = re.findall(r"^The demo model is at (.+)$", demo.stdout, re.MULTILINE)
    assert path == str(tmp_path / "cache" / "mlx-qwen35" / "demo" / f"v{DEMO_VERSION}" / "mlx-4bit")
    tries = re.findall(r"^  mlx-qwen35 (chat|serve|generate) (\S+)", demo.stdout, re.MULTILINE)
    assert tries == [("chat", path), ("serve", path), ("generate", path)]

    cli = [sys.executable, "-m", "mlx_qwen35"]
    generated = subprocess.run(
        [*cli, "generate", path, "-p", "hi", "-m", "3", "--json"], capture_output=True, text=True, env=env
    )
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["generation_tokens"] == 3
    listed = subprocess.run([*cli, "models"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if line.startswith("demo")]
    size_mb = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e6
    assert re.fullmatch(
        rf"demo \(tiny, trained on Python docs\)\s+{size_mb:.1f} MB\s+4bit\s+yes\s+{re.escape(path)}", row
    ), row


def test_demo_chat_answers_the_fixed_question_then_each_typed_one(shared_cache):
    """``demo --chat``: the fixed answer, then the REPL on the same model (stdin piped: its plain reader)."""
    result = run_demo(shared_cache, "--chat", stdin="What does os.getcwd do?\n/exit\n")
    assert result.returncode == 0, result.stderr
    fixed, chat = result.stdout.split("Now ask it", 1)
    assert "assistant: " in fixed and "The demo model is at" not in result.stdout
    assert re.search(r"\d+ tokens, [\d.]+ tok/s", chat), chat  # the REPL answered the typed question


def test_serve_without_a_model_serves_the_demo(shared_cache):
    """The zero-config server (and so the chat page): no MODEL builds and serves the demo, said on stderr."""
    env = {**os.environ, "XDG_CACHE_HOME": str(shared_cache)}
    # Up to 300 s to start: it may build the demo first.
    server = ServerProcess(None, "--max-tokens", "8", env=env, log_dir=shared_cache, start_timeout=300)
    url = server.url
    try:
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [DEMO_SERVED_NAME]
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "What does shutil.rmtree do?"}], "temperature": 0},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"], reply.text
        assert "serving the demo model" in server.log.read_text()
    finally:
        server.close()
