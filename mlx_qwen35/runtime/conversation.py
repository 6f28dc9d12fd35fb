"""A chat with one model: its messages and settings, and one cache reused from turn to turn.

Each prompt is the whole conversation rendered by the chat template. The template does not render
history as the model generated it (past turns lose their ``<think>`` block, even the empty one of
non-thinking mode), so the cache's token sequence is generally not a prefix of the next rendering.
The recurrent (Gated DeltaNet) state cannot be trimmed back either, so while prefilling a prompt we
snapshot the cache at two kinds of points that later renderings share:

* before each ``<|im_start|>user`` — the end of the previous turn, where ``edit`` restarts;
* after the final ``<|im_start|>assistant\\n`` — where the template starts rendering the reply,
  so the next turn (which re-renders the reply) and ``retry`` restart there.

Every prompt restores the longest of these checkpoints (or the live cache, e.g. after a tool call,
where the template keeps the reply as generated) whose tokens prefix the new rendering, and prefills
only the rest. Nothing reusable means restoring the empty cache: a full prefill, silently.

Images and videos: the cache holds their effect, so one inside a reused prefix is never encoded
again; only those whose placeholders lie in the part being prefilled go through the vision tower.
Placeholder tokens are the same id for every image, so the prefix is compared on cache keys: the
token ids with each item's placeholders replaced by a (negative) key of its pixels — a different
image of the same size is a different prefix.

``ConversationCache`` is that machinery on its own — the server feeds it whole request histories;
``Conversation`` adds the messages, the settings and the parsed reply (``reply_events``, which the CLI
uses for a reply without a conversation too).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationResponse

from ..errors import Qwen35Error
from ..model.cache import Snapshot, cache_length, make_cache, restore, snapshot
from ..model.inputs import ModelInputs
from ..processing.output import OutputParser, OutputPiece, PieceKind, ShownAnswer, ToolCall, collect
from .generation import stream_text
from .prefill import prefill_prompt
from .settings import (
    DEFAULT_MAX_TOKENS,
    KV_GROUP_SIZE,
    PREFILL_STEP_SIZE,
    GenerationSettings,
    KVCacheSettings,
    MTPSettings,
    recommended_sampling,
)
from .speculative import MTPStats

CHECKPOINTS_KEPT_AT_START = 2  # the empty cache and the end of the system turn: reused after reset
CHECKPOINTS_KEPT_AT_END = 3  # reply start of the last prompt, its user-turn start, the reply start before


@dataclass(frozen=True)
class ChatEvent:
    """One streamed piece of a reply and the token response that produced it (every token yields ≥ 1 event)."""

    kind: PieceKind  # "reasoning" | "content" | "tool_call"
    text: str  # "" when the token only extended a tag or a call still forming
    response: GenerationResponse
    tool_call: ToolCall | None = None  # set on the event that completes a call


@dataclass
class TurnStats:
    """What the last prompt cost: tokens reused from the cache vs prefilled, speed, context used."""

    prompt_tokens: int = 0  # the whole rendered conversation
    reused_tokens: int = 0  # restored from the cache
    prefilled_tokens: int = 0  # run through the model for this prompt
    generated_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds, restore + prefill + first step
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    context_tokens: int = 0  # tokens in the cache after the reply
    mtp_drafted: int = 0  # tokens the MTP head drafted for the reply (speculative decoding)
    mtp_accepted: int = 0  # of them, accepted by the model


@dataclass(frozen=True)
class Checkpoint:
    """A snapshot of the cache and the cache keys (token ids, media keyed by pixels) it held when it was taken."""

    tokens: tuple[int, ...]
    snapshot: Snapshot


@dataclass(frozen=True)
class ConversationSettings:
    """Everything about a conversation except its messages and cache (what ``sessions`` saves); checked when built."""

    system: str | None = None
    enable_thinking: bool = True
    tools: list[dict] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # overrides of the model card's preset for the mode
    max_tokens: int = DEFAULT_MAX_TOKENS
    thinking_budget: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = KV_GROUP_SIZE
    prefill_step_size: int = PREFILL_STEP_SIZE
    max_pixels: int | None = None  # largest image / video-frame area; None: the processor's default (1344²)

    def __post_init__(self) -> None:
        self.generation()  # every value is checked here, not when a reply starts

    def generation(self) -> GenerationSettings:
        """The settings of the next reply: the model card's preset for the thinking mode under the overrides."""
        return GenerationSettings(
            sampling=recommended_sampling(self.enable_thinking, self.sampling),
            max_tokens=self.max_tokens,
            enable_thinking=self.enable_thinking,
            thinking_budget=self.thinking_budget,
            tools=self.tools,
            prefill_step_size=self.prefill_step_size,
            kv_cache=KVCacheSettings(self.kv_bits, self.kv_group_size),
        )


