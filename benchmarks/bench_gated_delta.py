"""Gated delta prefill at the 397B layer shape: our pure chunked path vs mlx-lm's sequential ops path vs
MLX's mx.fast.gated_delta_update (and, on a Mac, our Metal kernel). Median of alternating runs, as ratios.

    python benchmarks/bench_gated_delta.py [--T 1024] [--runs 3]
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.models.gated_delta import compute_g, gated_delta_ops, normalize_qk

from mlx_qwen35.kernels.gated_delta import gated_delta_prefill


def main() -> None:
    """Time each path --runs times, alternating, and print medians and ratios to mlx-lm's ops path."""
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    B, T, Hk, Hv, D = 1, args.T, 16, 64, 128
    mx.random.seed(0)
    q, k = mx.random.normal((B, T, Hk, D)).astype(mx.bfloat16), mx.random.normal((B, T, Hk, D)).astype(mx.bfloat16)
    v = mx.random.normal((B, T, Hv, D)).astype(mx.bfloat16)
    a, b = mx.random.normal((B, T, Hv)).astype(mx.bfloat16), mx.random.normal((B, T, Hv)).astype(mx.bfloat16)
    A_log, dt_bias = mx.random.uniform(shape=(Hv,)), mx.random.normal((Hv,))
    mx.eval(q, k, v, a, b, A_log, dt_bias)

    def peer_inputs():  # the normalised q, k and linear-space gates the peers take
        qn, kn = normalize_qk(q, k, inv_scale=D**-0.5, eps=1e-6)
        return qn, kn, v, compute_g(A_log, a, dt_bias), mx.sigmoid(b)

    paths = {
        "ours_pure_chunked": lambda: gated_delta_prefill(q, k, v, a, b, A_log, dt_bias, use_kernel=False),
        "mlx_lm_ops": lambda: gated_delta_ops(*peer_inputs()),
        "mx_fast_gated_delta_update": lambda: mx.fast.gated_delta_update(*peer_inputs()),
    }
    if mx.metal.is_available():
        paths["ours_metal_kernel"] = lambda: gated_delta_prefill(q, k, v, a, b, A_log, dt_bias, use_kernel=True)
    for f in paths.values():  # warm-up: compile, allocate
        mx.eval(*f())
    times = {name: [] for name in paths}
    for _ in range(args.runs):
        for name, f in paths.items():
            start = time.perf_counter()
            mx.eval(*f())
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["mlx_lm_ops"])
    print(f"B={B} T={T} Hk={Hk} Hv={Hv} Dk=Dv={D} device={mx.default_device()} runs={args.runs}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28s} median {med * 1e3:9.1f} ms   speed-up vs mlx_lm_ops {base / med:5.2f}x")


if __name__ == "__main__":
    main()
