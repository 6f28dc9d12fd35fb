"""Seeded random-weight checkpoints in the released Hugging Face layout, written without torch.

The demo builds its model with this, the converter's memory benchmark writes multi-shard inputs
with it, and the test builders (tests/checkpoints.py) reuse its shard writer and processor configs,
so every checkpoint we fabricate has the same files a real Qwen3.5 release has (ARCHITECTURE.md §2.1).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

SafetensorsSaver = Callable[..., None]  # save_file(tensors, filename, metadata=...)


def write_shards(
    tensors: Mapping[str, Any],
    path: str | Path,
    max_shard_bytes: int,
    save_file: SafetensorsSaver,
) -> list[Path]:
    """Write ``tensors`` as ``model-0000i-of-0000n.safetensors`` shards + ``model.safetensors.index.json``.

    ``tensors`` may hold numpy, torch or mlx arrays (anything with ``.nbytes``); ``save_file`` is the
    matching ``safetensors.*.save_file`` / ``mlx.core.save_safetensors``-style writer. A shard is closed
    before it would exceed ``max_shard_bytes`` (a single larger tensor gets a shard of its own).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    group_bytes = 0
    for name, tensor in tensors.items():
        if groups[-1] and group_bytes + tensor.nbytes > max_shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(name)
        group_bytes += tensor.nbytes
    weight_map: dict[str, str] = {}
    files = []
    for i, names in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(path / filename), metadata={"format": "pt"})
        weight_map.update({n: filename for n in names})
        files.append(path / filename)
    index = {
        "metadata": {"total_size": sum(int(t.nbytes) for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_processor_configs(path: str | Path, vision_config: Mapping[str, Any]) -> None:
    """Write preprocessor_config.json and video_preprocessor_config.json as the family ships them (§12.1)."""
    path = Path(path)
    shared = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "merge_size": vision_config["spatial_merge_size"],
        "patch_size": vision_config["patch_size"],
        "resample": 3,  # PIL BICUBIC
        "rescale_factor": 1 / 255,
        "temporal_patch_size": vision_config["temporal_patch_size"],
    }
    image = {
        **shared,
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "size": {"longest_edge": 16_777_216, "shortest_edge": 65_536},
    }
    video = {
        **shared,
        "do_sample_frames": True,
        "fps": 2,
        "max_frames": 768,
        "min_frames": 4,
        "processor_class": "Qwen3VLProcessor",
        "size": {"longest_edge": 25_165_824, "shortest_edge": 4096},
        "video_processor_type": "Qwen3VLVideoProcessor",
    }
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
