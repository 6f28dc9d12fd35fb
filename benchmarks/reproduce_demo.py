"""Does the demo model reproduce? Re-run tools/train_demo.py with its seed and compare with what ships.

    PYTHONPATH=. .venv/bin/python benchmarks/reproduce_demo.py [--tolerance 0.01]

Trains into a temporary directory (about 20 minutes on 2 CPU cores), then compares the held-out losses
with tools/demo_metrics.json (the shipped run's) and every tensor with the shipped checkpoint. Prints one
JSON report; exits 1 if a held-out loss differs by more than ``--tolerance`` (nats). On the machine that
trained the shipped weights the run is bit-identical (torch deterministic algorithms, 2 threads, a fixed
step count); another CPU (AVX2 vs AVX-512 reductions) may differ in the last bits, hence a tolerance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_WEIGHTS = ROOT / "mlx_qwen35" / "surfaces" / "demo_model"
SHIPPED_METRICS = ROOT / "tools" / "demo_metrics.json"


def bf16_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint dir's shards, widened from bf16 to float32 (exactly)."""
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name).float().numpy()
    return tensors


def main() -> None:
    """Train again, compare losses and weights, print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tolerance", type=float, default=0.01, help="Largest held-out loss difference (nats).")
    args = parser.parse_args()
    shipped = json.loads(SHIPPED_METRICS.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out, metrics_file = Path(tmp) / "model", Path(tmp) / "metrics.json"
        command = [sys.executable, str(ROOT / "tools" / "train_demo.py"), "--steps", str(shipped["steps"])]
        subprocess.run([*command, "--out", str(out), "--metrics", str(metrics_file)], check=True, cwd=ROOT)
        rerun = json.loads(metrics_file.read_text())
        ours, theirs = bf16_tensors(out), bf16_tensors(SHIPPED_WEIGHTS)
    differences = {name: float(np.abs(ours[name] - theirs[name]).max()) for name in theirs}
    report = {
        "steps": shipped["steps"],
        "held_out_loss": {"shipped": shipped["trained"]["loss"], "rerun": rerun["trained"]["loss"]},
        "held_out_mtp_loss": {"shipped": shipped["trained"]["mtp_loss"], "rerun": rerun["trained"]["mtp_loss"]},
        "tensors_identical": sum(d == 0.0 for d in differences.values()),
        "tensors": len(differences),
        "largest_weight_difference": max(differences.values()),
        "train_seconds": rerun["train_seconds"],
    }
    gaps = [abs(v["shipped"] - v["rerun"]) for k, v in report.items() if k.startswith("held_out")]
    report["within_tolerance"] = max(gaps) <= args.tolerance
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["within_tolerance"] else 1)


if __name__ == "__main__":
    main()
