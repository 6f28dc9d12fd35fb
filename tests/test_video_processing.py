"""Video preprocessing vs transformers' Qwen3-VL video processor, on clips made here with PyAV.

transformers' video processor needs torchvision for three calls (grayscale_to_rgb, resize, normalize),
and PyPI's torchvision does not import beside torch 2.13. The ``reference`` fixture loads the
processor module unchanged and stands in for those calls with torch-only equivalents: resize is
``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` rounded back to uint8, which is
what torchvision's resize does on uint8 tensors on the CPU.

Pixel tolerance: we resize with pillow's bicubic in float mode, the reference with torch's antialiased
bicubic; both use the same a = −0.5 kernel and support and round to uint8 once, but sum in a different
order, so a value that lands near .5 can round the other way: at most 1 uint8 level (2/255 ≈ 0.0078
after (x/255 − 0.5)/0.5) at any pixel, and rarely (we allow 0.5 % of values; measured ≤ 0.04 %).
pillow's uint8 path would differ by up to 12 levels at the square's saturated edges (it rounds between
its two passes), which is why the video path does not use it.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import sys
import types
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.processing.video import (
    VideoProcessorConfig,
    VideoWindow,
    format_timestamp,
    preprocess_video,
    sample_frame_indices,
    video_smart_resize,
)
from mlx_qwen35.weights.random_checkpoint import write_processor_configs

LEVEL = 2 / 255  # one uint8 level after rescale (1/255) and normalise (mean 0.5, std 0.5)
MAX_LEVELS = 1
MAX_FRACTION_OFF = 0.005
VIDEO_FPS = 10
WIDTH, HEIGHT = 100, 60  # not multiples of 32, so both sides resize (to 96×64)
VISION_CONFIG = {"patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}


def write_moving_square(
    path: Path, seconds: int, fps: int = VIDEO_FPS, size: tuple[int, int] = (WIDTH, HEIGHT)
) -> Path:
    """An H.264 clip of a white square crossing a gradient, so every frame differs."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 80)], axis=-1).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            frame = background.copy()
            left, top = (i * 3) % (width - 16), (i * 2) % (height - 16)
            frame[top : top + 16, left : left + 16] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def decode_all(path: Path) -> np.ndarray:
    """Every frame as rgb24, decoded as the reference's PyAV reader does: [frames, H, W, 3]."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    directory = tmp_path_factory.mktemp("videos")
    return {seconds: write_moving_square(directory / f"square_{seconds}s.mp4", seconds) for seconds in (60, 90)}


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video-processor")
    write_processor_configs(path, VISION_CONFIG)
    return path


@pytest.fixture(scope="module")
def config(processor_dir: Path) -> VideoProcessorConfig:
    return VideoProcessorConfig.load(processor_dir)


class _InterpolationMode(enum.Enum):
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


def _resize(image: torch.Tensor, size, interpolation, antialias: bool = True) -> torch.Tensor:
    flat = image.reshape(-1, *image.shape[-3:]).float()
    out = torch.nn.functional.interpolate(flat, size=list(size), mode=interpolation.value, antialias=antialias)
    out = out.reshape(*image.shape[:-2], *out.shape[-2:])
    return out.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else out


def _normalize(image: torch.Tensor, mean, std, inplace: bool = False) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image - mean) / std


def _grayscale_to_rgb(video: torch.Tensor) -> torch.Tensor:
    return video if video.shape[-3] == 3 else video.expand(*video.shape[:-3], 3, *video.shape[-2:])


@pytest.fixture(scope="module")
def reference_module():
    """transformers' video_processing_qwen3_vl, loaded as is, with torch-only stand-ins for torchvision."""
    import transformers.image_processing_backends as backends
    import transformers.models.qwen3_vl as qwen3_vl
    import transformers.video_processing_utils as video_utils

    functional = types.SimpleNamespace(
        resize=_resize, normalize=_normalize, grayscale_to_rgb=_grayscale_to_rgb, InterpolationMode=_InterpolationMode
    )
    name = "transformers.models.qwen3_vl._reference_video_processing"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "tvF", functional, raising=False)
        patch.setattr(video_utils, "tvF", functional, raising=False)
        patch.setattr(
            backends, "pil_torch_interpolation_mapping", {2: _InterpolationMode.BILINEAR, 3: _InterpolationMode.BICUBIC}
        )
        spec = importlib.util.spec_from_file_location(name, Path(qwen3_vl.__path__[0]) / "video_processing_qwen3_vl.py")
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, name, module)  # auto_docstring looks the class's file up here
        spec.loader.exec_module(module)
        yield module


