"""Vision: encode time of our tower vs mlx-vlm's Qwen3.5 tower on the same weights, and decode after an image.

1. Encode one 1344² image (grid (1, 84, 84): 7056 patches → 1764 LM tokens) and a 60-s video
   (grid (60, 20, 38): 45,600 patches → 11,400 LM tokens) with a narrow tower: the real patch,
   temporal, merge and position-table geometry and head_dim 72, but a small width and depth (the
   real tower at ~0.9 GFLOP per patch takes hours on a CPU; on a Mac pass --real for the 397B
   tower). Median of alternating runs; ratio ours / mlx-vlm (< 1 = we are faster).
2. Decode time per token after an image prompt vs a text-only prompt of the same length, on a
   small random language model (target: within 10%; both decode through the same cache path).

    python benchmarks/bench_vision.py [--width 144] [--heads 2] [--depth 2] [--runs 3] [--real]
        [--decode-tokens 64]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_vlm.models.qwen3_5.config import VisionConfig as VlmVisionConfig
from mlx_vlm.models.qwen3_5.vision import VisionModel as VlmVisionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_qwen35.config import VisionConfig, parse_config  # noqa: E402
from mlx_qwen35.model.inputs import ModelInputs  # noqa: E402
from mlx_qwen35.model.qwen35 import Qwen35Model  # noqa: E402
from mlx_qwen35.model.vision import VisionModel  # noqa: E402

PATCH_DIM = 3 * 2 * 16 * 16
INPUTS = {"image 1344x1344": (1, 84, 84), "video 60 s (120 frames)": (60, 20, 38)}
WARMUP_TOKENS = 4
REAL_TOWER = dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096)


def vision_config(args) -> dict:
    """The tower's vision_config: real geometry, narrow unless --real."""
    size = (
        REAL_TOWER
        if args.real
        else dict(
            depth=args.depth,
            hidden_size=args.width,
            num_heads=args.heads,
            intermediate_size=2 * args.width,
            out_hidden_size=256,
        )
    )
    return size | dict(
        patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304, in_channels=3
    )


def peer_tower(ours: VisionModel, cfg: dict) -> VlmVisionModel:
    """mlx-vlm's tower holding our weights (its sanitize moves the Conv3d kernel to channels-last)."""
    theirs = VlmVisionModel(VlmVisionConfig(model_type="qwen3_5", **cfg))
    theirs.load_weights(list(theirs.sanitize(dict(tree_flatten(ours.parameters()))).items()))
    return theirs


def timed(fn) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def bench_encode(args) -> None:
    cfg = vision_config(args)
    mx.random.seed(0)
    ours = VisionModel(VisionConfig(**cfg))
    mx.eval(ours.parameters())
    theirs = peer_tower(ours, cfg)
    mx.eval(theirs.parameters())
    print(
        f"encode: tower depth {cfg['depth']} width {cfg['hidden_size']} heads {cfg['num_heads']}, "
        f"device {mx.default_device()}, median of {args.runs} alternating runs"
    )
    for name, grid in INPUTS.items():
        t, h, w = grid
        pixels = mx.random.uniform(-1, 1, (t * h * w, PATCH_DIM))
        grid_thw = mx.array([grid])
        paths = {
            "ours": lambda p=pixels, g=grid_thw: ours(p, g),
            "mlx-vlm": lambda p=pixels, g=grid_thw: theirs(p, g)[0],
        }
        delta = mx.abs(paths["ours"]() - paths["mlx-vlm"]()).max().item()
        times = {k: [] for k in paths}
        for _ in range(args.runs):
            for k, fn in paths.items():
                times[k].append(timed(fn))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"  {name:24s} grid {grid}: ours {med['ours']:.3f} s, mlx-vlm {med['mlx-vlm']:.3f} s, "
            f"ratio {med['ours'] / med['mlx-vlm']:.2f}, max |Δ| {delta:.1e}, {t * h * w // 4} LM tokens"
        )


def small_model(args) -> Qwen35Model:
    """A random MoE language model (hidden 256, 4 layers, 3:1 DeltaNet:attention) with the narrow tower."""
    text = dict(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
        rope_parameters=dict(
            rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=[3, 3, 2], mrope_interleaved=True
        ),
    )
    vision = vision_config(args) | dict(out_hidden_size=256)
    config = parse_config(
        dict(
            model_type="qwen3_5_moe",
            text_config=text,
            vision_config=vision,
            image_token_id=4000,
            vision_start_token_id=4001,
            vision_end_token_id=4002,
        )
    )
    mx.random.seed(1)
    model = Qwen35Model(config)
    mx.eval(model.parameters())
    return model


def decode_seconds_per_token(model: Qwen35Model, prompt, n: int) -> float:
    """Prefill ``prompt`` (token ids, or (embeddings, positions, rope_delta)), then greedy-decode; seconds per token."""
    cache = model.make_cache()
    if isinstance(prompt, tuple):
        embeds, positions, cache.rope_delta = prompt
        logits = model(None, cache, inputs_embeds=embeds, position_ids=positions)
    else:
        logits = model(mx.array([prompt]), cache)
    token = logits[:, -1].argmax(-1, keepdims=True)
    for i in range(WARMUP_TOKENS + n):
        if i == WARMUP_TOKENS:
            start = time.perf_counter()
        token = model(token, cache)[:, -1].argmax(-1, keepdims=True)
        mx.eval(token)
    return (time.perf_counter() - start) / n


def bench_decode(args) -> None:
    model = small_model(args)
    cfg = model.config
    rng = np.random.default_rng(0)
    text = lambda n: rng.integers(0, 3000, n).tolist()  # noqa: E731
    t, h, w = INPUTS["image 1344x1344"]
    ids = (
        text(20)
        + [cfg.vision_start_token_id]
        + [cfg.image_token_id] * (h * w // 4)
        + [cfg.vision_end_token_id]
        + text(20)
    )
    image = ModelInputs(
        ids, pixel_values=mx.random.uniform(-1, 1, (t * h * w, PATCH_DIM)), image_grid_thw=mx.array([[t, h, w]])
    )
    # Encoded once: this compares the decode path after the prompt, not the encode (measured above).
    image_prompt = model.prompt_embeddings(image)
    mx.eval(image_prompt[:2])
    prompts = {"text": text(len(ids)), "image": image_prompt}
    per = {k: [] for k in prompts}
    for _ in range(args.runs):
        for k, prompt in prompts.items():
            per[k].append(decode_seconds_per_token(model, prompt, args.decode_tokens))
    med = {k: statistics.median(v) for k, v in per.items()}
    print(
        f"decode after a {len(ids)}-token prompt (small random MoE LM, {args.decode_tokens} tokens, median of {args.runs}): "
        f"text-only {med['text'] * 1e3:.2f} ms/token, after an image {med['image'] * 1e3:.2f} ms/token, "
        f"ratio {med['image'] / med['text']:.3f}"
    )


def main() -> None:
    """Print encode times and ratios vs mlx-vlm, then the decode comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=144)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--real", action="store_true", help="the 397B tower (27 blocks, width 1152): for a Mac")
    args = ap.parse_args()
    bench_encode(args)
    bench_decode(args)


if __name__ == "__main__":
    main()
