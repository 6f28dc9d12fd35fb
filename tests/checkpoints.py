"""Tiny seeded Qwen3.5 checkpoints in the real Hugging Face layouts, the test suite's ground truth.

Built with transformers' own classes and ``save_pretrained`` (so key names and config.json are what
transformers writes: per-expert MoE keys), then completed like a release: ``mtp.*`` tensors (which
transformers never writes), tokenizer, chat template, generation and processor configs. Rewrites
produce the other two layouts the converter must read: fused experts (the BF16 release) and
block-FP8 (the FP8 release). Every parameter is drawn away from HF's initialisation, which zeroes
the (1 + w) norms and would hide a norm applied the wrong way.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    PreTrainedModel,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
)

from mlx_qwen35.weights.layout import FP8_BLOCK, PER_EXPERT_KEY, padded_vocab_size
from mlx_qwen35.weights.random_checkpoint import (
    hf_tensor_shapes,
    random_parameter,
    shape_output_rows,
    write_processor_configs,
    write_shards,
)
from mlx_qwen35.weights.tokenizer_builder import CORPUS, TokenizerInfo, write_generation_config, write_tokenizer_files

TINY_BASE_VOCAB = 512
# Explicit and not the interval-4 pattern, so a loader that derives layer types itself gets caught.
TINY_LAYER_TYPES = [
    "linear_attention",
    "linear_attention",
    "linear_attention",
    "full_attention",
    "linear_attention",
    "full_attention",
]
MAX_SHARD_BYTES = 512 * 1024  # a ~2 MB model → several shards
FP8_E4M3_MAX = 448.0
# Modules the official FP8 release stores as float8_e4m3fn + weight_scale_inv (docs/architecture.md §2.3).
FP8_QUANTIZED = re.compile(
    r"(mlp\.experts\.\d+\.(gate|up|down)_proj"
    r"|mlp\.shared_expert\.(gate|up|down)_proj"
    r"|self_attn\.(q|k|v|o)_proj"
    r"|linear_attn\.(in_proj_qkv|in_proj_z|out_proj))\.weight$"
)


@dataclass(frozen=True)
class TinyCheckpoint:
    """A built checkpoint dir and what tests need to check a port of it against transformers."""

    path: Path  # the checkpoint, in ``layout``
    layout: str  # "per_expert" (save_pretrained), "fused" (BF16 release) or "fp8" (FP8 release)
    config: dict  # config.json as written
    tokens: TokenizerInfo  # tokenizer size and Qwen's special ids
    reference_path: Path  # what transformers loads: == path, except fp8 → the exact dequantised fp32 copy

    @property
    def is_moe(self) -> bool:
        return self.config["model_type"] == "qwen3_5_moe"

    @property
    def text_config(self) -> dict:
        return self.config["text_config"]

    def load_reference(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        """The transformers model of this checkpoint in ``dtype``, eval mode (float64: the numerical oracle)."""
        cls = Qwen3_5MoeForConditionalGeneration if self.is_moe else Qwen3_5ForConditionalGeneration
        # The default grouped-mm experts have no float64 kernel; the eager loop over experts computes the same.
        experts = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
        return cls.from_pretrained(self.reference_path, dtype=dtype, **experts).eval()

    def prompt_ids(self, n: int = 64) -> list[int]:
        """``n`` deterministic token ids of ordinary English text (the embedded corpus)."""
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(self.path / "tokenizer.json")).encode(CORPUS).ids
        assert len(ids) >= n, f"the corpus only has {len(ids)} tokens"
        return ids[:n]


def tiny_text_config(tokens: TokenizerInfo, moe: bool, hidden_size: int = 64, moe_intermediate_size: int = 32) -> dict:
    """A small ``text_config`` exercising every code path: both mixers, GQA, partial M-RoPE, MoE or MLP."""
    text = {
        "vocab_size": padded_vocab_size(tokens.size),  # rows past the tokenizer are padding, as released
        "hidden_size": hidden_size,
        "num_hidden_layers": len(TINY_LAYER_TYPES),
        "layer_types": TINY_LAYER_TYPES,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        # rotary dim = 32 · 0.25 = 8 → 4 frequencies, split T/H/W = 2/1/1 (interleaved)
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "eos_token_id": tokens.endoftext_id,
        "tie_word_embeddings": not moe,  # the small dense releases (0.8B) tie lm_head to the embedding
    }
    if moe:
        text |= {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": moe_intermediate_size,
            "shared_expert_intermediate_size": moe_intermediate_size,
        }
    else:
        text |= {"intermediate_size": 96}
    return text


def tiny_vision_config(out_hidden_size: int) -> dict:
    """A 2-block ViT with the real patch / temporal / merge sizes and a 4×4 learned position table."""
    return {
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 2,
        "intermediate_size": 64,
        "out_hidden_size": out_hidden_size,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 16,
        "in_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "deepstack_visual_indexes": [],
    }


@torch.no_grad()
def _perturb(model: PreTrainedModel, tokens: TokenizerInfo, rng: np.random.Generator) -> None:
    """Redraw every parameter (in-memory names; experts are fused 3-D tensors there)."""
    for name, param in model.named_parameters():
        value = random_parameter(name, tuple(param.shape), rng)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):  # lm_head is listed only when untied
            shape_output_rows(value, tokens)
        param.copy_(torch.from_numpy(value))


def _mtp_tensors(config: dict, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The ``mtp.*`` block (§2.2) that transformers never writes: fc, three norms, one full-attention layer."""
    shapes = hf_tensor_shapes(config, layout="per_expert")
    return {n: torch.from_numpy(random_parameter(n, s, rng)) for n, s in shapes.items() if n.startswith("mtp.")}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors |= load_file(shard)
    return tensors