@pytest.fixture(scope="module")
def reference(reference_module, processor_dir: Path):
    """The reference video processor built from the checkpoint's video_preprocessor_config.json."""
    import json

    raw = json.loads((processor_dir / "video_preprocessor_config.json").read_text())
    return reference_module.Qwen3VLVideoProcessor(**raw, cap_pixels_per_frame=False)


def reference_timestamps(indices: np.ndarray, video_fps: float) -> list[float]:
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    return Qwen3VLProcessor._calculate_timestamps(None, indices, video_fps, 2)


def run_reference(reference, frames: np.ndarray, first: int = 0):
    """The reference on ``frames`` (a window's frames), indices shifted back to the whole clip's numbering."""
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=len(frames), fps=float(VIDEO_FPS))
    out = reference(
        videos=[frames], video_metadata=[metadata], do_sample_frames=True, return_metadata=True, return_tensors="np"
    )
    indices = np.asarray(out["video_metadata"][0].frames_indices) + first
    return out["pixel_values_videos"], tuple(out["video_grid_thw"][0].tolist()), indices


def assert_pixels_close(ours: np.ndarray, expected: np.ndarray) -> None:
    levels = np.abs(ours - expected) / LEVEL
    fraction_off = float((levels > 0.01).mean())
    assert levels.max() <= MAX_LEVELS + 1e-3 and fraction_off <= MAX_FRACTION_OFF, (levels.max(), fraction_off)


def test_config_comes_from_the_checkpoint(config: VideoProcessorConfig):
    assert (config.min_pixels, config.max_pixels) == (4096, 25_165_824)
    assert (config.fps, config.min_frames, config.max_frames) == (2.0, 4, 768)


def test_60_second_clip_matches_reference(clips, config, reference, caplog):
    with caplog.at_level(logging.WARNING):
        ours = preprocess_video(clips[60], config)
    assert not caplog.records  # the whole clip fits the default window
    expected_pixels, expected_grid, expected_indices = run_reference(reference, decode_all(clips[60]))
    assert len(ours.frame_indices) == 120
    np.testing.assert_array_equal(ours.frame_indices, expected_indices)
    assert ours.timestamps == reference_timestamps(expected_indices, VIDEO_FPS)
    assert ours.grid_thw == expected_grid == (60, 4, 6)
    assert_pixels_close(ours.pixel_values, expected_pixels)


def test_90_second_clip_samples_the_first_60_and_says_so(clips, config, reference, caplog):
    with caplog.at_level(logging.WARNING):
        ours = preprocess_video(clips[90], config)
    assert any("square_90s.mp4 is 90.0 s long; sampling 0.0–60.0 s" in r.getMessage() for r in caplog.records)
    expected_pixels, expected_grid, expected_indices = run_reference(reference, decode_all(clips[90])[:600])
    np.testing.assert_array_equal(ours.frame_indices, expected_indices)
    assert ours.timestamps == reference_timestamps(expected_indices, VIDEO_FPS)
    assert ours.grid_thw == expected_grid
    assert_pixels_close(ours.pixel_values, expected_pixels)


def test_explicit_window_has_absolute_timestamps(clips, config, reference, caplog):
    with caplog.at_level(logging.WARNING):
        ours = preprocess_video(clips[90], config, video_start=30.0, video_end=75.0)
    assert not caplog.records  # the window was asked for
    expected_pixels, expected_grid, expected_indices = run_reference(
        reference, decode_all(clips[90])[300:750], first=300
    )
    np.testing.assert_array_equal(ours.frame_indices, expected_indices)
    assert ours.frame_indices[0] == 300 and ours.frame_indices[-1] == 749
    assert ours.timestamps == reference_timestamps(expected_indices, VIDEO_FPS)
    assert format_timestamp(ours.timestamps[0]) == "<30.2 seconds>"
    assert ours.grid_thw == expected_grid == (45, 4, 6)
    assert_pixels_close(ours.pixel_values, expected_pixels)


def test_odd_frame_count_repeats_the_last_frame(tmp_path, config, reference):
    path = write_moving_square(tmp_path / "short.mp4", seconds=1, fps=3)  # 3 frames: min_frames 4 is capped at 3
    ours = preprocess_video(path, config)
    expected_pixels, expected_grid, expected_indices = run_reference(reference, decode_all(path))
    np.testing.assert_array_equal(ours.frame_indices, expected_indices)
    assert len(ours.frame_indices) == 3 and ours.grid_thw == expected_grid and ours.grid_thw[0] == 2
    assert ours.timestamps == reference_timestamps(expected_indices, 3.0) == [1 / 6, 2 / 3]
    assert np.array_equal(
        ours.pixel_values[-24:].reshape(24, 3, 2, 256)[:, :, 0], ours.pixel_values[-24:].reshape(24, 3, 2, 256)[:, :, 1]
    )
    assert_pixels_close(ours.pixel_values, expected_pixels)


