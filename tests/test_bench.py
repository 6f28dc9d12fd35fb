"""`mlx-qwen35 bench`: the report it prints is measured, its launch count is the graph's, bad input is one line."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from cli_runner import run_cli

from mlx_qwen35.surfaces.bench import measure, runtimes


@pytest.fixture
def cache_home(tmp_path_factory, monkeypatch):
    # One build of the preset for the module's tests, in a cache of their own.
    root = tmp_path_factory.getbasetemp() / "bench-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root


def _bench_json(monkeypatch, capsys, *args: str) -> dict:
    code, out, err = run_cli(monkeypatch, capsys, "bench", *args, "--json")
    assert code in (0, None), err
    return json.loads(out)  # the report alone: progress goes to stderr


def test_preset_against_mlx_lm_reports_every_measure_and_ratio(cache_home, monkeypatch, capsys):
    report = _bench_json(
        monkeypatch, capsys, "--preset", "bench", "--compare", "mlx-lm", "--prompt-lengths", "8,24",
        "--decode-tokens", "3", "--repeats", "2", "--warmup", "0",
    )  # fmt: skip
    assert set(report["runtimes"]) == {"mlx-qwen35", "mlx-lm"}
    for runtime in report["runtimes"].values():
        assert runtime["decode_step_launches"] > 50 and runtime["weights_bytes"] > 1e6
        assert 0 < runtime["decode_step_build_s"] < 1
        for length in ("8", "24"):
            p = runtime["prompts"][length]
            assert len(p["decode_tokens_per_s"]["runs"]) == 2
            assert p["decode_tokens_per_s"]["min"] > 0 and p["ttft_s"]["min"] > 0
            assert p["peak_memory_bytes"]["min"] >= runtime["weights_bytes"]
    ours, theirs = (report["runtimes"][n] for n in ("mlx-qwen35", "mlx-lm"))
    ratio = report["ratios"]["mlx-lm"]
    assert ratio["decode_step_launches"] == ours["decode_step_launches"] / theirs["decode_step_launches"]
    decode = (
        ours["prompts"]["24"]["decode_tokens_per_s"]["median"]
        / theirs["prompts"]["24"]["decode_tokens_per_s"]["median"]
    )
    assert ratio["prompts"]["24"]["decode_tokens_per_s"] == pytest.approx(decode)


def test_our_conversion_is_compared_on_the_peers_conversion_of_its_source(cache_home, monkeypatch, capsys):
    _bench_json(
        monkeypatch, capsys, "--preset", "bench", "--prompt-lengths", "4", "--decode-tokens", "1", "--repeats", "1"
    )
    built = cache_home / "mlx-qwen35" / "bench" / "bench"
    ours = next(built.glob("mlx-qwen35-4bit-*"))
    report = _bench_json(
        monkeypatch, capsys, str(ours), "--source", str(built / "hf"), "--compare", "mlx-lm",
        "--prompt-lengths", "4", "--decode-tokens", "1", "--repeats", "1", "--warmup", "0",
    )  # fmt: skip
    assert set(report["runtimes"]) == {"mlx-qwen35", "mlx-lm"}
    [peer_dir] = (cache_home / "mlx-qwen35" / "bench" / "peers").iterdir()
    assert json.loads((peer_dir / "config.json").read_text())["quantization"]["bits"] == 4
    # An mlx-lm conversion is loaded as it is by both runtimes: no --source needed.
    report = _bench_json(
        monkeypatch, capsys, str(peer_dir), "--compare", "mlx-lm", "--prompt-lengths", "4", "--decode-tokens", "1",
        "--repeats", "1", "--warmup", "0",
    )  # fmt: skip
    assert set(report["runtimes"]) == {"mlx-qwen35", "mlx-lm"}


def test_launches_count_the_graphs_non_view_primitives():
    a = mx.ones((2, 3))
    mx.eval(a)
    out = mx.sum((a.T + 1).reshape(6) * 2)
    counts = measure.count_primitives([out])
    assert counts["Add"] == counts["Multiply"] == counts["Sum"] == 1 and counts["Transpose"] == 1
    assert measure.launches(counts) == 3  # Add, Multiply, Sum; the transpose, broadcasts, reshape and squeeze are views


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/model"], "model /no/such/model: no such directory"),
        ([], "give a model directory / Hub id, or --preset NAME"),
        (["--preset", "huge"], "--preset huge: unknown; choose one of bench, dispatch, 397b-layers"),
        (["--preset", "bench", "--compare", "llama.cpp"], "--compare llama.cpp: unknown runtime"),
        (["--preset", "bench", "--prompt-lengths", "1k"], "--prompt-lengths 1k: give comma-separated token counts"),
        (["--preset", "bench", "--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_bad_input_is_one_line(monkeypatch, capsys, args, message):
    code, _, err = run_cli(monkeypatch, capsys, "bench", *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_a_peer_not_installed_is_one_line(monkeypatch, capsys):
    real = runtimes.importlib.util.find_spec
    monkeypatch.setattr(runtimes.importlib.util, "find_spec", lambda name: None if name == "mlx_vlm" else real(name))
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--preset", "bench", "--compare", "mlx-vlm")
    assert code == 1 and err.strip() == "error: --compare mlx-vlm: mlx-vlm is not installed; pip install mlx-vlm"


def test_our_conversion_without_its_source_and_a_model_too_large_are_one_line(cache_home, monkeypatch, capsys):
    _bench_json(
        monkeypatch, capsys, "--preset", "bench", "--prompt-lengths", "4", "--decode-tokens", "1", "--repeats", "1"
    )
    ours = next((cache_home / "mlx-qwen35" / "bench" / "bench").glob("mlx-qwen35-4bit-*"))
    code, _, err = run_cli(monkeypatch, capsys, "bench", str(ours), "--compare", "mlx-lm")
    assert code == 1 and "which mlx-lm cannot load; give --source" in err and len(err.strip().splitlines()) == 1

    from mlx_qwen35.weights import local_models

    monkeypatch.setattr(local_models, "total_memory_bytes", lambda: 2 * 2**30)
    code, _, err = run_cli(monkeypatch, capsys, "bench", str(ours))
    assert code == 1 and "bench needs" in err and "this machine has 2.1 GB" in err
