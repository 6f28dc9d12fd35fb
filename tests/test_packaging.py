"""The package as users get it: a built wheel carries the Metal kernels and the demo model, and the CLI starts without MLX."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_cli_help_does_not_import_mlx():
    code = "import sys, mlx_qwen35.surfaces.cli; assert 'mlx.core' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    result = subprocess.run([sys.executable, "-m", "mlx_qwen35", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert" in result.stdout and "generate" in result.stdout


def test_wheel_carries_metal_kernels_and_finds_them_installed(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("mlx_qwen35-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(p.name for p in (REPO / "metal_kernels").glob("*.metal"))
    assert sources, "metal_kernels/ has no kernels"
    assert (
        sorted(n.split("/")[-1] for n in names if n.startswith("mlx_qwen35/metal_kernels/") and n.endswith(".metal"))
        == sources
    )
    # The demo model's weights, tokenizer and configs travel in the wheel (`demo` converts them from there).
    shipped = sorted(p.name for p in (REPO / "mlx_qwen35" / "surfaces" / "demo_model").iterdir())
    assert "model.safetensors.index.json" in shipped
    prefix = "mlx_qwen35/surfaces/demo_model/"
    assert sorted(n.removeprefix(prefix) for n in names if n.startswith(prefix)) == shipped

    # Installed (not a source checkout): the package must read its kernels from inside itself.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    names = [Path(s).stem for s in sources]
    code = (
        "import mlx_qwen35.kernels.metal_source as m, pathlib; "
        f"paths = [m.kernel_path(n) for n in {names!r}]; "
        f"assert all(p.resolve().is_relative_to(pathlib.Path({str(target)!r}).resolve()) for p in paths), paths; "
        "print(sorted(p.name for p in paths))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target)}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sources)
