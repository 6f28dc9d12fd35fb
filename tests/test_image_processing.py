"""Image preprocessing vs transformers' Qwen2-VL image processor (pillow backend), built from the checkpoint's file.

Grids must be identical and pixel values equal to 1e-5: both sides resize with pillow's bicubic on
the same uint8 RGB image, so only float32 rounding in rescale/normalise can differ (measured ≤ 1.2e-7).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.processing.image import ImageProcessorConfig, preprocess_image, smart_resize
from mlx_qwen35.weights.random_checkpoint import write_processor_configs

PIXEL_TOLERANCE = 1e-5
VISION_CONFIG = {"patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The processor files exactly as the tiny checkpoints (and the releases, §12.1) carry them."""
    path = tmp_path_factory.mktemp("image-processor")
    write_processor_configs(path, VISION_CONFIG)
    return path


@pytest.fixture(scope="module")
def config(processor_dir: Path) -> ImageProcessorConfig:
    return ImageProcessorConfig.load(processor_dir)


@pytest.fixture(scope="module")
def reference(processor_dir: Path) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(**json.loads((processor_dir / "preprocessor_config.json").read_text()))


def noise(width: int, height: int, seed: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients plus noise, so resampling errors in either direction would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255 // max(width - 1, 1) + y * 255 // max(height - 1, 1)) // 2
    pixels = base[..., None] + rng.integers(-40, 40, (height, width, channels))
    return pixels.clip(0, 255).astype(np.uint8)


def assert_matches_reference(
    ours, reference: Qwen2VLImageProcessorPil, reference_image: Image.Image, **overrides
) -> float:
    expected = reference(images=[reference_image], return_tensors="np", **overrides)
    assert ours.grid_thw == tuple(expected["image_grid_thw"][0].tolist())
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == expected["pixel_values"].shape
    difference = float(np.abs(ours.pixel_values - expected["pixel_values"]).max())
    assert difference <= PIXEL_TOLERANCE
    return difference


def test_config_comes_from_the_checkpoint_not_class_defaults(config: ImageProcessorConfig):
    assert (config.min_pixels, config.max_pixels) == (65_536, 16_777_216)
    assert (config.patch_size, config.merge_size, config.temporal_patch_size, config.factor) == (16, 2, 2, 32)


@pytest.mark.parametrize(
    ("width", "height", "grid"),
    [
        (1344, 1344, (1, 84, 84)),  # unchanged: 1764 LM tokens
        (1000, 700, (1, 44, 62)),
        (28, 28, (1, 16, 16)),  # below the budget: up to 256×256
        (4000, 3000, (1, 188, 250)),  # within 4096²: sides rounded only
        (200, 3000, (1, 188, 12)),  # tall
    ],
)
def test_rgb_images_match_reference(width, height, grid, config, reference):
    image = Image.fromarray(noise(width, height, seed=width + height))
    ours = preprocess_image(image, config, max_pixels=config.max_pixels)  # the reference's budget, not our 1344² cap
    assert ours.grid_thw == grid
    assert_matches_reference(ours, reference, image)


def test_the_default_cap_is_the_reference_at_1344_squared(config, reference):
    image = Image.fromarray(noise(4000, 3000, seed=3))
    ours = preprocess_image(image, config)
    assert ours.grid_thw == (1, 72, 96)  # 1536×1152
    assert_matches_reference(ours, reference, image, size={"longest_edge": 1344 * 1344, "shortest_edge": 65_536})


def test_1344_square_is_1764_tokens(config):
    ours = preprocess_image(Image.fromarray(noise(1344, 1344, seed=0)), config)
    assert ours.pixel_values.shape == (7056, 3 * 2 * 16 * 16)
    assert ours.grid_thw[1] * ours.grid_thw[2] // config.merge_size**2 == 1764


def test_larger_than_budget_is_resized_not_rejected(config, reference):
    image = Image.fromarray(noise(4000, 3000, seed=7))
    ours = preprocess_image(image, config, max_pixels=1_000_000, min_pixels=4096)
    assert ours.grid_thw == (1, 54, 72)  # 864×1152 = 995,328 ≤ 1e6
    assert_matches_reference(ours, reference, image, size={"longest_edge": 1_000_000, "shortest_edge": 4096})


def test_min_pixels_override_upscales(config, reference):
    image = Image.fromarray(noise(300, 200, seed=8))
    ours = preprocess_image(image, config, min_pixels=512 * 512)
    assert ours.grid_thw[1] * ours.grid_thw[2] * 256 >= 512 * 512
    assert_matches_reference(
        ours, reference, image, size={"longest_edge": config.max_pixels, "shortest_edge": 512 * 512}
    )


def test_exif_rotated_jpeg(tmp_path, config, reference):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.fromarray(noise(640, 360, seed=3)).save(path, exif=exif, quality=95)
    ours = preprocess_image(path, config)
    assert ours.grid_thw == (1, 40, 22)  # displayed 360 wide × 640 tall
    upright = ImageOps.exif_transpose(Image.open(path))
    assert_matches_reference(ours, reference, upright)


def test_rgba_png_composited_like_reference(tmp_path, config, reference):
    path = tmp_path / "alpha.png"
    Image.fromarray(noise(300, 200, seed=4, channels=4), mode="RGBA").save(path)
    ours = preprocess_image(path, config)
    assert_matches_reference(ours, reference, Image.open(path))


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_png(tmp_path, transparency, config, reference):
    path = tmp_path / "palette.png"
    palette = Image.fromarray(noise(320, 240, seed=5)).quantize(colors=32)
    palette.save(path, **({"transparency": 0} if transparency else {}))
    ours = preprocess_image(path, config)
    assert_matches_reference(ours, reference, Image.open(path))


def test_greyscale(tmp_path, config, reference):
    path = tmp_path / "grey.png"
    Image.fromarray(noise(256, 320, seed=6, channels=1)[..., 0], mode="L").save(path)
    ours = preprocess_image(path, config)
    assert_matches_reference(ours, reference, Image.open(path))


def test_16_bit_greyscale_scales_the_range(tmp_path, config, reference):
    """pillow's own 16-bit → RGB conversion clips at 255 (a white image), so the reference is given the
    8-bit image (value / 257, rounded) we expect, as with the EXIF case."""
    path = tmp_path / "deep.png"
    deep = noise(256, 256, seed=9, channels=1)[..., 0].astype(np.uint16) * 257 + 100
    Image.fromarray(deep).save(path)
    assert Image.open(path).mode == "I;16"
    ours = preprocess_image(path, config)
    eight_bit = Image.fromarray(np.round(deep / 257).astype(np.uint8), mode="L")
    assert_matches_reference(ours, reference, eight_bit)
    assert ours.pixel_values.min() < -0.5  # not the near-white image the clipping conversion gives


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1344, 1344), (1344, 1344)), ((1080, 1920), (1088, 1920)), ((720, 1280), (704, 1280)), ((224, 224), (256, 256))],
)
def test_smart_resize_examples(size, expected, config):
    """docs/architecture.md §12.2's measured examples, (height, width)."""
    assert smart_resize(*size, config.factor, config.min_pixels, config.max_pixels) == expected


