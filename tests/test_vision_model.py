"""The vision tower and the multimodal forward against transformers (the oracle), float32.

Prompts are built here in the reference format (docs/architecture.md §11.1): an image is
``<|vision_start|>`` + n × ``<|image_pad|>`` + ``<|vision_end|>``; a video is, per temporal group, a
timestamp text + ``<|vision_start|>`` + n × ``<|video_pad|>`` + ``<|vision_end|>``. transformers gets
the identical token sequence plus the ``mm_token_type_ids`` it needs (1 = image pad, 2 = video pad).
Positions are exact. Tower outputs and logits are judged against transformers in float64
(``tests/parity.py``): max |ours − fp64| ≤ max(floor, 8 × max |hf fp32 − fp64|), floor 1e-6 for the
tower (outputs ≤ 0.5) and 1e-4 for logits. Measured: tower ours 1.6e-7 … 2.7e-7 from float64,
transformers' float32 1.6e-7 … 3.2e-7, bounds 1.3e-6 … 2.6e-6 (≥ 5.7× headroom); logits ours
2.7e-5 … 8.6e-5, transformers' 2.5e-5 … 7.8e-5, bounds 2.0e-4 … 6.2e-4 (≥ 2.4× headroom). The
smallest headroom is the MoE two-image prompt, full and after cached text: one ill-conditioned text
position carries our error there, bounded relative to transformers' own (see ``tests/parity.py``).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import convert_tiny
from parity import assert_parity, cast_inputs

from mlx_qwen35 import load
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.model.inputs import ModelInputs
from mlx_qwen35.model.mrope_positions import mrope_positions
from mlx_qwen35.model.vision import segment_attention
from mlx_qwen35.runtime.generation import stream_generate

TOWER_FLOOR = 1e-6  # ours ≤ 2.7e-7 from float64 on every grid here (outputs ≤ 0.5)
PATCH_DIM = 3 * 2 * 16 * 16  # C · temporal_patch · patch · patch
MERGE = 2

# Vision grids (t, h, w) in patches: a non-square image, one larger than the 4×4 position table
# (upsampled), a video-like grid_t > 1, two images of different shapes, images and videos mixed.
TOWER_GRIDS = {
    "image_4x6": [[1, 4, 6]],
    "image_8x10": [[1, 8, 10]],
    "video_3x4x6": [[3, 4, 6]],
    "two_images": [[1, 4, 4], [1, 6, 2]],
    "image_and_video": [[1, 2, 4], [2, 6, 4]],
}


@pytest.fixture(scope="module", params=["tiny_moe_checkpoint", "tiny_dense_checkpoint"])
def pair(request, references, tmp_path_factory):
    """(checkpoint, our loaded model, processor, transformers reference in float32 and float64)."""
    ckpt = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp(f"mlx-vision-{ckpt.layout}") / "model"
    convert_tiny(ckpt, out)
    model, processor = load(str(out))
    return ckpt, model, processor, references(ckpt)


def random_pixels(grids: list[list[int]], seed: int) -> np.ndarray:
    """Patch rows for ``grids``, values in the normalised range [-1, 1]."""
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).uniform(-1, 1, (n, PATCH_DIM)).astype(np.float32)


class Prompt:
    """A token sequence in the reference format, its vision inputs, and transformers' ``mm_token_type_ids``."""

    def __init__(self, ckpt, seed: int = 0):
        self.tokens = ckpt.tokens
        self.text = ckpt.prompt_ids(120)
        self.ids: list[int] = []
        self.types: list[int] = []
        self.images: list[list[int]] = []
        self.videos: list[list[int]] = []
        self.seed = seed

    def add_text(self, n: int) -> Prompt:
        start = len(self.ids) % 100
        self.ids += self.text[start : start + n]
        self.types += [0] * n
        return self

    def _vision(self, pad: int, kind: int, n: int) -> None:
        self.ids += [self.tokens.vision_start_token_id] + [pad] * n + [self.tokens.vision_end_token_id]
        self.types += [0] + [kind] * n + [0]

    def add_image(self, h: int, w: int) -> Prompt:
        self.images.append([1, h, w])
        self._vision(self.tokens.image_token_id, 1, h * w // MERGE**2)
        return self

    def add_video(self, t: int, h: int, w: int) -> Prompt:
        self.videos.append([t, h, w])
        for _ in range(t):
            self.add_text(3)  # the timestamp, e.g. "<0.5 seconds>": ordinary text tokens
            self._vision(self.tokens.video_token_id, 2, h * w // MERGE**2)
        return self

    def inputs(self) -> ModelInputs:
        pixels = random_pixels(self.images, self.seed) if self.images else None
        videos = random_pixels(self.videos, self.seed + 1) if self.videos else None
        return ModelInputs(
            input_ids=list(self.ids),
            pixel_values=None if pixels is None else mx.array(pixels),
            image_grid_thw=mx.array(self.images) if self.images else None,
            pixel_values_videos=None if videos is None else mx.array(videos),
            video_grid_thw=mx.array(self.videos) if self.videos else None,
        )

    def hf_kwargs(self, ids: list[int] | None = None) -> dict:
        """transformers' forward arguments for this prompt (optionally followed by generated text ``ids``)."""
        extra = [] if ids is None else ids
        kwargs = {
            "input_ids": torch.tensor([self.ids + extra]),
            "mm_token_type_ids": torch.tensor([self.types + [0] * len(extra)]),
        }
        if self.images:
            kwargs |= {
                "pixel_values": torch.from_numpy(random_pixels(self.images, self.seed)),
                "image_grid_thw": torch.tensor(self.images),
            }
        if self.videos:
            kwargs |= {
                "pixel_values_videos": torch.from_numpy(random_pixels(self.videos, self.seed + 1)),
                "video_grid_thw": torch.tensor(self.videos),
            }
        return kwargs


def one_image(ckpt) -> Prompt:
    return Prompt(ckpt).add_text(7).add_image(4, 6).add_text(9)


def two_images(ckpt) -> Prompt:
    return Prompt(ckpt, seed=1).add_text(5).add_image(4, 4).add_text(4).add_image(6, 2).add_text(8)


def a_video(ckpt) -> Prompt:
    return Prompt(ckpt, seed=2).add_text(6).add_video(3, 4, 6).add_text(8)


def image_then_video(ckpt) -> Prompt:
    return Prompt(ckpt, seed=3).add_text(4).add_image(8, 4).add_text(3).add_video(2, 4, 4).add_text(6)


PROMPTS = {"one_image": one_image, "two_images": two_images, "video": a_video, "image_then_video": image_then_video}


@pytest.mark.parametrize("grids", TOWER_GRIDS.values(), ids=TOWER_GRIDS.keys())
def test_tower_matches_transformers(pair, grids, request):
    _, model, _, reference = pair
    pixels = random_pixels(grids, seed=len(grids))
    ours = np.array(model.visual(mx.array(pixels), mx.array(grids)))
    fp32, fp64 = reference.both(
        lambda hf, **kw: hf.model.visual(**kw).pooler_output,
        hidden_states=torch.from_numpy(pixels),
        grid_thw=torch.tensor(grids),
    )
    assert ours.shape == (
        sum(t * h * w for t, h, w in grids) // MERGE**2,
        reference.fp64.config.text_config.hidden_size,
    )
    assert_parity(request.node.name, ours, fp32, fp64, floor=TOWER_FLOOR)


@pytest.mark.parametrize("build", PROMPTS.values(), ids=PROMPTS.keys())
def test_positions_match_get_rope_index(pair, build):
    ckpt, model, _, reference = pair
    prompt = build(ckpt)
    ours, delta = mrope_positions(
        np.array(prompt.ids), model.config, prompt.inputs().image_grid_thw, prompt.inputs().video_grid_thw
    )
    kwargs = prompt.hf_kwargs()
    ref, ref_delta = reference.fp32.model.get_rope_index(
        kwargs["input_ids"], kwargs["mm_token_type_ids"], kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw")
    )
    assert np.array_equal(ours, ref[:, 0].numpy())
    assert delta == int(ref_delta[0, 0])


@pytest.mark.parametrize("build", PROMPTS.values(), ids=PROMPTS.keys())
def test_logits_match_transformers(pair, build, request):
    ckpt, model, _, reference = pair
    prompt = build(ckpt)
    inputs = prompt.inputs()
    ours = np.array(
        model(
            mx.array([inputs.input_ids]),
            pixel_values=inputs.pixel_values,
            image_grid_thw=inputs.image_grid_thw,
            pixel_values_videos=inputs.pixel_values_videos,
            video_grid_thw=inputs.video_grid_thw,
        )[0]
    )
    assert_parity(request.node.name, ours, *reference.logits(**prompt.hf_kwargs()))


def test_chunked_prefill_then_decode_matches_full_forward(pair, request):
    """Embeddings and positions in chunks of 8, then text tokens one at a time through the cache = one full forward."""
    ckpt, model, _, reference = pair
    prompt = image_then_video(ckpt)
    follow = ckpt.prompt_ids(120)[100:112]  # text after the prompt, decoded step by step
    cache = model.make_cache()
    embeds, positions, rope_delta = model.prompt_embeddings(prompt.inputs(), cache)
    T = embeds.shape[1]
    pieces = [
        model(None, cache, inputs_embeds=embeds[:, s : s + 8], position_ids=positions[..., s : s + 8])[0]
        for s in range(0, T, 8)
    ]
    cache.rope_delta = rope_delta
    pieces += [model(mx.array([[t]]), cache)[0] for t in follow]
    stepped = np.array(mx.concatenate(pieces, axis=0))
    assert_parity(request.node.name, stepped, *reference.logits(**prompt.hf_kwargs(follow)))


def test_multimodal_turn_after_cached_text(pair, request):
    """A multimodal prompt after tokens already in the cache continues their positions."""
    ckpt, model, _, reference = pair
    prompt = two_images(ckpt)
    head = 5  # the prompt's first text tokens go through the cache first, as an earlier turn would
    inputs = prompt.inputs()
    cache = model.make_cache()
    first = model(mx.array([prompt.ids[:head]]), cache)[0]
    second = model(
        mx.array([prompt.ids[head:]]), cache, pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw
    )[0]
    ours = np.array(mx.concatenate([first, second], axis=0))
    assert_parity(request.node.name, ours, *reference.logits(**prompt.hf_kwargs()))


def hf_greedy_multimodal(hf, prompt: Prompt, max_new_tokens: int) -> tuple[list[int], float]:
    """transformers' greedy continuation of a multimodal prompt and its smallest top-1 − top-2 logit gap."""
    with torch.no_grad():
        out = hf.generate(
            **cast_inputs(prompt.hf_kwargs(), hf.dtype),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    gaps = [float(t[0].topk(2).values[0] - t[0].topk(2).values[1]) for t in out.logits]
    return out.sequences[0, len(prompt.ids) :].tolist(), min(gaps)


@pytest.mark.parametrize("build", [one_image, a_video], ids=["one_image", "video"])
def test_greedy_continuation_equals_transformers(pair, build):
    ckpt, model, processor, reference = pair
    prompt = build(ckpt)
    expected, margin = hf_greedy_multimodal(reference.fp64, prompt, max_new_tokens=12)
    assert margin > 1e-3, "the checkpoint's greedy path is too close to a tie to compare"
    ours = [
        r.token
        for r in stream_generate(model, processor, prompt.inputs(), max_tokens=12, temp=0.0, prefill_step_size=8)
    ]
    assert ours == expected


@pytest.mark.parametrize("kind", ["image", "video"])
def test_feature_count_mismatch_names_both_numbers(pair, kind):
    ckpt, model, _, _ = pair
    prompt = Prompt(ckpt).add_text(4)
    prompt = prompt.add_image(4, 6) if kind == "image" else prompt.add_video(2, 4, 4)
    pad = ckpt.tokens.image_token_id if kind == "image" else ckpt.tokens.video_token_id
    inputs = prompt.inputs()
    dropped = list(prompt.ids)
    dropped.remove(pad)
    n_features = 6 if kind == "image" else 8
    inputs.input_ids = dropped
    with pytest.raises(
        Qwen35Error, match=f"{n_features - 1} {kind} placeholder tokens .* {n_features} {kind} features"
    ):
        model.prompt_embeddings(inputs)
    inputs.input_ids = [t for t in prompt.ids if t != pad]
    with pytest.raises(Qwen35Error, match=f"0 {kind} placeholder tokens .* {n_features} {kind} features"):
        model(
            mx.array([inputs.input_ids]),
            **{
                k: getattr(inputs, k)
                for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
            },
        )


def test_head_padding_for_the_fused_kernel_is_exact():
    """Padding the ViT's head size 72 to 80 (what Metal's fused attention needs) gives the same output."""
    q, k, v = (mx.random.normal((3, 2, 20, 72), key=mx.random.key(i)) for i in range(3))
    padded = segment_attention(q, k, v, 72**-0.5, pad=True)
    assert padded.shape == (3, 2, 20, 72)
    assert mx.abs(padded - segment_attention(q, k, v, 72**-0.5, pad=False)).max().item() <= 1e-6
