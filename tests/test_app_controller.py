"""The menu-bar app's controller on Linux: model discovery with sizes and fit, start/stop, status."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from checkpoints import convert_tiny
from test_server import free_port

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.surfaces.menubar.controller import AppController
from mlx_qwen35.weights.local_models import find_models, quantization_label


def fake_model(path, size: int, model_type: str = "qwen3_5_moe"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (path / "model.safetensors").write_bytes(b"\0" * size)
    return path


def test_models_from_local_dirs_and_the_hub_cache_with_sizes_and_fit(tmp_path):
    local = tmp_path / "models"
    fake_model(local / "small", 1000)
    fake_model(local / "not-qwen", 10, model_type="llama")
    blob_dir = tmp_path / "hub" / "models--mlx-community--Qwen3.5-big" / "blobs"
    blob_dir.mkdir(parents=True)
    (blob_dir / "abc").write_bytes(b"\0" * 5000)
    snapshot = tmp_path / "hub" / "models--mlx-community--Qwen3.5-big" / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    (snapshot / "model.safetensors").symlink_to(blob_dir / "abc")
    models = find_models([local], hf_cache=tmp_path / "hub", memory_bytes=4000)
    assert [(m.name, m.size_bytes, m.fits) for m in models] == [
        ("mlx-community/Qwen3.5-big", 5000, False),
        ("small", 1000, True),
    ]
    assert "too large" in models[0].label and "too large" not in models[1].label


@pytest.mark.parametrize(
    "config, label",
    [
        ({"mlx_qwen35": {"recipe": "mixed-3-6"}, "quantization": {"bits": 3}}, "mixed-3-6"),  # ours: the recipe
        ({"mlx_qwen35": {"recipe": "bf16", "dtype": "float32"}}, "float32"),  # ours unquantised: the written dtype
        ({"quantization": {"group_size": 64, "bits": 4}}, "4bit"),  # mlx-lm / mlx-community
        ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),  # the block-FP8 release
        ({"text_config": {"dtype": "bfloat16"}}, "bfloat16"),
        ({}, "unknown"),
    ],
)
def test_quantization_label(config, label):
    assert quantization_label(config) == label


def test_start_status_stop(tiny_moe_checkpoint, tmp_path):

    out = tmp_path / "models" / "tiny"
    convert_tiny(tiny_moe_checkpoint, out)
    controller = AppController(port=free_port())
    with pytest.raises(Qwen35Error, match="no model"):
        controller.start()
    [controller.model] = find_models([tmp_path / "models"], hf_cache=tmp_path / "none")
    assert controller.status() == "Stopped · tiny"
    controller.start()
    try:
        assert controller.running and controller.health()["model"] == "tiny"
        httpx.post(
            f"{controller.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60
        ).raise_for_status()
        status = controller.status()
        assert status.startswith("Running · tiny") and "tok/s" in status and "GB" in status
    finally:
        controller.stop()
    assert not controller.running and controller.health() is None


def test_app_command_without_rumps_says_what_it_needs():
    result = subprocess.run([sys.executable, "-m", "mlx_qwen35", "app"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: the menu-bar app needs macOS and its extra: pip install 'mlx-qwen35[app]'"
    ]
