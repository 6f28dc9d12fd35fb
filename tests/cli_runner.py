"""The console entry point run in the test's own process (a subprocess would spend seconds importing MLX again)."""

from __future__ import annotations

import sys

import pytest


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``mlx-qwen35 ARGS`` through ``main()`` → (exit code, stdout, stderr)."""
    from mlx_qwen35.surfaces.cli import main

    monkeypatch.setattr(sys, "argv", ["mlx-qwen35", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err
