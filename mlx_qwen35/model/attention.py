"""Gated attention: the full-attention mixer of every fourth layer (docs/architecture.md §5)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from ..config import TextConfig
from .norms import RMSNorm1p
from .parallel import RankShare, sum_partials
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
        # Tensor-parallel runs: this rank holds a slice of the heads; the ranks' outputs add up (§21).
        self.share: RankShare | None = None

    def queries_keys_values(self, x: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, ...]:
        """q [B, Hq, T, D], k and v [B, Hkv, T, D] (normed, rotated), and the output gate [B, T, Hq·D]."""
        B, T, _ = x.shape
        query, gate = mx.split(self.q_proj(x).reshape(B, T, self.num_heads, 2 * self.head_dim), 2, axis=-1)
        q = self.q_norm(query).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        return self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin), v, gate.reshape(B, T, -1)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache=None) -> mx.array:
        """q over the cache's keys and values after appending k, v: [B, Hq, T, D]."""
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, Hkv, offset + T, D]
        return scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)

    def attend_each(self, q: mx.array, k: mx.array, v: mx.array, cache) -> mx.array:
        """Like ``attend`` for T positions appended at once, each query run alone over the keys up to its own,
        as a decode step runs it (no mask), so the numbers are a decode step's (docs/architecture.md §20.2)."""
        T = q.shape[2]
        keys, values = cache.update_and_fetch(k, v)  # [B, Hkv, offset, D], quantised: (data, scales, biases)
        start = cache.offset - T

        def upto(x, n):
            return tuple(part[..., :n, :] for part in x) if isinstance(x, tuple) else x[..., :n, :]

        outs = [
            scaled_dot_product_attention(
                q[:, :, t : t + 1], upto(keys, start + t + 1), upto(values, start + t + 1), cache, self.scale, None
            )
            for t in range(T)
        ]
        return mx.concatenate(outs, axis=2)

    def output(self, attended: mx.array, gate: mx.array) -> mx.array:
        """o_proj(attention · sigmoid(gate)): attended [B, Hq, T, D] → [B, T, H]."""
        B, _, T, _ = attended.shape
        out = self.o_proj(attended.transpose(0, 2, 1, 3).reshape(B, T, -1) * mx.sigmoid(gate))
        return sum_partials(self.share, out)

    def __call__(self, x: mx.array, cos_sin: tuple[mx.array, mx.array], cache=None) -> mx.array:
        q, k, v, gate = self.queries_keys_values(x, *cos_sin)
        return self.output(self.attend(q, k, v, create_attention_mask(x, cache), cache), gate)
