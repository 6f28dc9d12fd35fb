"""Repack an MLX checkpoint (ours, mlx-lm's or mlx-vlm's) into resident shards + an expert store (docs/architecture.md §6.1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx

from ..config import load_config
from ..errors import Qwen35Error
from .expert_store import INDEX_FILE, STORE_DIR, has_expert_store, split_expert_tensors, write_store
from .layout import pack_shards, shard_filename, write_index
from .loading import read_weights
from .output_dir import OutputDir
from .peer_formats import detect_format, translate_peer_checkpoint


def repack(source: str | Path, target: str | Path, overwrite: bool = False, shard_size_gb: float = 5.0) -> Path:
    """Write ``target``: the MLX checkpoint ``source`` (ours, mlx-lm's or mlx-vlm's) with its routed experts in a store."""
    src = Path(source).expanduser()
    if not (src / "config.json").is_file():
        raise Qwen35Error(f"--model {src}: no config.json; give an MLX checkpoint directory")
    if has_expert_store(src):
        raise Qwen35Error(f"--model {src}: already holds an expert store ({STORE_DIR}/{INDEX_FILE}); nothing to do")
    output = OutputDir(target, overwrite=overwrite, sources=(src,), argument="--out", source_argument="--model")
    with output as staging:
        write_store_dir(src, staging, shard_size_gb)
    return Path(target).expanduser()


def write_store_dir(src: Path, staging: Path, shard_size_gb: float = 5.0, source: str | None = None) -> None:
    """Fill ``staging`` from the MLX dir ``src``: resident shards, ``experts/``, config (our names) and the other files."""
    config = load_config(src)
    if not config.is_moe:
        raise Qwen35Error(f"{src}: a dense model has no routed experts to store; give an MoE checkpoint")
    weights = read_weights(src)
    fmt = detect_format(weights)
    if fmt == "hf":
        raise Qwen35Error(f"{src}: a Hugging Face checkpoint; use: mlx-qwen35 convert --expert-store")
    if fmt != "ours":
        weights, config = translate_peer_checkpoint(weights, config, fmt)
    resident, layers = split_expert_tensors(weights)
    if not layers:
        raise Qwen35Error(f"{src}: no routed expert tensors (…mlp.experts.*_proj) found; is it a Qwen3.5 MoE?")
    write_store(staging, layers)
    names = sorted(resident)
    groups = pack_shards([(n, resident[n].nbytes) for n in names], int(shard_size_gb * 1e9))
    weight_map = {}
    for i, group in enumerate(groups):
        filename = shard_filename(i, len(groups))
        mx.save_safetensors(str(staging / filename), {n: resident[n] for n in group}, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(group, filename))
    write_index(staging, weight_map, sum(resident[n].nbytes for n in names))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, staging / f.name)
    raw = json.loads((src / "config.json").read_text())
    if config.quantization:
        raw["quantization"] = config.quantization  # in our module names, like the tensors
        raw.pop("quantization_config", None)
        raw.get("text_config", {}).pop("quantization", None)
    raw.setdefault("mlx_qwen35", {})["expert_store"] = {"source": source or str(src), "source_format": fmt}
    (staging / "config.json").write_text(json.dumps(raw, indent=2))  # last: marks the dir complete
