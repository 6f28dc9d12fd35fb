"""3-D M-RoPE positions (t, h, w) of a prompt mixing text, images and videos (docs/architecture.md §11.2).

A running counter p walks the prompt. A text token takes (p, p, p) and advances p by one. An image
(or one temporal group of a video) of gh×gw merged tokens starting at p gives the token at merged
(row, col) the position (p, p + row, p + col), then advances p by max(gh, gw). A video's groups are
separated by timestamp text in the prompt, so each group is placed like an image of its own and the
time is carried by the text, not by the T component. This is transformers' ``get_rope_index``,
driven by the placeholder ids instead of ``mm_token_type_ids``.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..errors import Qwen35Error


def _grids(grid_thw, split_temporal: bool) -> list[tuple[int, int, int]]:
    """grid_thw [items, 3] as tuples; videos split into grid_t separate (1, h, w) groups."""
    if grid_thw is None:
        return []
    grids = [tuple(int(v) for v in g) for g in np.array(grid_thw).reshape(-1, 3)]
    return [(1, h, w) for t, h, w in grids for _ in range(t)] if split_temporal else grids


def check_placeholder_counts(
    input_ids: np.ndarray, config: ModelConfig, image_grid_thw=None, video_grid_thw=None
) -> None:
    """Raise a clear error when the prompt's image/video placeholders and the vision features disagree in number."""
    merge = config.vision.spatial_merge_size if config.vision else 1
    for kind, token_id, grid_thw, token in (
        ("image", config.image_token_id, image_grid_thw, "<|image_pad|>"),
        ("video", config.video_token_id, video_grid_thw, "<|video_pad|>"),
    ):
        placeholders = int((input_ids == token_id).sum())
        features = sum(t * h * w for t, h, w in _grids(grid_thw, False)) // merge**2
        if placeholders != features:
            raise Qwen35Error(
                f"the prompt has {placeholders} {kind} placeholder tokens ({token}) but the {kind} inputs give "
                f"{features} {kind} features ({kind}_grid_thw {_grids(grid_thw, False)}); build the prompt and the "
                f"{kind} inputs together with the processor, which expands each {kind} to grid_t·grid_h·grid_w/"
                f"{merge**2} placeholders"
            )


def mrope_positions(
    input_ids: np.ndarray, config: ModelConfig, image_grid_thw=None, video_grid_thw=None
) -> tuple[np.ndarray, int]:
    """Positions [3, T] of one prompt and its delta δ = max position + 1 − T (text after it continues at length + δ)."""
    input_ids = np.asarray(input_ids).reshape(-1)
    check_placeholder_counts(input_ids, config, image_grid_thw, video_grid_thw)
    merge = config.vision.spatial_merge_size if config.vision else 1
    pending = {
        config.image_token_id: iter(_grids(image_grid_thw, False)),
        config.video_token_id: iter(_grids(video_grid_thw, True)),
    }
    is_vision = np.isin(input_ids, list(pending))
    # Runs of equal token kind: text, or consecutive placeholders of one modality.
    kind = np.where(is_vision, input_ids, -1)
    bounds = np.flatnonzero(np.diff(kind)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(input_ids)]

    pieces, p = [], 0
    for start, end in zip(starts, ends):
        if not is_vision[start]:
            pieces.append(np.broadcast_to(np.arange(p, p + end - start), (3, end - start)))
            p += end - start
            continue
        at = start
        while at < end:  # a run may hold several items when nothing separates them
            t, h, w = next(pending[input_ids[start]])
            gh, gw = h // merge, w // merge
            tt, rr, cc = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([p + tt, p + rr, p + cc]).reshape(3, -1))
            at += t * gh * gw
            p += max(gh, gw)
        if at != end:
            raise Qwen35Error(
                f"a run of {end - start} placeholder tokens at position {start} does not match the grids of its "
                f"items ({at - start} tokens); build the prompt with the processor"
            )
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
    delta = int(positions.max()) + 1 - len(input_ids) if len(input_ids) else 0
    return positions, delta
