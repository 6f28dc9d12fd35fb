"""The tiny checkpoints are what they claim: layouts, FP8 blocks, perturbed weights, tokenizer, template."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from checkpoints import FP8_QUANTIZED, TinyCheckpoint, hf_greedy
from safetensors import safe_open

from mlx_qwen35.weights.layout import FP8_BLOCK, PER_EXPERT_KEY

# Smallest top-1 − top-2 logit gap along transformers' 32-token greedy path that the parity tests
# rely on: 100× the 1e-4 logit tolerance and ~500× transformers' own float32 error, so numeric noise
# cannot flip a token.
MIN_GREEDY_MARGIN = 0.01
# transformers' float32 logits against its float64 ones on the tiny checkpoints (measured 1.6e-5 …
# 4e-5 over seeds): the floor under any float32 port, which the 1e-4 parity tolerance must clear.
REFERENCE_FP32_ERROR = 5e-5


def read_index(ckpt: TinyCheckpoint) -> dict[str, str]:
    return json.loads((ckpt.path / "model.safetensors.index.json").read_text())["weight_map"]


def read_tensors(ckpt_path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(ckpt_path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return tensors


@pytest.fixture(
    params=["tiny_moe_checkpoint", "tiny_dense_checkpoint", "tiny_moe_fused_checkpoint", "tiny_moe_fp8_checkpoint"]
)
def any_checkpoint(request: pytest.FixtureRequest) -> TinyCheckpoint:
    return request.getfixturevalue(request.param)


def test_index_matches_shards_and_release_files_exist(any_checkpoint: TinyCheckpoint) -> None:
    weight_map = read_index(any_checkpoint)
    shards = sorted(any_checkpoint.path.glob("model-*.safetensors"))
    assert len(shards) >= 2
    in_shards = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            in_shards |= {k: shard.name for k in f.keys()}
    assert in_shards == weight_map
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
    ):
        assert (any_checkpoint.path / name).is_file(), name


def test_mtp_block_present(any_checkpoint: TinyCheckpoint) -> None:
    keys = set(read_index(any_checkpoint))
    hidden = any_checkpoint.text_config["hidden_size"]
    tensors = read_tensors(any_checkpoint.path)
    assert tensors["mtp.fc.weight"].shape == (hidden, 2 * hidden)
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        assert tensors[f"mtp.{norm}.weight"].shape == (hidden,)
    full = any_checkpoint.text_config["layer_types"].index("full_attention")
    main_layer = {
        k.split(f"layers.{full}.", 1)[1] for k in keys if k.startswith(f"model.language_model.layers.{full}.")
    }
    mtp_layer = {k.removeprefix("mtp.layers.0.") for k in keys if k.startswith("mtp.layers.0.")}
    assert mtp_layer == main_layer  # a full-attention decoder layer with the same FFN kind and layout


def test_per_expert_layout(tiny_moe_checkpoint: TinyCheckpoint) -> None:
    keys = set(read_index(tiny_moe_checkpoint))
    assert not any("gate_up_proj" in k for k in keys)
    text = tiny_moe_checkpoint.text_config
    for prefix in [f"model.language_model.layers.{i}" for i in range(text["num_hidden_layers"])] + ["mtp.layers.0"]:
        for e in range(text["num_experts"]):
            for proj in ("gate", "up", "down"):
                assert f"{prefix}.mlp.experts.{e}.{proj}_proj.weight" in keys


def test_fused_layout_holds_the_same_weights(
    tiny_moe_checkpoint: TinyCheckpoint, tiny_moe_fused_checkpoint: TinyCheckpoint
) -> None:
    per_expert = read_tensors(tiny_moe_checkpoint.path)
    fused = read_tensors(tiny_moe_fused_checkpoint.path)
    assert not any(PER_EXPERT_KEY.match(k) for k in fused)
    text = tiny_moe_checkpoint.text_config
    n, inter, hidden = text["num_experts"], text["moe_intermediate_size"], text["hidden_size"]
    prefixes = {m["prefix"] for k in per_expert if (m := PER_EXPERT_KEY.match(k))}
    assert len(prefixes) == text["num_hidden_layers"] + 1  # every layer and the MTP layer
    for prefix in prefixes:
        gate_up, down = fused[f"{prefix}.gate_up_proj"], fused[f"{prefix}.down_proj"]
        assert gate_up.shape == (n, 2 * inter, hidden) and down.shape == (n, hidden, inter)
        for e in range(n):
            assert torch.equal(gate_up[e, :inter], per_expert[f"{prefix}.{e}.gate_proj.weight"])  # gate rows first
            assert torch.equal(gate_up[e, inter:], per_expert[f"{prefix}.{e}.up_proj.weight"])
            assert torch.equal(down[e], per_expert[f"{prefix}.{e}.down_proj.weight"])
    rest = {k for k in per_expert if not PER_EXPERT_KEY.match(k)}
    assert all(torch.equal(per_expert[k], fused[k]) for k in rest)


def test_fp8_blocks_dequantise_to_the_reference(tiny_moe_fp8_checkpoint: TinyCheckpoint) -> None:
    quantized = read_tensors(tiny_moe_fp8_checkpoint.path)
    reference = read_tensors(tiny_moe_fp8_checkpoint.reference_path)
    qcfg = tiny_moe_fp8_checkpoint.config["quantization_config"]
    assert qcfg["quant_method"] == "fp8" and qcfg["weight_block_size"] == [FP8_BLOCK, FP8_BLOCK]
    fp8_names = [k for k in quantized if quantized[k].dtype == torch.float8_e4m3fn]
    assert set(fp8_names) == {k for k in reference if FP8_QUANTIZED.search(k)}
    assert any("linear_attn.in_proj_qkv" in k for k in fp8_names) and any("mtp.layers.0" in k for k in fp8_names)
    grids = set()
    for name in fp8_names:
        w, scale = quantized[name].float(), quantized[name + "_scale_inv"]
        out_dim, in_dim = w.shape
        assert scale.dtype == torch.float32
        assert scale.shape == (math.ceil(out_dim / FP8_BLOCK), math.ceil(in_dim / FP8_BLOCK))
        grids.add(tuple(scale.shape))
        expanded = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:out_dim, :in_dim]
        assert torch.equal(w * expanded, reference[name]), name  # dequant = fp8 × scale_inv, exactly
    assert (2, 2) in grids  # multi-block with partial edge blocks on both axes
    unquantized = set(quantized) - set(fp8_names) - {k for k in quantized if k.endswith("_scale_inv")}
    assert all(torch.equal(quantized[k], reference[k]) for k in unquantized)
    assert {n.rsplit(".", 1)[0] for n in unquantized if n.endswith(".weight")} == set(qcfg["modules_to_not_convert"])


def test_fp8_dequantisation_is_within_fp8_precision(tiny_moe_fp8_checkpoint: TinyCheckpoint) -> None:
    from checkpoints import quantize_fp8_blockwise

    weight = torch.randn(200, 150, generator=torch.Generator().manual_seed(0))
    fp8, scale, exact = quantize_fp8_blockwise(weight)
    assert fp8.dtype == torch.float8_e4m3fn and scale.shape == (2, 2)
    expanded = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:200, :150]
    # e4m3: 3 mantissa bits → relative rounding error ≤ 2^-4; subnormal steps are 2^-9 of the scale
    assert bool(((exact - weight).abs() <= weight.abs() / 16 + expanded * 2.0**-9).all())


@pytest.mark.parametrize("fixture", ["tiny_moe_checkpoint", "tiny_dense_checkpoint", "tiny_moe_fp8_checkpoint"])
def test_every_parameter_is_perturbed_from_hf_init(fixture: str, request: pytest.FixtureRequest) -> None:
    ckpt: TinyCheckpoint = request.getfixturevalue(fixture)
    model, info = type(ckpt.load_reference()).from_pretrained(ckpt.reference_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, param in model.named_parameters():
        # HF initialises norms, biases and dt_bias to constants; every tensor here must vary
        assert param.numel() == 1 or float(param.detach().std()) > 0.01, name


def test_per_expert_and_fused_give_identical_transformers_logits(
    tiny_moe_checkpoint: TinyCheckpoint, tiny_moe_fused_checkpoint: TinyCheckpoint
) -> None:
    ids = torch.tensor([tiny_moe_checkpoint.prompt_ids(64)])
    with torch.no_grad():
        a = tiny_moe_checkpoint.load_reference()(ids).logits
        b = (
            type(tiny_moe_checkpoint.load_reference())
            .from_pretrained(tiny_moe_fused_checkpoint.path, dtype=torch.float32)
            .eval()(ids)
            .logits
        )
    assert torch.equal(a, b)


@pytest.mark.parametrize("fixture", ["tiny_moe_checkpoint", "tiny_dense_checkpoint", "tiny_moe_fp8_checkpoint"])
def test_greedy_path_has_a_clear_top1_margin(fixture: str, request: pytest.FixtureRequest) -> None:
    ckpt: TinyCheckpoint = request.getfixturevalue(fixture)
    tokens, margin = hf_greedy(ckpt.load_reference(), ckpt.prompt_ids(64), 32)
    print(f"{fixture}: min top1-top2 gap along 32 greedy tokens = {margin:.4f}")
    assert len(tokens) == 32 and all(t < ckpt.tokens.base_vocab_size for t in tokens)
    assert len(set(tokens)) > 8  # a varied continuation, not one token repeated
    assert margin >= MIN_GREEDY_MARGIN


@pytest.mark.parametrize("fixture", ["tiny_moe_checkpoint", "tiny_dense_checkpoint", "tiny_moe_fp8_checkpoint"])
def test_reference_float32_error_is_well_below_the_parity_tolerance(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    ckpt: TinyCheckpoint = request.getfixturevalue(fixture)
    model = ckpt.load_reference()
    ids = torch.tensor([ckpt.prompt_ids(64)])
    with torch.no_grad():
        fp32 = model(ids).logits.double()
        model.set_experts_implementation("eager")  # the grouped-mm experts have no float64 kernel
        fp64 = model.double()(ids).logits
    error = float((fp32 - fp64).abs().max())
    print(f"{fixture}: transformers float32 vs float64 logits max |Δ| = {error:.2e}")
    assert error <= REFERENCE_FP32_ERROR


def test_config_points_at_the_tokenizers_special_ids(any_checkpoint: TinyCheckpoint) -> None:
    cfg, tok = any_checkpoint.config, any_checkpoint.tokens
    assert cfg["image_token_id"] == tok.ids["<|image_pad|>"]
    assert cfg["video_token_id"] == tok.ids["<|video_pad|>"]
    assert cfg["vision_start_token_id"] == tok.ids["<|vision_start|>"]
    assert cfg["vision_end_token_id"] == tok.ids["<|vision_end|>"]
    assert cfg["text_config"]["vocab_size"] >= tok.size
    assert cfg["text_config"]["layer_types"].count("full_attention") >= 2
    generation = json.loads((any_checkpoint.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.ids["<|im_end|>"], tok.ids["<|endoftext|>"]]


def test_tokenizer_round_trip_and_special_ids(tiny_moe_checkpoint: TinyCheckpoint) -> None:
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer

    text = "Hello, world! Numbers 12345 and café — naïve 🙂 <think>\nhmm\n</think>\n\n"
    hf = AutoTokenizer.from_pretrained(tiny_moe_checkpoint.path)
    mlx = load_tokenizer(tiny_moe_checkpoint.path)
    ids = hf.encode(text)
    assert ids == mlx.encode(text)
    assert hf.decode(ids) == text
    assert hf.bos_token is None and hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    base = tiny_moe_checkpoint.tokens.base_vocab_size
    assert hf.convert_tokens_to_ids("<|endoftext|>") == base
    assert hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [base + 1, base + 2]
    assert hf.encode("<think></think>") == [base + 24, base + 25]  # single tokens, not split
    assert set(mlx.eos_token_ids) >= {base + 2}
    # \d is split into single digits by the Qwen regex
    assert [hf.decode([i]) for i in hf.encode("2026")] == ["2", "0", "2", "6"]


def test_chat_template_generation_prompts(tiny_moe_checkpoint: TinyCheckpoint) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_moe_checkpoint.path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    on = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert (
        on
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_template_tools_and_vision(tiny_moe_checkpoint: TinyCheckpoint) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_moe_checkpoint.path)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather here?"}]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    text = tok.apply_chat_template(messages, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n")
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Weather here?<|im_end|>" in text
    assert (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n[1, 2]\n</parameter>\n</function>\n</tool_call><|im_end|>" in text
    )
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" in text
    assert re.search(r"<\|im_start\|>assistant\n<think>\n$", text)


@pytest.mark.parametrize(
    "fixture, layout",
    [
        ("tiny_moe_checkpoint", "per_expert"),
        ("tiny_dense_checkpoint", "per_expert"),
        ("tiny_moe_fused_checkpoint", "fused"),
    ],
)
def test_release_tensor_spec_matches_what_transformers_writes(
    fixture: str, layout: str, request: pytest.FixtureRequest
) -> None:
    """The torch-free writer behind the demo names and shapes tensors exactly as transformers does."""
    from mlx_qwen35.weights.random_checkpoint import hf_tensor_shapes

    ckpt: TinyCheckpoint = request.getfixturevalue(fixture)
    written = {k: tuple(v.shape) for k, v in read_tensors(ckpt.path).items()}
    assert hf_tensor_shapes(ckpt.config, layout) == written


def test_torch_free_writer_makes_a_checkpoint_transformers_loads(tiny_moe_checkpoint: TinyCheckpoint, tmp_path) -> None:
    """The demo's writer (numpy + mlx, fused experts, bf16) produces a complete release transformers accepts."""
    from mlx_qwen35.weights.random_checkpoint import hf_tensor_shapes, write_random_hf_checkpoint

    shards = write_random_hf_checkpoint(
        tmp_path, tiny_moe_checkpoint.config, seed=0, layout="fused", max_shard_bytes=256 * 1024
    )
    assert len(shards) >= 2
    tensors = read_tensors(tmp_path)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == hf_tensor_shapes(tiny_moe_checkpoint.config, "fused")
    assert all(v.dtype == torch.bfloat16 for v in tensors.values())
    model, info = type(tiny_moe_checkpoint.load_reference()).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "preprocessor_config.json"):
        assert (tmp_path / name).is_file()
