"""Configuration parsed from a checkpoint's ``config.json`` (HF layout, or ours, or mlx-lm/mlx-vlm's).

Field names are the ones the HF config uses, so a reader can grep a value from the model card to
the code. Everything architectural comes from here; model code holds no magic numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import Qwen35Error

MOE_MODEL_TYPES = ("qwen3_5_moe",)
DENSE_MODEL_TYPES = ("qwen3_5",)
LAYER_TYPES = ("linear_attention", "full_attention")


def _require(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise Qwen35Error(f"config.json: missing field '{where}.{key}'; the checkpoint's config is incomplete")
    return d[key]


def _take(cls, d: dict, where: str, required: tuple[str, ...]) -> dict:
    """Keyword arguments for dataclass ``cls`` from ``d``: required names must be present."""
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names and v is not None}
    for key in required:
        kwargs[key] = _require(d, key, where)
    return kwargs


@dataclass
class RopeConfig:
    """Text-side rotary embedding: partial, interleaved 3-D M-RoPE (docs/architecture.md §5, §8)."""

    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: list[int] = field(default_factory=lambda: [11, 11, 10])
    mrope_interleaved: bool = True
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None


@dataclass
class TextConfig:
    """The language model (``text_config``)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 256
    layer_types: list[str] = field(default_factory=list)
    full_attention_interval: int = 4
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # MoE members; num_experts == 0 means a dense member with an ``intermediate_size`` MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    intermediate_size: int = 0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262_144
    tie_word_embeddings: bool = False
    mtp_num_hidden_layers: int = 0
    rope: RopeConfig = field(default_factory=RopeConfig)
    eos_token_id: list[int] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim


@dataclass
class VisionConfig:
    """The ViT (``vision_config``); used by the vision tower."""

    depth: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    intermediate_size: int = 4304
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    out_hidden_size: int = 4096
    rope_theta: float = 10_000.0


@dataclass
class ModelConfig:
    """The whole checkpoint: text + vision + token ids + quantisation map."""

    model_type: str
    text: TextConfig
    vision: VisionConfig | None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    # mlx-lm style map: {"group_size", "bits", "mode", "<module path>": {...} | False}; None = unquantised.
    quantization: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.text.is_moe


def _parse_rope(text: dict) -> RopeConfig:
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in text and key not in params:
            params[key] = text[key]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    rope = RopeConfig(
        **{k: v for k, v in params.items() if k in {f.name for f in fields(RopeConfig)} and v is not None}
    )
    if rope.rope_type not in ("default", "yarn", "mrope"):
        raise Qwen35Error(
            f"config.json: text_config.rope_parameters.rope_type '{rope.rope_type}' is not supported; use 'default' or 'yarn'"
        )
    if sum(rope.mrope_section) * 2 != int(text.get("head_dim", 256) * rope.partial_rotary_factor):
        raise Qwen35Error(
            f"config.json: rope_parameters.mrope_section {rope.mrope_section} does not cover the rotary dims "
            f"(head_dim × partial_rotary_factor / 2); fix the config"
        )
    return rope


def parse_text_config(text: dict, model_type: str, top: dict) -> TextConfig:
    """Build and validate the text config; errors name the field."""
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    kwargs = _take(TextConfig, text, "text_config", required)
    kwargs.pop("rope", None)
    kwargs.pop("eos_token_id", None)
    cfg = TextConfig(**kwargs, rope=_parse_rope(text))
    eos = text.get("eos_token_id", top.get("eos_token_id"))
    cfg.eos_token_id = [eos] if isinstance(eos, int) else list(eos or [])
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in top:
        cfg.tie_word_embeddings = bool(top["tie_word_embeddings"])

    if not cfg.layer_types:
        interval = cfg.full_attention_interval
        cfg.layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(cfg.num_hidden_layers)
        ]
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise Qwen35Error(
            f"config.json: text_config.layer_types has {len(cfg.layer_types)} entries but num_hidden_layers is "
            f"{cfg.num_hidden_layers}; they must agree"
        )
    bad = sorted(set(cfg.layer_types) - set(LAYER_TYPES))
    if bad:
        raise Qwen35Error(
            f"config.json: text_config.layer_types has unknown entries {bad}; expected {list(LAYER_TYPES)}"
        )

    if model_type in MOE_MODEL_TYPES:
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
            if not getattr(cfg, key):
                raise Qwen35Error(f"config.json: missing field 'text_config.{key}' for a {model_type} (MoE) checkpoint")
        if cfg.num_experts_per_tok > cfg.num_experts:
            raise Qwen35Error(
                f"config.json: text_config.num_experts_per_tok ({cfg.num_experts_per_tok}) exceeds num_experts "
                f"({cfg.num_experts})"
            )
    else:
        cfg.num_experts = 0
        if not cfg.intermediate_size:
            raise Qwen35Error(
                f"config.json: missing field 'text_config.intermediate_size' for a dense {model_type} checkpoint"
            )

    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise Qwen35Error(
            f"config.json: text_config.num_attention_heads ({cfg.num_attention_heads}) is not a multiple of "
            f"num_key_value_heads ({cfg.num_key_value_heads})"
        )
    if cfg.linear_num_value_heads % cfg.linear_num_key_heads:
        raise Qwen35Error(
            f"config.json: text_config.linear_num_value_heads ({cfg.linear_num_value_heads}) is not a multiple of "
            f"linear_num_key_heads ({cfg.linear_num_key_heads})"
        )
    if cfg.hidden_act != "silu":
        raise Qwen35Error(
            f"config.json: text_config.hidden_act '{cfg.hidden_act}' is not supported; Qwen3.5 uses 'silu'"
        )
    return cfg


def parse_config(raw: dict, source: str = "config.json") -> ModelConfig:
    """Parse a Qwen3.5 ``config.json`` dict (HF, ours, mlx-lm or mlx-vlm flavour)."""
    model_type = raw.get("model_type")
    if model_type not in MOE_MODEL_TYPES + DENSE_MODEL_TYPES:
        raise Qwen35Error(
            f"{source}: model_type '{model_type}' is not a Qwen3.5 model; expected one of "
            f"{list(MOE_MODEL_TYPES + DENSE_MODEL_TYPES)}"
        )
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise Qwen35Error(f"{source}: missing field 'text_config'; this is not a Qwen3.5 checkpoint config")
    vision_raw = raw.get("vision_config")
    vision = None
    if isinstance(vision_raw, dict):
        vision = VisionConfig(**_take(VisionConfig, vision_raw, "vision_config", ()))
        rope = vision_raw.get("rope_parameters") or {}
        if rope.get("rope_theta"):
            vision.rope_theta = float(rope["rope_theta"])
    top_ids = {
        k: raw[k]
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        if k in raw
    }
    return ModelConfig(
        model_type=model_type,
        text=parse_text_config(text, model_type, raw),
        vision=vision,
        quantization=raw.get("quantization"),
        raw=raw,
        **top_ids,
    )


def read_config_json(model_dir: str | Path, argument: str = "--model") -> dict:
    """The raw ``<model_dir>/config.json``; errors name the file and the ``argument`` that pointed at it."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise Qwen35Error(
            f"{path}: not found; {argument} must point at a Qwen3.5 checkpoint directory (it holds config.json)"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Qwen35Error(
            f"{path}: not valid JSON ({e.__class__.__name__}); re-download or re-convert the checkpoint"
        ) from None


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and parse ``<model_dir>/config.json``."""
    return parse_config(read_config_json(model_dir), source=str(Path(model_dir) / "config.json"))
