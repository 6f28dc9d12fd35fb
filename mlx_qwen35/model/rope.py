"""Text-side rotary embedding: partial (first rotary_dim dims of each head), interleaved 3-D M-RoPE.

docs/architecture.md §5 and §8. Every token has a position (t, h, w); frequency i takes its angle from
component H when i ≡ 1 (mod 3) and i < 3·mrope_section[1], W when i ≡ 2 (mod 3) and
i < 3·mrope_section[2], T otherwise. For text t = h = w, which is plain 1-D RoPE.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..config import TextConfig
from ..errors import Qwen35Error


def _yarn_inv_freq(inv_freq: np.ndarray, dim: int, rope, base: float) -> tuple[np.ndarray, float]:
    """YaRN: blend interpolated and extrapolated frequencies; returns (inv_freq, attention scaling)."""
    factor = rope.factor
    original = rope.original_max_position_embeddings
    if not original:
        raise Qwen35Error(
            "config.json: rope_parameters.original_max_position_embeddings is required for rope_type 'yarn'"
        )

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    blended = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    scaling = rope.attention_factor if rope.attention_factor is not None else 0.1 * math.log(factor) + 1.0
    return blended.astype(np.float32), float(scaling)


class MRoPE:
    """Cos/sin tables for 3-D positions, and their application to the rotary part of q and k."""

    def __init__(self, cfg: TextConfig):
        rope = cfg.rope
        dim = cfg.rotary_dim
        self.dim = dim
        inv_freq = 1.0 / (rope.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        self.scaling = 1.0
        if rope.rope_type == "yarn":
            inv_freq, self.scaling = _yarn_inv_freq(inv_freq, dim, rope, rope.rope_theta)
        self.inv_freq = mx.array(inv_freq)  # [dim/2]
        n_freq = dim // 2
        component = np.zeros(n_freq, dtype=np.int32)  # 0 = T, 1 = H, 2 = W
        if rope.mrope_interleaved:
            for c in (1, 2):
                component[c : 3 * rope.mrope_section[c] : 3] = c
        else:  # Qwen2-VL layout: contiguous blocks of T, H, W frequencies
            bounds = np.cumsum([0] + list(rope.mrope_section))
            for c in (1, 2):
                component[bounds[c] : bounds[c + 1]] = c
        self.component = mx.array(component)

    def cos_sin(self, position_ids: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """position_ids [3, B, T] → cos, sin [B, 1, T, dim] in ``dtype`` (HF casts before applying)."""
        pos = position_ids.astype(mx.float32)[self.component]  # [F, B, T]: each frequency's component
        angles = pos.transpose(1, 2, 0) * self.inv_freq  # [B, T, F]
        angles = mx.concatenate([angles, angles], axis=-1)[:, None]  # [B, 1, T, dim]
        return (mx.cos(angles) * self.scaling).astype(dtype), (mx.sin(angles) * self.scaling).astype(dtype)

    def apply(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """Rotate-half RoPE on the first ``dim`` features of x [B, H, T, D]; the rest passes through."""
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        half = self.dim // 2
        rotated_half = mx.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
        return mx.concatenate([rot * cos + rotated_half * sin, rest], axis=-1)


def text_positions(batch: int, length: int, offset: int) -> mx.array:
    """Positions of plain text continuing after ``offset`` tokens: [3, B, T], equal on all components."""
    pos = mx.arange(offset, offset + length)
    return mx.broadcast_to(pos, (3, batch, length))
