"""Images → the vision tower's inputs: RGB, smart-resized, normalised, flattened into patch rows.

The rules are the reference's (transformers' Qwen2-VL image processor, pillow backend; docs/architecture.md
§12.2–12.3); the numbers (pixel budget, mean, std) come from the checkpoint's ``preprocessor_config.json``,
never from transformers' class defaults, which are Qwen2-VL's.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import Qwen35Error

IMAGE_CONFIG_FILE = "preprocessor_config.json"
MAX_ASPECT_RATIO = 200  # the reference refuses anything more extreme
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
DATA_URL = re.compile(r"^data:image/[^;,]+;base64,", re.IGNORECASE)
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# The model card's largest image, 1344×1344 (84×84 patches, 1764 LM tokens): larger ones are resized down
# to it unless the caller raises max_pixels. The checkpoint's own limit (4096², 16,384 tokens) is 9× the
# tower's memory and compute for one photo.
CARD_MAX_PIXELS = 1344 * 1344

ImageSource = str | Path | Image.Image


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of ``preprocessor_config.json`` that preprocessing uses."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int  # size.shortest_edge: the smallest resized area, in pixels
    max_pixels: int  # size.longest_edge: the largest resized area, in pixels
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged 2×2 block of patches."""
        return self.patch_size * self.merge_size

    @classmethod
    def fields_from_dict(cls, raw: dict, path: Path) -> dict:
        """Keyword arguments from a parsed processor config; a missing key is named with its file."""
        try:
            return dict(
                patch_size=int(raw["patch_size"]),
                temporal_patch_size=int(raw["temporal_patch_size"]),
                merge_size=int(raw["merge_size"]),
                min_pixels=int(raw["size"]["shortest_edge"]),
                max_pixels=int(raw["size"]["longest_edge"]),
                image_mean=tuple(float(v) for v in raw["image_mean"]),
                image_std=tuple(float(v) for v in raw["image_std"]),
                rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            )
        except (KeyError, TypeError) as e:
            raise Qwen35Error(
                f"{path}: missing or malformed key {e}; copy the file from the original checkpoint"
            ) from None

    @classmethod
    def load(cls, model_dir: Path) -> ImageProcessorConfig:
        """Read ``preprocessor_config.json`` of a checkpoint directory."""
        return cls(
            **cls.fields_from_dict(read_processor_file(model_dir / IMAGE_CONFIG_FILE), model_dir / IMAGE_CONFIG_FILE)
        )


@dataclass(frozen=True)
class ImagePatches:
    """One image, ready for the vision tower."""

    pixel_values: np.ndarray  # [grid_h·grid_w, C·T·P·P] float32, rows in merge-block order (§12.3)
    grid_thw: tuple[int, int, int]  # (1, grid_h, grid_w) in patches


@dataclass
class VisionBudget:
    """What a request's images and videos may still take: LM tokens (the context) and patch rows (the tower's memory)."""

    tokens: int  # placeholder tokens the context has room for
    patches: int  # patch rows one vision-tower call can take in the memory left
    context: int  # the model's whole context, in tokens (for the message)

    def reserve(self, grid_thw: tuple[int, int, int], merge_size: int, what: str, fix: str) -> None:
        """Take one item's tokens and patches, or refuse it with a message naming its size (``what``) and ``fix``."""
        patches = grid_thw[0] * grid_thw[1] * grid_thw[2]
        tokens = patches // merge_size**2
        if tokens > self.tokens:
            raise Qwen35Error(
                f"{what} is {tokens:,} vision tokens, more than the {self.tokens:,} left of the "
                f"{self.context:,}-token context; {fix}"
            )
        if patches > self.patches:
            raise Qwen35Error(
                f"{what} is {patches:,} patches, more than the {self.patches:,} the vision tower can still "
                f"take in the memory left; {fix}"
            )
        self.tokens -= tokens
        self.patches -= patches


def max_area(config: ImageProcessorConfig, max_pixels: int | None) -> int:
    """The largest resized area of an image or a video frame: ``max_pixels``, else the card's 1344² (within the checkpoint's)."""
    max_pixels = min(config.max_pixels, CARD_MAX_PIXELS) if max_pixels is None else max_pixels
    if max_pixels < config.factor**2:
        raise Qwen35Error(
            f"--max-pixels {max_pixels} is below one {config.factor}×{config.factor} block; "
            f"give at least {config.factor**2}"
        )
    return max_pixels


