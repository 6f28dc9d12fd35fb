"""Checks of what a user types besides the generation settings: numbers by their rule in ``settings.RANGES``
(named as the CLI's flags), the image and video options together, and text that is not UTF-8.

Every surface runs them before it loads a model, so a typo costs no wait; the rules stay in ``RANGES``.
"""

from __future__ import annotations

from ..errors import Qwen35Error
from .settings import RANGES


def flag(name: str) -> str:
    """The CLI flag of an option: ``max_kv_size`` → ``--max-kv-size``."""
    return "--" + name.replace("_", "-")


def check_numbers(**values: float | None) -> None:
    """Raise ``Qwen35Error`` naming the flag of the first value outside its rule in ``RANGES`` (None: not set)."""
    for name, value in values.items():
        RANGES[name].check(flag(name), value)


def check_media(
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    video_start: float | None = None,
    video_end: float | None = None,
) -> None:
    """The image and video options are each in range and agree with each other (None: the checkpoint's default)."""
    check_numbers(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        fps=fps,
        max_frames=max_frames,
        video_start=video_start,
        video_end=video_end,
    )
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise Qwen35Error(f"--min-pixels {min_pixels} is larger than --max-pixels {max_pixels}; swap or drop one")
    if video_end is not None and video_end <= (video_start or 0):
        raise Qwen35Error(f"--video-end {video_end} is not after --video-start {video_start or 0}; give a later end")


def check_text(text: str, what: str) -> None:
    """``text`` holds no bytes that were not UTF-8 (Python keeps them from argv and stdin as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        shown = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character {text[e.start]!r}"
        raise Qwen35Error(
            f"{what} is not UTF-8 text ({shown} at position {e.start}); save or convert it as UTF-8"
        ) from None
