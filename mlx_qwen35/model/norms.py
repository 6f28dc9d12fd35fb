"""The two RMSNorms of Qwen3.5 (docs/architecture.md §3)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class RMSNorm1p(nn.Module):
    """Zero-centred RMSNorm: y = x / rms(x) · (1 + w), computed in fp32.

    The converter stores ``1 + w`` (in fp32), so the module multiplies by its weight as is.
    """

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps).astype(x.dtype)


class GatedRMSNorm(nn.Module):
    """DeltaNet output norm: y = (o / rms(o)) · w · silu(z); the weight is used as stored (not 1 + w)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, o: mx.array, z: mx.array) -> mx.array:
        normed = mx.fast.rms_norm(o.astype(mx.float32), None, self.eps).astype(o.dtype) * self.weight
        return (normed.astype(mx.float32) * nn.silu(z.astype(mx.float32))).astype(o.dtype)
