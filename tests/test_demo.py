"""``mlx-qwen35 demo``, the README's first command: builds once into the user cache, then reuses it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def run_demo(cache_home) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    return subprocess.run(
        [sys.executable, "-m", "mlx_qwen35", "demo", "--max-tokens", "12"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_demo_builds_once_and_generates(tmp_path):
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "building the demo checkpoint" in first.stdout and "NOT Qwen's model" in first.stdout
    assert re.search(r"generation: 12 tokens, [\d.]+ tokens/s", first.stdout)
    built = sorted(p.name for p in (tmp_path / "mlx-qwen35" / "demo").iterdir())
    assert built == ["v2"], built  # no staging directories left behind

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
    assert path == str(tmp_path / "cache" / "mlx-qwen35" / "demo" / "v2" / "mlx-4bit")
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
