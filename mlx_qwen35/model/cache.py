"""Per-layer caches, their length, and snapshots.

Attention layers keep K/V in mlx-lm's ``KVCache`` (post-norm, post-RoPE keys); Gated DeltaNet layers
keep an mlx-lm ``ArraysCache`` of two slots: [0] the conv window [B, K−1, C], [1] the recurrent
state [B, Hv, Dv, Dk] (float32). A recurrent state cannot be trimmed back to an earlier token, so
going back (regenerate, edit, speculative rejection) means restoring a snapshot.

A snapshot is cheap: the K/V part is only the length (positions before it are never rewritten
while the cache grows), the recurrent part references the state arrays (each step makes new ones).
Restoring to a shorter length lets later writes overwrite K/V past it, so snapshots taken at a
greater length become stale; ``restore`` refuses a stale snapshot instead of returning wrong numbers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache

from ..errors import Qwen35Error


class ModelCache(list):
    """The per-layer cache objects of one model (a list, as mlx-lm expects), plus its snapshots.

    ``rope_delta``: after a multimodal prompt, positions run ahead of the token count (an image of
    gh×gw merged tokens advances the M-RoPE counter by max(gh, gw) only); text continuing after the
    cache's tokens is at position cache_length + rope_delta on all three components.
    """

    def __init__(self, layers: list):
        super().__init__(layers)
        self.rope_delta = 0
        self._snapshots: list[weakref.ref] = []


def make_cache(model, kv_bits: int | None = None, kv_group_size: int = 64) -> ModelCache:
    """A fresh cache for ``model``: K/V per attention layer (quantised to ``kv_bits`` if given), ArraysCache(2) per DeltaNet layer."""

    head_dim = model.config.text.head_dim
    if kv_bits and head_dim % kv_group_size:  # mx.quantize groups each key row; it would fail at the first token
        raise Qwen35Error(
            f"--kv-bits {kv_bits}: this model's attention heads ({head_dim} wide) are not a multiple of the "
            f"quantisation group ({kv_group_size}); drop --kv-bits for it"
        )

    def attention_cache():
        return QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) if kv_bits else KVCache()

    return ModelCache([ArraysCache(size=2) if layer.is_linear else attention_cache() for layer in model.layers])


def cache_length(cache: list) -> int:
    """How many tokens the cache holds (read from its first attention layer)."""
    for layer_cache in cache:
        if hasattr(layer_cache, "offset"):
            return layer_cache.offset
    raise ValueError("cache has no attention layer")


@dataclass(eq=False)
class Snapshot:
    """The state of a cache after ``length`` tokens; put it back with ``restore``."""

    length: int
    recurrent: list  # per layer: [conv window, state] for DeltaNet layers, None for attention layers
    rope_delta: int
    owner: weakref.ref
    stale: bool = False


def recurrent_arrays(cache: list) -> list:
    """Per layer, the DeltaNet layer's [conv window, state] arrays (references, not copies); None for attention."""
    return [list(c.cache) if isinstance(c, ArraysCache) else None for c in cache]


def _rewind(cache: list, recurrent: list, tokens: int) -> None:
    """K/V trimmed by ``tokens``, the DeltaNet arrays put back to ``recurrent`` (taken that many tokens ago)."""
    for layer_cache, saved in zip(cache, recurrent):
        if isinstance(layer_cache, ArraysCache):
            layer_cache.cache = list(saved)
        else:
            layer_cache.trim(tokens)


def drop_last_token(cache: list, recurrent: list) -> None:
    """Undo the latest one-token step; ``recurrent``: ``recurrent_arrays`` taken just before it."""
    _rewind(cache, recurrent, 1)


def snapshot(cache: ModelCache) -> Snapshot:
    """Capture the cache's current state (no copy of K/V)."""
    snap = Snapshot(cache_length(cache), recurrent_arrays(cache), cache.rope_delta, weakref.ref(cache))
    cache._snapshots.append(weakref.ref(snap))
    return snap


def restore(cache: ModelCache, snap: Snapshot) -> None:
    """Put ``cache`` back to the state of ``snap`` (taken from this same cache)."""
    if snap.owner() is not cache:
        raise Qwen35Error("cache snapshot belongs to another cache; restore it into the cache it was taken from")
    if snap.stale:
        raise Qwen35Error("cache snapshot is stale: the cache was rolled back before it and overwritten since")
    current = cache_length(cache)
    if snap.length > current:
        raise Qwen35Error(f"cache snapshot at {snap.length} tokens is ahead of the cache ({current} tokens)")
    _rewind(cache, snap.recurrent, current - snap.length)
    cache.rope_delta = snap.rope_delta
    # Later K/V writes land past snap.length, over what longer snapshots relied on.
    alive = [ref for ref in cache._snapshots if ref() is not None]
    for ref in alive:
        if ref().length > snap.length:
            ref().stale = True
    cache._snapshots = [ref for ref in alive if not ref().stale]


def rebuilt_snapshot(cache: ModelCache, length: int, recurrent: list, rope_delta: int) -> Snapshot:
    """A snapshot of an earlier state of ``cache`` from saved recurrent arrays (a loaded prompt cache); K/V before ``length`` must be that state's."""
    if length > cache_length(cache):
        raise Qwen35Error(f"cache snapshot at {length} tokens is ahead of the cache ({cache_length(cache)} tokens)")
    snap = Snapshot(length, recurrent, rope_delta, weakref.ref(cache))
    cache._snapshots.append(weakref.ref(snap))
    return snap


def keep_verified(cache: list, start: int, states: list, positions: int) -> None:
    """After a verify forward from length ``start`` (``LanguageModel.verify``): the cache as if only its first
    ``positions`` tokens had been decoded (docs/architecture.md §20.2). ``states``: the verify's per-layer
    DeltaNet states after each position (None for attention layers).

    K/V: the length is set, up or down within what the verify wrote (entries past it stay in the buffer and the
    next write overwrites them, as ``trim`` leaves them); DeltaNet: the arrays after the last kept position.
    """
    for layer_cache, layer_states in zip(cache, states):
        if layer_states is None:
            layer_cache.offset = start + positions
        else:
            layer_cache.cache = list(layer_states[positions - 1])
