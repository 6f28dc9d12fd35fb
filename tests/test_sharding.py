"""How a multi-Mac run shares the model out: the split of layers, what fits, what each rank loads (§21)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.config import parse_config
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.model.parallel import RankShare, check_expert_split
from mlx_qwen35.weights.memory_plan import GIB, RELEASED_CONFIGS, predicted_tensor_bytes
from mlx_qwen35.weights.quantize import RECIPES
from mlx_qwen35.weights.sharding import (
    HEADROOM_BYTES,
    check_fits,
    check_stages,
    held_bytes,
    layer_and_end_bytes,
    parse_split,
    proportional_split,
    rank_quantization,
    rank_weights,
    stages,
)

FLAGSHIP = parse_config(RELEASED_CONFIGS["Qwen3.5-397B-A17B"])
FLAGSHIP_4BIT = predicted_tensor_bytes(FLAGSHIP, RECIPES["4bit"])


def test_layers_split_in_proportion_to_free_memory_with_rank_0_holding_the_ends():
    layers, ends = [10] * 12, 20
    assert proportional_split(layers, ends, [100, 100]) == [5, 7]  # rank 0's 20 for the ends: 50+20 vs 70
    assert proportional_split(layers, 0, [100, 100]) == [6, 6]
    assert proportional_split(layers, 0, [300, 100]) == [9, 3]
    assert proportional_split(layers, 0, [1, 1000]) == [1, 11]  # every rank holds at least one layer
    assert sum(proportional_split([7, 1, 9, 3, 5, 2], 4, [50, 30, 20])) == 6


def test_the_397b_on_a_192_gb_and_a_96_gb_mac_splits_two_to_one_and_fits():
    layers, ends = layer_and_end_bytes(FLAGSHIP_4BIT, FLAGSHIP.text.num_hidden_layers)
    assert ends > 0 and min(layers) > 0
    free = [180 * GIB, 90 * GIB]
    counts = proportional_split(layers, ends, free)
    # Rank 0's target: 2/3 of 223.9 GB less its 2.06 GB of embedding, LM head and vision = 39.8 layers of 3.7 GB.
    assert counts == [40, 20]
    runs = stages(counts)
    check_stages(FLAGSHIP, runs, ["a", "b"])
    shares = [RankShare("pipeline", r, 2, runs[r]) for r in range(2)]
    held = [held_bytes(FLAGSHIP_4BIT, s) for s in shares]
    assert sum(held) == sum(v for k, v in FLAGSHIP_4BIT.items() if not k.startswith("mtp."))
    check_fits(shares, FLAGSHIP_4BIT, free, ["a", "b"])


def test_a_split_that_does_not_fit_names_the_rank_host_layers_and_numbers():
    runs = stages([30, 30])
    shares = [RankShare("pipeline", r, 2, runs[r]) for r in range(2)]
    with pytest.raises(Qwen35Error) as error:
        check_fits(shares, FLAGSHIP_4BIT, [192 * GIB, 96 * GIB], ["studio:5000", "mini:5001"])
    message = str(error.value)
    need = (held_bytes(FLAGSHIP_4BIT, shares[1]) + HEADROOM_BYTES) / GIB
    assert message.startswith(f"rank 1 (mini:5001): layers 30-59 need {need:.2f} GiB")
    assert "96.00 GiB free" in message and "--split" in message and "\n" not in message


def test_split_flag_errors_and_stages_without_attention():
    assert parse_split("40,20", 60, 2) == [40, 20]
    for bad in ("40,21", "60", "x,y", "60,0"):
        with pytest.raises(Qwen35Error, match="--split"):
            parse_split(bad, 60, 2)
    with pytest.raises(Qwen35Error, match=r"rank 0 \(a\) would hold layers 0-2, none of them an attention layer"):
        check_stages(FLAGSHIP, stages([3, 57]), ["a", "b"])
    check_stages(FLAGSHIP, stages([4, 56]), ["a", "b"])  # layer 3 is the first attention layer


def test_expert_split_needs_whole_groups_and_an_moe_model():
    check_expert_split(FLAGSHIP.text, 2, 64)  # 1024 → 512 per rank, 8 groups of 64
    with pytest.raises(Qwen35Error, match="moe_intermediate_size 1024 does not split into 3 ranks"):
        check_expert_split(FLAGSHIP.text, 3, 64)
    with pytest.raises(Qwen35Error, match="dense"):
        check_expert_split(parse_config(RELEASED_CONFIGS["Qwen3.5-27B"]).text, 2, 64)


def test_expert_ranks_slices_put_together_are_the_whole_tensors():
    rng = np.random.default_rng(0)
    weights = {
        "language_model.layers.0.mlp.experts.gate_proj.weight": mx.array(rng.standard_normal((4, 8, 6))),
        "language_model.layers.0.mlp.experts.down_proj.weight": mx.array(rng.standard_normal((4, 6, 8))),
        "language_model.layers.0.mlp.shared_expert.up_proj.weight": mx.array(rng.standard_normal((8, 6))),
        "language_model.layers.0.mlp.gate.weight": mx.array(rng.standard_normal((4, 6))),
        "mtp.fc.weight": mx.array(rng.standard_normal((6, 12))),
    }
    parts = [rank_weights(weights, RankShare("expert", r, 2, range(1))) for r in range(2)]
    for name, whole in weights.items():
        if name.startswith("mtp."):
            assert all(name not in p for p in parts)  # the MTP head is not loaded on ranks
            continue
        axis = -1 if "down_proj" in name else -2
        if "mlp.gate." in name:
            assert all(np.array_equal(np.array(p[name]), np.array(whole)) for p in parts)
        else:
            assert parts[0][name].shape[axis] == whole.shape[axis] // 2
            joined = mx.concatenate([p[name] for p in parts], axis=axis)
            assert np.array_equal(np.array(joined), np.array(whole))


def test_pipeline_ranks_load_their_layers_under_local_names():
    weights = {f"language_model.layers.{i}.input_layernorm.weight": mx.full((2,), i) for i in range(4)}
    weights |= {"language_model.embed_tokens.weight": mx.zeros((3, 2)), "visual.x": mx.zeros(1)}
    first = rank_weights(weights, RankShare("pipeline", 0, 2, range(0, 1)))
    second = rank_weights(weights, RankShare("pipeline", 1, 2, range(1, 4)))
    assert sorted(first) == [
        "language_model.embed_tokens.weight",
        "language_model.layers.0.input_layernorm.weight",
        "visual.x",
    ]
    assert sorted(second) == [f"language_model.layers.{i}.input_layernorm.weight" for i in range(3)]
    assert second["language_model.layers.0.input_layernorm.weight"].tolist() == [1, 1]  # global layer 1
    quantization = {"group_size": 64, "language_model.layers.2.mlp.gate": {"bits": 8}, "lm_head": {"bits": 6}}
    assert rank_quantization(quantization, RankShare("pipeline", 1, 2, range(1, 4))) == {
        "group_size": 64,
        "language_model.layers.1.mlp.gate": {"bits": 8},
        "lm_head": {"bits": 6},
    }
