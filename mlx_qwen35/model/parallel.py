"""The part of the network one rank of a multi-Mac run holds, and the communication in its forward (docs/architecture.md §21).

Three layouts, all on ``mx.distributed`` (ring over TCP, JACCL over Thunderbolt RDMA, MPI), no transport of ours:

- **pipeline**: rank r holds a contiguous run of decoder layers; rank 0 also holds the embedding, the vision
  tower, the final norm and the LM head. Hidden states go round the ring 0 → 1 → … → n−1 → 0: two
  point-to-point messages per rank per forward. It makes the model fit; the stages run one after another.
- **expert**: every rank holds everything but the experts, and 1/n of every expert's (and the shared
  expert's) intermediate rows; each MoE layer sums its ranks' partial outputs with one ``all_sum``.
- **tensor**: as expert (a dense member: 1/n of its MLP's rows), and every rank also holds 1/n of each attention
  and DeltaNet layer's heads; each mixer sums its ranks' partial outputs with one more ``all_sum`` (two per
  layer). The LM head's vocabulary rows are sliced too, its logits ``all_gather``ed; the embedding (one row read
  per token) and the vision tower stay whole.

Every send and receive is tied (``mx.depends``) into the rank's cache and its logits, so evaluating either
one (the prefill evaluates the cache, a decode step the logits) performs all of the rank's messages in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

from ..config import TextConfig
from ..errors import Qwen35Error

MODES = ("pipeline", "expert", "tensor")


@dataclass(frozen=True)
class RankShare:
    """What rank ``rank`` of ``size`` holds: in pipeline mode the decoder layers ``layers`` (global indices)."""

    mode: str
    rank: int
    size: int
    layers: range
    group: object = dataclasses.field(default=None, compare=False, repr=False)  # mx.distributed.Group
    # Called as each forward pass is built: the runtime's watchdog counts it as progress.
    on_forward: Callable[[], None] | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def leads(self) -> bool:
        """Rank 0 embeds, samples and does all input and output."""
        return self.rank == 0

    @property
    def holds_ends(self) -> bool:
        """Whether this rank holds the embedding, vision tower, final norm and LM head."""
        return self.mode != "pipeline" or self.leads

    @property
    def slices_mixers(self) -> bool:
        """Whether this rank holds 1/n of each attention and DeltaNet layer's heads (tensor mode)."""
        return self.mode == "tensor"


def kv_head_share(kv_heads: int, size: int, rank: int) -> tuple[int, int]:
    """(parts, part kept) of the K/V heads in tensor mode: 1/n of them, or, with fewer heads than ranks, the one
    head this rank's query heads use (ranks r·h/n of h heads: contiguous query heads map to contiguous K/V heads)."""
    parts = min(size, kv_heads)
    return parts, rank * parts // size


def stage_text_config(text: TextConfig, share: RankShare) -> TextConfig:
    """The text config of the layers ``share`` builds: its run of layers, or its slice of each expert (and head)."""
    if share.mode == "pipeline":
        layer_types = text.layer_types[share.layers.start : share.layers.stop]
        return dataclasses.replace(text, layer_types=layer_types, num_hidden_layers=len(layer_types))
    n = share.size
    experts = dataclasses.replace(
        text,
        moe_intermediate_size=text.moe_intermediate_size // n,
        shared_expert_intermediate_size=text.shared_expert_intermediate_size // n,
    )
    if not share.slices_mixers:
        return experts
    return dataclasses.replace(
        experts,
        intermediate_size=text.intermediate_size // n,  # a dense member's MLP
        num_attention_heads=text.num_attention_heads // n,
        num_key_value_heads=text.num_key_value_heads // kv_head_share(text.num_key_value_heads, n, share.rank)[0],
        linear_num_key_heads=text.linear_num_key_heads // n,
        linear_num_value_heads=text.linear_num_value_heads // n,
    )


