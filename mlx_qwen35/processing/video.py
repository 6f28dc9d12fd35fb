"""Videos → the vision tower's inputs: decoded (PyAV), sampled, smart-resized, normalised, in temporal pairs.

Sampling, sizing and timestamps follow the reference Qwen3-VL video processor (docs/architecture.md §12.4)
with the numbers of the checkpoint's ``video_preprocessor_config.json``. One addition: a time window,
the first 60 s unless told otherwise, so a long clip cannot silently eat the context.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ..errors import Qwen35Error
from .image import (
    URL_SCHEME,
    ImageProcessorConfig,
    VisionBudget,
    check_aspect_ratio,
    max_area,
    normalize,
    patchify,
    read_processor_file,
    smart_resize,
)

VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
DEFAULT_WINDOW_SECONDS = 60.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoProcessorConfig(ImageProcessorConfig):
    """The fields of ``video_preprocessor_config.json``: the image fields plus frame sampling."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    @classmethod
    def load(cls, model_dir: Path) -> VideoProcessorConfig:
        """Read ``video_preprocessor_config.json`` of a checkpoint directory (class defaults as the reference's)."""
        path = model_dir / VIDEO_CONFIG_FILE
        raw = read_processor_file(path)
        sampling = {key: type(getattr(cls, key))(raw[key]) for key in ("fps", "min_frames", "max_frames") if key in raw}
        return cls(**cls.fields_from_dict(raw, path), **sampling)


@dataclass(frozen=True)
class VideoPatches:
    """One video, ready for the vision tower, with what the prompt says about it."""

    pixel_values: np.ndarray  # [grid_t·grid_h·grid_w, C·T·P·P] float32, rows in §12.3 order
    grid_thw: tuple[int, int, int]  # (temporal groups, grid_h, grid_w)
    timestamps: list[float]  # seconds, one per temporal group: the mean time of its frames
    frame_indices: np.ndarray  # source frame index of each sampled frame (before pairing)


@dataclass(frozen=True)
class VideoWindow:
    """The frames of a video that may be sampled: ``count`` frames from ``first``."""

    first: int
    count: int