def _copy_side_files(src: Path, dst: Path) -> None:
    """Everything but the weights: configs, tokenizer, template."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)


def build_per_expert_checkpoint(
    path: Path, moe: bool, seed: int = 0, hidden_size: int = 64, moe_intermediate_size: int = 32
) -> TinyCheckpoint:
    """Build with transformers + ``save_pretrained`` (per-expert keys), then add what a release has."""
    path = Path(path)
    tokens = write_tokenizer_files(path, base_vocab_size=TINY_BASE_VOCAB)
    write_generation_config(path, tokens)
    text = tiny_text_config(tokens, moe, hidden_size, moe_intermediate_size)
    vision = tiny_vision_config(out_hidden_size=hidden_size)
    special = {
        "image_token_id": tokens.image_token_id,
        "video_token_id": tokens.video_token_id,
        "vision_start_token_id": tokens.vision_start_token_id,
        "vision_end_token_id": tokens.vision_end_token_id,
        "tie_word_embeddings": text["tie_word_embeddings"],
    }
    config_cls, model_cls = (
        (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration)
        if moe
        else (Qwen3_5Config, Qwen3_5ForConditionalGeneration)
    )
    torch.manual_seed(seed)
    model = model_cls(config_cls(text_config=text, vision_config=vision, **special)).eval()
    rng = np.random.default_rng(seed)
    _perturb(model, tokens, rng)

    staging = path / "_save_pretrained"
    model.save_pretrained(staging)
    saved = _read_tensors(staging)
    shutil.copy2(staging / "config.json", path / "config.json")
    shutil.rmtree(staging)
    config = json.loads((path / "config.json").read_text())
    write_shards(saved | _mtp_tensors(config, rng), path, MAX_SHARD_BYTES, save_file)
    write_processor_configs(path, vision)
    return TinyCheckpoint(path=path, layout="per_expert", config=config, tokens=tokens, reference_path=path)


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert keys → the released layout: ``experts.gate_up_proj`` [E, 2I, H] (gate rows first), ``down_proj`` [E, H, I]."""
    fused: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        m = PER_EXPERT_KEY.match(name)
        if m is None:
            fused[name] = tensor
        else:
            experts.setdefault(m["prefix"], {}).setdefault(m["proj"], {})[int(m["expert"])] = tensor
    for prefix, projs in experts.items():
        n = len(projs["gate"])
        fused[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([projs["gate"][e], projs["up"][e]]) for e in range(n)])
        fused[f"{prefix}.down_proj"] = torch.stack([projs["down"][e] for e in range(n)])
    return dict(sorted(fused.items()))


