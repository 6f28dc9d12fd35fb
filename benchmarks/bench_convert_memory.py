"""Peak RSS of ``convert`` on a multi-shard checkpoint, against the budget "largest input shard + 1 GB".

Writes a random bf16 checkpoint in the released layout (fused experts, ``mtp.*``) of a moderately large
Qwen3.5-MoE config, sharded like a release, then converts it in a fresh process per recipe and reads
that process's own peak RSS (VmHWM; ru_maxrss would carry the parent's peak over fork + exec).
Also prints the predicted vs written size of each recipe.

    python benchmarks/bench_convert_memory.py [--workdir DIR] [--shard-mb 400] [--recipes bf16 4bit]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlx_qwen35.weights.layout import pack_shards, safetensors_header, shard_filename, write_index  # noqa: E402
from mlx_qwen35.weights.random_checkpoint import hf_tensor_shapes  # noqa: E402

# ~2.3 B parameters (4.6 GB in bf16): experts dominate, as in the real members. No vision tower.
BENCH_CONFIG = {
    "model_type": "qwen3_5_moe",
    "text_config": {
        "hidden_size": 2048,
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "linear_num_key_heads": 8,
        "linear_num_value_heads": 16,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "vocab_size": 32768,
        "num_experts": 64,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1024,
        "shared_expert_intermediate_size": 1024,
        "mtp_num_hidden_layers": 1,
        "tie_word_embeddings": False,
    },
}


def write_checkpoint(path: Path, shard_bytes: int, seed: int = 0) -> list[int]:
    """Write a random bf16 checkpoint in the released layout, one tensor at a time; returns the shard sizes."""
    rng = np.random.default_rng(seed)
    tensors = hf_tensor_shapes(BENCH_CONFIG, layout="fused")
    groups = pack_shards(((name, 2 * math.prod(shape)) for name, shape in tensors.items()), shard_bytes)
    path.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(groups):
        filename = shard_filename(i, len(groups))
        header = safetensors_header(
            [(n, "BF16", tensors[n], 2 * math.prod(tensors[n])) for n in names], {"format": "pt"}
        )
        with open(path / filename, "wb") as f:
            f.write(header)
            for name in names:
                x = rng.standard_normal(math.prod(tensors[name]), dtype=np.float32) * 0.02
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())  # bf16 = top half of fp32
        weight_map |= dict.fromkeys(names, filename)
    write_index(path, weight_map, sum(2 * math.prod(s) for s in tensors.values()))
    (path / "config.json").write_text(json.dumps(BENCH_CONFIG))
    return [(path / shard_filename(i, len(groups))).stat().st_size for i in range(len(groups))]


CHILD = """
import contextlib, io, json, re, sys, time
from mlx_qwen35.weights.convert import convert, predict_recipes

def peak_kb():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1])

source, target, recipe = sys.argv[1:4]
with contextlib.redirect_stdout(io.StringIO()):
    baseline = peak_kb()
    predicted = predict_recipes(source)[recipe]
    start = time.perf_counter()
    convert(source, target, recipe=recipe)
    seconds = time.perf_counter() - start
print(json.dumps({"peak_kb": peak_kb(), "baseline_kb": baseline, "predicted": predicted, "seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Where to write the checkpoints (default: a temp dir)."
    )
    parser.add_argument("--shard-mb", type=int, default=400, help="Input shard size in MB.")
    parser.add_argument("--recipes", nargs="+", default=["bf16", "4bit"])
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    source = work / "hf"
    try:
        start = time.perf_counter()
        shards = write_checkpoint(source, args.shard_mb * 10**6)
        print(
            f"checkpoint: {len(shards)} shards, {sum(shards) / 1e9:.2f} GB, largest {max(shards) / 1e9:.3f} GB "
            f"(written in {time.perf_counter() - start:.0f} s)"
        )
        budget = max(shards) + 10**9
        for recipe in args.recipes:
            target = work / f"mlx-{recipe}"
            result = subprocess.run(
                [sys.executable, "-c", CHILD, str(source), str(target), recipe],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            if result.returncode:
                sys.exit(f"convert {recipe} failed: {result.stderr.strip()}")
            r = json.loads(result.stdout.strip().splitlines()[-1])
            peak = r["peak_kb"] * 1024
            written = sum(f.stat().st_size for f in target.glob("*.safetensors"))
            print(
                f"{recipe:>6}: peak RSS {peak / 1e9:.3f} GB (python + mlx alone {r['baseline_kb'] * 1024 / 1e9:.3f} GB) "
                f"vs budget {budget / 1e9:.3f} GB → {'OK' if peak <= budget else 'OVER'}; "
                f"{r['seconds']:.0f} s; size {written / 1e9:.4f} GB vs predicted {r['predicted'] / 1e9:.4f} GB "
                f"({written / r['predicted'] - 1:+.3%})"
            )
            shutil.rmtree(target)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
