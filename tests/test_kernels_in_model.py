"""The whole model with every kernel switched on gives the logits of the pure-MLX paths.

On Linux the kernels run through the Metal CPU emulator; on a Mac through ``mx.fast.metal_kernel``.
The model is small but has kernel-sized heads (Dk = Dv = 32) and 4-bit experts, so the gated-delta
decode and prefill kernels and both expert-dispatch kernels all run. Tolerance: max |Δ logits| ≤
1e-4 × max |logits| (the kernels sum in a different order than the pure paths).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_qwen35.config import parse_config
from mlx_qwen35.kernels import set_use_kernels
from mlx_qwen35.model.qwen35 import Qwen35Model

CONFIG = {
    "model_type": "qwen3_5_moe",
    "text_config": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "vocab_size": 128,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1]},
    },
}


@pytest.fixture(autouse=True)
def restore_kernel_switch():
    yield
    set_use_kernels(None)


def logits_prefill_then_decode(model: Qwen35Model, ids: list[int]) -> mx.array:
    cache = model.make_cache()
    prefill = model(mx.array([ids[:-2]]), cache)[0]
    decode = [model(mx.array([[t]]), cache)[0] for t in ids[-2:]]
    return mx.concatenate([prefill, *decode])


def test_kernels_on_equal_pure_paths():
    mx.random.seed(0)
    model = Qwen35Model(parse_config(CONFIG))
    model.update(model.parameters())  # materialise the random init
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda path, _: (
            path.endswith("mlp.experts.gate_proj")
            or path.endswith("mlp.experts.up_proj")
            or path.endswith("mlp.experts.down_proj")
        ),
    )
    ids = [
        int(i) for i in mx.random.randint(0, 128, (40,)).tolist()
    ]  # 38 prompt tokens × top-2 ≥ 64 pairs: the sorted expert path

    set_use_kernels(False)
    pure = logits_prefill_then_decode(model, ids)
    set_use_kernels(True, emulate=not mx.metal.is_available())
    with_kernels = logits_prefill_then_decode(model, ids)

    scale = float(mx.abs(pure).max())
    assert float(mx.abs(with_kernels - pure).max()) <= 1e-4 * scale
