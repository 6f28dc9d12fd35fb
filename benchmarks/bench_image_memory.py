"""Peak memory of ``mlx-qwen35 generate --image`` on a 12-MP photo and a 4096² PNG, against a stated bound.

Issue 10 item 8: the 4096² PNG killed the process with SIGFPE (a [heads, 65,536, 65,536] score
matrix, whose size MLX's CPU matmul computes in 32 bits) and the 4032×3024 photo grew past 18 GB of
RSS (47,376 patches at the checkpoint's 4096² budget, full N×N scores). Now images are resized to the
card's 1344² by default and the vision attention holds at most ``MAX_ATTENTION_SCORES`` scores at once.

Builds the demo's tiny random-weight Qwen3.5-MoE checkpoint (real patch / merge geometry, a 2-block
width-64 tower, bf16), writes a photo-like 4032×3024 JPEG and a 4096×4096 PNG, and runs the console
entry point in a fresh process per case: its own peak RSS (VmHWM; ru_maxrss on macOS) and
``mx.get_peak_memory()``, the vision tokens and the time. A text-only run gives the baseline.

    python benchmarks/bench_image_memory.py [--workdir DIR] [--uncapped]

``--uncapped`` also runs both images at the checkpoint's own budget (``--max-pixels 16777216``): 47,376
and 65,536 patches through the blocked attention, the inputs that used to die. Measured here: photo
1.20 GB RSS / 0.81 GB MLX peak (14 min), PNG 1.54 / 1.15 GB (23 min); no bound is claimed for them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlx_qwen35.surfaces.demo import demo_config  # noqa: E402
from mlx_qwen35.weights.convert import convert  # noqa: E402
from mlx_qwen35.weights.random_checkpoint import write_random_hf_checkpoint  # noqa: E402

# The bound this benchmark checks, for either image at the default cap. Measured on the 2-core x86 Linux
# box (MLX CPU): 0.57 GB peak RSS and 0.185 GB MLX peak (text only: 0.39 GB and 0.07 GB), so ≥ 2.6× headroom.
RSS_BOUND_GB = 1.5
MLX_PEAK_BOUND_GB = 0.5
CHECKPOINT_BUDGET = 4096 * 4096  # preprocessor_config.json's longest_edge

# The console entry point, reporting its own peaks when it exits (sys.exit runs atexit handlers).
CHILD = """
import atexit, json, re, resource, sys

def report():
    import mlx.core as mx
    try:
        rss = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    print("PEAKS " + json.dumps({"rss": rss, "mlx": mx.get_peak_memory()}), file=sys.stderr)

atexit.register(report)
sys.argv = ["mlx-qwen35", *sys.argv[1:]]
from mlx_qwen35.surfaces.cli import main
main()
"""


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth light falloff, a few soft shapes and sensor noise: compresses and resizes like a phone photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 200 - 120 * ((x / width - 0.4) ** 2 + (y / height - 0.5) ** 2)
    image = np.repeat(base[..., None], 3, axis=2) * np.array([1.0, 0.9, 0.75], dtype=np.float32)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * width
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        image += blob * rng.uniform(-80, 80, 3).astype(np.float32)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


def screenshot_like(side: int) -> Image.Image:
    """Flat colour bands and a grid: a large PNG that compresses small (the issue's was 600 KB)."""
    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([(x // 256) * 16 % 256, (y // 256) * 16 % 256, ((x // 64 + y // 64) % 2) * 200], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def build_checkpoint(work: Path) -> Path:
    """The demo's random checkpoint, converted to bf16 (tower in bf16, as a release converts it)."""
    write_random_hf_checkpoint(work / "hf", demo_config(), seed=0, layout="fused", max_shard_bytes=8 * 1024**2)
    out = work / "mlx"
    convert(hf_path=str(work / "hf"), mlx_path=out, recipe="bf16", shard_size_gb=0.01, overwrite=True)
    return out


def run_generate(model: Path, *extra: str) -> dict:
    """``mlx-qwen35 generate`` in a fresh process: its JSON stats plus its peak RSS and MLX peak, or the error."""
    args = ["generate", "--model", str(model), "--prompt", "Describe it.", "--max-tokens", "4", "--temp", "0"]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *args, "--json", *extra], cwd=REPO, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    peaks = [line for line in result.stderr.splitlines() if line.startswith("PEAKS ")]
    if result.returncode or not peaks:
        return {"error": f"exit {result.returncode}: {result.stderr.strip()[-300:]}", "seconds": seconds}
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    return stats | json.loads(peaks[-1][len("PEAKS ") :]) | {"seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="Where to build (default: a temp dir).")
    parser.add_argument("--uncapped", action="store_true", help="Also run at the checkpoint's 4096² budget.")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-image-memory-"))
    try:
        model = build_checkpoint(work)
        photo, png = work / "photo-4032x3024.jpg", work / "screenshot-4096x4096.png"
        photo_like(4032, 3024).save(photo, quality=90)
        screenshot_like(4096).save(png)
        print(f"photo {photo.stat().st_size / 1e6:.1f} MB JPEG, PNG {png.stat().st_size / 1e6:.2f} MB")

        cases = [("text only", ()), ("photo 4032×3024", ("--image", str(photo))), ("PNG 4096²", ("--image", str(png)))]
        if args.uncapped:
            budget = ("--max-pixels", str(CHECKPOINT_BUDGET))
            cases += [
                ("photo, --max-pixels 4096²", ("--image", str(photo), *budget)),
                ("PNG, --max-pixels 4096²", ("--image", str(png), *budget)),
            ]
        within = True
        for name, extra in cases:
            r = run_generate(model, *extra)
            if "error" in r:
                print(f"{name:>26}: FAILED after {r['seconds']:.0f} s: {r['error']}")
                within = False
                continue
            rss, peak = r["rss"] / 1e9, r["mlx"] / 1e9
            capped = "--max-pixels" not in extra  # the bound is stated for the default cap
            ok = rss <= RSS_BOUND_GB and peak <= MLX_PEAK_BOUND_GB
            within &= ok or not capped
            bound = f"{RSS_BOUND_GB} / {MLX_PEAK_BOUND_GB} GB"
            verdict = f"{'within' if ok else 'OVER'} {bound}" if capped else "above the default cap: no bound"
            print(
                f"{name:>26}: {r['vision_tokens']:>6} vision tokens, peak RSS {rss:.3f} GB, MLX peak {peak:.3f} GB, "
                f"{r['seconds']:.0f} s ({r['vision_seconds']:.1f} s preprocessing) → {verdict}"
            )
        print(f"bound (default cap): peak RSS ≤ {RSS_BOUND_GB} GB, MLX peak ≤ {MLX_PEAK_BOUND_GB} GB → "
              f"{'OK' if within else 'OVER'}")  # fmt: skip
        if not within:
            sys.exit(1)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
