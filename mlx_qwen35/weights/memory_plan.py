"""What a checkpoint needs in memory, and how fast decode can be at best (docs/architecture.md §19).

One source for the numbers ``convert --dry-run``, ``mlx-qwen35 plan``, ``load``'s wired-limit warning and
the README's fit table print: the weight bytes are the converter's own prediction (``predict_size``, which
is what it writes), the caches follow the shapes the model allocates, and the decode roofline divides a
chip's memory bandwidth by the bytes one token must read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..config import ModelConfig, load_config, parse_config
from .layout import expected_tensors, read_safetensors_header
from .quantize import RECIPES, Recipe, nbytes, stored_tensors

# A decoding step does not touch these; of these it reads top_k / num_experts; of this one row.
_UNREAD = re.compile(r"^(visual|vision_tower|mtp)\.|\.visual\.|\.mtp\.")
_EXPERTS = re.compile(r"\.mlp\.(experts|switch_mlp)\.")
_EMBEDDING = re.compile(r"embed_tokens\.(weight|scales|biases)$")

GIB = 2**30
MIB = 2**20
# What macOS and the apps beside the model keep when iogpu.wired_limit_mb is raised.
OS_RESERVE_GIB = 8
FIT_CONTEXT_TOKENS = 131_072
ROOFLINE_CONTEXT_TOKENS = 4096  # the README's decode ceilings: a short conversation
MAC_MEMORY_GIB = (192, 256)
# Apple's published unified-memory bandwidths (GB/s) of the chips the 397B runs on.
CHIP_BANDWIDTH_GBS = {"M2 Ultra": 800, "M3 Ultra": 819, "M4 Max": 546, "M5 Max": 614}
# Sustained SSD reads (GB/s), for experts streamed from an expert store (docs/architecture.md §6.1). The Verge
# measured 13.6 GB/s on a 16" M5 Max with a 4 TB SSD, "86% faster reads than its M4 counterparts" (hence 7.3 for
# the M4 Max); no comparable figure was found for the Ultras, so they get no projection.
SSD_READ_GBS = {"M4 Max": 7.3, "M5 Max": 13.6}
SSD_READ_SOURCE = 'The Verge, 16" M5 Max review: 13.6 GB/s sustained read, 86% above the M4 Max (→ 7.3)'
# The expert cache's decode hit rate at a share of the experts resident (1 − bytes read per token ÷ the routed
# experts' bytes per token, prefetches counted as reads), measured on the trained demo model (32 experts, top-4)
# by benchmarks/bench_expert_offload.py; projections interpolate it unless given one.
MEASURED_HIT_RATE = {0.0: 0.0, 0.1: 0.23, 0.25: 0.46, 0.5: 0.72, 1.0: 1.0}
# Prompt tokens per forward pass while prefilling: what bounds the prefill workspace at any length.
PREFILL_STEP_SIZE = 2048
# Activations and caches on a Mac are bf16; the DeltaNet recurrent state is fp32 (docs/architecture.md §4.9).
ACTIVATION_BYTES = 2
STATE_BYTES = 4

# ------------------------------------------------------------------------------------------- the family

# text_config values of the released members (docs/architecture.md §1.3); 9B and up use the large ViT.
_SHARED_TEXT = {
    "head_dim": 256,
    "vocab_size": 248320,
    "linear_num_key_heads": 16,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "mtp_num_hidden_layers": 1,
    "tie_word_embeddings": False,
}
_LARGE_VIT = {
    "depth": 27,
    "hidden_size": 1152,
    "num_heads": 16,
    "intermediate_size": 4304,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "num_position_embeddings": 2304,
    "in_channels": 3,
}


def _member(model_type: str, hidden: int, layers: int, heads: int, kv_heads: int, value_heads: int, **ffn) -> dict:
    """config.json of a released member: the family's shared text fields, its own sizes, the large ViT."""
    text = _SHARED_TEXT | dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (layers // 4),  # full_attention_interval 4
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        linear_num_value_heads=value_heads,
        **ffn,
    )
    return {"model_type": model_type, "text_config": text, "vision_config": _LARGE_VIT | {"out_hidden_size": hidden}}


