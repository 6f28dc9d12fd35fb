"""Feed-forward blocks: the sparse MoE of the MoE members and the dense SwiGLU MLP (docs/architecture.md §6)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from ..config import TextConfig
from ..kernels.expert_dispatch import routed_experts
from .parallel import RankShare, sum_partials


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)). The dense members' FFN and the MoE's shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        # A dense member's MLP in a tensor-parallel run: this rank holds a slice of its rows (the shared expert's
        # partial output is summed by its SparseMoE instead).
        self.share: RankShare | None = None

    def __call__(self, x: mx.array) -> mx.array:
        return sum_partials(self.share, self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x)))


class SparseMoE(nn.Module):
    """Top-k of num_experts routed SwiGLU experts (renormalised fp32 softmax) + one gated shared expert.

    Experts are stacked [E, out, in] (mlx-lm's SwitchGLU holds the weights); ``routed_experts``
    runs them: the expert-dispatch Metal kernels for quantised experts on a Mac, else MLX's gather
    matmuls, with token–expert pairs sorted by expert in prefill so each expert's weights are read once.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        # Expert-parallel runs: this rank holds a slice of each expert's rows; the ranks' outputs add up.
        self.share: RankShare | None = None
        # Set by the loader for a checkpoint with an expert store: the routed experts stream through it (§6.1).
        self.expert_cache = None
        self.layer_index = -1

    @property
    def streams_experts(self) -> bool:
        """Whether the routed experts come from an expert store (the layer then reads its routing on the host)."""
        return self.expert_cache is not None

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Expert indices [..., k] and their renormalised weights [..., k] (selection in fp32)."""
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        indices = mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        weights = mx.take_along_axis(probs, indices, axis=-1)
        return indices, (weights / weights.sum(axis=-1, keepdims=True)).astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = self.route(x)
        if self.expert_cache is not None:
            routed = self.expert_cache.routed(self.layer_index, x, indices, weights, self.experts)
        else:
            routed = routed_experts(x, indices, weights, self.experts)  # [B, T, H]
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return sum_partials(self.share, routed + shared)


def feed_forward(cfg: TextConfig) -> nn.Module:
    """The FFN of a decoder layer: sparse MoE for MoE members, SwiGLU MLP for dense ones."""
    return SparseMoE(cfg) if cfg.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
