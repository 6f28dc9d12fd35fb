"""Which weights each rank of a multi-Mac run loads, and how the layers split (docs/architecture.md §21).

Pipeline: the layers split into contiguous runs in proportion to each host's free memory (rank 0's share
less what its embedding, LM head and vision tower take), or as ``--split`` says; each rank keeps only its
layers' tensors (renamed to its local layer numbers). Expert: every rank keeps every tensor but the experts',
of which it keeps 1/n of each expert's intermediate rows — gathered into a new array, so the whole tensor is not
kept. Tensor: as expert (a dense member's MLP likewise), and 1/n of each mixer's heads: the output rows of its
in-projections (each of DeltaNet's q | k | v segments apart), their conv channels and per-head gate parameters,
and o_proj / out_proj's input columns; and 1/n of the LM head's vocabulary rows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ..config import ModelConfig, TextConfig
from ..errors import Qwen35Error
from ..model.parallel import RankShare, kv_head_share
from .memory_plan import GIB, stored_tensors_on_disk

_LAYER = re.compile(r"^language_model\.layers\.(\d+)\.(.*)$")
# Expert and shared-expert projections: gate/up hold the intermediate rows on axis −2, down on axis −1.
_SLICED_ROWS = re.compile(r"\.mlp\.(experts|shared_expert)\.(gate_proj|up_proj)\.(weight|scales|biases)$")
_SLICED_COLUMNS = re.compile(r"\.mlp\.(experts|shared_expert)\.down_proj\.(weight|scales|biases)$")
# Tensor mode: the mixers' head-major tensors (the MTP head's attention is dropped, the vision tower's is named attn).
_MIXER = re.compile(
    r"^language_model\.layers\.\d+\.(?:self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(?:weight|scales|biases)"
    r"|linear_attn\.(in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj)\.(?:weight|scales|biases)"
    r"|linear_attn\.(conv1d)\.weight|linear_attn\.(A_log|dt_bias))$"
)
# Tensor mode on a dense member: its MLP's intermediate rows (gate/up on axis −2, down on axis −1).
_DENSE_ROWS = re.compile(r"^language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj)\.(weight|scales|biases)$")
_DENSE_COLUMNS = re.compile(r"^language_model\.layers\.\d+\.mlp\.down_proj\.(weight|scales|biases)$")
_LM_HEAD = re.compile(r"^language_model\.lm_head\.(weight|scales|biases)$")
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


class _Cut(NamedTuple):
    """How a rank slices one tensor: ``axis`` cut into ``parts`` equal parts, of which it keeps part ``index`` —
    of each of ``segments`` (widths along the axis that add up to it) apart when given."""

    axis: int
    parts: int
    index: int
    segments: tuple[int, ...] = ()


def _cut(name: str, share: RankShare, text: TextConfig | None) -> _Cut | None:
    """The slice of tensor ``name`` that ``share`` holds (None: the whole tensor, in expert and tensor mode).

    Contiguous slices are each rank's heads: attention's q_proj rows are per head [query | gate] and query head h
    reads K/V head h·kv/heads; DeltaNet's q, k, v, z, b, a and conv channels are head-major and value head h reads
    key head h·Hk/Hv (docs/architecture.md §4.1, §4.5, §5), so rank r's value heads read its own key heads.
    """
    n, r = share.size, share.rank
    if _SLICED_ROWS.search(name):
        return _Cut(-2, n, r)
    if _SLICED_COLUMNS.search(name):
        return _Cut(-1, n, r)
    if share.slices_mixers and (_LM_HEAD.match(name) or _DENSE_ROWS.match(name)):
        return _Cut(-2, n, r)  # vocabulary rows; a dense MLP's intermediate rows
    if share.slices_mixers and _DENSE_COLUMNS.match(name):
        return _Cut(-1, n, r)
    match = _MIXER.match(name) if share.slices_mixers else None
    if match is None:
        return None
    tensor = next(group for group in match.groups() if group)
    if tensor in ("k_proj", "v_proj"):
        return _Cut(-2, *kv_head_share(text.num_key_value_heads, n, r))
    if tensor in ("in_proj_qkv", "conv1d"):  # channels [q | k | v]; conv1d.weight is [C, K, 1]
        axis = -2 if tensor == "in_proj_qkv" else 0
        return _Cut(axis, n, r, (text.linear_key_dim, text.linear_key_dim, text.linear_value_dim))
    return _Cut(-1 if tensor in ("o_proj", "out_proj", "A_log", "dt_bias") else -2, n, r)


def held_bytes(stored: dict[str, int], share: RankShare, text: TextConfig | None = None) -> int:
    """Stored bytes of the tensors ``share`` holds (``stored``: every tensor's bytes, by checkpoint name).

    ``text`` (the whole model's text config) tells the tensor layout its head counts and DeltaNet's segments."""
    return sum(held_tensor_bytes(stored, share, text).values())


def held_tensor_bytes(stored: dict[str, int], share: RankShare, text: TextConfig | None = None) -> dict[str, int]:
    """Stored bytes of each tensor ``share`` holds (a slice: its share of the bytes), by checkpoint name."""
    held = {}
    for name, size in stored.items():
        if _DROPPED.search(name):
            continue
        if share.mode == "pipeline":
            if _pipeline_name(name, share) is not None:
                held[name] = size
        else:
            cut = _cut(name, share, text)
            held[name] = size if cut is None else size // cut.parts
    return held


def check_fits(
    shares: list[RankShare],
    stored: dict[str, int],
    free_bytes: list[int],
    hosts: list[str],
    text: TextConfig | None = None,
) -> None:
    """A rank whose share (plus ``HEADROOM_BYTES``) exceeds its free memory stops the run before anything loads."""
    for share, free in zip(shares, free_bytes):
        need = held_bytes(stored, share, text) + HEADROOM_BYTES
        if need > free:
            what = {
                "pipeline": f"layers {share.layers.start}-{share.layers.stop - 1}",
                "expert": f"its 1/{share.size} of the experts and all other weights",
                "tensor": f"its 1/{share.size} of the experts, mixer heads and LM head and the embedding and vision",
            }[share.mode]
            fix = "move layers to another rank with --split" if share.mode == "pipeline" else "add ranks"
            raise Qwen35Error(
                f"rank {share.rank} ({hosts[share.rank]}): {what} need {need / GIB:.2f} GiB with "
                f"{HEADROOM_BYTES / GIB:.0f} GiB headroom but it has {free / GIB:.2f} GiB free; {fix}, "
                "or use a smaller quantisation"
            )


def rank_weights(weights: dict[str, mx.array], share: RankShare, text: TextConfig | None = None) -> dict[str, mx.array]:
    """The tensors of ``weights`` (the whole checkpoint, lazy) that ``share`` holds, under its local names.

    ``text``: the whole model's text config (the tensor layout's head counts)."""
    held = {}
    for name, array in weights.items():
        if _DROPPED.search(name):
            continue
        if share.mode == "pipeline":
            if (local := _pipeline_name(name, share)) is not None:
                held[local] = array
        else:
            cut = _cut(name, share, text)
            held[name] = array if cut is None else _slice(array, cut)
    return held


def rank_quantization(quantization: dict | None, share: RankShare) -> dict | None:
    """The config's quantisation map under ``share``'s local layer names (pipeline renumbers the layers)."""
    if quantization is None or share.mode != "pipeline":
        return quantization
    local = {}
    for path, spec in quantization.items():
        if _LAYER.match(path) is None:
            local[path] = spec  # kept whether or not the rank holds the module: a map entry alone quantises nothing
        elif (name := _pipeline_name(path, share)) is not None:
            local[name] = spec
    return local


def _pipeline_name(name: str, share: RankShare) -> str | None:
    """A pipeline rank's local name for the checkpoint's ``name`` (its layers renumbered from 0), None if not held."""
    match = _LAYER.match(name)
    if match is None:
        return name if share.holds_ends else None
    index = int(match.group(1))
    return f"language_model.layers.{index - share.layers.start}.{match.group(2)}" if index in share.layers else None


def _slice(array: mx.array, cut: _Cut) -> mx.array:
    """This rank's part of ``array``: a gather into a new array, so that evaluating it keeps only the slice.

    (A basic slice is a view of the whole buffer; an elementwise copy of a contiguous one may take over that
    buffer, whole, by donation: measured on the DeltaNet's small in_proj_a/b, A_log and dt_bias.)
    """
    segments = cut.segments or (array.shape[cut.axis],)
    indices, start = [], 0
    for width in segments:
        part = width // cut.parts
        indices.append(np.arange(start + cut.index * part, start + (cut.index + 1) * part))
        start += width
    return mx.take(array, mx.array(np.concatenate(indices).astype(np.int32)), axis=cut.axis)
