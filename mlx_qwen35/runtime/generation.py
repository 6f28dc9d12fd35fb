"""Generation in two levels: a token-level generator under a text-level stream.

``generate_tokens`` (``token_generator.py``) is the token level, like mlx-lm's ``generate_step``: a prompt's ids (and vision
inputs) in, ``(token, logprobs)`` out, one forward pass ahead (the next token computes under
``async_eval`` while the caller handles this one). Speculative decoding (``speculative.py``, with
``settings.mtp`` on), distributed ranks and benchmarks against mlx-lm sit on this seam.

``stream_text`` puts the text on top: the thinking budget, stop tokens and stop strings, detokenising
and statistics, one mlx-lm ``GenerationResponse`` per token, read from a ``GenerationSettings``.
``stream_generate`` is the same with mlx-lm-style keywords; ``generate`` collects the text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
from mlx_lm.generate import GenerationResponse
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from ..errors import Qwen35Error
from ..model.cache import make_cache
from ..model.inputs import ModelInputs

# Prefill moved to prefill.py; these names stay importable from here for code written against the old module.
from .prefill import PrefillCancelled, prefill, prefill_prompt  # noqa: F401
from .settings import (
    GENERATE_MAX_TOKENS,
    PENALTY_CONTEXT,
    PREFILL_STEP_SIZE,
    GenerationSettings,
    KVCacheSettings,
    Sampling,
)
from .text_stream import TextStream
from .token_generator import LogitsProcessor, Sampler, generate_tokens

Prompt = str | list[dict] | list[int] | mx.array | ModelInputs


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


def leaves_thinking_open(processor, prompt_tokens: Sequence[int]) -> bool:
    """Whether the prompt ends inside a ``<think>`` block (its last ``<think>`` comes after its last ``</think>``)."""
    convert = processor.tokenizer.convert_tokens_to_ids
    open_id, close_id = convert("<think>"), convert("</think>")
    last_open = max((i for i, t in enumerate(prompt_tokens) if t == open_id), default=-1)
    last_close = max((i for i, t in enumerate(prompt_tokens) if t == close_id), default=-1)
    return last_open > last_close


class ThinkingBudget:
    """Closes an open ``<think>`` block after ``budget`` generated tokens by forcing ``\n</think>\n\n``."""

    def __init__(self, processor, prompt_tokens: list[int], budget: int | None):
        self.close_id = processor.tokenizer.convert_tokens_to_ids("</think>")
        self.thinking = budget is not None and leaves_thinking_open(processor, prompt_tokens)
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


def sampling_functions(model, processor, sampling: Sampling) -> tuple[Sampler, list[LogitsProcessor]]:
    """mlx-lm's sampler and logits processors for ``sampling``, the first processor masking the LM head's padding rows."""
    vocab = model.config.text.vocab_size
    # Top-k of the whole vocabulary keeps every token; mlx-lm's top-k refuses k >= vocab, and an exception
    # inside that compiled function leaves mx.random.state unusable for every later generation.
    top_k = sampling.top_k if sampling.top_k < vocab else 0
    sampler = make_sampler(temp=sampling.temp, top_p=sampling.top_p, min_p=sampling.min_p, top_k=top_k)
    processors = make_logits_processors(
        repetition_penalty=sampling.repetition_penalty,
        repetition_context_size=PENALTY_CONTEXT,
        presence_penalty=sampling.presence_penalty,
        presence_context_size=PENALTY_CONTEXT,
        frequency_penalty=sampling.frequency_penalty,
        frequency_context_size=PENALTY_CONTEXT,
    )
    vocab_mask = _vocab_mask(model, processor)
    if vocab_mask is not None:
        processors.insert(0, lambda _, logits: logits + vocab_mask)
    if getattr(model, "share", None) is not None:  # one rank of several: every rank takes rank 0's token
        from .distributed import shared_sampler

        sampler = shared_sampler(sampler, model.share, min(processor.eos_token_ids))
    return sampler, processors


class StopStrings:
    """Ends the text before the first stop string, holding back text that may start one until it is decided."""

    def __init__(self, stop: Sequence[str]):
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text, self.emitted = "", 0  # all text so far, and how much of it was shown

    def feed(self, segment: str, final: bool) -> tuple[str, bool]:
        """The text that can be shown now (``final``: the last segment), and whether a stop string ended it."""
        if not self.stop:
            return segment, False
        self.text += segment
        start = max(0, self.emitted - self.hold)
        hit = min((i for s in self.stop if (i := self.text.find(s, start)) != -1), default=-1)
        end = hit if hit != -1 else len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        segment, self.emitted = self.text[self.emitted : end], end
        return segment, hit != -1


def stream_text(
    model,
    processor,
    prompt: Prompt,
    settings: GenerationSettings,
    *,
    cache: list | None = None,
    cached_tokens: list[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
    mtp_stats=None,
) -> Iterator[GenerationResponse]:
    """Generate from ``prompt`` as ``settings`` say, yielding a response per token. A caller-owned ``cache`` continues from its contents.

    ``cached_tokens``: the ids that ``cache`` already holds, for the penalties to look back over as a fresh run would.
    ``should_stop``: asked between prefill chunks; True raises ``PrefillCancelled`` (decoding stops when the caller
    stops iterating). ``mtp_stats``: a ``speculative.MTPStats`` the MTP drafting (``settings.mtp``) counts into.
    """
    tokens = prompt_token_ids(processor, prompt, settings.enable_thinking, settings.tools)
    if not tokens:
        raise Qwen35Error("the prompt is empty; give some text")
    if settings.seed is not None:
        mx.random.seed(settings.seed)
    if cache is None:
        cache = make_cache(model, settings.kv_cache.bits, settings.kv_cache.group_size)
    sampler, processors = sampling_functions(model, processor, settings.sampling)
    choose_token = ThinkingBudget(processor, tokens, settings.thinking_budget).choose
    if settings.json_schema is not None:
        from .structured_output import JsonConstraint

        thinking = leaves_thinking_open(processor, tokens)
        constraint = JsonConstraint(processor, settings.json_schema, model.config.text.vocab_size, thinking)
        processors.append(constraint)  # last: it masks what the penalties left
        budget_choose = choose_token
        choose_token = lambda sampled: constraint.choose(budget_choose(sampled))  # noqa: E731
    eos = processor.eos_token_ids
    arguments = dict(
        max_tokens=settings.max_tokens,
        stop_tokens=eos,
        context_tokens=cached_tokens or (),
        choose_token=choose_token,
        prefill_step_size=settings.prefill_step_size,
        should_stop=should_stop,
    )
    inputs = prompt if isinstance(prompt, ModelInputs) else ModelInputs(tokens)
    # A JSON constraint keeps state across its calls in token order, which a verify's look-ahead would break.
    if settings.mtp.enabled and "mtp" in model and settings.json_schema is None:
        from .speculative import generate_tokens_speculative

        generated = generate_tokens_speculative(
            model,
            inputs,
            cache,
            sampler,
            processors,
            mtp=settings.mtp,
            sampling=settings.sampling,
            stats=mtp_stats,
            **arguments,
        )
    else:
        generated = generate_tokens(model, inputs, cache, sampler, processors, **arguments)
    detokenizer = TextStream(processor.tokenizer)
    stop = StopStrings(settings.stop)
    start = time.perf_counter()
    for n, (token, logprobs) in enumerate(generated, start=1):
        if n == 1:  # the prompt is in the cache and the first token is out
            prompt_tps = len(tokens) / (time.perf_counter() - start)
            start = time.perf_counter()
        finish = "stop" if token in eos else "length" if n == settings.max_tokens else None
        if finish != "stop":
            detokenizer.add_token(token)
        if finish is not None:
            detokenizer.finalize()
        segment, stopped = stop.feed(detokenizer.last_segment, final=finish is not None)
        finish = "stop" if stopped else finish
        yield GenerationResponse(
            text=segment,
            token=token,
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


def stream_generate(
    model,
    processor,
    prompt: Prompt,
    *,
    max_tokens: int = GENERATE_MAX_TOKENS,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    cache: list | None = None,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    enable_thinking: bool = True,
    tools: list[dict] | None = None,
    thinking_budget: int | None = None,
    kv_bits: int | None = None,
    cached_tokens: list[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
    json_schema: dict | None = None,
) -> Iterator[GenerationResponse]:
    """Generate from ``prompt``, yielding a response per token: ``stream_text`` with its settings as keywords.

    A caller-owned ``cache`` continues from its contents; ``cached_tokens``: the ids it already holds;
    ``should_stop``: asked between prefill chunks; ``json_schema``: the answer must be JSON matching it.
    """
    settings = GenerationSettings(
        sampling=Sampling(temp, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty),
        max_tokens=max_tokens,
        stop=tuple(stop or ()),
        seed=seed,
        enable_thinking=enable_thinking,
        thinking_budget=thinking_budget,
        tools=tools,
        prefill_step_size=prefill_step_size,
        kv_cache=KVCacheSettings(bits=kv_bits),
        json_schema=json_schema,
    )
    yield from stream_text(
        model, processor, prompt, settings, cache=cache, cached_tokens=cached_tokens, should_stop=should_stop
    )


def generate(model, processor, prompt: Prompt, **kwargs) -> str:
    """Generate from ``prompt`` and return the text (see ``stream_generate`` for the arguments)."""
    return "".join(response.text for response in stream_generate(model, processor, prompt, **kwargs))
