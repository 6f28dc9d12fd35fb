"""The Metal CPU emulator's own semantics: SIMD-group lockstep and reductions, shuffles, barriers,
threadgroup memory, MLX's signature rules, half / bfloat16 rounding, and its error reports."""

import hashlib

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.kernels.emulator import emulated_metal_kernel


def run(source, inputs, out_shape, out_dtype=mx.float32, grid=(64, 1, 1), tg=(64, 1, 1), template=None, header=""):
    names = [f"in{i}" for i in range(len(inputs))]
    kernel = emulated_metal_kernel("t" + hashlib.sha1(source.encode()).hexdigest()[:10], names, ["out"], source, header)
    return kernel(
        inputs=inputs,
        grid=grid,
        threadgroup=tg,
        output_shapes=[out_shape],
        output_dtypes=[out_dtype],
        template=template,
    )[0]


def test_simd_sum_is_the_ascending_xor_butterfly_bit_for_bit():
    x = mx.array(np.random.default_rng(0).standard_normal(64).astype(np.float32) * 1e3)
    out = run("uint i = thread_position_in_grid.x; out[i] = simd_sum(in0[i]);", [x], (64,))
    v = np.array(x).reshape(2, 32)
    for m in (1, 2, 4, 8, 16):
        v = v + v[:, np.arange(32) ^ m]
    assert np.array_equal(np.array(out).reshape(2, 32), v)


def test_simd_ops_see_values_written_before_them_by_every_lane():
    # each lane's operand depends on a value only known after the previous SIMD op: lockstep or bust
    src = """
        uint i = thread_position_in_grid.x;
        float a = simd_shuffle(in0[i], (thread_index_in_simdgroup + 1) % 32);
        float b = simd_shuffle_xor(a * 2.0f, 3);
        out[i] = simd_max(b) + simd_shuffle_down(b, 1) - simd_broadcast(b, 5);
    """
    x = mx.arange(64, dtype=mx.float32)
    out = np.array(run(src, [x], (64,))).reshape(2, 32)
    v = np.arange(64, dtype=np.float32).reshape(2, 32)
    a = v[:, (np.arange(32) + 1) % 32]
    b = 2 * a[:, np.arange(32) ^ 3]
    down = np.where(np.arange(32) + 1 < 32, b[:, np.minimum(np.arange(32) + 1, 31)], b)
    assert np.array_equal(out, b.max(1, keepdims=True) + down - b[:, 5:6])


def test_threadgroup_memory_and_barrier_reverse():
    src = """
        threadgroup float buf[128];
        uint t = thread_position_in_threadgroup.x;
        buf[t] = in0[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = buf[threads_per_threadgroup.x - 1 - t];
    """
    x = mx.arange(256, dtype=mx.float32)
    out = run(src, [x], (256,), grid=(256, 1, 1), tg=(128, 1, 1))
    assert np.array_equal(np.array(out), np.concatenate([np.arange(127, -1, -1), np.arange(255, 127, -1)]))


def test_missing_barrier_gives_stale_threadgroup_data():
    src = """
        threadgroup float buf[64];
        uint t = thread_position_in_threadgroup.x;
        buf[t] = in0[t];
        out[t] = buf[63 - t];
    """
    x = mx.arange(64, dtype=mx.float32)
    out = np.array(run(src, [x], (64,)))
    assert not np.array_equal(out, np.arange(63, -1, -1))  # threads ran before their partners wrote


def test_barrier_skipped_by_returning_threads_is_reported():
    src = """
        if (thread_position_in_threadgroup.x == 0) return;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = 1.0f;
    """
    with pytest.raises(RuntimeError, match="threadgroup_barrier not reached by all threads"):
        run(src, [mx.zeros(64)], (64,))


def test_divergent_simd_op_is_reported():
    src = """
        float x = in0[thread_position_in_grid.x];
        if (thread_index_in_simdgroup < 16) x = simd_sum(x);
        out[thread_position_in_grid.x] = simd_sum(x);
    """
    with pytest.raises(RuntimeError, match="divergent SIMD operation"):
        run(src, [mx.zeros(64)], (64,))


def test_thread_ids_3d_grid_with_partial_threadgroups():
    src = """
        uint3 p = thread_position_in_grid;
        uint i = p.x + 5 * (p.y + 3 * p.z);
        out[i] = float(threadgroup_position_in_grid.x * 1000 + thread_position_in_threadgroup.y * 10 + p.z);
    """
    out = np.array(run(src, [mx.zeros(8)], (2, 3, 5), grid=(5, 3, 2), tg=(4, 2, 1)))
    z, y, x = np.meshgrid(np.arange(2), np.arange(3), np.arange(5), indexing="ij")
    assert np.array_equal(out, (x // 4) * 1000 + (y % 2) * 10 + z)


def test_signature_follows_mlx_scalars_templates_shapes_and_strides():
    src = "uint i = thread_position_in_grid.x; out[i] = static_cast<T>(in0[i] * scale + N + in0_shape[1] + in0_strides[0] + in0_ndim);"
    x = mx.ones((2, 4))
    kernel = emulated_metal_kernel("sig", ["in0", "scale"], ["out"], src)
    out = kernel(
        inputs=[x, 0.5],
        template=[("T", mx.float32), ("N", 3)],
        grid=(8, 1, 1),
        threadgroup=(8, 1, 1),
        output_shapes=[(8,)],
        output_dtypes=[mx.float32],
    )[0]
    assert np.array_equal(np.array(out), np.full(8, 0.5 + 3 + 4 + 4 + 2))
    tu = kernel.translation_unit([x, mx.array(0.5)], [mx.float32], [("T", mx.float32), ("N", 3)])
    assert "const device float* in0 [[buffer(0)]]" in tu and "const constant float& scale [[buffer(4)]]" in tu
    assert "template <typename T, int N>" in tu and "custom_kernel_sig<float, 3>(" in tu


def test_half_and_bfloat16_round_like_the_hardware():
    src = "uint i = thread_position_in_grid.x; out[i] = static_cast<T>(in0[i] * 3.0f);"
    x = mx.array(np.random.default_rng(1).standard_normal(64).astype(np.float32))
    for dtype in (mx.float16, mx.bfloat16):
        out = run(src, [x], (64,), out_dtype=dtype, template=[("T", dtype)])
        assert out.dtype == dtype and mx.array_equal(out, (x * 3.0).astype(dtype)).item()
    h = run(
        "uint i = thread_position_in_grid.x; out[i] = in0[i] + in0[i];",
        [x.astype(mx.bfloat16)],
        (64,),
        out_dtype=mx.bfloat16,
    )
    assert mx.array_equal(h, x.astype(mx.bfloat16) * 2).item()


def test_unwritten_outputs_are_nan():
    out = run("if (thread_position_in_grid.x < 10) out[thread_position_in_grid.x] = 1.0f;", [mx.zeros(64)], (64,))
    assert np.isnan(np.array(out)[10:]).all() and (np.array(out)[:10] == 1).all()
