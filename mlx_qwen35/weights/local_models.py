"""The Qwen3.5 checkpoints already on this machine: local MLX dirs and Hugging Face cache snapshots.

One list for every surface that offers a model to pick (``mlx-qwen35 models``, the menu-bar app),
each with its size on disk, its quantisation and whether it fits this machine's memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# Where people keep converted models, searched (with their direct subdirectories) besides the Hub cache.
DEFAULT_SEARCH_DIRS = [Path.home() / "models", Path.home() / "mlx-models", Path.cwd()]
FIT_FRACTION = 0.75  # weights may take this share of memory: the rest is for the cache, activations and the OS


@dataclass(frozen=True)
class ModelEntry:
    """A model on this machine: a local MLX dir or a Hub cache snapshot."""

    name: str
    path: Path
    size_bytes: int
    fits: bool  # weights leave a quarter of the machine's memory for the cache and the OS
    quantization: str = "unknown"  # "4bit", a recipe name of ours, or the unquantised dtype

    @property
    def label(self) -> str:
        """The menu text: name, size, and a warning when it will not fit."""
        return f"{self.name} ({self.size_bytes / 1e9:.1f} GB){'' if self.fits else ' — too large for this Mac'}"


def total_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it (``HF_HUB_CACHE``, ``HF_HOME``, ``XDG_CACHE_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("HF_HOME") or cache_home / "huggingface") / "hub"


def _weights_size(model_dir: Path) -> int:
    # Hub snapshots hold symlinks into blobs/: stat follows them to the real size.
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def _qwen35_config(path: Path) -> dict | None:
    """The config.json of a Qwen3.5 checkpoint with weights at ``path``, else None."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not str(config.get("model_type", "")).startswith("qwen3_5"):
        return None
    return config if any(path.glob("*.safetensors")) else None


def quantization_label(config: dict) -> str:
    """How a checkpoint's weights are stored: our recipe's name, mlx-lm's ``Nbit``, or the dtype of unquantised ones."""
    ours = config.get("mlx_qwen35")
    if isinstance(ours, dict) and ours.get("recipe"):
        # An unquantised conversion is named by the dtype it was written in (its recipe is called "bf16").
        unquantised = not (config.get("quantization") or config.get("quantization_config"))
        return str(ours.get("dtype") if unquantised and ours.get("dtype") else ours["recipe"])
    quantization = config.get("quantization") or config.get("quantization_config")
    if isinstance(quantization, dict):
        if "bits" in quantization:
            return f"{quantization['bits']}bit"
        if quantization.get("quant_method"):  # an HF checkpoint, e.g. block-FP8
            return str(quantization["quant_method"])
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return str(config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or "unknown")


def find_models(
    search_dirs: list[Path], hf_cache: Path | None = None, memory_bytes: int | None = None
) -> list[ModelEntry]:
    """Qwen3.5 checkpoints in ``search_dirs`` (and their subdirs) and the Hugging Face cache, largest first."""
    memory = memory_bytes or total_memory_bytes()
    candidates: list[tuple[str, Path]] = []
    for root in search_dirs:
        for path in [root, *(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []:
            candidates.append((path.name, path))
    cache = hf_cache or hf_hub_cache()
    for repo in cache.glob("models--*") if cache.is_dir() else []:
        for snapshot in sorted((repo / "snapshots").glob("*")):
            candidates.append((repo.name.removeprefix("models--").replace("--", "/"), snapshot))
    entries = {}
    for name, path in candidates:
        config = _qwen35_config(path)
        if config is not None:
            size = _weights_size(path)
            entries[path.resolve()] = ModelEntry(
                name, path, size, fits=size <= FIT_FRACTION * memory, quantization=quantization_label(config)
            )
    return sorted(entries.values(), key=lambda e: -e.size_bytes)