class ConversationCache:
    """One ``ModelCache`` and its checkpoints; ``stream`` generates from a rendered prompt, reusing the longest prefix it shares with them."""

    def __init__(self, model, processor, kv_bits: int | None = None, kv_group_size: int = KV_GROUP_SIZE):
        self.model = model
        self.processor = processor
        self.model_cache = make_cache(model, kv_bits, kv_group_size)
        self.tokens: list[int] | None = []  # cache keys of what the live cache holds; None: unknown (interrupted)
        self.checkpoints: list[Checkpoint] = [Checkpoint((), snapshot(self.model_cache))]
        self.reused_tokens = 0  # of the last prompt: restored from the cache rather than prefilled
        encode = processor.encode
        self._im_start = encode("<|im_start|>")[0]
        self._user_header = encode("<|im_start|>user\n")
        self._reply_header = encode("<|im_start|>assistant\n")

    def stream(
        self,
        inputs: ModelInputs,
        settings: GenerationSettings,
        should_stop: Callable[[], bool] | None = None,
        mtp_stats: MTPStats | None = None,
    ) -> Iterator[GenerationResponse]:
        """Restore the longest reusable prefix of ``inputs`` and prefill up to the reply start now; the iterator generates.

        Afterwards ``reused_tokens`` says how many prompt tokens the cache gave. ``should_stop`` is asked between
        prefill chunks (``prefill``); True raises ``PrefillCancelled``. ``mtp_stats`` counts the MTP drafts.
        """
        keys = self._cache_keys(inputs)
        self.reused_tokens = self._restore_longest_prefix(keys)
        try:
            position = self._prefill_with_checkpoints(
                inputs, keys, self.reused_tokens, settings.prefill_step_size, should_stop
            )
        except BaseException:
            self.tokens = None  # a forward pass may have stopped halfway
            raise
        return self._generate(inputs, keys, position, settings, should_stop, mtp_stats)

    def _cache_keys(self, inputs: ModelInputs) -> list[int]:
        """The prompt's token ids with each image's / video's placeholders replaced by one key of its pixels."""
        keys = list(inputs.input_ids)
        for item in inputs.vision_items(self.model.config):
            digest = hashlib.sha256(np.array(item.pixel_values).tobytes() + str(item.grid_thw).encode()).digest()
            key = -1 - int.from_bytes(digest[:7], "big")  # never a token id; exact in JSON when saved
            for position in item.positions.tolist():
                keys[position] = key
        return keys

    def _restore_longest_prefix(self, keys: list[int]) -> int:
        """Bring the cache to the longest reusable prefix of ``keys`` (≥ 1 token left to run); its length."""
        live = self.tokens
        best_live = live is not None and len(live) < len(keys) and keys[: len(live)] == live
        best_length = len(live) if best_live else -1
        best_checkpoint = None
        for checkpoint in self.checkpoints:
            n = len(checkpoint.tokens)
            if best_length < n < len(keys) and tuple(keys[:n]) == checkpoint.tokens and not checkpoint.snapshot.stale:
                best_checkpoint, best_length = checkpoint, n
        if best_checkpoint is not None:
            restore(self.model_cache, best_checkpoint.snapshot)
            self.tokens = list(best_checkpoint.tokens)
        return best_length

    def _checkpoint_positions(self, keys: list[int], start: int) -> list[int]:
        """Where to snapshot while prefilling ``keys[start:]``: before each user turn, and at the reply start."""
        header = self._user_header
        positions = [
            i for i in range(start + 1, len(keys)) if keys[i] == self._im_start and keys[i : i + len(header)] == header
        ]
        reply = max((i for i, t in enumerate(keys) if t == self._im_start), default=0) + len(self._reply_header)
        if keys[reply - len(self._reply_header) : reply] == self._reply_header and start < reply < len(keys):
            positions.append(reply)
        return positions

    def _prefill_with_checkpoints(
        self, inputs: ModelInputs, keys: list[int], start: int, step_size: int, should_stop: Callable[[], bool] | None
    ) -> int:
        """Prefill up to the last checkpoint position (only the media there meet the vision tower), snapshotting at each; where the cache ends."""
        position = start
        for point in self._checkpoint_positions(keys, start):
            span = inputs.span(position, point, self.model.config)
            prefill_prompt(self.model, span, self.model_cache, step_size, should_stop)
            position = point
            self.tokens = keys[:point]
            self.checkpoints.append(Checkpoint(tuple(keys[:point]), snapshot(self.model_cache)))
        self._prune_checkpoints(keys)
        return position

    def _prune_checkpoints(self, keys: list[int]) -> None:
        """Keep the checkpoints the next operations can use; each holds the recurrent state of every layer."""
        on_path = sorted(
            (c for c in self.checkpoints if not c.snapshot.stale and tuple(keys[: len(c.tokens)]) == c.tokens),
            key=lambda c: len(c.tokens),
        )
        self.checkpoints = (
            on_path[:CHECKPOINTS_KEPT_AT_START] + on_path[CHECKPOINTS_KEPT_AT_START:][-CHECKPOINTS_KEPT_AT_END:]
        )

    def _generate(
        self,
        inputs: ModelInputs,
        keys: list[int],
        position: int,
        settings: GenerationSettings,
        should_stop: Callable[[], bool] | None,
        mtp_stats: MTPStats | None,
    ) -> Iterator[GenerationResponse]:
        """Stream the reply from ``position`` on and keep track of what the cache holds, however it ends."""
        generated: list[int] = []
        consistent = False  # an exception inside a forward pass may leave layers half-updated
        try:
            for response in stream_text(
                self.model,
                self.processor,
                inputs.span(position, len(keys), self.model.config),
                settings,
                cache=self.model_cache,
                cached_tokens=inputs.input_ids[:position],
                should_stop=should_stop,
                mtp_stats=mtp_stats,
            ):
                generated.append(response.token)
                consistent = True  # between tokens the cache holds exactly the tokens fed so far
                yield response
                consistent = False
            consistent = True
        finally:
            fed = keys + generated
            self.tokens = fed[: cache_length(self.model_cache)] if consistent else None


