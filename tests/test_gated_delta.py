"""Gated delta: pure step and chunked prefill against a float64 sequential reference; the Metal kernels
(through the CPU emulator here, through mx.fast.metal_kernel on a Mac) against the pure path."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.kernels import set_use_kernels
from mlx_qwen35.kernels.gated_delta import gated_delta_prefill, gated_delta_step

TOL = 1e-5  # fp32 max |Δ| for outputs and states (issue 3)
ON_METAL = mx.metal.is_available()


def make_inputs(B, T, Hk, Hv, D, seed=0, dtype=mx.float32, with_state=True):
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v = mx.array(f(B, T, Hk, D), dtype), mx.array(f(B, T, Hk, D), dtype), mx.array(f(B, T, Hv, D), dtype)
    a, b = mx.array(f(B, T, Hv)), mx.array(f(B, T, Hv))
    A_log, dt_bias = mx.array(rng.uniform(-2, 1.5, Hv).astype(np.float32)), mx.array(f(Hv))
    state = mx.array(0.1 * f(B, Hv, D, D)) if with_state else None
    return q, k, v, a, b, A_log, dt_bias, state


def reference(q, k, v, a, b, A_log, dt_bias, state, mask=None):
    """docs/architecture.md §4.3–4.6 token by token in float64, state [B, Hv, Dv, Dk]."""
    q, k, v, a, b, A_log, dt_bias = (
        np.array(x.astype(mx.float32)).astype(np.float64) for x in (q, k, v, a, b, A_log, dt_bias)
    )
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    S = np.zeros((B, Hv, Dv, Dk)) if state is None else np.array(state).astype(np.float64)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) * Dk**-0.5
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    beta = 1 / (1 + np.exp(-b))
    alpha = np.exp(-np.exp(A_log) * np.logaddexp(a + dt_bias, 0))
    o = np.zeros((B, T, Hv, Dv))
    for t in range(T):
        for h in range(Hv):
            live = np.ones(B, bool) if mask is None else np.array(mask)[:, t]
            kk, qq = k[:, t, h // (Hv // Hk)], q[:, t, h // (Hv // Hk)]
            new = S[:, h] * alpha[:, t, h, None, None]
            u = beta[:, t, h, None] * (v[:, t, h] - np.einsum("bvk,bk->bv", new, kk))
            new = new + u[:, :, None] * kk[:, None, :]
            S[:, h] = np.where(live[:, None, None], new, S[:, h])
            o[:, t, h] = np.where(live[:, None], np.einsum("bvk,bk->bv", new, qq), 0.0)
    return o, S


def max_diff(x, y):
    return float(np.abs(np.array(x.astype(mx.float32)) - np.asarray(y)).max())


SHAPES = [  # (B, T, Hk, Hv, D)
    (2, 1, 2, 8, 32),
    (2, 7, 2, 8, 32),
    (2, 64, 2, 8, 32),
    (2, 65, 2, 8, 32),
    (2, 130, 1, 4, 32),
    (2, 7, 1, 4, 128),
    (1, 130, 1, 4, 128),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_pure_prefill_matches_sequential_reference(shape):
    inputs = make_inputs(*shape)
    o, S = gated_delta_prefill(*inputs, use_kernel=False)
    ro, rS = reference(*inputs)
    assert o.shape == ro.shape and S.shape == rS.shape and S.dtype == mx.float32
    assert max_diff(o, ro) <= TOL and max_diff(S, rS) <= TOL


@pytest.mark.parametrize("shape", [(2, 7, 2, 8, 32), (1, 5, 1, 4, 128)])
def test_pure_steps_match_sequential_reference(shape):
    q, k, v, a, b, A_log, dt_bias, S = make_inputs(*shape)
    ro, rS = reference(q, k, v, a, b, A_log, dt_bias, S)
    outs = []
    for t in range(shape[1]):
        o, S = gated_delta_step(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            a[:, t : t + 1],
            b[:, t : t + 1],
            A_log,
            dt_bias,
            S,
            use_kernel=False,
        )
        outs.append(o)
    assert max_diff(mx.concatenate(outs, 1), ro) <= TOL and max_diff(S, rS) <= TOL


def test_prefill_from_zero_state_and_in_two_pieces():
    q, k, v, a, b, A_log, dt_bias, _ = make_inputs(1, 100, 2, 8, 32, seed=3)
    o, S = gated_delta_prefill(q, k, v, a, b, A_log, dt_bias, use_kernel=False)
    o1, S1 = gated_delta_prefill(
        q[:, :37], k[:, :37], v[:, :37], a[:, :37], b[:, :37], A_log, dt_bias, use_kernel=False
    )
    o2, S2 = gated_delta_prefill(
        q[:, 37:], k[:, 37:], v[:, 37:], a[:, 37:], b[:, 37:], A_log, dt_bias, S1, use_kernel=False
    )
    assert max_diff(mx.concatenate([o1, o2], 1), np.array(o)) <= TOL and max_diff(S2, np.array(S)) <= TOL


def test_pure_prefill_runs_in_any_thread_after_another_used_it():
    """The CPU head-group streams belong to the thread that made them: each thread gets its own."""
    import threading

    inputs = make_inputs(1, 20, 2, 8, 32, seed=5)
    expected, _ = reference(*inputs)
    assert max_diff(gated_delta_prefill(*inputs, use_kernel=False)[0], expected) <= TOL
    results = []

    def in_a_thread():  # inputs made here too: arrays are evaluated on the stream of the thread that made them
        try:
            o, _ = gated_delta_prefill(*make_inputs(1, 20, 2, 8, 32, seed=5), use_kernel=False)
            results.append(max_diff(o, expected))
        except RuntimeError as e:
            results.append(e)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert len(results) == 1 and not isinstance(results[0], RuntimeError), results
    assert results[0] <= TOL


def test_prefill_mask_leaves_state_untouched_at_padding():
    inputs = make_inputs(2, 70, 2, 8, 32, seed=4)
    mask = mx.array(np.arange(70)[None, :] >= np.array([[0], [9]]))  # row 1 left-padded by 9
    o, S = gated_delta_prefill(*inputs, mask=mask, use_kernel=False)
    ro, rS = reference(*inputs, mask=mask)
    assert max_diff(o, ro) <= TOL and max_diff(S, rS) <= TOL


def test_bf16_inputs_give_bf16_outputs_and_fp32_state():
    inputs = make_inputs(1, 9, 1, 4, 32, dtype=mx.bfloat16)
    o, S = gated_delta_prefill(*inputs, use_kernel=False)
    assert o.dtype == mx.bfloat16 and S.dtype == mx.float32
    ro, rS = reference(*inputs)
    assert max_diff(S, rS) <= TOL and max_diff(o, ro) <= 1e-2  # o rounded to bf16 (8 bits)


def test_bad_shapes_raise_our_error():
    q, k, v, a, b, A_log, dt_bias, S = make_inputs(1, 2, 1, 4, 32)
    with pytest.raises(Qwen35Error, match="gated_delta_step takes one token"):
        gated_delta_step(q, k, v, a, b, A_log, dt_bias, S, use_kernel=False)
    with pytest.raises(Qwen35Error, match="state"):
        gated_delta_prefill(q, k, v, a, b, A_log, dt_bias, S.astype(mx.bfloat16), use_kernel=False)


@pytest.fixture
def kernels_on():
    """Kernel paths on: real Metal on a Mac, the CPU emulator elsewhere."""
    set_use_kernels(True, emulate=not ON_METAL)
    yield
    set_use_kernels(None)


KERNEL_SHAPES = [  # the emulator runs every lane as a fiber: keep D = 128 cases small in B·Hv·T
    (2, 1, 2, 8, 32),
    (2, 7, 2, 8, 32),
    (2, 64, 1, 4, 32),
    (2, 65, 1, 4, 32),
    (2, 130, 1, 4, 32),
    (2, 1, 1, 4, 128),
    (2, 7, 1, 4, 128),
    (1, 65, 1, 4, 128),
]


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_prefill_kernel_matches_pure(shape, kernels_on):
    inputs = make_inputs(*shape, seed=1)
    o, S = gated_delta_prefill(*inputs, use_kernel=False)
    ko, kS = gated_delta_prefill(*inputs)
    assert max_diff(ko, np.array(o)) <= TOL and max_diff(kS, np.array(S)) <= TOL


@pytest.mark.parametrize("shape", [(2, 1, 2, 8, 32), (2, 1, 1, 4, 128)])
def test_decode_kernel_matches_pure(shape, kernels_on):
    inputs = make_inputs(*shape, seed=2)
    o, S = gated_delta_step(*inputs, use_kernel=False)
    ko, kS = gated_delta_step(*inputs)
    assert ko.shape == o.shape and kS.dtype == mx.float32
    assert max_diff(ko, np.array(o)) <= TOL and max_diff(kS, np.array(S)) <= TOL


def test_prefill_kernel_mask_and_zero_state(kernels_on):
    q, k, v, a, b, A_log, dt_bias, _ = make_inputs(2, 20, 1, 4, 32, seed=5)
    mask = mx.array(np.arange(20)[None, :] >= np.array([[0], [6]]))
    o, S = gated_delta_prefill(q, k, v, a, b, A_log, dt_bias, mask=mask, use_kernel=False)
    ko, kS = gated_delta_prefill(q, k, v, a, b, A_log, dt_bias, mask=mask)
    assert max_diff(ko, np.array(o)) <= TOL and max_diff(kS, np.array(S)) <= TOL


def test_use_kernel_true_without_metal_is_our_error():
    if ON_METAL:
        pytest.skip("this machine has Metal")
    set_use_kernels(None)
    with pytest.raises(Qwen35Error, match="needs Metal"):
        gated_delta_step(*make_inputs(1, 1, 1, 4, 32), use_kernel=True)
