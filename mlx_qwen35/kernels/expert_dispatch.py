"""Routed experts of the sparse MoE (ARCHITECTURE.md §6): the pure-MLX specification and the Metal dispatch.

routed[t] = Σ_j w[t, j] · W_down,e (silu(W_gate,e x[t]) ⊙ W_up,e x[t]),  e = indices[t, j].
The experts live in mlx-lm's ``SwitchGLU`` (stacked [E, out, in]; ``QuantizedSwitchLinear`` once quantised).
"""

import mlx.core as mx
import mlx.nn as nn

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.kernels import resolve_use_kernel

# From this many token–expert pairs on, sorting them by expert pays (SwitchGLU's threshold, so the
# pure path keeps its numbers).
SORT_MIN_PAIRS = 64


def _check_shapes(x: mx.array, indices: mx.array, weights: mx.array, experts: nn.Module) -> None:
    problems = []
    if indices.shape != weights.shape:
        problems.append(f"indices {indices.shape} != weights {weights.shape}")
    if indices.shape[:-1] != x.shape[:-1]:
        problems.append(f"indices {indices.shape} and x {x.shape} differ before the last axis")
    if x.shape[-1] != experts.gate_proj.input_dims:
        problems.append(f"x has {x.shape[-1]} features, the experts take {experts.gate_proj.input_dims}")
    if problems:
        raise Qwen35Error("routed experts: " + "; ".join(problems))


def _routed_pure(x: mx.array, indices: mx.array, weights: mx.array, experts: nn.Module) -> mx.array:
    """The specification: SwitchGLU's gather matmuls (sorted by expert for many pairs), then Σ_j w_j y_j."""
    x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, H]: one row per token, broadcast over its k experts
    do_sort = indices.size >= SORT_MIN_PAIRS
    idx = indices
    if do_sort:
        k = indices.shape[-1]
        order = mx.argsort(indices.flatten())
        x, idx = x.flatten(0, -3)[order // k], indices.flatten()[order]  # [P, 1, H], [P]
    gate = experts.gate_proj(x, idx, sorted_indices=do_sort)
    h = experts.activation(experts.up_proj(x, idx, sorted_indices=do_sort), gate)  # silu(gate) · up
    y = experts.down_proj(h, idx, sorted_indices=do_sort)  # [..., k, 1, H] or sorted [P, 1, H]
    if do_sort:
        y = mx.unflatten(y[mx.argsort(order)], 0, indices.shape)
    return (y.squeeze(-2) * weights[..., None]).sum(axis=-2)


def routed_experts(
    x: mx.array, indices: mx.array, weights: mx.array, experts: nn.Module, *, use_kernel: bool | None = None
) -> mx.array:
    """Σ_j weights[..., j] · expert_{indices[..., j]}(x) for x [..., H], indices/weights [..., k]: [..., H]."""
    _check_shapes(x, indices, weights, experts)
    return _routed_pure(x, indices, weights, experts)
