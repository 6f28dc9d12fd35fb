"""Which weights each rank of a multi-Mac run loads, and how the layers split (docs/architecture.md §21).

Pipeline: the layers split into contiguous runs in proportion to each host's free memory (rank 0's share
less what its embedding, LM head and vision tower take), or as ``--split`` says; each rank keeps only its
layers' tensors (renamed to its local layer numbers). Expert: every rank keeps every tensor but the experts',
of which it keeps 1/n of each expert's intermediate rows — a contiguous copy, so the whole tensor is not kept.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from ..config import ModelConfig
from ..errors import Qwen35Error
from ..model.parallel import RankShare
from .memory_plan import GIB, stored_tensors_on_disk

_LAYER = re.compile(r"^language_model\.layers\.(\d+)\.(.*)$")
# Expert and shared-expert projections: gate/up hold the intermediate rows on axis −2, down on axis −1.
_SLICED_ROWS = re.compile(r"\.mlp\.(experts|shared_expert)\.(gate_proj|up_proj)\.(weight|scales|biases)$")
_SLICED_COLUMNS = re.compile(r"\.mlp\.(experts|shared_expert)\.down_proj\.(weight|scales|biases)$")
_DROPPED = re.compile(r"^mtp\.")  # the MTP head runs only in one-process runs
# What a rank's process needs beside its weights: activations, its caches at a long context, the OS's share.
HEADROOM_BYTES = 2 * GIB


def stored_bytes(model_dir: Path) -> dict[str, int]:
    """Every tensor's stored bytes, by checkpoint name (from the shard headers; no data read)."""
    return {name: tensor.nbytes for name, tensor in stored_tensors_on_disk(model_dir).items()}


def layer_and_end_bytes(stored: dict[str, int], num_layers: int) -> tuple[list[int], int]:
    """Stored bytes of each decoder layer, and of the rest rank 0 holds (embedding, norm, LM head, vision tower)."""
    layers, ends = [0] * num_layers, 0
    for name, size in stored.items():
        if _DROPPED.search(name):
            continue
        match = _LAYER.match(name)
        if match:
            layers[int(match.group(1))] += size
        else:
            ends += size
    return layers, ends


def parse_split(text: str, num_layers: int, size: int) -> list[int]:
    """``--split 40,20`` → layers per rank; they must be ``size`` positive counts adding up to the model's layers."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise Qwen35Error(f"--split {text}: give layers per rank as integers, e.g. --split 40,20") from None
    if len(counts) != size or min(counts) < 1 or sum(counts) != num_layers:
        raise Qwen35Error(
            f"--split {text}: needs {size} positive layer counts (one per rank) adding up to the model's "
            f"{num_layers} layers; got {len(counts)} adding up to {sum(counts)}"
        )
    return counts


def proportional_split(layer_bytes: list[int], end_bytes: int, free_bytes: list[int]) -> list[int]:
    """Layers per rank so each rank's bytes (rank 0's including ``end_bytes``) follow its share of the free memory."""
    total = sum(layer_bytes) + end_bytes
    targets = [total * f / sum(free_bytes) for f in free_bytes]
    targets[0] -= end_bytes
    counts, start = [], 0
    for rank in range(len(free_bytes)):
        left = len(free_bytes) - rank - 1  # every later rank needs at least one layer
        taken, held = 0, 0
        while start + taken < len(layer_bytes) - left and (
            taken == 0 or rank == len(free_bytes) - 1 or held + layer_bytes[start + taken] / 2 <= targets[rank]
        ):
            held += layer_bytes[start + taken]
            taken += 1
        counts.append(taken)
        start += taken
    return counts


def stages(counts: list[int]) -> list[range]:
    """Layer counts per rank → each rank's run of global layer indices."""
    starts = [sum(counts[:r]) for r in range(len(counts))]
    return [range(s, s + c) for s, c in zip(starts, counts)]