def rewrite_fused(source: TinyCheckpoint, path: Path) -> TinyCheckpoint:
    """Rewrite a per-expert MoE checkpoint into the fused-expert layout of the BF16 release (also ``mtp.layers.0``)."""
    _copy_side_files(source.path, path)
    write_shards(fuse_experts(_read_tensors(source.path)), path, MAX_SHARD_BYTES, save_file)
    return TinyCheckpoint(
        path=path, layout="fused", config=source.config, tokens=source.tokens, reference_path=source.reference_path
    )


def quantize_fp8_blockwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale_inv [ceil(out/128), ceil(in/128)], exact fp32 dequantisation fp8 × scale_inv per block)."""
    out_dim, in_dim = weight.shape
    rows, cols = math.ceil(out_dim / FP8_BLOCK), math.ceil(in_dim / FP8_BLOCK)
    padded = torch.zeros(rows * FP8_BLOCK, cols * FP8_BLOCK)
    padded[:out_dim, :in_dim] = weight
    blocks = padded.view(rows, FP8_BLOCK, cols, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax)).float()
    expanded = scale_inv.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:out_dim, :in_dim]
    fp8 = (weight / expanded).to(torch.float8_e4m3fn)
    return fp8, scale_inv, fp8.float() * expanded


def rewrite_fp8(source: TinyCheckpoint, path: Path, reference_path: Path) -> TinyCheckpoint:
    """Rewrite a per-expert checkpoint into the official block-FP8 layout; its dequantised fp32 twin goes to ``reference_path``."""
    tensors = _read_tensors(source.path)
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if FP8_QUANTIZED.search(name):
            fp8, scale_inv, exact = quantize_fp8_blockwise(tensor)
            quantized[name] = fp8
            quantized[name + "_scale_inv"] = scale_inv
            dequantized[name] = exact
        else:
            quantized[name] = tensor
            dequantized[name] = tensor
    not_converted = sorted(
        {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight") and not FP8_QUANTIZED.search(n)}
    )
    config = source.config | {
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            "modules_to_not_convert": not_converted,
        }
    }
    _copy_side_files(source.path, path)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_shards(dict(sorted(quantized.items())), path, MAX_SHARD_BYTES, save_file)
    _copy_side_files(source.path, reference_path)
    write_shards(dequantized, reference_path, MAX_SHARD_BYTES, save_file)
    return TinyCheckpoint(path=path, layout="fp8", config=config, tokens=source.tokens, reference_path=reference_path)


def hf_greedy(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """transformers' greedy continuation and its smallest top-1 − top-2 logit gap (how robust it is to noise)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    gaps = [float(t[0].topk(2).values[0] - t[0].topk(2).values[1]) for t in out.logits]
    return out.sequences[0, len(prompt_ids) :].tolist(), min(gaps)


def convert_tiny(checkpoint: TinyCheckpoint, out: Path, recipe: str = "bf16") -> Path:
    """Convert a tiny checkpoint with our converter: unquantised tensors in float32, tiny shards (several files)."""
    from mlx_qwen35.weights.convert import convert

    convert(
        hf_path=str(checkpoint.path),
        mlx_path=out,
        recipe=recipe,
        dtype="float32",
        shard_size_gb=0.001,
        revision=None,
        overwrite=False,
        dry_run=False,
    )
    return out
