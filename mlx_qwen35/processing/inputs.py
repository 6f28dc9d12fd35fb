"""What a processor hands the model: token ids and, for multimodal prompts, the vision inputs.

Field names are transformers' so code ported from it finds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class ModelInputs:
    """One prompt, ready for the model."""

    input_ids: list[int]
    pixel_values: mx.array | None = None  # [image patches, C·T·P·P] in the order of ARCHITECTURE.md §12.3
    image_grid_thw: mx.array | None = None  # [images, 3] (grid_t, grid_h, grid_w) in patches
    pixel_values_videos: mx.array | None = None  # [video patches, C·T·P·P]
    video_grid_thw: mx.array | None = None  # [videos, 3]

    @property
    def has_vision(self) -> bool:
        return self.pixel_values is not None or self.pixel_values_videos is not None
