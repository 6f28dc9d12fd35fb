"""What a processor hands the model: token ids and, for multimodal prompts, the vision inputs.

Field names are transformers' so code ported from it finds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..config import ModelConfig


@dataclass(frozen=True)
class VisionItem:
    """One image or video of a prompt: the prompt positions its placeholders fill, its patches and grid."""

    video: bool
    positions: np.ndarray  # [placeholder tokens] indices into input_ids
    pixel_values: mx.array  # [patches, C·T·P·P]
    grid_thw: tuple[int, int, int]


@dataclass
class ModelInputs:
    """One prompt, ready for the model."""

    input_ids: list[int]
    pixel_values: mx.array | None = None  # [image patches, C·T·P·P] in the order of docs/architecture.md §12.3
    image_grid_thw: mx.array | None = None  # [images, 3] (grid_t, grid_h, grid_w) in patches
    pixel_values_videos: mx.array | None = None  # [video patches, C·T·P·P]
    video_grid_thw: mx.array | None = None  # [videos, 3]

    @property
    def has_vision(self) -> bool:
        return self.pixel_values is not None or self.pixel_values_videos is not None

    def vision_items(self, config: ModelConfig) -> list[VisionItem]:
        """Each image and video of the prompt, in prompt order."""
        if not self.has_vision:
            return []
        ids = np.asarray(self.input_ids)
        merge = config.vision.spatial_merge_size if config.vision else 1
        items = []
        for video, token_id, pixels, grids in (
            (False, config.image_token_id, self.pixel_values, self.image_grid_thw),
            (True, config.video_token_id, self.pixel_values_videos, self.video_grid_thw),
        ):
            if pixels is None:
                continue
            # Items fill their modality's placeholders in order, t·h·w/merge² tokens and t·h·w patch rows each.
            slots, token, row = np.flatnonzero(ids == token_id), 0, 0
            for t, h, w in np.array(grids).reshape(-1, 3).tolist():
                tokens = t * h * w // merge**2
                items.append(VisionItem(video, slots[token : token + tokens], pixels[row : row + t * h * w], (t, h, w)))
                token, row = token + tokens, row + t * h * w
        return sorted(items, key=lambda item: int(item.positions[0]))

    def span(self, start: int, end: int, config: ModelConfig) -> ModelInputs:
        """Tokens ``start:end`` with the vision inputs of the items whose placeholders lie there."""
        items = [item for item in self.vision_items(config) if start <= item.positions[0] < end]
        images, videos = [i for i in items if not i.video], [i for i in items if i.video]
        return ModelInputs(self.input_ids[start:end], *_stacked(images), *_stacked(videos))


def _stacked(items: list[VisionItem]) -> tuple[mx.array | None, mx.array | None]:
    """(pixel values, grid_thw) of ``items`` as the model takes them; (None, None) for none."""
    if not items:
        return None, None
    return mx.concatenate([i.pixel_values for i in items]), mx.array([i.grid_thw for i in items], dtype=mx.int32)