def pixel_range(config: ImageProcessorConfig, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """The resized-area bounds of an image: the caller's, else the checkpoint's minimum and ``max_area``'s default."""
    min_pixels = config.min_pixels if min_pixels is None else min_pixels
    max_pixels = max_area(config, max_pixels)
    if min_pixels < 0:
        raise Qwen35Error(f"--min-pixels {min_pixels} is negative; give an area in pixels (0 or more)")
    if min_pixels > max_pixels:
        raise Qwen35Error(f"--min-pixels {min_pixels} is larger than --max-pixels {max_pixels}; swap or drop one")
    return min_pixels, max_pixels


def read_processor_file(path: Path) -> dict:
    """A processor JSON file of the checkpoint; absent or broken → an error naming it."""
    if not path.is_file():
        raise Qwen35Error(f"{path}: not found; copy it from the original checkpoint (images and videos need it)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Qwen35Error(f"{path}: not readable JSON ({e}); copy it again from the original checkpoint") from None


def describe_source(source: ImageSource) -> str:
    """How an error message names an image: its path, or what it is."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}×{source.height}>"
    text = str(source)
    return text[:60] + "…" if DATA_URL.match(text) else text


def open_image(source: ImageSource) -> Image.Image:
    """A path, a ``data:image/…;base64,`` URL or a PIL image → a PIL image; URLs are not fetched."""
    if isinstance(source, Image.Image):
        return source
    text = str(source)
    if DATA_URL.match(text):
        try:
            return _opened(io.BytesIO(base64.b64decode(text.split(",", 1)[1], validate=True)), describe_source(text))
        except ValueError:
            raise Qwen35Error(f"{describe_source(text)}: not valid base64 image data") from None
    if URL_SCHEME.match(text):
        raise Qwen35Error(f"{text}: URLs are not fetched; download the image and pass its local path")
    path = Path(text).expanduser()
    if not path.is_file():
        raise Qwen35Error(f"{text}: no such image file; check the path")
    return _opened(path, text)


def _opened(file, name: str) -> Image.Image:
    try:
        image = Image.open(file)
        image.load()
    except Image.DecompressionBombError as e:
        raise Qwen35Error(f"{name}: too large to decode safely ({e}); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise Qwen35Error(f"{name}: not an image pillow can read ({e}); convert it to PNG or JPEG") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, then RGB the way the reference converts (transparency composited on white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        # pillow's own conversion clips 16-bit values at 255 (a near-white image); scale the range instead.
        image = Image.fromarray(np.round(np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        on_white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(on_white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def check_aspect_ratio(height: int, width: int, name: str) -> None:
    """The reference's limit on how elongated an image or video may be."""
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise Qwen35Error(
            f"{name}: aspect ratio {ratio:.0f}:1 ({width}×{height}) is beyond {MAX_ASPECT_RATIO}:1; crop or pad it first"
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Sides rounded to multiples of ``factor`` (banker's rounding), area brought into [min_pixels, max_pixels]."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def normalize(frames: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """uint8 [..., C, H, W] → float32 (x·rescale − mean) / std per channel."""
    mean = np.asarray(config.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(config.image_std, dtype=np.float32)[:, None, None]
    return ((frames.astype(np.float32) * np.float32(config.rescale_factor)) - mean) / std


def patchify(frames: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """[T, C, H, W] (T a multiple of temporal_patch_size) → patch rows [grid_t·grid_h·grid_w, C·t·P·P] (§12.3)."""
    t, c, h, w = frames.shape
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_t, grid_h, grid_w = t // tp, h // p, w // p
    blocks = frames.reshape(grid_t, tp, c, grid_h // m, m, p, grid_w // m, m, p)
    # (grid_t, block_row, block_col, in_row, in_col | C, t, y, x): 4 consecutive rows = one merge block.
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(blocks).reshape(grid_t * grid_h * grid_w, c * tp * p * p)


def preprocess_image(
    source: ImageSource,
    config: ImageProcessorConfig,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    budget: VisionBudget | None = None,
) -> ImagePatches:
    """Load, resize, normalise and patchify one image within ``budget``; ``min_pixels`` / ``max_pixels`` override the defaults."""
    name = describe_source(source)
    image = to_rgb(open_image(source))
    if not image.width or not image.height:
        raise Qwen35Error(f"{name}: the image is empty ({image.width}×{image.height}); give one with pixels")
    check_aspect_ratio(image.height, image.width, name)
    min_pixels, max_pixels = pixel_range(config, min_pixels, max_pixels)
    height, width = smart_resize(image.height, image.width, config.factor, min_pixels, max_pixels)
    grid_thw = (1, height // config.patch_size, width // config.patch_size)
    if budget is not None:  # before the resize: a refused image costs no pixel work
        what = f"{name} ({image.width}×{image.height}, resized to {width}×{height})"
        budget.reserve(grid_thw, config.merge_size, what, f"lower --max-pixels (now {max_pixels}) or send fewer images")
    resized = np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))  # [H, W, C] uint8
    frame = normalize(resized.transpose(2, 0, 1), config)
    # A still image is a clip of temporal_patch_size identical frames.
    frames = np.broadcast_to(frame, (config.temporal_patch_size, *frame.shape))
    return ImagePatches(pixel_values=patchify(frames, config), grid_thw=grid_thw)
