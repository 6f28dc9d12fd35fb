"""Checkpoints on disk: our tensor names and shapes, and the conventions every checkpoint we read or write follows.

* ``expected_tensors``: every tensor of a converted checkpoint, read off the module tree itself
  (``Qwen35Model(config)`` builds lazy arrays: no memory, ~0.03 s for the 397B skeleton), so the
  converter checks a source against exactly what the loader will assign. The Hugging Face release
  layout is stated once, independently of our modules, by ``random_checkpoint.hf_tensor_shapes``.
* Names shared by the converter and the checkpoint writers (docs/architecture.md §2): the zero-centred
  norms, the per-expert and fused expert keys, the FP8 block, the vocabulary padding.
* Shard files: their names, how tensors are packed into them, the index, the safetensors header.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from mlx.utils import tree_flatten

from ..config import ModelConfig
from ..errors import Qwen35Error

# ---------------------------------------------------------------------------------------------- tensors


def expected_tensors(cfg: ModelConfig, include_vision: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of a converted checkpoint (our names, unquantised shapes): the parameters of the module tree."""
    # Imported here: the model imports mlx-lm and with it transformers (seconds), which a convert that
    # stops at a bad argument or a broken config.json, and every checkpoint writer, should not wait for.
    from ..model.qwen35 import Qwen35Model

    tree = tree_flatten(Qwen35Model(cfg).parameters())
    return {name: tuple(a.shape) for name, a in tree if include_vision or not name.startswith("visual.")}


# HF stores these RMSNorm weights as w and applies (1 + w) (RMSNorm1p); the DeltaNet gated norm and the
# ViT's LayerNorms use w as is. Matches HF names (``model.language_model.…``) and ours (``language_model.…``).
_ZERO_CENTRED_NORM = re.compile(
    r"(?:^|\.)(?:language_model\.norm|mtp\.norm|mtp\.pre_fc_norm_embedding|mtp\.pre_fc_norm_hidden"
    r"|input_layernorm|post_attention_layernorm|q_norm|k_norm)\.weight$"
)


def is_zero_centred_norm(name: str) -> bool:
    """True for the RMSNorm weights HF stores as w and applies as (1 + w) (not the DeltaNet gated norm)."""
    return bool(_ZERO_CENTRED_NORM.search(name))


# Routed experts as transformers' save_pretrained writes them (HF names or ours: the prefix is free) …
PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
# … and as the BF16 release stores them: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
FUSED_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<proj>gate_up|down)_proj(\.weight)?$")
# The FP8 release: float8_e4m3fn weights with one ``weight_scale_inv`` per 128 × 128 block.
FP8_BLOCK = 128
# A release's vocab_size is its tokenizer's size rounded up to this; the rows past the tokenizer are padding.
VOCAB_PAD_MULTIPLE = 64


def padded_vocab_size(tokenizer_size: int) -> int:
    """The embedding rows of a checkpoint whose tokenizer has ``tokenizer_size`` tokens."""
    return math.ceil(tokenizer_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


# ---------------------------------------------------------------------------------------------- shard files

INDEX_FILE = "model.safetensors.index.json"
T = TypeVar("T")


def shard_filename(index: int, count: int) -> str:
    """The name of shard ``index`` (from 0) of ``count``: ``model-00001-of-00003.safetensors``."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def pack_shards(items: Iterable[tuple[T, int]], max_shard_bytes: int) -> list[list[T]]:
    """Group ``(item, bytes)`` in order into shards: a shard closes before it would exceed ``max_shard_bytes``.

    A single item larger than the limit gets a shard of its own.
    """
    groups: list[list[T]] = [[]]
    size = 0
    for item, nbytes in items:
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    return groups


def write_index(directory: Path, weight_map: Mapping[str, str], total_size: int) -> None:
    """Write ``model.safetensors.index.json``: tensor name → shard file, and the bytes of tensor data."""
    index = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(directory) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def safetensors_header(tensors: Iterable[tuple[str, str, tuple[int, ...], int]], metadata: Mapping[str, str]) -> bytes:
    """The header of a safetensors file holding ``(name, dtype code, shape, bytes)`` back to back, in order.

    8-byte little-endian length, then the JSON padded with spaces to a multiple of 8 (the data stays aligned).
    """
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts; a truncated or corrupt file is one clear error."""
    size = path.stat().st_size
    fix = "re-download this shard"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise Qwen35Error(f"{path}: truncated ({size} bytes, no safetensors header); {fix}")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise Qwen35Error(
                f"{path}: truncated or corrupt (header of {header_len} bytes in a {size}-byte file); {fix}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Qwen35Error(f"{path}: corrupt safetensors header (not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise Qwen35Error(
            f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object of tensors); {fix}"
        )
    return header, 8 + header_len
