"""Seeded random-weight checkpoints in the released Hugging Face layout, written without torch.

The demo builds its model with this, the converter's memory benchmark writes multi-shard inputs
with it, and the test builders (tests/checkpoints.py) reuse its shard writer and processor configs,
so every checkpoint we fabricate has the same files a real Qwen3.5 release has (docs/architecture.md §2.1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import Qwen35Error
from .layout import is_zero_centred_norm, pack_shards, shard_filename, write_index
from .tokenizer_builder import QWEN_ADDED_TOKENS, TokenizerInfo, write_generation_config, write_tokenizer_files

SafetensorsSaver = Callable[..., None]  # save_file(tensors, filename, metadata=...)


def write_shards(
    tensors: Mapping[str, Any],
    path: str | Path,
    max_shard_bytes: int,
    save_file: SafetensorsSaver,
) -> list[Path]:
    """Write ``tensors`` as ``model-0000i-of-0000n.safetensors`` shards + ``model.safetensors.index.json``.

    ``tensors`` may hold numpy, torch or mlx arrays (anything with ``.nbytes``); ``save_file`` is the
    matching ``safetensors.*.save_file`` / ``mlx.core.save_safetensors``-style writer. A shard is closed
    before it would exceed ``max_shard_bytes`` (a single larger tensor gets a shard of its own).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    groups = pack_shards(((name, tensor.nbytes) for name, tensor in tensors.items()), max_shard_bytes)
    weight_map: dict[str, str] = {}
    files = []
    for i, names in enumerate(groups):
        filename = shard_filename(i, len(groups))
        save_file({n: tensors[n] for n in names}, str(path / filename), metadata={"format": "pt"})
        weight_map.update({n: filename for n in names})
        files.append(path / filename)
    write_index(path, weight_map, sum(int(t.nbytes) for t in tensors.values()))
    return files


def write_processor_configs(path: str | Path, vision_config: Mapping[str, Any]) -> None:
    """Write preprocessor_config.json and video_preprocessor_config.json as the family ships them (§12.1)."""
    path = Path(path)
    shared = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "merge_size": vision_config["spatial_merge_size"],
        "patch_size": vision_config["patch_size"],
        "resample": 3,  # PIL BICUBIC
        "rescale_factor": 1 / 255,
        "temporal_patch_size": vision_config["temporal_patch_size"],
    }
    image = {
        **shared,
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "size": {"longest_edge": 16_777_216, "shortest_edge": 65_536},
    }
    video = {
        **shared,
        "do_sample_frames": True,
        "fps": 2,
        "max_frames": 768,
        "min_frames": 4,
        "processor_class": "Qwen3VLProcessor",
        "size": {"longest_edge": 25_165_824, "shortest_edge": 4096},
        "video_processor_type": "Qwen3VLVideoProcessor",
    }
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# Tensor names and shapes of a release, from config.json alone (docs/architecture.md §2.2)
# ---------------------------------------------------------------------------------------------------

LM = "model.language_model."
VISUAL = "model.visual."
LAYOUTS = ("fused", "per_expert")


