"""Prefill / decode loop: chunked prefill, mlx-lm sampling, streaming detokenisation, stop conditions.

``stream_generate`` yields one mlx-lm ``GenerationResponse`` per token (text segment, token id,
logprobs, running statistics, finish reason); ``generate`` collects the text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import GenerationResponse
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from ..errors import Qwen35Error
from ..model.cache import make_cache
from ..model.inputs import ModelInputs
from .text_stream import TextStream

Prompt = str | list[dict] | list[int] | mx.array | ModelInputs
PENALTY_CONTEXT = 20  # tokens the repetition and presence penalties look back over


@dataclass(frozen=True)
class SamplingPreset:
    """Sampling settings recommended by the Qwen3.5 model card (docs/architecture.md §14)."""

    temp: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float


THINKING_PRESET = SamplingPreset(temp=1.0, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=1.5)
NON_THINKING_PRESET = SamplingPreset(temp=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5)


def recommended_sampling(enable_thinking: bool) -> dict:
    """The model card's general-purpose sampling for thinking or non-thinking mode, as keyword arguments."""
    return dict(vars(THINKING_PRESET if enable_thinking else NON_THINKING_PRESET))


def prompt_token_ids(processor, prompt: Prompt, enable_thinking: bool = True, tools: list | None = None) -> list[int]:
    """Token ids for a raw string, a list of chat messages (rendered with the template), ids or ModelInputs."""
    if isinstance(prompt, ModelInputs):
        return list(prompt.input_ids)
    if isinstance(prompt, mx.array):
        return prompt.reshape(-1).tolist()
    if isinstance(prompt, str):
        return processor.encode(prompt)
    if prompt and isinstance(prompt[0], dict):
        return processor.encode(processor.apply_chat_template(prompt, enable_thinking=enable_thinking, tools=tools))
    return list(prompt)


def _vocab_mask(model, processor) -> mx.array | None:
    """-inf on the padding rows of the LM head (ids past the tokenizer's last token); None if there are none."""
    vocab = model.config.text.vocab_size
    real = len(processor.tokenizer._tokenizer)
    if real >= vocab:
        return None
    return mx.where(mx.arange(vocab) < real, 0.0, -mx.inf)


class ThinkingBudget:
    """Closes an open ``<think>`` block after ``budget`` generated tokens by forcing ``\n</think>\n\n``."""

    def __init__(self, processor, prompt_tokens: list[int], budget: int | None):
        convert = processor.tokenizer.convert_tokens_to_ids
        self.close_id = convert("</think>")
        open_id = convert("<think>")
        last_open = max((i for i, t in enumerate(prompt_tokens) if t == open_id), default=-1)
        last_close = max((i for i, t in enumerate(prompt_tokens) if t == self.close_id), default=-1)
        self.thinking = budget is not None and last_open > last_close  # the prompt left a block open
        self.budget = budget or 0
        self.spent = 0
        self.closing = processor.encode("\n</think>\n\n")
        self.forced: list[int] = list(self.closing) if self.thinking and self.budget <= 0 else []

    def choose(self, sampled: int) -> int:
        """The token to emit: the sampled one, or the next of the forced closing sequence."""
        token = self.forced.pop(0) if self.forced else sampled
        if self.thinking:
            if token == self.close_id:
                self.thinking = False
            elif not self.forced:
                self.spent += 1
                if self.spent >= self.budget:
                    self.forced = list(self.closing)
        return token


class PrefillCancelled(Exception):
    """``should_stop`` said stop between two prefill chunks; the cache holds part of the prompt."""