def test_smart_resize_agrees_with_reference_on_a_size_sweep(config):
    rng = np.random.default_rng(11)
    sizes = [(16, 3000), (48, 48), (8000, 8000), (4097, 4095), (32 * 75 + 16, 100)]
    sizes += [tuple(int(v) for v in rng.integers(20, 9000, 2)) for _ in range(400)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        args = (config.factor, config.min_pixels, config.max_pixels)
        assert smart_resize(h, w, *args) == reference_smart_resize(h, w, *args), (h, w)


def test_too_extreme_aspect_ratio_names_the_file(tmp_path, config):
    path = tmp_path / "strip.png"
    Image.fromarray(noise(4020, 20, seed=1)).save(path)
    with pytest.raises(Qwen35Error, match=r"strip\.png: aspect ratio 201:1"):
        preprocess_image(path, config)


def test_url_is_not_fetched(config):
    with pytest.raises(Qwen35Error, match=r"https://example.com/cat.png: URLs are not fetched"):
        preprocess_image("https://example.com/cat.png", config)


def test_missing_file_names_it(tmp_path, config):
    with pytest.raises(Qwen35Error, match=r"nowhere\.png: no such image file"):
        preprocess_image(tmp_path / "nowhere.png", config)


def test_unreadable_file_names_it(tmp_path, config):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(Qwen35Error, match=r"notes\.png: not an image pillow can read"):
        preprocess_image(path, config)


def test_data_url_is_decoded_locally(config, reference):
    import base64
    import io

    buffer = io.BytesIO()
    image = Image.fromarray(noise(64, 96, seed=12))
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert_matches_reference(preprocess_image(url, config), reference, image)


def test_error_messages_are_one_line(tmp_path, config):
    for source in ("https://example.com/a.png", tmp_path / "missing.png"):
        with pytest.raises(Qwen35Error) as caught:
            preprocess_image(source, config)
        assert "\n" not in str(caught.value)