def _ffn_shapes(prefix: str, text: Mapping[str, Any], layout: str) -> dict[str, tuple[int, ...]]:
    hidden = text["hidden_size"]
    if not text.get("num_experts"):
        inter = text["intermediate_size"]
        return {
            f"{prefix}mlp.gate_proj.weight": (inter, hidden),
            f"{prefix}mlp.up_proj.weight": (inter, hidden),
            f"{prefix}mlp.down_proj.weight": (hidden, inter),
        }
    experts, inter, shared = text["num_experts"], text["moe_intermediate_size"], text["shared_expert_intermediate_size"]
    shapes = {f"{prefix}mlp.gate.weight": (experts, hidden)}
    if layout == "fused":
        shapes[f"{prefix}mlp.experts.gate_up_proj"] = (experts, 2 * inter, hidden)  # gate rows, then up rows
        shapes[f"{prefix}mlp.experts.down_proj"] = (experts, hidden, inter)
    else:
        for e in range(experts):
            shapes[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = (inter, hidden)
            shapes[f"{prefix}mlp.experts.{e}.up_proj.weight"] = (inter, hidden)
            shapes[f"{prefix}mlp.experts.{e}.down_proj.weight"] = (hidden, inter)
    shapes[f"{prefix}mlp.shared_expert.gate_proj.weight"] = (shared, hidden)
    shapes[f"{prefix}mlp.shared_expert.up_proj.weight"] = (shared, hidden)
    shapes[f"{prefix}mlp.shared_expert.down_proj.weight"] = (hidden, shared)
    shapes[f"{prefix}mlp.shared_expert_gate.weight"] = (1, hidden)
    return shapes


def _attention_shapes(prefix: str, text: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, heads, kv_heads, head_dim = (
        text["hidden_size"],
        text["num_attention_heads"],
        text["num_key_value_heads"],
        text["head_dim"],
    )
    return {
        f"{prefix}self_attn.q_proj.weight": (2 * heads * head_dim, hidden),  # per head: query rows, then gate rows
        f"{prefix}self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        f"{prefix}self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        f"{prefix}self_attn.o_proj.weight": (hidden, heads * head_dim),
        f"{prefix}self_attn.q_norm.weight": (head_dim,),
        f"{prefix}self_attn.k_norm.weight": (head_dim,),
    }


def _deltanet_shapes(prefix: str, text: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden = text["hidden_size"]
    key_dim = text["linear_num_key_heads"] * text["linear_key_head_dim"]
    v_heads = text["linear_num_value_heads"]
    value_dim = v_heads * text["linear_value_head_dim"]
    conv_dim = 2 * key_dim + value_dim
    return {
        f"{prefix}linear_attn.in_proj_qkv.weight": (conv_dim, hidden),
        f"{prefix}linear_attn.in_proj_z.weight": (value_dim, hidden),
        f"{prefix}linear_attn.in_proj_b.weight": (v_heads, hidden),
        f"{prefix}linear_attn.in_proj_a.weight": (v_heads, hidden),
        f"{prefix}linear_attn.conv1d.weight": (conv_dim, 1, text["linear_conv_kernel_dim"]),
        f"{prefix}linear_attn.dt_bias": (v_heads,),
        f"{prefix}linear_attn.A_log": (v_heads,),
        f"{prefix}linear_attn.norm.weight": (text["linear_value_head_dim"],),
        f"{prefix}linear_attn.out_proj.weight": (hidden, value_dim),
    }


def _vision_shapes(vision: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    width, inter = vision["hidden_size"], vision["intermediate_size"]
    patch, temporal = vision["patch_size"], vision["temporal_patch_size"]
    merged = width * vision["spatial_merge_size"] ** 2
    shapes = {
        f"{VISUAL}patch_embed.proj.weight": (width, vision.get("in_channels", 3), temporal, patch, patch),
        f"{VISUAL}patch_embed.proj.bias": (width,),
        f"{VISUAL}pos_embed.weight": (vision["num_position_embeddings"], width),
    }
    for b in range(vision["depth"]):
        p = f"{VISUAL}blocks.{b}."
        for norm in ("norm1", "norm2"):
            shapes |= {f"{p}{norm}.weight": (width,), f"{p}{norm}.bias": (width,)}
        for name, out_dim, in_dim in (
            ("attn.qkv", 3 * width, width),
            ("attn.proj", width, width),
            ("mlp.linear_fc1", inter, width),
            ("mlp.linear_fc2", width, inter),
        ):
            shapes |= {f"{p}{name}.weight": (out_dim, in_dim), f"{p}{name}.bias": (out_dim,)}
    shapes |= {f"{VISUAL}merger.norm.weight": (width,), f"{VISUAL}merger.norm.bias": (width,)}
    shapes |= {f"{VISUAL}merger.linear_fc1.weight": (merged, merged), f"{VISUAL}merger.linear_fc1.bias": (merged,)}
    out = vision["out_hidden_size"]
    shapes |= {f"{VISUAL}merger.linear_fc2.weight": (out, merged), f"{VISUAL}merger.linear_fc2.bias": (out,)}
    return shapes


def hf_tensor_shapes(config: Mapping[str, Any], layout: str = "fused") -> dict[str, tuple[int, ...]]:
    """Every tensor of a release with this ``config.json`` (LM, vision tower, ``mtp.*``), name → shape."""
    if layout not in LAYOUTS:
        raise Qwen35Error(f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    text = config["text_config"]
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {f"{LM}embed_tokens.weight": (vocab, hidden), f"{LM}norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i, kind in enumerate(text["layer_types"]):
        p = f"{LM}layers.{i}."
        shapes |= {f"{p}input_layernorm.weight": (hidden,), f"{p}post_attention_layernorm.weight": (hidden,)}
        shapes |= _attention_shapes(p, text) if kind == "full_attention" else _deltanet_shapes(p, text)
        shapes |= _ffn_shapes(p, text, layout)
    if text.get("mtp_num_hidden_layers", 0):
        shapes["mtp.fc.weight"] = (hidden, 2 * hidden)  # input: [embedding ‖ hidden state]
        for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            shapes[f"mtp.{norm}.weight"] = (hidden,)
        for i in range(text["mtp_num_hidden_layers"]):
            p = f"mtp.layers.{i}."
            shapes |= {f"{p}input_layernorm.weight": (hidden,), f"{p}post_attention_layernorm.weight": (hidden,)}
            shapes |= _attention_shapes(p, text) | _ffn_shapes(p, text, layout)
    return shapes | (_vision_shapes(config["vision_config"]) if "vision_config" in config else {})


# ---------------------------------------------------------------------------------------------------
# Random values: far from HF's initialisation (which zeroes the (1 + w) norms), unit-scale activations
# ---------------------------------------------------------------------------------------------------

# Logits of unit scale, like a trained model's: transformers' own float32 error grows with the logit
# magnitude (≈2e-5 against float64 at unit scale, ≈9e-5 at scale 4), and the parity tests compare
# logits to 1e-4 absolute. lm_head rows act on a unit-RMS final hidden state (std ≈ LM_HEAD_STD · √H).
LM_HEAD_STD = 1.0 / 8.0
# Scale of the residual stream: embedding rows, and (twice that) every projection writing into it,
# so the mixers, not the token's own embedding, dominate the last hidden state — otherwise a tied
# model just repeats its input token. With tied embeddings it also sets the logit scale.
RESIDUAL_STD = 1.0 / 8.0
RESIDUAL_WRITERS = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")
# Added tokens' output rows are damped so greedy paths stay on text tokens (never stop at EOS early).
ADDED_TOKEN_ROW_SCALE = 0.1


def random_parameter(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A float32 value for HF parameter ``name``: every norm, bias and gate visibly away from its init."""

    def normal(std: float, mean: float = 0.0) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std + mean).astype(np.float32)

    if is_zero_centred_norm(name):
        return normal(0.3)  # used as (1 + w)
    if name.endswith("linear_attn.norm.weight") or (
        name.startswith(VISUAL) and "norm" in name and name.endswith(".weight")
    ):
        return normal(0.3, mean=1.0)  # used as w
    if name.endswith(".bias"):
        return normal(0.1)
    if name.endswith("A_log"):
        return rng.uniform(-2.0, 0.0, shape).astype(np.float32)  # decay rates exp(A_log) in [0.14, 1]
    if name.endswith("dt_bias"):
        return normal(0.5)
    if name.endswith("pos_embed.weight"):
        return normal(0.5)
    if name.endswith("embed_tokens.weight"):
        return normal(RESIDUAL_STD)
    if name == "lm_head.weight":
        return normal(LM_HEAD_STD)
    fan_in = math.prod(shape[1:]) if name.endswith(("conv1d.weight", "patch_embed.proj.weight")) else shape[-1]
    if name.endswith("merger.linear_fc2.weight"):  # vision features replace embedding rows
        return normal(RESIDUAL_STD / math.sqrt(fan_in))
    if name.endswith(RESIDUAL_WRITERS) and not name.startswith(VISUAL):
        return normal(2.0 * RESIDUAL_STD / math.sqrt(fan_in))
    return normal(1.0 / math.sqrt(fan_in))


def shape_output_rows(weight: np.ndarray, tokens: TokenizerInfo) -> None:
    """In place: zero the padding rows (they never win an argmax), damp the added tokens' rows."""
    weight[tokens.size :] = 0.0
    weight[tokens.base_vocab_size : tokens.size] *= ADDED_TOKEN_ROW_SCALE


# ---------------------------------------------------------------------------------------------------
# Whole checkpoints
# ---------------------------------------------------------------------------------------------------


def tokenizer_base_size(config: Mapping[str, Any]) -> int:
    """The base vocabulary a config's special ids imply (`<|endoftext|>` is the first id after it)."""
    base = config["text_config"]["eos_token_id"]
    expected = {"vision_start_token_id": "<|vision_start|>", "image_token_id": "<|image_pad|>"}
    for key, token in expected.items():
        if config[key] != base + [t for t, _ in QWEN_ADDED_TOKENS].index(token):
            raise Qwen35Error(
                f"config {key}={config[key]}: inconsistent with <|endoftext|> = text_config.eos_token_id = {base}"
            )
    return base


def _mlx_save(tensors: Mapping[str, Any], filename: str, metadata: dict[str, str]) -> None:
    mx.save_safetensors(filename, dict(tensors), metadata=metadata)


def write_release_files(path: Path, config: Mapping[str, Any]) -> TokenizerInfo:
    """Every file of a release of ``config`` but its weights: tokenizer, chat template, generation and processor configs, config.json."""
    tokens = write_tokenizer_files(path, base_vocab_size=tokenizer_base_size(config))
    write_generation_config(path, tokens)
    write_processor_configs(path, config["vision_config"])
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokens


def write_random_hf_checkpoint(
    path: str | Path,
    config: dict,
    seed: int = 0,
    layout: str = "fused",
    dtype: str = "bfloat16",
    max_shard_bytes: int = 64 * 1024**2,
) -> list[Path]:
    """Write a complete seeded random checkpoint of ``config`` in the released HF layout; returns the shards.

    Weights (LM, vision tower, ``mtp.*``) in ``dtype``, config.json, tokenizer, chat template,
    generation and processor configs. Needs only numpy, mlx and tokenizers.
    """
    path = Path(path)
    tokens = write_release_files(path, config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in hf_tensor_shapes(config, layout).items():
        value = random_parameter(name, shape, rng)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            shape_output_rows(value, tokens)
        tensors[name] = mx.array(value).astype(getattr(mx, dtype))
    return write_shards(tensors, path, max_shard_bytes, _mlx_save)
