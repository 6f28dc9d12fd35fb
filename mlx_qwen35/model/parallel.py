"""The part of the network one rank of a multi-Mac run holds, and the communication in its forward (docs/architecture.md §21).

Two layouts, both on ``mx.distributed`` (ring over TCP, JACCL over Thunderbolt RDMA, MPI), no transport of ours:

- **pipeline**: rank r holds a contiguous run of decoder layers; rank 0 also holds the embedding, the vision
  tower, the final norm and the LM head. Hidden states go round the ring 0 → 1 → … → n−1 → 0: two
  point-to-point messages per rank per forward. It makes the model fit; the stages run one after another.
- **expert**: every rank holds everything but the experts, and 1/n of every expert's (and the shared
  expert's) intermediate rows; each MoE layer sums its ranks' partial outputs with one ``all_sum``.

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

MODES = ("pipeline", "expert")


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
        return self.mode == "expert" or self.leads


def stage_text_config(text: TextConfig, share: RankShare) -> TextConfig:
    """The text config of the layers ``share`` builds: its run of layers, or its slice of each expert."""
    if share.mode == "pipeline":
        layer_types = text.layer_types[share.layers.start : share.layers.stop]
        return dataclasses.replace(text, layer_types=layer_types, num_hidden_layers=len(layer_types))
    return dataclasses.replace(
        text,
        moe_intermediate_size=text.moe_intermediate_size // share.size,
        shared_expert_intermediate_size=text.shared_expert_intermediate_size // share.size,
    )


def check_expert_split(text: TextConfig, size: int, group_size: int | None) -> None:
    """Expert mode slices each expert's intermediate rows in ``size`` equal parts, whole quantisation groups each."""
    if not text.is_moe:
        raise Qwen35Error("--parallel expert needs an MoE model (this one is dense); use --parallel pipeline")
    unit = size * (group_size or 1)
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        width = getattr(text, name)
        if width % unit:
            raise Qwen35Error(
                f"--parallel expert: {name} {width} does not split into {size} ranks of whole "
                f"{group_size or 1}-wide groups; use --parallel pipeline or fewer ranks"
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
    """Expert mode: the MoE output is the sum of every rank's partial output (one all_sum per layer)."""
    if share is None or share.mode != "expert":
        return partial
    return mx.distributed.all_sum(partial, group=share.group)