def check_expert_split(text: TextConfig, size: int, group_size: int | None, mode: str = "expert") -> None:
    """Expert mode slices each expert's intermediate rows in ``size`` equal parts, whole quantisation groups each."""
    if not text.is_moe:
        raise Qwen35Error(f"--parallel {mode} needs an MoE model (this one is dense); use --parallel pipeline")
    unit = size * (group_size or 1)
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        width = getattr(text, name)
        if width % unit:
            raise Qwen35Error(
                f"--parallel {mode}: {name} {width} does not split into {size} ranks of whole "
                f"{group_size or 1}-wide groups; use --parallel pipeline or fewer ranks"
            )


def check_tensor_split(text: TextConfig, size: int, group_size: int | None) -> None:
    """Tensor mode slices the experts as expert mode does (a dense member's MLP rows likewise), every mixer's heads
    in ``size`` equal parts (K/V heads: or ``size`` a multiple of them), o_proj / out_proj's input columns in whole
    quantisation groups, and the LM head's vocabulary rows."""
    if text.is_moe:
        check_expert_split(text, size, group_size, "tensor")
    kv = text.num_key_value_heads
    counts = {
        "num_attention_heads": text.num_attention_heads,
        "linear_num_key_heads": text.linear_num_key_heads,
        "linear_num_value_heads": text.linear_num_value_heads,
    }
    uneven = [f"{name} {count}" for name, count in counts.items() if count % size]
    if kv % size and size % kv:
        uneven.append(f"num_key_value_heads {kv}")
    if text.vocab_size % size:
        uneven.append(f"vocab_size {text.vocab_size}")
    unit = size * (group_size or 1)
    for name, width in (
        ("o_proj input", text.num_attention_heads * text.head_dim),
        ("out_proj input", text.linear_value_dim),
        *([] if text.is_moe else [("intermediate_size", text.intermediate_size)]),
    ):
        if width % unit:
            uneven.append(f"{name} {width} (in whole {group_size or 1}-wide groups)")
    if uneven:
        verb = "does" if len(uneven) == 1 else "do"
        raise Qwen35Error(
            f"--parallel tensor: {', '.join(uneven)} {verb} not split into {size} ranks; "
            "use --parallel expert or --parallel pipeline, or a number of ranks that divides them"
        )


def receive_hidden(share: RankShare, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    """A follower's input: the previous stage's hidden states [B, T, H]."""
    return mx.distributed.recv(shape, dtype, share.rank - 1, group=share.group)


def pass_hidden(share: RankShare, x: mx.array, cache: list | None) -> mx.array:
    """Send this stage's output on round the ring; rank 0 gets the last stage's back (its logits' input).

    A follower returns what it sent, for its logits to depend on.
    """
    sent = mx.distributed.send(x, (share.rank + 1) % share.size, group=share.group)
    out = mx.depends(mx.distributed.recv_like(x, share.size - 1, group=share.group), sent) if share.leads else sent
    if cache:
        _tie(cache[-1], out)
    return out


def _tie(layer_cache, out: mx.array) -> None:
    """Make the layer cache's state depend on ``out``: evaluating the cache then performs the messages."""
    if isinstance(layer_cache, ArraysCache):
        layer_cache.cache[1] = mx.depends(layer_cache.cache[1], out)
    elif isinstance(layer_cache.keys, tuple):  # a quantised K/V cache: (packed, scales, biases)
        layer_cache.keys = tuple(mx.depends(list(layer_cache.keys), out))
    else:
        layer_cache.keys = mx.depends(layer_cache.keys, out)


def sum_partials(share: RankShare | None, partial: mx.array) -> mx.array:
    """A sliced block's output is the sum of every rank's partial output: the MoE's in expert and tensor mode, each
    mixer's in tensor mode (one all_sum each). ``share`` is set only on the blocks a rank holds a slice of."""
    if share is None or share.mode == "pipeline":
        return partial
    return mx.distributed.all_sum(partial, group=share.group)


def gather_vocabulary(share: RankShare, part: mx.array) -> mx.array:
    """Tensor mode: every rank's logits [B, T, V/n] for its rows of the vocabulary → the whole [B, T, V] on each."""
    B, T, rows = part.shape
    gathered = mx.distributed.all_gather(part, group=share.group)  # [n·B, T, V/n], rank-major
    return gathered.reshape(share.size, B, T, rows).transpose(1, 2, 0, 3).reshape(B, T, share.size * rows)
