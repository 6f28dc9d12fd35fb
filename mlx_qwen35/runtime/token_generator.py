"""The token level of generation: a prompt's ids in, ``(token, logprobs)`` out, one forward pass ahead.

Like mlx-lm's ``generate_step``; ``generation.stream_text`` puts the text on top, and speculative decoding
(``speculative.generate_tokens_speculative``) is a drop-in with the same contract.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Sequence

import mlx.core as mx

from ..model.cache import drop_last_token, recurrent_arrays
from ..model.inputs import ModelInputs
from .prefill import prefill_prompt
from .settings import PENALTY_CONTEXT, PREFILL_STEP_SIZE

Sampler = Callable[[mx.array], mx.array]  # log-probabilities [1, vocab] -> token [1]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (recent tokens, logits [1, vocab]) -> logits


def generate_tokens(
    model,
    prompt: ModelInputs,
    cache: list,
    sampler: Sampler,
    logits_processors: Sequence[LogitsProcessor] = (),
    *,
    max_tokens: int,
    stop_tokens: Container[int] = (),
    context_tokens: Sequence[int] = (),
    choose_token: Callable[[int], int] | None = None,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Prefill ``prompt`` into ``cache``, then yield each generated token and its log-probabilities [vocab].

    Each step is built on the previous token before that token is read back, so building the graph overlaps
    the compute (as mlx-lm's ``generate_step`` does); a step run ahead on a stop token, or on a token that
    ``choose_token`` replaces, is undone (``drop_last_token``), so the cache never holds the last token and
    the next token is computing while the caller handles this one. ``choose_token`` may replace a sampled token
    (the thinking budget forces its closing tag); ``context_tokens``: the ids ``cache`` already holds, for the
    penalties to look back over as a fresh run would; ``should_stop``: asked between prefill chunks (``prefill``).
    """
    ids = list(prompt.input_ids)
    # The penalties look back PENALTY_CONTEXT tokens (mlx-lm's default window); keep only those, not the
    # whole context, so each decode step does not copy a growing array.
    history = mx.array((list(context_tokens) + ids)[-PENALTY_CONTEXT:])

    def step(inputs: mx.array, history: mx.array) -> tuple[mx.array, mx.array]:
        logits = model(inputs[None], cache)[:, -1, :].astype(mx.float32)
        for process in logits_processors:
            logits = process(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    def step_after(token: mx.array, history: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Dispatch the step that reads ``token``: (its sampled token, its logprobs, the penalties' window)."""
        history = mx.concatenate([history, token])[-PENALTY_CONTEXT:]
        sampled, logprobs = step(token, history)
        mx.async_eval(sampled, logprobs)
        return sampled, logprobs, history

    # The last token is text (<|vision_end|> at the latest), so the first step embeds it itself.
    prefill_prompt(model, prompt.span(0, len(ids) - 1, model.config), cache, prefill_step_size, should_stop)
    token, logprobs = step(history[-1:], history)
    mx.async_eval(token, logprobs)
    for n in range(1, max_tokens + 1):
        ahead = n < max_tokens
        if ahead:  # build the next step on this token before reading it: reading waits for the compute
            before = recurrent_arrays(cache)
            following = step_after(token, history)
        sampled = token.item()
        token_id = choose_token(sampled) if choose_token is not None else sampled
        last = token_id in stop_tokens or n == max_tokens
        if ahead and (last or token_id != sampled):
            drop_last_token(cache, before)  # the step ahead read a token the reply does not have
            if not last:
                token = mx.array([token_id], dtype=token.dtype)
                following = step_after(token, history)
        yield token_id, logprobs
        if last:
            return
        token, logprobs, history = following