def video_smart_resize(
    num_frames: int, height: int, width: int, factor: int, temporal_factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Frame size for a clip: sides multiples of ``factor``, pixels summed over all frames within the budget."""
    if height < factor or width < factor:
        # Tiny frames are sized as if first upscaled so the short side reaches one factor.
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of an RGB uint8 frame, rounded to uint8 once at the end, as the reference's torch resize."""
    # pillow's uint8 path rounds and clips between its horizontal and vertical passes, which moves
    # saturated edges by up to ~12 levels from the reference; its float mode is the same kernel without that.
    channels = [
        np.asarray(Image.fromarray(frame[..., c].astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC))
        for c in range(frame.shape[-1])
    ]
    return np.stack(channels, axis=-1).round().clip(0, 255).astype(np.uint8)


def sample_frame_indices(
    window: VideoWindow, video_fps: float, fps: float, min_frames: int, max_frames: int, temporal_patch_size: int
) -> np.ndarray:
    """``fps`` frames per second of the window, clamped to [min_frames, max_frames] and the frames there are."""
    n = int(window.count / video_fps * fps)
    n = min(max(n, min_frames), max_frames, window.count)
    # A one-frame window still makes one temporal group (the reference would refuse it).
    n = max(n, temporal_patch_size)
    return window.first + np.linspace(0, window.count - 1, n).round().astype(int)


def group_timestamps(frame_indices: np.ndarray, video_fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds per temporal group: the mean of its first and last frame's time (odd counts repeat the last frame)."""
    indices = list(frame_indices) + [frame_indices[-1]] * (-len(frame_indices) % temporal_patch_size)
    times = [int(i) / video_fps for i in indices]
    return [(times[g] + times[g + temporal_patch_size - 1]) / 2 for g in range(0, len(times), temporal_patch_size)]


def format_timestamp(seconds: float) -> str:
    """The text before each temporal group in the prompt, as the reference processor writes it."""
    return f"<{seconds:.1f} seconds>"


class _Decoder:
    """A video file opened with PyAV; every failure becomes one ``Qwen35Error`` naming the file."""

    def __init__(self, source: str | Path):
        self.name = str(source)
        if URL_SCHEME.match(self.name):
            raise Qwen35Error(f"{self.name}: URLs are not fetched; download the video and pass its local path")
        self.path = Path(self.name).expanduser()
        if not self.path.is_file():
            raise Qwen35Error(f"{self.name}: no such video file; check the path")
        with self._open() as container:
            if not container.streams.video:
                raise Qwen35Error(f"{self.name}: has no video stream; give a video file (mp4, mov, webm, …)")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise Qwen35Error(
                    f"{self.name}: the frame rate cannot be read; re-encode it (e.g. ffmpeg -i IN -r 30 OUT.mp4)"
                )
            self.video_fps = float(rate)
            self.height, self.width = stream.height, stream.width
            self.frame_count = stream.frames or self._frames_from_duration(container, stream)
        if not self.frame_count:
            self.frame_count = self.decode(set())[1]
        if not self.frame_count:
            raise Qwen35Error(f"{self.name}: contains no decodable frames")

    def _open(self):
        try:
            return av.open(str(self.path))
        except av.FFmpegError as e:
            raise Qwen35Error(f"{self.name}: not a video PyAV can read ({e}); re-encode it as mp4") from None

    def _frames_from_duration(self, container, stream) -> int:
        """Containers that do not record a frame count (webm, mkv): duration × rate (corrected if decoding finds fewer)."""
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / av.time_base
        else:
            return 0
        return int(round(seconds * self.video_fps))

    def decode(
        self, wanted: set[int], transform: Callable[[np.ndarray], np.ndarray] = lambda frame: frame
    ) -> tuple[dict[int, np.ndarray], int]:
        """``transform``ed RGB frames at the ``wanted`` decode-order indices, and how many frames were decoded."""
        frames: dict[int, np.ndarray] = {}
        stop = max(wanted, default=None)
        seen = 0
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            try:
                for index, frame in enumerate(container.decode(stream)):
                    seen = index + 1
                    if index in wanted:
                        frames[index] = transform(frame.to_ndarray(format="rgb24"))
                    if stop is not None and index >= stop:
                        break
            except av.FFmpegError as e:
                raise Qwen35Error(f"{self.name}: decoding failed at frame {seen} ({e}); re-encode it as mp4") from None
        return frames, seen


def _window(decoder: _Decoder, start: float | None, end: float | None) -> VideoWindow:
    """Frames i with start ≤ i / video_fps < end (default end: start + 60 s); says so when the clip is cut."""
    start = 0.0 if start is None else start
    if start < 0:
        raise Qwen35Error(f"--video-start {start} is negative; give seconds from the beginning")
    if end is not None and end <= start:
        raise Qwen35Error(f"--video-end {end} is not after --video-start {start}; give a later end")
    stop_time = start + DEFAULT_WINDOW_SECONDS if end is None else end
    fps, total = decoder.video_fps, decoder.frame_count
    # The epsilon keeps float noise (0.3 · 10 = 3.0000000000000004) from skipping a frame.
    first = math.ceil(start * fps - 1e-9)
    stop = min(total, math.ceil(stop_time * fps - 1e-9))
    if first >= total:
        raise Qwen35Error(f"--video-start {start} is past the end of {decoder.name} ({total / fps:.1f} s)")
    if end is None and stop < total:
        logger.warning(
            "%s is %.1f s long; sampling %.1f–%.1f s only (set --video-start / --video-end for another window)",
            decoder.name, total / fps, start, stop_time,
        )  # fmt: skip
    return VideoWindow(first=first, count=stop - first)


def frame_size(
    num_frames: int, height: int, width: int, config: VideoProcessorConfig, max_frame_pixels: int
) -> tuple[int, int]:
    """The resized frame of a ``num_frames`` clip: the reference's size for the whole-clip budget, at most ``max_frame_pixels``."""
    h_bar, w_bar = video_smart_resize(
        num_frames, height, width, config.factor, config.temporal_patch_size, config.min_pixels, config.max_pixels
    )
    if h_bar * w_bar > max_frame_pixels:
        # The clip budget alone lets a 2-s 4K clip keep 6-MP frames (~24,000 patches, one attention segment
        # each); qwen-vl-utils caps frames too. Sized from the source, so the aspect ratio is the frame's.
        h_bar, w_bar = smart_resize(height, width, config.factor, 0, max_frame_pixels)
    return h_bar, w_bar


def _decode_resized(
    decoder: _Decoder, indices: np.ndarray, height: int, width: int
) -> tuple[dict[int, np.ndarray], int]:
    """The sampled frames resized to ``height``×``width`` as they are decoded, and how many frames were decoded."""
    # Resizing each frame as it arrives keeps memory at the resized clip (120 4K frames would be 3 GB).
    return decoder.decode(set(indices.tolist()), lambda frame: resize_frame(frame, height, width))


def preprocess_video(
    source: str | Path,
    config: VideoProcessorConfig,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    video_start: float | None = None,
    video_end: float | None = None,
    max_pixels: int | None = None,
    budget: VisionBudget | None = None,
) -> VideoPatches:
    """Decode, sample, resize, normalise and patchify one video file within ``budget``; the keywords override the defaults.

    ``max_pixels`` bounds each frame (default: the card's 1344²); the checkpoint's ``max_pixels`` bounds the whole clip.
    """
    fps = config.fps if fps is None else fps
    max_frames = config.max_frames if max_frames is None else max_frames
    max_frame_pixels = max_area(config, max_pixels)
    if fps <= 0:
        raise Qwen35Error(f"--fps {fps} must be positive")
    if max_frames < 1:
        raise Qwen35Error(f"--max-frames {max_frames} must be at least 1")
    decoder = _Decoder(source)
    check_aspect_ratio(decoder.height, decoder.width, decoder.name)
    window = _window(decoder, video_start, video_end)
    sample = dict(video_fps=decoder.video_fps, fps=fps, min_frames=config.min_frames, max_frames=max_frames)
    indices = sample_frame_indices(window, temporal_patch_size=config.temporal_patch_size, **sample)
    height, width = frame_size(len(indices), decoder.height, decoder.width, config, max_frame_pixels)
    if budget is not None:  # before decoding: a refused clip costs no pixel work
        groups = -(-len(indices) // config.temporal_patch_size)
        what = (
            f"{decoder.name} ({len(indices)} frames of {decoder.width}×{decoder.height}, resized to {width}×{height})"
        )
        fix = f"lower --max-pixels (now {max_frame_pixels}), --fps or --max-frames, or cut it with --video-end"
        budget.reserve((groups, height // config.patch_size, width // config.patch_size), config.merge_size, what, fix)
    frames, seen = _decode_resized(decoder, indices, height, width)
    if seen <= indices[-1]:
        # The recorded frame count was too high: sample again from the frames that exist (fewer frames,
        # within the same clip budget as the reservation above).
        window = VideoWindow(first=window.first, count=min(window.count, seen - window.first))
        if window.count <= 0:
            raise Qwen35Error(f"{decoder.name}: no frames after --video-start {video_start}")
        indices = sample_frame_indices(window, temporal_patch_size=config.temporal_patch_size, **sample)
        height, width = frame_size(len(indices), decoder.height, decoder.width, config, max_frame_pixels)
        frames, _ = _decode_resized(decoder, indices, height, width)

    clip = np.stack([frames[int(i)] for i in indices]).transpose(0, 3, 1, 2)  # [n, C, H, W] uint8
    pad = -len(indices) % config.temporal_patch_size  # odd frame counts repeat the last frame
    clip = normalize(np.concatenate([clip, np.repeat(clip[-1:], pad, axis=0)]), config)
    return VideoPatches(
        pixel_values=patchify(clip, config),
        grid_thw=(clip.shape[0] // config.temporal_patch_size, height // config.patch_size, width // config.patch_size),
        timestamps=group_timestamps(indices, decoder.video_fps, config.temporal_patch_size),
        frame_indices=indices,
    )
