"""A non-editable install serves the chat page: the wheel carries app/ and the server finds it inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_carries_the_chat_page_and_the_installed_server_finds_it(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("mlx_qwen35-*.whl")
    page_files = sorted(
        str(p.relative_to(REPO / "app" / "web")) for p in (REPO / "app" / "web").rglob("*") if p.is_file()
    )
    names = zipfile.ZipFile(wheel).namelist()
    assert (
        sorted(n.removeprefix("mlx_qwen35/app/web/") for n in names if n.startswith("mlx_qwen35/app/web/"))
        == page_files
    )
    assert "mlx_qwen35/surfaces/menubar/shell.py" in names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    code = (
        "import pathlib, mlx_qwen35.surfaces.server.routes as s; root = s.web_root(); "
        f"assert root.resolve().is_relative_to(pathlib.Path({str(target)!r}).resolve()), root; "
        "print(sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target)}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(page_files)