def test_frame_sampling_agrees_with_reference_on_a_sweep(reference):
    from transformers.video_utils import VideoMetadata

    rng = np.random.default_rng(0)
    for _ in range(300):
        count = int(rng.integers(2, 40_000))
        video_fps = float(rng.choice([10, 23.976, 24, 25, 29.97, 30, 60]))
        fps = float(rng.choice([0.5, 1, 2, 4]))
        ours = sample_frame_indices(VideoWindow(0, count), video_fps, fps, 4, 768, temporal_patch_size=2)
        expected = reference.sample_frames(VideoMetadata(total_num_frames=count, fps=video_fps), fps=fps)
        np.testing.assert_array_equal(ours, expected)


def test_video_smart_resize_agrees_with_reference(reference_module, config):
    rng = np.random.default_rng(1)
    cases = [(120, 720, 1280), (120, 1080, 1920), (768, 1080, 1920), (4, 20, 30), (120, 1344, 1344)]
    cases += [(int(rng.integers(2, 800)), int(rng.integers(8, 4000)), int(rng.integers(8, 4000))) for _ in range(300)]
    args = dict(factor=config.factor, temporal_factor=2, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    for n, h, w in cases:
        if max(h, w) / min(h, w) > 200:
            continue
        assert video_smart_resize(n, h, w, **args) == reference_module.smart_resize(n, h, w, **args), (n, h, w)


def test_sixty_seconds_at_30_fps_is_120_frames_and_11400_tokens(config):
    """docs/architecture.md §12.4's measured example, without decoding 1800 frames."""
    indices = sample_frame_indices(VideoWindow(0, 1800), 30.0, config.fps, config.min_frames, config.max_frames, 2)
    assert len(indices) == 120 and list(indices[:4]) == [0, 15, 30, 45] and list(indices[-2:]) == [1784, 1799]
    h, w = video_smart_resize(120, 720, 1280, config.factor, 2, config.min_pixels, config.max_pixels)
    assert (h, w) == (320, 608)
    assert 60 * (h // 32) * (w // 32) == 11_400


def test_fps_and_max_frames_overrides(clips, config):
    ours = preprocess_video(clips[60], config, fps=1.0, max_frames=20)
    assert len(ours.frame_indices) == 20 and ours.grid_thw[0] == 10
    np.testing.assert_array_equal(ours.frame_indices, np.linspace(0, 599, 20).round().astype(int))


def test_unreadable_video_names_the_file(tmp_path, config):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x01 definitely not a video" * 100)
    with pytest.raises(Qwen35Error, match=r"broken\.mp4: not a video PyAV can read") as caught:
        preprocess_video(path, config)
    assert "\n" not in str(caught.value)


def test_file_without_video_stream_names_the_file(tmp_path, config):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(Qwen35Error, match=r"tone\.wav: has no video stream"):
        preprocess_video(path, config)


def test_missing_video_and_url(tmp_path, config):
    with pytest.raises(Qwen35Error, match=r"gone\.mp4: no such video file"):
        preprocess_video(tmp_path / "gone.mp4", config)
    with pytest.raises(Qwen35Error, match=r"URLs are not fetched"):
        preprocess_video("https://example.com/clip.mp4", config)


def test_bad_window_is_refused(clips, config):
    with pytest.raises(Qwen35Error, match=r"--video-end 10.0 is not after --video-start 20.0"):
        preprocess_video(clips[60], config, video_start=20.0, video_end=10.0)
    with pytest.raises(Qwen35Error, match=r"--video-start 75.0 is past the end of .*square_60s\.mp4 \(60\.0 s\)"):
        preprocess_video(clips[60], config, video_start=75.0)


def test_container_without_frame_count(tmp_path, config, reference):
    """Matroska records no frame count: it is taken from the duration, and the sampling still matches."""
    path = write_moving_square(tmp_path / "clip.mkv", seconds=9)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    ours = preprocess_video(path, config)
    _, expected_grid, expected_indices = run_reference(reference, decode_all(path))
    np.testing.assert_array_equal(ours.frame_indices, expected_indices)
    assert ours.grid_thw == expected_grid == (9, 4, 6)
