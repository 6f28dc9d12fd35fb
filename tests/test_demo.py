"""``mlx-qwen35 demo``, the README's first command: builds once into the user cache, then reuses it."""

from __future__ import annotations

import os
import re
import subprocess
import sys


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
    assert "building the demo checkpoint" in first.stdout and "RANDOM" in first.stdout
    assert re.search(r"generation: 12 tokens, [\d.]+ tokens/s", first.stdout)
    built = sorted(p.name for p in (tmp_path / "mlx-qwen35" / "demo").iterdir())
    assert built == ["v1"], built  # no staging directories left behind

    second = run_demo(tmp_path)
    assert second.returncode == 0, second.stderr
    assert "building the demo checkpoint" not in second.stdout
    # Same checkpoint and greedy decoding (stream_generate defaults to temp 0): the same text both times.
    assert (
        first.stdout.split("assistant: ", 1)[1].split("\n")[0]
        == second.stdout.split("assistant: ", 1)[1].split("\n")[0]
    )