class Conversation:
    """Messages + settings + one ``ConversationCache``; ``send`` streams the reply as ``ChatEvent``s."""

    def __init__(
        self,
        model,
        processor,
        settings: ConversationSettings | None = None,
        *,
        seed: int | None = None,
        cache: ConversationCache | None = None,
    ):
        """``cache``: the prompt cache to use (rank 0's ``rank_jobs.LeadingCache``); default: one of the settings' own."""
        self.model = model
        self.processor = processor
        self.settings = settings or ConversationSettings()
        self.messages: list[dict] = []  # without the system prompt (``settings.system``)
        self.last_stats = TurnStats()
        self.should_stop: Callable[[], bool] | None = None  # asked between prefill chunks (progress, Ctrl-C)
        # Speculative decoding: a runtime choice like the device, not part of the saved conversation (same replies).
        self.mtp = MTPSettings()
        if seed is not None:
            mx.random.seed(seed)  # once: a retry should draw a new reply, not the same one
        self.cache = cache or ConversationCache(model, processor, self.settings.kv_bits, self.settings.kv_group_size)

    # -- the conversation -------------------------------------------------------------------------

    def send(self, content: str | list) -> Iterator[ChatEvent]:
        """Add a user message (text, or a list of text / image / video items) and stream the reply."""
        self.messages.append({"role": "user", "content": content})
        return self._reply()

    def send_tool_results(self, results: list[str]) -> Iterator[ChatEvent]:
        """Add the results of the last reply's tool calls (in call order) and stream the model's next reply."""
        if not self.messages or not self.messages[-1].get("tool_calls"):
            raise Qwen35Error("the last reply made no tool call; send tool results after a reply with tool_calls")
        self.messages += [{"role": "tool", "content": result} for result in results]
        return self._reply()

    def retry(self) -> Iterator[ChatEvent]:
        """Drop the last reply and generate it again (from the snapshot at the start of the reply)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            raise Qwen35Error("nothing to retry: the conversation is empty")
        return self._reply()

    def edit(self, content: str | list) -> Iterator[ChatEvent]:
        """Replace the last user message (dropping what followed it) and stream the new reply."""
        last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise Qwen35Error("nothing to edit: no user message yet")
        del self.messages[last_user:]
        return self.send(content)

    def reset(self) -> None:
        """Forget the messages; the cache's system-prompt checkpoint stays for the next conversation."""
        self.messages.clear()
        self.last_stats = TurnStats()

    def set_thinking(self, enabled: bool) -> None:
        """Thinking on or off from the next reply (the history renders the same either way)."""
        self.settings = replace(self.settings, enable_thinking=enabled)

    @property
    def context_tokens(self) -> int:
        """Tokens held in the cache."""
        return cache_length(self.cache.model_cache)

    def sampling(self) -> dict[str, Any]:
        """The model card's preset for the current thinking mode with the user's overrides on top, as keywords."""
        return recommended_sampling(self.settings.enable_thinking, self.settings.sampling).keywords()

    def prompt_inputs(self) -> ModelInputs:
        """The conversation rendered by the chat template, with the generation prompt: token ids and vision inputs."""
        if not self.messages:
            raise Qwen35Error("the conversation has no message yet")
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return self.processor(
            system + self.messages,
            enable_thinking=self.settings.enable_thinking,
            tools=self.settings.tools,
            max_pixels=self.settings.max_pixels,
        )

    def prompt_tokens(self) -> list[int]:
        """The conversation rendered by the chat template, with the generation prompt, as token ids."""
        return self.prompt_inputs().input_ids

    # -- one reply --------------------------------------------------------------------------------

    def _reply(self) -> Iterator[ChatEvent]:
        """Render, reuse the cache, prefill the rest, stream the reply, and record it as a message."""
        started = time.perf_counter()
        inputs = self.prompt_inputs()
        settings = self.settings
        mtp_stats = MTPStats()
        responses = self.cache.stream(inputs, replace(settings.generation(), mtp=self.mtp), self.should_stop, mtp_stats)
        reused = self.cache.reused_tokens
        stats = TurnStats(
            prompt_tokens=len(inputs.input_ids), reused_tokens=reused, prefilled_tokens=len(inputs.input_ids) - reused
        )
        self.last_stats = stats
        parser = OutputParser(settings.enable_thinking, settings.tools)
        try:
            for event in reply_events(responses, parser):
                response = event.response
                if response.generation_tokens == 1 and not stats.generated_tokens:
                    stats.time_to_first_token = time.perf_counter() - started
                stats.generated_tokens = response.generation_tokens
                stats.generation_tps = response.generation_tps
                stats.peak_memory_gb = response.peak_memory
                stats.mtp_drafted, stats.mtp_accepted = mtp_stats.drafted, mtp_stats.accepted
                yield event
        finally:
            responses.close()  # now, not at garbage collection: the cache records what it holds
            if not parser.finished:
                parser.finish()  # interrupted: keep what was shown
            if stats.generated_tokens:
                self.messages.append(assistant_message(parser.pieces))
            stats.context_tokens = self.context_tokens


def reply_events(responses: Iterable[GenerationResponse], parser: OutputParser) -> Iterator[ChatEvent]:
    """The ``ChatEvent``s of a reply: each token response's text split by ``parser`` (at least one event per token)."""
    for response in responses:
        new = parser.feed(response.text)
        if response.finish_reason:
            new += parser.finish()
        for piece in new or [OutputPiece(parser.mode, "")]:
            yield ChatEvent(piece.kind, piece.text, response, piece.tool_call)


def assistant_message(pieces: list[OutputPiece]) -> dict:
    """The assistant message for a reply, in the form the chat template renders back as generated."""
    parsed = collect(pieces)
    calls = [c for c in parsed.tool_calls if c.error is None]
    content = ShownAnswer.of(pieces).text  # a malformed call stays in the content as text, where it was
    message = {"role": "assistant", "content": content, "reasoning_content": parsed.reasoning}
    if calls:
        message["tool_calls"] = [
            {"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
    return message