def prefill(
    model,
    tokens: mx.array,
    cache: list,
    step_size: int = 2048,
    embeds: mx.array | None = None,
    positions: mx.array | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Run ``tokens`` [T] through the model into ``cache`` in chunks, so memory stays bounded with length.

    A multimodal prompt comes as ``embeds`` [1, T, H] and ``positions`` [3, 1, T] (``model.prompt_embeddings``).
    ``should_stop`` is asked before each chunk (a server's client may have gone); True raises ``PrefillCancelled``.
    """
    for start in range(0, tokens.shape[0], step_size):
        if should_stop is not None and should_stop():
            raise PrefillCancelled(f"prefill stopped after {start} of {tokens.shape[0]} tokens")
        chunk = slice(start, start + step_size)
        if embeds is None:
            model(tokens[None, chunk], cache)
        else:
            model(None, cache, inputs_embeds=embeds[:, chunk], position_ids=positions[..., chunk])
        mx.eval([c.state for c in cache])
        mx.clear_cache()


def prefill_prompt(
    model, inputs: ModelInputs, cache: list, step_size: int = 2048, should_stop: Callable[[], bool] | None = None
) -> None:
    """Run a prompt, its images and videos too, into ``cache``; positions continue after what the cache holds."""
    tokens = mx.array(inputs.input_ids)
    if not inputs.has_vision:
        prefill(model, tokens, cache, step_size, should_stop=should_stop)
        return
    embeds, positions, rope_delta = model.prompt_embeddings(inputs, cache)
    mx.eval(embeds)  # the vision tower, once, before the chunks slice it
    prefill(model, tokens, cache, step_size, embeds, positions, should_stop)
    cache.rope_delta = rope_delta


def stream_generate(
    model,
    processor,
    prompt: Prompt,
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    cache: list | None = None,
    prefill_step_size: int = 2048,
    enable_thinking: bool = True,
    tools: list[dict] | None = None,
    thinking_budget: int | None = None,
    kv_bits: int | None = None,
    cached_tokens: list[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[GenerationResponse]:
    """Generate from ``prompt``, yielding a response per token. A caller-owned ``cache`` continues from its contents.

    ``cached_tokens``: the ids that ``cache`` already holds, for the penalties to look back over as a fresh run would.
    ``should_stop``: asked between prefill chunks; True raises ``PrefillCancelled`` (decoding stops when the caller
    stops iterating).
    """
    tokens = prompt_token_ids(processor, prompt, enable_thinking, tools)
    if not tokens:
        raise Qwen35Error("the prompt is empty; give some text")
    if seed is not None:
        mx.random.seed(seed)
    cache = cache if cache is not None else make_cache(model, kv_bits=kv_bits)
    budget = ThinkingBudget(processor, tokens, thinking_budget)
    # top_k beyond the vocabulary keeps every token; mlx-lm's compiled top-k raises instead, mid-trace,
    # which leaves mx.random.state holding a tracer that breaks every later sampled generation.
    top_k = top_k if top_k < model.config.text.vocab_size else 0
    sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(
        repetition_penalty=repetition_penalty,
        repetition_context_size=PENALTY_CONTEXT,
        presence_penalty=presence_penalty,
        presence_context_size=PENALTY_CONTEXT,
    )
    vocab_mask = _vocab_mask(model, processor)
    eos = processor.eos_token_ids
    detokenizer = TextStream(processor.tokenizer)
    # The penalties look back PENALTY_CONTEXT tokens (mlx-lm's default window); keep only those, not the
    # whole context, so each decode step does not copy a growing array.
    history = mx.array(((cached_tokens or []) + tokens)[-PENALTY_CONTEXT:])

    def step(inputs: mx.array) -> tuple[mx.array, mx.array]:
        logits = model(inputs[None], cache)[:, -1, :].astype(mx.float32)
        if vocab_mask is not None:
            logits = logits + vocab_mask
        for process in processors:
            logits = process(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        return token, logprobs.squeeze(0)

    start = time.perf_counter()
    # The last token is text (<|vision_end|> at the latest), so the step below embeds it itself.
    head = (
        prompt.span(0, len(tokens) - 1, model.config) if isinstance(prompt, ModelInputs) else ModelInputs(tokens[:-1])
    )
    prefill_prompt(model, head, cache, prefill_step_size, should_stop)
    token, logprobs = step(history[-1:])
    mx.eval(token, logprobs)
    prompt_tps = len(tokens) / (time.perf_counter() - start)

    start = time.perf_counter()
    text, emitted = "", 0  # with stop strings: all text so far, and how much of it was yielded
    hold = max((len(s) for s in stop or []), default=1) - 1
    for n in range(1, max_tokens + 1):
        token_id = budget.choose(token.item())
        if token_id != token.item():
            token = mx.array([token_id], dtype=token.dtype)
        history = mx.concatenate([history, token])[-PENALTY_CONTEXT:]
        finish = None
        if token_id in eos:
            finish = "stop"
        else:
            detokenizer.add_token(token_id)
            if n == max_tokens:
                finish = "length"
        if finish is None:  # start the next step while this token is being printed
            next_token, next_logprobs = step(token)
            mx.async_eval(next_token, next_logprobs)
        else:
            detokenizer.finalize()
        segment = detokenizer.last_segment
        if stop:  # hold back text that may be the start of a stop string until it is decided
            text += segment
            hit = min((i for s in stop if (i := text.find(s, max(0, emitted - hold))) != -1), default=-1)
            if hit != -1:
                finish = "stop"
            end = hit if hit != -1 else len(text) if finish else max(emitted, len(text) - hold)
            segment, emitted = text[emitted:end], end
        yield GenerationResponse(
            text=segment,
            token=token_id,
            logprobs=logprobs,
            from_draft=False,
            prompt_tokens=len(tokens),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=n / (time.perf_counter() - start),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )
        if finish is not None:
            return
        token, logprobs = next_token, next_logprobs


def generate(model, processor, prompt: Prompt, **kwargs) -> str:
    """Generate from ``prompt`` and return the text (see ``stream_generate`` for the arguments)."""
    return "".join(response.text for response in stream_generate(model, processor, prompt, **kwargs))
