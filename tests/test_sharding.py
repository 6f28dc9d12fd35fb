"""How a multi-Mac run shares the model out: the split of layers, what fits, what each rank loads (§21)."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.config import parse_config
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.model.parallel import (
    RankShare,
    check_expert_split,
    check_tensor_split,
    kv_head_share,
    stage_text_config,
)
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


# A small MoE text config whose heads split in two: 4 query heads on 2 K/V heads (or 1: replicated), DeltaNet 2 key
# heads of 4 value heads (value head h reads key head h // 2, so rank r's value heads read its own key head); every
# projection's input a multiple of 2 ranks × 32-wide quantisation groups.
SMALL = parse_config(
    {
        "model_type": "qwen3_5_moe",
        "text_config": {
            "hidden_size": 64, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 64,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
            "linear_value_head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64, "partial_rotary_factor": 0.25,
            "rope_parameters": {"rope_theta": 1e7, "mrope_section": [3, 3, 2], "mrope_interleaved": True},
        },
    }
).text  # fmt: skip


def _mixer_outputs_summed_over_ranks(text, kind: str, size: int, bits: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A mixer's output on the whole weights, and the sum of its ``size`` tensor-mode ranks' partial outputs."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_qwen35.model.attention import GatedAttention
    from mlx_qwen35.model.deltanet import GatedDeltaNet
    from mlx_qwen35.model.moe import MLP
    from mlx_qwen35.model.rope import MRoPE, text_positions

    rng = np.random.default_rng(0)
    prefix = "language_model.layers.0." + {"linear": "linear_attn.", "attention": "self_attn.", "mlp": "mlp."}[kind]

    def module_of(cfg):
        if kind == "mlp":  # a dense member's MLP
            return MLP(cfg.hidden_size, cfg.intermediate_size)
        return GatedDeltaNet(cfg) if kind == "linear" else GatedAttention(cfg, MRoPE(cfg))

    def build(cfg):
        module = module_of(cfg)
        if bits:  # the linear layers, grouped along their input: a rank's slice is whole rows or whole groups
            nn.quantize(module, group_size=32, bits=bits, class_predicate=lambda _, m: isinstance(m, nn.Linear))
        return module

    whole = module_of(text)
    whole.load_weights(
        [
            (k, mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.3))
            for k, v in tree_flatten(whole.parameters())
        ]
    )
    if bits:
        nn.quantize(whole, group_size=32, bits=bits, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    params = dict(tree_flatten(whole.parameters()))
    x = mx.array(rng.standard_normal((1, 5, text.hidden_size)).astype(np.float32))
    cos_sin = MRoPE(text).cos_sin(text_positions(1, 5, 0), mx.float32)

    def run(module):
        return module(x, cos_sin) if kind == "attention" else module(x)

    summed = 0
    for rank in range(size):
        share = RankShare("tensor", rank, size, range(2))
        part = build(stage_text_config(text, share))
        held = rank_weights({prefix + k: v for k, v in params.items()}, share, text)
        part.load_weights([(k.removeprefix(prefix), v) for k, v in held.items()])  # strict: every shape must fit
        summed = summed + run(part)
    return np.array(run(whole)), np.array(summed)


@pytest.mark.parametrize("kind", ["linear", "attention", "mlp"])
@pytest.mark.parametrize("kv_heads, bits", [(2, None), (1, None), (2, 4)])
def test_tensor_ranks_mixer_partials_add_up_to_the_whole_mixer(kind, kv_heads, bits):
    import dataclasses

    text = dataclasses.replace(SMALL, num_key_value_heads=kv_heads)  # 1: each rank keeps the K/V head it reads
    if kind == "mlp":
        text = dataclasses.replace(text, num_experts=0, intermediate_size=128)
    whole, summed = _mixer_outputs_summed_over_ranks(text, kind, 2, bits)
    # float32 sums in another order: measured max difference over the largest output 5.2e-7 (MLP, outputs up to
    # 48), 2.9e-7 (attention, 20), 2.7e-7 (DeltaNet, 5.3); 4e-6 of it leaves 7x. A wrong head, segment or group
    # is off by O(1).
    scale = np.abs(whole).max()
    assert scale > 1
    np.testing.assert_allclose(summed, whole, atol=4e-6 * scale, rtol=0)


def test_tensor_split_needs_heads_that_divide_and_replicates_fewer_kv_heads_than_ranks():
    import dataclasses

    check_tensor_split(FLAGSHIP.text, 4, 64)  # 2 K/V heads on 4 ranks: ranks 0-1 keep head 0, ranks 2-3 head 1
    check_tensor_split(parse_config(RELEASED_CONFIGS["Qwen3.5-27B"]).text, 4, 64)  # dense: its MLP's rows split
    four = [stage_text_config(FLAGSHIP.text, RankShare("tensor", r, 4, range(60))) for r in range(4)]
    assert {(t.num_attention_heads, t.num_key_value_heads, t.linear_num_key_heads, t.linear_num_value_heads)
            for t in four} == {(8, 1, 4, 16)}  # fmt: skip
    assert [kv_head_share(2, 4, r) for r in range(4)] == [(2, 0), (2, 0), (2, 1), (2, 1)]
    odd = dataclasses.replace(FLAGSHIP.text, num_key_value_heads=3, num_attention_heads=24)
    with pytest.raises(Qwen35Error) as error:
        check_tensor_split(odd, 2, 64)
    assert str(error.value) == (
        "--parallel tensor: num_key_value_heads 3 does not split into 2 ranks; use --parallel expert or "
        "--parallel pipeline, or a number of ranks that divides them"
    )
    with pytest.raises(Qwen35Error, match="num_attention_heads 24, num_key_value_heads 3 do not split into 16 ranks"):
        check_tensor_split(odd, 16, None)


def test_tensor_ranks_of_the_397b_hold_half_of_it_plus_the_replicated_ends_and_fit_two_192_gb_macs():
    text = FLAGSHIP.text
    expert = [held_bytes(FLAGSHIP_4BIT, RankShare("expert", r, 2, range(60))) for r in range(2)]
    tensor = [held_bytes(FLAGSHIP_4BIT, RankShare("tensor", r, 2, range(60)), text) for r in range(2)]
    whole = sum(v for k, v in FLAGSHIP_4BIT.items() if not k.startswith("mtp."))
    assert tensor[0] == tensor[1] < expert[0] == expert[1]
    # Replicated on each rank: embedding, vision tower, norms, routers — what a rank holds beyond half.
    replicated = 2 * tensor[0] - whole
    whole_on_each = r"^(?!mtp\.).*(embed_tokens|^visual\.|norm|\.mlp\.(gate|shared_expert_gate)\.)"
    assert replicated == sum(v for k, v in FLAGSHIP_4BIT.items() if re.search(whole_on_each, k))
    assert (tensor[0] / GIB, replicated / GIB) == pytest.approx((105.03, 1.51), abs=0.005)
    shares = [RankShare("tensor", r, 2, range(60)) for r in range(2)]
    check_fits(shares, FLAGSHIP_4BIT, [180 * GIB] * 2, ["a", "b"], text)
    with pytest.raises(Qwen35Error, match=r"rank 0 \(a\): its 1/2 of the experts, mixer heads .* need 107.03 GiB"):
        check_fits(shares, FLAGSHIP_4BIT, [96 * GIB] * 2, ["a", "b"], text)


def test_a_tensor_rank_sums_every_mixer_and_a_dense_mlp_over_the_ranks():
    import dataclasses

    from mlx_qwen35.model.language import LanguageModel

    dense = dataclasses.replace(SMALL, num_experts=0, intermediate_size=128)
    share = RankShare("tensor", 1, 2, range(2))
    model = LanguageModel(stage_text_config(dense, share), share)
    deltanet, attention = model.layers
    assert deltanet.linear_attn.share is share and attention.self_attn.share is share
    assert all(layer.mlp.share is share for layer in model.layers)
    assert model.lm_head.weight.shape == (dense.vocab_size // 2, dense.hidden_size)
    assert deltanet.mlp.down_proj.weight.shape == (dense.hidden_size, 64)
    expert = RankShare("expert", 1, 2, range(2))
    moe = LanguageModel(stage_text_config(SMALL, expert), expert)
    assert moe.layers[0].linear_attn.share is None and moe.layers[0].mlp.share is expert
    assert moe.layers[0].mlp.shared_expert.share is None  # summed once, with the routed experts
