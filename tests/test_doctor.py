"""``mlx-qwen35 doctor``: on this machine (no Metal) it reports the CPU paths; with --emulate every kernel's
self-check through the Metal CPU emulator; with --model the exact wired-limit command for that model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import pytest
from cli_runner import run_cli
from mlx.utils import tree_flatten
from test_kernel_self_check import CONFIG, OPERATIONS

from mlx_qwen35.config import parse_config
from mlx_qwen35.kernels import self_check, set_use_kernels
from mlx_qwen35.model.qwen35 import Qwen35Model
from mlx_qwen35.weights.memory_plan import plan


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own results file, a fixed timer (the doctor's output, not its speed, is under test), default switch."""
    monkeypatch.setattr(self_check, "cache_file", lambda: tmp_path / "kernel_checks.json")
    monkeypatch.setattr(
        self_check, "best_ms", lambda op, path, run: {"kernel": 1.0, "mlx_fast": 3.0, "pure": 2.0}[path]
    )
    self_check.forget_checks()
    yield
    self_check.forget_checks()
    set_use_kernels(None)


def doctor_json(monkeypatch, capsys, *args: str) -> dict:
    code, out, err = run_cli(monkeypatch, capsys, "doctor", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def results(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["operation"], r["path"]): r for r in report["kernels"]["self_check"]["results"]}


@pytest.mark.skipif(mx.metal.is_available(), reason="this machine has Metal")
def test_doctor_json_without_metal_reports_the_pure_paths(monkeypatch, capsys, tmp_path):
    report = doctor_json(monkeypatch, capsys)
    assert report["mlx"] == {"version": mx.__version__, "default_device": "cpu", "metal_available": False}
    assert report["system"]["memory_bytes"] > 0 and report["system"]["chip"] == self_check.device_name()
    kernels = report["kernels"]
    assert kernels["paths"] == "self-checked" and not kernels["emulated"]
    assert kernels["cache_file"] == str(tmp_path / "kernel_checks.json")
    assert all(path != "kernel" for _, path in results(report))  # no Metal: our kernels are not candidates
    assert kernels["self_check"]["chosen"] == dict.fromkeys(OPERATIONS, "pure")  # the fixed timer ranks pure first
    assert report["wired_memory"]["command"] is None and report["wired_memory"]["limit_mb"] is None


def test_doctor_emulate_json_reports_every_kernel_passing(monkeypatch, capsys):
    """On a Mac the real kernels are checked (the CI job's point); elsewhere through the emulator."""
    report = doctor_json(monkeypatch, capsys, *([] if mx.metal.is_available() else ["--emulate"]))
    checked = results(report)
    assert {op for op, path in checked if path == "kernel"} == set(OPERATIONS)
    assert all(r["passed"] and r["error"] is None for r in checked.values()), checked
    assert report["kernels"]["emulated"] == report["kernels"]["self_check"]["emulated"] != mx.metal.is_available()
    assert report["kernels"]["self_check"]["chosen"] == dict.fromkeys(OPERATIONS, "kernel")


def test_doctor_with_a_model_gives_its_wired_limit_command(monkeypatch, capsys, tmp_path):
    mx.random.seed(0)
    model = Qwen35Model(parse_config(CONFIG))
    (tmp_path / "model").mkdir()
    mx.save_safetensors(str(tmp_path / "model" / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "model" / "config.json").write_text(json.dumps(CONFIG))
    weight_bytes = (tmp_path / "model" / "model.safetensors").stat().st_size

    report = doctor_json(monkeypatch, capsys, "--model", str(tmp_path / "model"))
    wired = report["wired_memory"]
    need = plan(parse_config(CONFIG), {k: a.nbytes for k, a in tree_flatten(model.parameters())}, 0)
    assert wired["model_weight_bytes"] == need.weights < weight_bytes  # the shard adds its header
    assert wired["model_need_bytes"] == need.total > need.weights
    assert wired["command"] == f"sudo sysctl iogpu.wired_limit_mb={need.wired_limit_mb}"
    assert wired["needed_mb"] * 2**20 >= 1.05 * need.total
    probe = report["kernels"]["self_check"]["probe"]
    text = CONFIG["text_config"]
    assert (probe["key_heads"], probe["value_heads"], probe["key_dim"]) == (
        text["linear_num_key_heads"],
        text["linear_num_value_heads"],
        text["linear_key_head_dim"],
    )
    assert probe["expert_hidden"] == 0  # float experts: the expert kernels do not apply, so nothing to check


def test_doctor_text_and_pure_switch(monkeypatch, capsys):
    monkeypatch.setenv("MLX_QWEN35_PURE", "1")
    report = doctor_json(monkeypatch, capsys)
    assert report["kernels"]["paths"] == "pure (MLX_QWEN35_PURE=1)" and report["kernels"]["self_check"] is None
    monkeypatch.delenv("MLX_QWEN35_PURE")
    code, out, _ = run_cli(monkeypatch, capsys, "doctor")
    assert code == 0 and f"mlx         {mx.__version__}" in out
    chosen = "kernel    1.000" if mx.metal.is_available() else "pure      2.000"
    assert f"gated_delta_prefill        {chosen} ms ← chosen" in out


def test_readme_documents_every_field(monkeypatch, capsys):
    report = doctor_json(monkeypatch, capsys)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = re.sub(r"```.*?```", "", readme.split("## Diagnosing a Mac", 1)[1].split("\n## ", 1)[0], flags=re.S)

    def names(obj: dict, skip=("probe", "chosen")):
        for key, value in obj.items():
            yield key
            if isinstance(value, dict) and key not in skip:
                yield from names(value)
            if isinstance(value, list):
                for item in value:
                    yield from names(item)

    documented = {part.removesuffix("[]") for code in re.findall(r"`([^`]+)`", section) for part in code.split(".")}
    assert set(names(report)) - documented == set()
