"""Gated DeltaNet recurrence (docs/architecture.md §4.3–4.8): the pure-MLX specification and the Metal dispatch.

Both public functions take the raw conv outputs q, k [B, T, Hk, Dk], v [B, T, Hv, Dv] and the raw
gate projections a, b [B, T, Hv]; they fuse the q/k L2-normalisation, the gates and the recurrence
    S ← α S;  u = β (v − S k̂);  S ← S + u k̂ᵀ;  o = S q̂
with the fp32 state S [B, Hv, Dv, Dk] (value rows × key columns). Value head h reads q/k head h // (Hv/Hk).
"""

import os
import threading
from functools import cache

import mlx.core as mx

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.kernels import kernel_forced, resolve_path
from mlx_qwen35.kernels.metal_source import metal_kernel

CHUNK = 32  # tokens per chunk of the WY/UT form; HF and FLA use 64, but on the CPU 32 is ~1.35× faster (fewer C² flops, same C·D² state work)
_NORM_EPS = 1e-6  # added to Σx² inside the sqrt of the q/k L2-norm


def _normalize_qk(q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
    """q̂ = q/‖q‖·Dk^-½, k̂ = k/‖k‖ in fp32, eps inside the sqrt of the sum."""
    q, k = q.astype(mx.float32), k.astype(mx.float32)
    scale = q.shape[-1] ** -0.5
    q = q * (mx.rsqrt((q * q).sum(-1, keepdims=True) + _NORM_EPS) * scale)
    k = k * mx.rsqrt((k * k).sum(-1, keepdims=True) + _NORM_EPS)
    return q, k


def _gates(a: mx.array, b: mx.array, A_log: mx.array, dt_bias: mx.array) -> tuple[mx.array, mx.array]:
    """β = sigmoid(b) and the log-decay g = −exp(A_log)·softplus(a + dt_bias), both fp32."""
    x = a.astype(mx.float32) + dt_bias.astype(mx.float32)
    g = -mx.exp(A_log.astype(mx.float32)) * mx.logaddexp(x, 0.0)
    return mx.sigmoid(b.astype(mx.float32)), g


def _check_shapes(q, k, v, a, b, A_log, dt_bias, state) -> None:
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[-2:]
    problems = []
    if q.shape != k.shape:
        problems.append(f"q {q.shape} != k {k.shape}")
    if v.shape[:2] != (B, T):
        problems.append(f"v {v.shape} does not start with [B, T] = {[B, T]}")
    if Hv % Hk:
        problems.append(f"Hv = {Hv} is not a multiple of Hk = {Hk}")
    for name, x in (("a", a), ("b", b)):
        if x.shape != (B, T, Hv):
            problems.append(f"{name} {x.shape} != [B, T, Hv] = {[B, T, Hv]}")
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        if x.shape != (Hv,):
            problems.append(f"{name} {x.shape} != [Hv] = {[Hv]}")
    if state is not None and (state.shape != (B, Hv, Dv, Dk) or state.dtype != mx.float32):
        problems.append(f"state {state.shape} {state.dtype} != [B, Hv, Dv, Dk] = {[B, Hv, Dv, Dk]} float32")
    if problems:
        raise Qwen35Error("gated delta: " + "; ".join(problems))


def _path(operation: str, Dk: int, use_kernel: bool | None) -> str:
    """The path to take; the kernel, chosen automatically, falls back to the pure path on an unsupported head size,
    forced, it is an error there."""
    path = resolve_path(operation, use_kernel)
    if path != "kernel" or Dk % 32 == 0:
        return path
    if kernel_forced(use_kernel):
        raise Qwen35Error(f"gated delta kernels need Dk a multiple of 32, got {Dk}: use use_kernel=False")
    return "pure"


@mx.compile
def _step_pure(q, k, v, a, b, A_log, dt_bias, state):
    # Value heads as [Hk, r] groups, so each q/k head meets its r value heads by broadcasting (no repeat), and
    # the state products as multiply + sum: a matrix–vector product would go to the CPU's BLAS, 2× slower here.
    q, k = _normalize_qk(q[:, 0], k[:, 0])  # [B, Hk, Dk]
    beta, g = _gates(a[:, 0], b[:, 0], A_log, dt_bias)  # [B, Hv]
    B, Hk, Dk = k.shape
    _, Hv, Dv, _ = state.shape
    group = (B, Hk, Hv // Hk)
    q, k = q[:, :, None, None, :], k[:, :, None, None, :]  # [B, Hk, 1, 1, Dk]
    S = state.reshape(*group, Dv, Dk) * mx.exp(g).reshape(*group, 1, 1)
    u = beta.reshape(*group, 1) * (v[:, 0].astype(mx.float32).reshape(*group, Dv) - (S * k).sum(-1))  # [B, Hk, r, Dv]
    S = S + u[..., None] * k
    o = (S * q).sum(-1)  # [B, Hk, r, Dv]
    return o.reshape(B, 1, Hv, Dv).astype(v.dtype), S.reshape(B, Hv, Dv, Dk)


def gated_delta_step(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: mx.array,
    *,
    use_kernel: bool | None = None,
) -> tuple[mx.array, mx.array]:
    """One decode token: (o [B, 1, Hv, Dv] in v.dtype, new state [B, Hv, Dv, Dk] fp32)."""
    _check_shapes(q, k, v, a, b, A_log, dt_bias, state)
    if q.shape[1] != 1:
        raise Qwen35Error(f"gated_delta_step takes one token, got T = {q.shape[1]}: use gated_delta_prefill")
    return STEP_PATHS[_path("gated_delta_step", k.shape[-1], use_kernel)](q, k, v, a, b, A_log, dt_bias, state)


def _unit_lower_inverse(L: mx.array) -> mx.array:
    """L^-1 for unit lower-triangular L [..., C, C], C a power of two, by 2×2 blocks:
    [[P, 0], [Q, R]]^-1 = [[P^-1, 0], [−R^-1 Q P^-1, R^-1]] — about C³/3 flops in log2(C) batched steps."""
    C = L.shape[-1]
    if C == 1:
        return mx.ones_like(L)
    h = C // 2
    P_inv, R_inv = _unit_lower_inverse(mx.stack([L[..., :h, :h], L[..., h:, h:]]))
    lower = -(R_inv @ L[..., h:, :h]) @ P_inv
    top = mx.concatenate([P_inv, mx.zeros_like(lower)], axis=-1)
    return mx.concatenate([top, mx.concatenate([lower, R_inv], axis=-1)], axis=-2)


# MLX's CPU matmul goes to BLAS, whose speed depends on operand layout (a reference BLAS runs
# A @ Bᵀ-views 2.5× slower than A @ B): right-hand operands below are made row-contiguous first.
_rows = mx.contiguous


@mx.compile
def _chunk_prepare(q, k, v, beta, g):
    """Everything within a chunk that does not depend on the incoming state, all chunks at once.

    q, k: [B, Hk, 1, N, C, Dk]; v: [B, Hk, r, N, C, Dv]; beta, g: [B, Hk, r, N, C].
    """
    C = g.shape[-1]
    gamma = mx.cumsum(g, axis=-1)  # inclusive cumulative log-decay
    diff = gamma[..., :, None] - gamma[..., None, :]  # γ_i − γ_j
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    decay = mx.exp(mx.where(causal, diff, -mx.inf))  # Γ_ij for j ≤ i, else 0; never exp of a positive
    k_t = _rows(k.swapaxes(-1, -2))  # [B, Hk, 1, N, Dk, C]
    kk = k @ k_t  # [B, Hk, 1, N, C, C], shared by the r value heads
    strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1)
    L = mx.eye(C) + mx.where(strict, beta[..., None] * kk * decay, 0.0)  # I + A
    M = _unit_lower_inverse(L)
    U = M @ (beta[..., None] * v)  # [B, Hk, r, N, C, Dv]
    W = M @ ((beta * mx.exp(gamma))[..., None] * k)  # [B, Hk, r, N, C, Dk]
    qk = (q @ k_t) * decay  # [B, Hk, r, N, C, C]
    q_decayed = mx.exp(gamma)[..., None] * q  # e^{γ_i} q̂_i
    k_decayed_t = _rows((mx.exp(gamma[..., -1:] - gamma)[..., None] * k).swapaxes(-1, -2))  # (e^{γ_last − γ_j} k̂_j)ᵀ
    return U, W, qk, q_decayed, k_decayed_t, mx.exp(gamma[..., -1])


@mx.compile
def _chunk_advance(state_t, U, W, qk, q_decayed, k_decayed_t, chunk_decay):
    """Carry the transposed state Sᵀ [B, Hk, r, Dk, Dv] across one chunk; returns (o [B, Hk, r, C, Dv], new Sᵀ)."""
    v_new = U - W @ state_t  # [.., C, Dv]
    o = q_decayed @ state_t + qk @ v_new
    state_t = chunk_decay[..., None, None] * state_t + k_decayed_t @ v_new
    return o, state_t


def _chunks_in_sequence(q, k, v, beta, g, S_t):
    """All chunks of some heads: the state-free work at once, then the state carried chunk by chunk."""
    prepared = _chunk_prepare(q, k, v, beta, g)
    outs = []
    for n in range(q.shape[3]):
        o, S_t = _chunk_advance(S_t, *(x[:, :, :, n] for x in prepared))
        outs.append(o)
    return mx.stack(outs, axis=3), S_t  # o [B, Hk', r, N, C, Dv]


def _head_groups(Hk: int) -> list[slice]:
    """Split the key heads into one group per CPU core (heads are independent); one group elsewhere."""
    if mx.default_device() != mx.cpu:
        return [slice(0, Hk)]
    n = max(1, min(Hk, os.cpu_count() or 1, _MAX_CPU_STREAMS))
    bounds = [round(i * Hk / n) for i in range(n + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def _cpu_streams(n: int) -> list:
    """``n`` CPU streams, made once per thread: MLX runs one op at a time per stream and the CPU BLAS is
    single-threaded, so independent head groups on separate streams are how the pure path uses every core.
    A stream belongs to the thread that made it (using it from another raises), hence one list per thread."""
    if mx.default_device() != mx.cpu:
        return [mx.default_stream(mx.default_device())]
    streams = _CPU_STREAMS.streams
    while len(streams) < n:
        streams.append(mx.new_stream(mx.cpu))
    return streams[:n]


class _ThreadStreams(threading.local):
    def __init__(self):
        self.streams: list = []  # set anew in each thread


_MAX_CPU_STREAMS = 8
_CPU_STREAMS = _ThreadStreams()


def _prefill_pure(q, k, v, a, b, A_log, dt_bias, state, mask):
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[-2:]
    r = Hv // Hk
    q, k = _normalize_qk(q, k)
    beta, g = _gates(a, b, A_log, dt_bias)
    if mask is not None:  # β = 0 and g = 0 make a token a no-op on the state
        beta, g = beta * mask[..., None], g * mask[..., None]
    N = -(-T // CHUNK)
    pad = [(0, 0), (0, N * CHUNK - T)]
    # padding tokens have q = k = v = 0, β = g = 0: they leave the state untouched
    q, k = (mx.pad(x, pad + [(0, 0), (0, 0)]) for x in (q, k))
    v = mx.pad(v.astype(mx.float32), pad + [(0, 0), (0, 0)])
    beta, g = (mx.pad(x, pad + [(0, 0)]) for x in (beta, g))
    q, k = (x.reshape(B, N, CHUNK, Hk, 1, Dk).transpose(0, 3, 4, 1, 2, 5) for x in (q, k))  # [B, Hk, 1, N, C, Dk]
    v = v.reshape(B, N, CHUNK, Hk, r, Dv).transpose(0, 3, 4, 1, 2, 5)  # [B, Hk, r, N, C, Dv]
    beta, g = (x.reshape(B, N, CHUNK, Hk, r).transpose(0, 3, 4, 1, 2) for x in (beta, g))  # [B, Hk, r, N, C]
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), mx.float32)
    # the loop carries Sᵀ [B, Hk, r, Dk, Dv] so that every state matmul has a row-contiguous right operand
    S_t = _rows(state.reshape(B, Hk, r, Dv, Dk).swapaxes(-1, -2))
    groups = _head_groups(Hk)
    results = []
    for stream, heads in zip(_cpu_streams(len(groups)), groups):
        with mx.stream(stream):
            results.append(
                _chunks_in_sequence(q[:, heads], k[:, heads], v[:, heads], beta[:, heads], g[:, heads], S_t[:, heads])
            )
    o = mx.concatenate([o for o, _ in results], axis=1)  # [B, Hk, r, N, C, Dv]
    S_t = mx.concatenate([s for _, s in results], axis=1)
    o = o.transpose(0, 3, 4, 1, 2, 5).reshape(B, N * CHUNK, Hv, Dv)[:, :T]
    if mask is not None:
        o = o * mask[..., None, None]
    return o, _rows(S_t.swapaxes(-1, -2)).reshape(B, Hv, Dv, Dk)  # o fp32


def gated_delta_prefill(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: mx.array | None = None,
    *,
    mask: mx.array | None = None,
    use_kernel: bool | None = None,
) -> tuple[mx.array, mx.array]:
    """T tokens (any T ≥ 1): (o [B, T, Hv, Dv] in v.dtype, final state [B, Hv, Dv, Dk] fp32); state None = zeros.

    mask [B, T] bool: where False the token leaves the state untouched and its output is 0.
    """
    _check_shapes(q, k, v, a, b, A_log, dt_bias, state)
    if mask is not None and mask.shape != q.shape[:2]:
        raise Qwen35Error(f"gated_delta_prefill: mask {mask.shape} != [B, T] = {list(q.shape[:2])}")
    path = _path("gated_delta_prefill", k.shape[-1], use_kernel)
    return PREFILL_PATHS[path](q, k, v, a, b, A_log, dt_bias, state, mask)


def _kernel_inputs(q, k, v, a, b, A_log, dt_bias):
    """Kernel operand dtypes: q, k, v share one (the output's), gates and their parameters are fp32."""
    dtype = v.dtype
    f32 = mx.float32
    return [q.astype(dtype), k.astype(dtype), v, a.astype(f32), b.astype(f32), A_log.astype(f32), dt_bias.astype(f32)]


@cache
def _one_token_mask(B: int) -> mx.array:
    """The decode step's mask [B, 1]: a constant, made once, so decode adds no primitive for it."""
    mask = mx.ones((B, 1), mx.bool_)
    mx.eval(mask)
    return mask


def _prefill_kernel(q, k, v, a, b, A_log, dt_bias, state, mask):
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[-2:]
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), mx.float32)
    mask = mx.ones((B, T), mx.bool_) if mask is None else mask.astype(mx.bool_)
    inputs = _kernel_inputs(q, k, v, a, b, A_log, dt_bias) + [state, mask, T]
    return metal_kernel("gated_delta_prefill")(
        inputs=inputs,
        template=[("InT", v.dtype), ("Dk", Dk), ("Dv", Dv), ("Hk", Hk), ("Hv", Hv)],
        grid=(32, Dv, B * Hv),  # one SIMD group per value row of each (batch, head)
        threadgroup=(32, 4, 1),
        output_shapes=[(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        output_dtypes=[v.dtype, mx.float32],
    )


def _prefill_pure_in_dtype(q, k, v, a, b, A_log, dt_bias, state, mask):
    o, state = _prefill_pure(q, k, v, a, b, A_log, dt_bias, state, mask)
    return o.astype(v.dtype), state


def _prefill_mlx_fast(q, k, v, a, b, A_log, dt_bias, state, mask):
    """MLX's own ``mx.fast.gated_delta_update`` (chunked simdgroup kernels on Metal) after our fp32 norms and gates:
    it takes q̂, k̂ already normalised and the decay α = e^g in linear space, same state layout and mask meaning."""
    q, k = _normalize_qk(q, k)
    beta, g = _gates(a, b, A_log, dt_bias)
    # all operands fp32: q̂, k̂ rounded to a half dtype would cost the state ~1e-3 (measured), and one dtype for all
    # is the form every backend of the op takes
    o, state = mx.fast.gated_delta_update(q, k, v.astype(mx.float32), mx.exp(g), beta, state, mask)
    return o.astype(v.dtype), state


def _step_kernel(q, k, v, a, b, A_log, dt_bias, state):
    return _prefill_kernel(q, k, v, a, b, A_log, dt_bias, state, _one_token_mask(q.shape[0]))


def _step_mlx_fast(q, k, v, a, b, A_log, dt_bias, state):
    return _prefill_mlx_fast(q, k, v, a, b, A_log, dt_bias, state, None)


# Each operation's paths by name (docs/architecture.md §17.1): the self-check runs and times them all.
PREFILL_PATHS = {"kernel": _prefill_kernel, "mlx_fast": _prefill_mlx_fast, "pure": _prefill_pure_in_dtype}
STEP_PATHS = {"kernel": _step_kernel, "mlx_fast": _step_mlx_fast, "pure": _step_pure}
