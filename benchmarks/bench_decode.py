"""Decode tokens/s, ours vs mlx-lm on the same random checkpoint, alternating in one process (median of rounds).

The checkpoint is the demo's architecture resized to the 397B's proportions at a CPU-instant size
(H 256; 3 DeltaNet : 1 attention layers; attention 8 query / 1 KV heads of 64; DeltaNet 2 key / 8 value
heads of 64; 64 experts top-8 of width 64 + a shared expert), written in the HF layout and converted by
each runtime's own converter at 4 bits, group 64, float32 activations (mlx-lm's fastest setting on
MLX's CPU backend). Compared at two levels: our ``generate_tokens`` vs mlx-lm's ``generate_step``
(tokens only), and our ``stream_generate`` vs ``mlx_lm.stream_generate`` (text too). Greedy, no penalties.

    python benchmarks/bench_decode.py [--rounds 4] [--tokens 64] [--prompt 128] [--work DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx


def preset_config() -> dict:
    from mlx_qwen35.surfaces.demo import demo_config

    config = demo_config()
    config["text_config"].update(
        hidden_size=256,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=8,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
    )
    return config


def build(work: Path) -> tuple[Path, Path]:
    """The HF checkpoint and both conversions under ``work`` (kept, so later runs reuse them)."""
    from mlx_lm import convert as mlx_lm_convert

    from mlx_qwen35.weights.convert import convert
    from mlx_qwen35.weights.random_checkpoint import write_random_hf_checkpoint

    hf, ours, theirs = work / "hf", work / "ours-4bit", work / "mlx-lm-4bit"
    if not hf.exists():
        write_random_hf_checkpoint(hf, preset_config(), seed=0, layout="fused")
    if not ours.exists():
        convert(hf_path=str(hf), mlx_path=ours, recipe="4bit", dtype="float32")
    if not theirs.exists():
        mlx_lm_convert(str(hf), str(theirs), quantize=True, q_bits=4, q_group_size=64, dtype="float32")
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mlx_qwen35_bench_decode")
    args = parser.parse_args()

    from mlx_lm import load as mlx_lm_load
    from mlx_lm import stream_generate as mlx_lm_stream_generate
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    from mlx_qwen35 import load, stream_generate
    from mlx_qwen35.model.inputs import ModelInputs
    from mlx_qwen35.runtime.generation import generate_tokens

    ours_dir, theirs_dir = build(args.work)
    ours, processor = load(str(ours_dir))
    theirs, tokenizer = mlx_lm_load(str(theirs_dir))
    mx.eval(ours.parameters(), theirs.parameters())
    prompt = [5 + (i * 7) % 900 for i in range(args.prompt)]
    greedy = make_sampler(temp=0.0)

    def rate(tokens) -> float:  # tokens/s after the first (which includes the prefill)
        next(tokens)
        start, n = time.perf_counter(), 0
        for _ in tokens:
            n += 1
        return n / (time.perf_counter() - start)

    runs = {
        "ours generate_tokens": lambda: rate(
            generate_tokens(ours, ModelInputs(prompt), ours.make_cache(), greedy, max_tokens=args.tokens)
        ),
        "mlx-lm generate_step": lambda: rate(
            generate_step(mx.array(prompt), theirs, max_tokens=args.tokens, sampler=greedy)
        ),
        "ours stream_generate": lambda: rate(
            stream_generate(ours, processor, prompt, max_tokens=args.tokens, temp=0.0)
        ),
        "mlx-lm stream_generate": lambda: rate(
            mlx_lm_stream_generate(theirs, tokenizer, mx.array(prompt), max_tokens=args.tokens, sampler=greedy)
        ),
    }
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            results[name].append(run())
    median = {name: statistics.median(values) for name, values in results.items()}
    for name, values in results.items():
        print(f"{name:24s} median {median[name]:6.1f} tok/s  ({', '.join(f'{v:.0f}' for v in values)})")
    print(f"token level: ours / mlx-lm = {median['ours generate_tokens'] / median['mlx-lm generate_step']:.2f}x")
    print(f"text level:  ours / mlx-lm = {median['ours stream_generate'] / median['mlx-lm stream_generate']:.2f}x")


if __name__ == "__main__":
    main()
