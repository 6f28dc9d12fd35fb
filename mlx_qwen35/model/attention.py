"""Gated attention: the full-attention mixer of every fourth layer (docs/architecture.md §5)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from ..config import TextConfig
from .norms import RMSNorm1p
from .rope import MRoPE


class GatedAttention(nn.Module):
    """GQA with per-head q/k RMSNorm1p, partial M-RoPE, and a sigmoid output gate.

    ``q_proj`` yields, per head, head_dim query rows followed by head_dim gate rows.
    """

    def __init__(self, cfg: TextConfig, rope: MRoPE):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim * 2, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm1p(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = RMSNorm1p(self.head_dim, eps=cfg.rms_norm_eps)
        self.rope = rope

    def __call__(self, x: mx.array, cos_sin: tuple[mx.array, mx.array], cache=None) -> mx.array:
        B, T, _ = x.shape
        query, gate = mx.split(self.q_proj(x).reshape(B, T, self.num_heads, 2 * self.head_dim), 2, axis=-1)
        q = self.q_norm(query).transpose(0, 2, 1, 3)  # [B, Hq, T, D]
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)

        cos, sin = cos_sin
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        mask = create_attention_mask(x, cache)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, Hkv, offset + T, D]
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)  # [B, T, Hq·D]
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, T, -1)))