def check_stages(config: ModelConfig, runs: list[range], hosts: list[str]) -> None:
    """Each stage must hold an attention layer: its K/V cache is where the stage reads the token positions."""
    for rank, run in enumerate(runs):
        if "full_attention" not in config.text.layer_types[run.start : run.stop]:
            raise Qwen35Error(
                f"--split: rank {rank} ({hosts[rank]}) would hold layers {run.start}-{run.stop - 1}, none of them "
                f"an attention layer (every {config.text.layer_types.index('full_attention') + 1}th is); give each "
                "rank a run that contains one"
            )


def held_bytes(stored: dict[str, int], share: RankShare) -> int:
    """Stored bytes of the tensors ``share`` holds (``stored``: every tensor's bytes, by checkpoint name)."""
    total = 0
    for name, size in stored.items():
        if _DROPPED.search(name):
            continue
        if share.mode == "pipeline":
            match = _LAYER.match(name)
            total += size if (share.holds_ends if match is None else int(match.group(1)) in share.layers) else 0
        else:
            total += size // share.size if _SLICED_ROWS.search(name) or _SLICED_COLUMNS.search(name) else size
    return total


def check_fits(shares: list[RankShare], stored: dict[str, int], free_bytes: list[int], hosts: list[str]) -> None:
    """A rank whose share (plus ``HEADROOM_BYTES``) exceeds its free memory stops the run before anything loads."""
    for share, free in zip(shares, free_bytes):
        need = held_bytes(stored, share) + HEADROOM_BYTES
        if need > free:
            what = (
                f"layers {share.layers.start}-{share.layers.stop - 1}"
                if share.mode == "pipeline"
                else f"its 1/{share.size} of the experts and all other weights"
            )
            fix = "move layers to another rank with --split" if share.mode == "pipeline" else "add ranks"
            raise Qwen35Error(
                f"rank {share.rank} ({hosts[share.rank]}): {what} need {need / GIB:.2f} GiB with "
                f"{HEADROOM_BYTES / GIB:.0f} GiB headroom but it has {free / GIB:.2f} GiB free; {fix}, "
                "or use a smaller quantisation"
            )


def rank_weights(weights: dict[str, mx.array], share: RankShare) -> dict[str, mx.array]:
    """The tensors of ``weights`` (the whole checkpoint, lazy) that ``share`` holds, under its local names."""
    held = {}
    for name, array in weights.items():
        if _DROPPED.search(name):
            continue
        if share.mode == "pipeline":
            match = _LAYER.match(name)
            if match is None:
                if share.holds_ends:
                    held[name] = array
                continue
            index = int(match.group(1))
            if index in share.layers:
                held[f"language_model.layers.{index - share.layers.start}.{match.group(2)}"] = array
        elif _SLICED_ROWS.search(name):
            held[name] = _slice(array, -2, share)
        elif _SLICED_COLUMNS.search(name):
            held[name] = _slice(array, -1, share)
        else:
            held[name] = array
    return held


def rank_quantization(quantization: dict | None, share: RankShare) -> dict | None:
    """The config's quantisation map under ``share``'s local layer names (pipeline renumbers the layers)."""
    if quantization is None or share.mode != "pipeline":
        return quantization
    local = {}
    for path, spec in quantization.items():
        match = _LAYER.match(path)
        if match is None:
            local[path] = spec
        elif int(match.group(1)) in share.layers:
            local[f"language_model.layers.{int(match.group(1)) - share.layers.start}.{match.group(2)}"] = spec
    return local


def _slice(array: mx.array, axis: int, share: RankShare) -> mx.array:
    """This rank's 1/n of ``axis``, copied so that evaluating it keeps only the slice, not the whole tensor."""
    part = mx.split(array, share.size, axis=axis)[share.rank]
    # A slice is a view of the whole buffer (kept alive with it); the product is a new array of the slice only.
    return part * mx.array(1, dtype=part.dtype)
