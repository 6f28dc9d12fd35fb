"""Decode steps compiled (the default; MLX_QWEN35_COMPILE=0 turns it off) give the eager path's tokens and logits."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import convert_tiny
from mlx_lm.sample_utils import make_sampler

from mlx_qwen35 import load
from mlx_qwen35.model import language
from mlx_qwen35.model.inputs import ModelInputs
from mlx_qwen35.runtime.generation import generate_tokens


@pytest.fixture(scope="module")
def tiny_model(tiny_moe_checkpoint, tmp_path_factory):
    model, _ = load(str(convert_tiny(tiny_moe_checkpoint, tmp_path_factory.mktemp("compiled") / "mlx")))
    return model


def _greedy_run(model, prompt: list[int], monkeypatch, compiled: str) -> tuple[list[int], np.ndarray]:
    monkeypatch.setenv("MLX_QWEN35_COMPILE", compiled)
    steps = generate_tokens(model, ModelInputs(prompt), model.make_cache(), make_sampler(temp=0.0), max_tokens=24)
    tokens, logprobs = zip(*steps)
    return list(tokens), np.stack([np.array(lp) for lp in logprobs])


def test_compiled_decode_equals_eager(tiny_model, tiny_moe_checkpoint, monkeypatch):
    prompt = tiny_moe_checkpoint.prompt_ids(24)
    eager_tokens, eager = _greedy_run(tiny_model, prompt, monkeypatch, "0")
    compiled_tokens, compiled = _greedy_run(tiny_model, prompt, monkeypatch, "1")
    assert compiled_tokens == eager_tokens
    # Measured max |Δ log p| 0.0 on this CPU (the fused kernels do the same float32 ops); 1e-5 allows a
    # different exp/log on another CPU while staying 100× below the seed's greedy margin (conftest.py).
    np.testing.assert_allclose(compiled, eager, atol=1e-5, rtol=0)


def test_compile_switch(monkeypatch):
    from mlx_qwen35.kernels import set_use_kernels

    monkeypatch.delenv("MLX_QWEN35_COMPILE", raising=False)
    assert language.compiles_decode()
    monkeypatch.setenv("MLX_QWEN35_COMPILE", "0")
    assert not language.compiles_decode()
    monkeypatch.delenv("MLX_QWEN35_COMPILE")
    set_use_kernels(True, emulate=True)
    try:
        assert not language.compiles_decode()  # the emulator runs Python callbacks a trace cannot hold
    finally:
        set_use_kernels(None)


def test_compiled_decode_has_fewer_launches(tiny_model, tiny_moe_checkpoint, monkeypatch):
    from mlx_qwen35.surfaces.bench.measure import launches
    from mlx_qwen35.surfaces.bench.runtimes import decode_step_graph

    graph = decode_step_graph(tiny_model, tiny_model.make_cache)
    prompt = tiny_moe_checkpoint.prompt_ids(16)
    monkeypatch.setenv("MLX_QWEN35_COMPILE", "0")
    eager = launches(graph(prompt).primitives)
    monkeypatch.setenv("MLX_QWEN35_COMPILE", "1")
    compiled = launches(graph(prompt).primitives)
    assert compiled < 0.9 * eager, (compiled, eager)
