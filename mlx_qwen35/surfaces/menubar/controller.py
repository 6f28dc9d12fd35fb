"""The menu-bar app's logic, platform-neutral so tests drive it on Linux: models, server, status.

``app/menubar.py`` (rumps) only draws menus and calls this.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import webbrowser

from ...errors import Qwen35Error
from ...weights.local_models import ModelEntry


class AppController:
    """Starts and stops ``mlx-qwen35 serve`` for the chosen model and reads its status."""

    def __init__(self, port: int = 8080, host: str = "127.0.0.1"):
        self.port, self.host = port, host
        self.model: ModelEntry | None = None
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def choose(self, model: ModelEntry) -> None:
        """Use ``model``; a running server restarts with it."""
        self.model = model
        if self.running:
            self.stop()
            self.start()

    def start(self, timeout: float = 120.0) -> None:
        """Start the server in a subprocess and wait until it answers /health."""
        if self.model is None:
            raise Qwen35Error("no model chosen; pick one from the Model menu")
        if self.running:
            return
        command = [
            sys.executable,
            "-m",
            "mlx_qwen35",
            "serve",
            "--model",
            str(self.model.path),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while self.health() is None:
            if not self.running:
                raise Qwen35Error(
                    f"the server for {self.model.name} exited (code {self._process.returncode}); run 'mlx-qwen35 serve --model {self.model.path}' to see why"
                )
            if time.time() > deadline:
                self.stop()
                raise Qwen35Error(f"the server did not answer on {self.url} within {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (if running)."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def health(self) -> dict | None:
        """The server's /health answer, or None when it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                return json.load(response)
        except OSError:
            return None

    def status(self) -> str:
        """One line for the menu: model, state, speed and memory of the last generation."""
        if not self.running:
            return f"Stopped · {self.model.name if self.model else 'no model'}"
        health = self.health() or {}
        parts = [f"Running · {self.model.name}"]
        if "generation_tps" in health:
            parts.append(f"{health['generation_tps']:.1f} tok/s")
        if "peak_memory_gb" in health:
            parts.append(f"{health['peak_memory_gb']:.1f} GB")
        return " · ".join(parts)

    def open_chat(self) -> None:
        """Open the chat page: a native pywebview window if installed, else the browser."""
        try:
            import webview
        except ImportError:
            webbrowser.open(self.url)
            return
        webview.create_window("mlx-qwen35", self.url)
        webview.start()
