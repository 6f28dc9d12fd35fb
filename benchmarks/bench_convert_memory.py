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

from mlx_qwen35.config import parse_config  # noqa: E402
from mlx_qwen35.weights.quantize import expected_tensors  # noqa: E402

# ~2.3 B parameters (4.6 GB in bf16): experts dominate, as in the real members.
BENCH_CONFIG = {
    "model_type": "qwen3_5_moe",
    "text_config": {
        "hidden_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "linear_num_key_heads": 8,
        "linear_num_value_heads": 16,
        "vocab_size": 32768,
        "num_experts": 64,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1024,
        "shared_expert_intermediate_size": 1024,
        "mtp_num_hidden_layers": 1,
        "tie_word_embeddings": False,
    },
}


def hf_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of the released layout (fused experts, conv1d [C, 1, K]) for ``config``."""
    out = {}
    for name, shape in expected_tensors(parse_config(config)).items():
        if name.endswith(".experts.up_proj.weight"):
            continue
        if name.endswith(".experts.gate_proj.weight"):
            name, shape = name.replace("gate_proj.weight", "gate_up_proj"), (shape[0], 2 * shape[1], shape[2])
        elif name.endswith(".experts.down_proj.weight"):
            name = name.removesuffix(".weight")
        elif name.endswith(".conv1d.weight"):
            shape = (shape[0], 1, shape[1])
        if name == "language_model.lm_head.weight":
            name = "lm_head.weight"
        elif name.startswith("language_model."):
            name = "model." + name
        out[name] = shape
    return out


def write_checkpoint(path: Path, shard_bytes: int, seed: int = 0) -> list[int]:
    """Write a random bf16 checkpoint, one tensor at a time; returns the shard sizes."""
    rng = np.random.default_rng(seed)
    tensors = hf_tensors(BENCH_CONFIG)
    groups, size = [[]], 0
    for name, shape in tensors.items():
        nbytes = 2 * math.prod(shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    path.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            n = 2 * math.prod(tensors[name])
            header[name] = {"dtype": "BF16", "shape": list(tensors[name]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = filename
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / filename, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name in names:
                x = rng.standard_normal(math.prod(tensors[name]), dtype=np.float32) * 0.02
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())  # bf16 = top half of fp32
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(BENCH_CONFIG))
    return [(path / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors").stat().st_size for i in range(len(groups))]


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
