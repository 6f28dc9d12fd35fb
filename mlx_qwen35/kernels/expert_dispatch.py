"""Routed experts of the sparse MoE (docs/architecture.md §6): the pure-MLX specification and the Metal dispatch.

routed[t] = Σ_j w[t, j] · W_down,e (silu(W_gate,e x[t]) ⊙ W_up,e x[t]),  e = indices[t, j].
The experts live in mlx-lm's ``SwitchGLU`` (stacked [E, out, in]; ``QuantizedSwitchLinear`` once quantised).
"""

from functools import cache

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.kernels import resolve_path
from mlx_qwen35.kernels.metal_source import metal_kernel

# From this many token–expert pairs on, the kernels group pairs by expert: SwitchGLU's threshold, so
# kernel and pure path sort alike.
SORT_MIN_PAIRS = 64
KERNEL_BITS = (2, 3, 4, 5, 6, 8)  # MLX's affine widths; a 32-value block is always `bits` whole words
ROWS = 4  # SIMD groups (output rows) per threadgroup, as the .metal headers state


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


def routed_pure(x: mx.array, indices: mx.array, weights: mx.array, experts: nn.Module) -> mx.array:
    """The specification: SwitchGLU's gather matmuls (sorted by expert from 64 pairs on), then Σ_j w_j y_j."""
    return (experts(x, indices) * weights[..., None]).sum(axis=-2)


def routed_experts(
    x: mx.array, indices: mx.array, weights: mx.array, experts: nn.Module, *, use_kernel: bool | None = None
) -> mx.array:
    """Σ_j weights[..., j] · expert_{indices[..., j]}(x) for x [..., H], indices/weights [..., k]: [..., H]."""
    _check_shapes(x, indices, weights, experts)
    if kernel_fits(experts) and resolve_path(dispatch_operation(indices.size), use_kernel) == "kernel":
        return routed_kernel(x, indices, weights, experts)
    return routed_pure(x, indices, weights, experts)


def dispatch_operation(pairs: int) -> str:
    """The operation (as the self-check names it) that routes ``pairs`` token–expert pairs: sorted or not."""
    return "expert_dispatch_sorted" if pairs >= SORT_MIN_PAIRS else "expert_dispatch_unsorted"


def kernel_fits(experts: nn.Module) -> bool:
    """The kernels take SwiGLU experts quantised affinely (no bias), gate and up alike; else the pure path."""
    gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
    return (
        isinstance(experts.activation, SwiGLU)
        and all(
            isinstance(p, QuantizedSwitchLinear)
            and p.mode == "affine"
            and p.bits in KERNEL_BITS
            and p.group_size % 32 == 0
            and "bias" not in p
            for p in (gate, up, down)
        )
        and (gate.bits, gate.group_size, gate.scales.dtype) == (up.bits, up.group_size, up.scales.dtype)
    )


def _rows(n: int) -> int:
    return -(-n // ROWS) * ROWS


@cache
def _pair_segments(pairs: int, k: int) -> tuple[mx.array, mx.array]:
    """Unsorted pairs: one segment per pair (seg_start = 0..P) and pair p's token p // k; cached constants."""
    return mx.arange(pairs + 1, dtype=mx.int32), mx.arange(pairs, dtype=mx.int32) // k


@cache
def _expert_ids(num_experts: int) -> mx.array:
    return mx.arange(num_experts, dtype=mx.int32)


def _quant(p: nn.Module) -> list:
    return [p.weight, p.scales, p.biases]


def routed_kernel(x: mx.array, indices: mx.array, weights: mx.array, experts: nn.Module) -> mx.array:
    """Two launches: gate/up with SwiGLU per pair, then down with the router weights (and, unsorted, the sum over k)."""
    gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
    H, I, k = x.shape[-1], gate.output_dims, indices.shape[-1]
    tokens = x.reshape(-1, H)  # [N, H]
    flat = indices.reshape(-1).astype(mx.int32)  # [P], pair p = token p // k, slot p % k
    w = weights.reshape(-1).astype(x.dtype)
    N, P = tokens.shape[0], flat.size
    do_sort = P >= SORT_MIN_PAIRS
    if do_sort:  # one segment per expert, pairs in expert order; unchosen experts get empty segments
        order = mx.argsort(flat).astype(mx.int32)  # sorted position -> pair
        counts = mx.zeros((gate.num_experts,), mx.int32).at[flat].add(1)
        seg_start = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts)])
        seg_expert, pair_token = _expert_ids(gate.num_experts), order // k
    else:  # one segment per pair, in pair order
        seg_start, pair_token = _pair_segments(P, k)
        seg_expert = flat
    gu = dict(T=x.dtype, S=gate.scales.dtype, H=H, I=I, BITS=gate.bits, GROUP_SIZE=gate.group_size)
    (h,) = metal_kernel("expert_dispatch_gate_up")(
        inputs=[tokens, *_quant(gate), *_quant(up), seg_expert, seg_start, pair_token],
        template=list(gu.items()),
        grid=(32, _rows(I), seg_expert.size),
        threadgroup=(32, ROWS, 1),
        output_shapes=[(P, I)],
        output_dtypes=[mx.float32],
    )  # [P, I] float32, in segment order
    dn = dict(T=x.dtype, S=down.scales.dtype, H=H, I=I, BITS=down.bits, GROUP_SIZE=down.group_size)
    if do_sort:
        (y,) = metal_kernel("expert_dispatch_down_sorted")(
            inputs=[h, *_quant(down), seg_expert, seg_start, order, w],
            template=list(dn.items()),
            grid=(32, _rows(H), seg_expert.size),
            threadgroup=(32, ROWS, 1),
            output_shapes=[(P, H)],
            output_dtypes=[mx.float32],
        )  # [P, H] by pair
        out = y.reshape(N, k, H).sum(axis=1).astype(x.dtype)
    else:
        (out,) = metal_kernel("expert_dispatch_down_sum")(
            inputs=[h, *_quant(down), flat, w],
            template=list({**dn, "K": k}.items()),
            grid=(32, _rows(H), N),
            threadgroup=(32, ROWS, 1),
            output_shapes=[(N, H)],
            output_dtypes=[x.dtype],
        )
    return out.reshape(x.shape)
