"""Prefill: a prompt (its images and videos too) into a cache, in chunks so memory stays bounded with length."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from ..model.inputs import ModelInputs
from .settings import PREFILL_STEP_SIZE


class PrefillCancelled(Exception):
    """``should_stop`` said stop between two prefill chunks; the cache holds part of the prompt."""


def prefill(
    model,
    tokens: mx.array,
    cache: list,
    step_size: int = PREFILL_STEP_SIZE,
    embeds: mx.array | None = None,
    positions: mx.array | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_hidden: Callable[[mx.array, slice], None] | None = None,
) -> None:
    """Run ``tokens`` [T] through the model into ``cache`` in chunks, so memory stays bounded with length.

    A multimodal prompt comes as ``embeds`` [1, T, H] and ``positions`` [3, 1, T] (``model.prompt_embeddings``).
    ``should_stop`` is asked before each chunk (a server's client may have gone); True raises ``PrefillCancelled``.
    ``on_hidden(hidden, chunk)`` sees each chunk's final-norm hidden states [1, T', H] (the MTP head reads them).
    """
    forward = model if on_hidden is None else model.language_model  # the MTP head reads hidden states, not logits
    for start in range(0, tokens.shape[0], step_size):
        if should_stop is not None and should_stop():
            raise PrefillCancelled(f"prefill stopped after {start} of {tokens.shape[0]} tokens")
        chunk = slice(start, start + step_size)
        if embeds is None:
            out = forward(tokens[None, chunk], cache)
        else:
            out = forward(None, cache, inputs_embeds=embeds[:, chunk], position_ids=positions[..., chunk])
        if on_hidden is not None:
            on_hidden(out, chunk)
        mx.eval([c.state for c in cache])
        mx.clear_cache()


def prefill_prompt(
    model,
    inputs: ModelInputs,
    cache: list,
    step_size: int = PREFILL_STEP_SIZE,
    should_stop: Callable[[], bool] | None = None,
    on_hidden: Callable[[mx.array, slice], None] | None = None,
) -> None:
    """Run a prompt, its images and videos too, into ``cache``; positions continue after what the cache holds."""
    tokens = mx.array(inputs.input_ids)
    if not inputs.has_vision:
        prefill(model, tokens, cache, step_size, should_stop=should_stop, on_hidden=on_hidden)
        return
    embeds, positions, rope_delta = model.prompt_embeddings(inputs, cache)
    mx.eval(embeds)  # the vision tower, once, before the chunks slice it
    prefill(model, tokens, cache, step_size, embeds, positions, should_stop, on_hidden)
    cache.rope_delta = rope_delta