RELEASED_MOE_CONFIGS = {
    name: _member(
        "qwen3_5_moe",
        h,
        layers,
        heads,
        2,
        hv,
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=inter,
        shared_expert_intermediate_size=inter,
    )
    for name, (h, layers, heads, hv, experts, top_k, inter) in {
        "Qwen3.5-397B-A17B": (4096, 60, 32, 64, 512, 10, 1024),
        "Qwen3.5-122B-A10B": (3072, 48, 32, 64, 256, 8, 1024),
        "Qwen3.5-35B-A3B": (2048, 40, 16, 32, 256, 8, 512),
    }.items()
}
# The dense members whose configs are confirmed (4B and 2B are not: docs/architecture.md §1.3).
RELEASED_DENSE_CONFIGS = {
    name: _member("qwen3_5", h, layers, heads, kv, hv, intermediate_size=inter)
    for name, (h, layers, heads, kv, hv, inter) in {
        "Qwen3.5-27B": (5120, 64, 24, 4, 48, 17408),
        "Qwen3.5-9B": (4096, 32, 16, 4, 32, 12288),
    }.items()
}
RELEASED_CONFIGS = RELEASED_MOE_CONFIGS | RELEASED_DENSE_CONFIGS


# ------------------------------------------------------------------------------------------- the plan


def kv_cache_bytes(cfg: ModelConfig, tokens: int, kv_bits: int | None = None) -> int:
    """K and V of every attention layer for ``tokens`` (bf16, or quantised with group 64 + bf16 scale/bias)."""
    t = cfg.text
    elements = t.layer_types.count("full_attention") * 2 * t.num_key_value_heads * t.head_dim * tokens
    if kv_bits is None:
        return elements * ACTIVATION_BYTES
    return elements * kv_bits // 8 + elements // 64 * 2 * ACTIVATION_BYTES


def recurrent_state_bytes(cfg: ModelConfig) -> int:
    """The DeltaNet layers' fp32 states and conv windows: the same at any context length."""
    t = cfg.text
    linear = t.layer_types.count("linear_attention")
    state = t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim * STATE_BYTES
    conv = (t.linear_conv_kernel_dim - 1) * t.linear_conv_dim * ACTIVATION_BYTES
    return linear * (state + conv)


def cache_bytes(cfg: ModelConfig, tokens: int, kv_bits: int | None = None) -> int:
    """All of one conversation's cache at ``tokens``: the KV cache plus the recurrent states."""
    return kv_cache_bytes(cfg, tokens, kv_bits) + recurrent_state_bytes(cfg)


def prefill_workspace_bytes(cfg: ModelConfig, step_size: int) -> int:
    """Estimate of the largest activations one prefill step of ``step_size`` tokens holds at once.

    The widest layer's intermediates (the experts' gate, up and product rows for every routed token,
    or the dense MLP's; the DeltaNet projections with their chunked states; attention's q/k/v/gate)
    plus the residual stream in and out. Attention scores are not counted: Metal's fused attention
    never holds them.
    """
    t, s = cfg.text, step_size
    if t.is_moe:
        mlp = s * t.num_experts_per_tok * (3 * t.moe_intermediate_size + t.hidden_size)
        mlp += s * 3 * t.shared_expert_intermediate_size
    else:
        mlp = s * 3 * t.intermediate_size
    chunks = math.ceil(s / 64)  # the chunked DeltaNet form keeps one state per 64-token chunk
    deltanet = s * 2 * (t.linear_conv_dim + t.linear_value_dim + 2 * t.linear_num_value_heads)
    deltanet_states = chunks * t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim
    attention = s * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    widest = max(mlp, deltanet, attention) * ACTIVATION_BYTES + deltanet_states * STATE_BYTES
    return widest + 4 * s * t.hidden_size * ACTIVATION_BYTES


