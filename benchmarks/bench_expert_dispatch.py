"""Routed experts, quantised: our pure path vs mlx-lm's SwitchGLU (QuantizedSwitchLinear) followed by the
weighted sum over k, and on a Mac our Metal kernels too. Decode (1 token) and prefill (T tokens) at a scaled
397B shape (k of E experts, hidden H, expert intermediate I); median of alternating runs, as ratios.

    python benchmarks/bench_expert_dispatch.py [--experts 128] [--hidden 2048] [--intermediate 512] [--k 10]
        [--tokens 256] [--bits 4] [--group-size 64] [--runs 7]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_qwen35.kernels.expert_dispatch import routed_experts  # noqa: E402


def timed(fn, *args) -> float:
    """Seconds for one evaluated call."""
    start = time.perf_counter()
    mx.eval(fn(*args))
    return time.perf_counter() - start


def switchglu_routed(x, indices, weights, experts):
    return (experts(x, indices) * weights[..., None]).sum(axis=-2)


def main() -> None:
    """Print per-call medians and ratios against SwitchGLU for decode and prefill."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()

    mx.random.seed(0)
    experts = SwitchGLU(args.hidden, args.intermediate, args.experts)
    nn.quantize(experts, group_size=args.group_size, bits=args.bits)
    mx.eval(experts.parameters())
    paths = {
        "mlx-lm SwitchGLU": switchglu_routed,
        "ours, pure": lambda *a: routed_experts(*a, use_kernel=False),
    }
    if mx.metal.is_available():
        paths["ours, Metal kernels"] = lambda *a: routed_experts(*a, use_kernel=True)
    print(
        f"device {mx.default_device()}, E={args.experts} k={args.k} H={args.hidden} I={args.intermediate} "
        f"{args.bits}-bit group {args.group_size}, median of {args.runs} alternating runs"
    )
    for name, tokens in (("decode", 1), ("prefill", args.tokens)):
        x = mx.random.normal((1, tokens, args.hidden))
        indices = mx.argpartition(-mx.random.normal((1, tokens, args.experts)), args.k - 1, axis=-1)[..., : args.k]
        weights = mx.softmax(mx.random.normal((1, tokens, args.k)), axis=-1)
        mx.eval(x, indices, weights)
        times = {p: [] for p in paths}
        for fn in paths.values():  # warm-up: compile and first-touch the weights
            timed(fn, x, indices, weights, experts)
        for _ in range(args.runs):
            for p, fn in paths.items():
                times[p].append(timed(fn, x, indices, weights, experts))
        base = statistics.median(times["mlx-lm SwitchGLU"])
        for p, t in times.items():
            med = statistics.median(t)
            print(f"  {name:7s} T={tokens:<4d} {p:22s} {med * 1e3:9.3f} ms   SwitchGLU / this = {base / med:5.2f}x")


if __name__ == "__main__":
    main()