def predicted_tensor_bytes(cfg: ModelConfig, recipe: Recipe, dtype: str = "bfloat16") -> dict[str, int]:
    """Bytes of every tensor the converter writes for ``cfg`` under ``recipe``, by stored name."""
    return {
        stored: nbytes(shape, d)
        for name, shape in expected_tensors(cfg).items()
        for stored, shape, d in stored_tensors(name, shape, recipe.spec_for(name, shape), dtype)
    }


class StoredTensor(NamedTuple):
    """One tensor of a safetensors shard, as its header describes it."""

    dtype: str  # the safetensors name: BF16, F32, U32, …
    nbytes: int


def stored_tensors_on_disk(model_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor in ``model_dir``'s shards, from their headers (no data is read)."""
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        header, _ = read_safetensors_header(path)
        for key, info in header.items():
            if key != "__metadata__":
                begin, end = info["data_offsets"]
                tensors[key] = StoredTensor(info["dtype"], end - begin)
    return tensors


def plan_model_dir(model_dir: Path, memory_bytes: int, context: int = FIT_CONTEXT_TOKENS) -> MemoryPlan:
    """The plan of a converted checkpoint (ours or a peer's) as it lies on disk."""
    weights = {name: t.nbytes for name, t in stored_tensors_on_disk(model_dir).items()}
    return plan(load_config(model_dir), weights, memory_bytes, context=context)


def decode_read_bytes(cfg: ModelConfig, tensor_bytes: dict[str, int], context: int, kv_bits: int | None = None) -> int:
    """Bytes one decode token reads at ``context``: active weights, the whole KV cache, the states twice.

    Of the routed experts only ``top_k / num_experts`` are read; of the embedding one row (unless tied,
    when it is also the lm_head); the vision tower and the MTP head not at all. Names may be ours or
    mlx-lm's / mlx-vlm's (``switch_mlp``, ``vision_tower``).
    """
    t = cfg.text
    total = 0
    for name, size in tensor_bytes.items():
        if _UNREAD.search(name):
            continue
        if _EXPERTS.search(name):
            size = size * t.num_experts_per_tok // t.num_experts
        elif _EMBEDDING.search(name) and not t.tie_word_embeddings:
            size //= t.vocab_size
        total += size
    return total + kv_cache_bytes(cfg, context, kv_bits) + 2 * recurrent_state_bytes(cfg)


def wired_limit_mb(need_bytes: int) -> int:
    """The ``iogpu.wired_limit_mb`` that wires ``need_bytes`` with 5% to spare, rounded up to a GiB."""
    return math.ceil(need_bytes * 1.05 / GIB) * GIB // MIB


@dataclass(frozen=True)
class MemoryPlan:
    """One model, recipe and context on one machine: what it holds and the decode speed it allows."""

    recipe: str
    context: int
    weights: int
    kv_cache: int
    recurrent_state: int
    prefill_workspace: int
    decode_read: int
    memory: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.recurrent_state + self.prefill_workspace

    @property
    def spare(self) -> int:
        """What is left after the plan and macOS's reserve (negative: it does not fit)."""
        return self.memory - OS_RESERVE_GIB * GIB - self.total

    @property
    def fits(self) -> bool:
        return self.spare >= 0

    @property
    def wired_limit_mb(self) -> int:
        return wired_limit_mb(self.total)

    def roofline_tokens_per_s(self, bandwidth_gbs: float) -> float:
        """Decode tokens/s if every byte were read once at the chip's full bandwidth: the ceiling."""
        return bandwidth_gbs * 1e9 / self.decode_read


def plan(
    cfg: ModelConfig,
    tensor_bytes: dict[str, int],
    memory_bytes: int,
    context: int = FIT_CONTEXT_TOKENS,
    kv_bits: int | None = None,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    recipe: str = "as converted",
) -> MemoryPlan:
    """The memory plan of ``cfg`` with these stored tensors (predicted, or as stored on disk)."""
    return MemoryPlan(
        recipe=recipe,
        context=context,
        weights=sum(tensor_bytes.values()),
        kv_cache=kv_cache_bytes(cfg, context, kv_bits),
        recurrent_state=recurrent_state_bytes(cfg),
        prefill_workspace=prefill_workspace_bytes(cfg, min(prefill_step_size, context)),
        decode_read=decode_read_bytes(cfg, tensor_bytes, context, kv_bits),
        memory=memory_bytes,
    )


def size_table(dtype: str = "bfloat16") -> str:
    """Markdown table: each recipe of each released member; fits a 192 / 256 GB Mac at 128k; roofline at 4k."""
    macs = [f"{m} GB Mac" for m in MAC_MEMORY_GIB]
    chips = [f"{c} tok/s" for c in CHIP_BANDWIDTH_GBS]
    head = "| model | recipe | weights (GB) | " + " | ".join(macs + chips) + " |"
    rows = [head, "|" + "---|" * (3 + len(macs) + len(chips))]
    for name, raw in RELEASED_CONFIGS.items():
        cfg = parse_config(raw)
        for recipe in RECIPES.values():
            tensors = predicted_tensor_bytes(cfg, recipe, dtype)
            plans = [plan(cfg, tensors, m * GIB, recipe=recipe.name) for m in MAC_MEMORY_GIB]
            fits = [f"yes ({p.spare / GIB:.0f} GiB spare)" if p.fits else "no" for p in plans]
            short = plan(cfg, tensors, 0, context=ROOFLINE_CONTEXT_TOKENS)
            speed = [f"{short.roofline_tokens_per_s(bw):.0f}" for bw in CHIP_BANDWIDTH_GBS.values()]
            rows.append(
                f"| {name} | {recipe.name} | {plans[0].weights / 1e9:,.1f} | " + " | ".join(fits + speed) + " |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(size_table())


@dataclass(frozen=True)
class ExpertStreamPlan:
    """A plan whose routed experts do not all fit: the share kept resident, the rest read from the SSD per token."""

    budget: int  # bytes of routed experts kept in memory
    experts: int  # bytes of all routed experts
    hit_rate: float
    hit_rate_source: str
    expert_read: int  # routed-expert bytes one token uses
    memory_read: int  # bytes one token reads from memory (the plan's decode_read)

    @property
    def share(self) -> float:
        return self.budget / self.experts if self.experts else 1.0

    @property
    def ssd_read(self) -> int:
        """Bytes one token reads from the SSD: the routed experts it uses that are not resident."""
        return int((1 - self.hit_rate) * self.expert_read)

    def tokens_per_s(self, memory_gbs: float, ssd_gbs: float) -> float:
        """Decode tokens/s with memory and SSD reads one after the other (prefetch overlap would add to it)."""
        return 1 / (self.memory_read / (memory_gbs * 1e9) + self.ssd_read / (ssd_gbs * 1e9))


def expert_stream_plan(p: MemoryPlan, cfg: ModelConfig, tensor_bytes: dict[str, int], hit_rate: float | None = None):
    """The expert store's share of ``p``'s machine: what is left beside the other weights and caches holds experts."""
    experts = sum(n for name, n in tensor_bytes.items() if _EXPERTS.search(name) and not _UNREAD.search(name))
    others = p.total - experts
    budget = max(0, min(experts, p.memory - OS_RESERVE_GIB * GIB - others))
    share = budget / experts if experts else 1.0
    if hit_rate is None:
        hit_rate = _interpolate(MEASURED_HIT_RATE, share)
        source = "measured on the trained demo model at that share"
    else:
        source = "given"
    t = cfg.text
    return ExpertStreamPlan(
        budget=budget,
        experts=experts,
        hit_rate=hit_rate,
        hit_rate_source=source,
        expert_read=experts * t.num_experts_per_tok // max(t.num_experts, 1),
        memory_read=p.decode_read,
    )


def _interpolate(points: dict[float, float], x: float) -> float:
    """Piecewise-linear through ``points`` (x → y), clamped at the ends."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if x <= b:
            return points[a] + (points[b] - points[a]) * (x - a) / (b - a)
    return points[xs[-1]]
