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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import mlx.core as mx
from mlx_lm.generate import GenerationResponse

from .cache import Snapshot, cache_length, make_cache, restore, snapshot
from .errors import Qwen35Error
from .generation import prefill, recommended_sampling, stream_generate
from .processing.output import OutputParser, OutputPiece, PieceKind, ToolCall, collect

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


@dataclass(frozen=True)
class Checkpoint:
    """A snapshot of the cache and the tokens the cache held when it was taken."""

    tokens: tuple[int, ...]
    snapshot: Snapshot


@dataclass
class ConversationSettings:
    """Everything about a conversation except its messages and cache (what ``prompt_cache`` saves)."""

    system: str | None = None
    enable_thinking: bool = True
    tools: list[dict] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # overrides of the model card's preset
    max_tokens: int = 32768
    thinking_budget: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = 64
    prefill_step_size: int = 2048


class Conversation:
    """Messages + settings + one ``ModelCache``; ``send`` streams the reply as ``ChatEvent``s."""

    def __init__(self, model, processor, settings: ConversationSettings | None = None, *, seed: int | None = None):
        self.model = model
        self.processor = processor
        self.settings = settings or ConversationSettings()
        self.messages: list[dict] = []  # without the system prompt (``settings.system``)
        self.last_stats = TurnStats()
        if seed is not None:
            mx.random.seed(seed)  # once: a retry should draw a new reply, not the same one
        self.cache = make_cache(model, self.settings.kv_bits, self.settings.kv_group_size)
        self.cache_tokens: list[int] | None = []  # what the live cache holds; None: unknown (interrupted)
        self.checkpoints: list[Checkpoint] = [Checkpoint((), snapshot(self.cache))]
        encode = processor.encode
        self._im_start = encode("<|im_start|>")[0]
        self._user_header = encode("<|im_start|>user\n")
        self._reply_header = encode("<|im_start|>assistant\n")

    # -- the conversation -------------------------------------------------------------------------

    def send(self, content: str | list) -> Iterator[ChatEvent]:
        """Add a user message and stream the reply."""
        if _has_media(content):
            # The template would render one unexpanded placeholder and no vision rows: wrong, not slow.
            raise Qwen35Error(
                "images and videos are not supported in a conversation yet; ask about them with "
                "`mlx-qwen35 generate --image/--video`"
            )
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
        self.settings.enable_thinking = enabled

    @property
    def context_tokens(self) -> int:
        """Tokens held in the cache."""
        return cache_length(self.cache)

    def sampling(self) -> dict[str, Any]:
        """The model card's preset for the current thinking mode with the user's overrides on top."""
        return recommended_sampling(self.settings.enable_thinking) | self.settings.sampling

    def prompt_tokens(self) -> list[int]:
        """The conversation rendered by the chat template, with the generation prompt, as token ids."""
        if not self.messages:
            raise Qwen35Error("the conversation has no message yet")
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        text = self.processor.apply_chat_template(
            system + self.messages, enable_thinking=self.settings.enable_thinking, tools=self.settings.tools
        )
        return self.processor.encode(text)

    # -- the cache --------------------------------------------------------------------------------

    def _restore_longest_prefix(self, tokens: list[int]) -> int:
        """Bring the cache to the longest reusable prefix of ``tokens`` (≥ 1 token left to run); its length."""
        live = self.cache_tokens
        best_live = live is not None and len(live) < len(tokens) and tokens[: len(live)] == live
        best_length = len(live) if best_live else -1
        best_checkpoint = None
        for checkpoint in self.checkpoints:
            n = len(checkpoint.tokens)
            if best_length < n < len(tokens) and tuple(tokens[:n]) == checkpoint.tokens and not checkpoint.snapshot.stale:
                best_checkpoint, best_length = checkpoint, n
        if best_checkpoint is not None:
            restore(self.cache, best_checkpoint.snapshot)
            self.cache_tokens = list(best_checkpoint.tokens)
        return best_length

    def _checkpoint_positions(self, tokens: list[int], start: int) -> list[int]:
        """Where to snapshot while prefilling ``tokens[start:]``: before each user turn, and at the reply start."""
        header = self._user_header
        positions = [
            i for i in range(start + 1, len(tokens)) if tokens[i] == self._im_start and tokens[i : i + len(header)] == header
        ]
        reply = max(i for i, t in enumerate(tokens) if t == self._im_start) + len(self._reply_header)
        if tokens[reply - len(self._reply_header) : reply] == self._reply_header and start < reply < len(tokens):
            positions.append(reply)
        return positions

    def _prefill_with_checkpoints(self, tokens: list[int], start: int) -> int:
        """Prefill up to the last checkpoint position, snapshotting at each; where the cache ends."""
        position = start
        for point in self._checkpoint_positions(tokens, start):
            prefill(self.model, mx.array(tokens[position:point]), self.cache, self.settings.prefill_step_size)
            position = point
            self.cache_tokens = tokens[:point]
            self.checkpoints.append(Checkpoint(tuple(tokens[:point]), snapshot(self.cache)))
        self._prune_checkpoints(tokens)
        return position

    def _prune_checkpoints(self, tokens: list[int]) -> None:
        """Keep the checkpoints the next operations can use; each holds the recurrent state of every layer."""
        on_path = sorted(
            (c for c in self.checkpoints if not c.snapshot.stale and tuple(tokens[: len(c.tokens)]) == c.tokens),
            key=lambda c: len(c.tokens),
        )
        self.checkpoints = on_path[:CHECKPOINTS_KEPT_AT_START] + on_path[CHECKPOINTS_KEPT_AT_START:][-CHECKPOINTS_KEPT_AT_END:]

    # -- one reply --------------------------------------------------------------------------------

    def _reply(self) -> Iterator[ChatEvent]:
        """Render, reuse the cache, prefill the rest, stream the reply, and record it as a message."""
        started = time.perf_counter()
        tokens = self.prompt_tokens()
        reused = self._restore_longest_prefix(tokens)
        position = self._prefill_with_checkpoints(tokens, reused)
        stats = TurnStats(prompt_tokens=len(tokens), reused_tokens=reused, prefilled_tokens=len(tokens) - reused)
        self.last_stats = stats
        settings = self.settings
        parser = OutputParser(settings.enable_thinking, settings.tools)
        generated: list[int] = []
        pieces: list[OutputPiece] = []
        parser_done = False
        cache_consistent = False  # an exception inside a forward pass may leave layers half-updated
        try:
            for response in stream_generate(
                self.model,
                self.processor,
                tokens[position:],
                cache=self.cache,
                max_tokens=settings.max_tokens,
                enable_thinking=settings.enable_thinking,
                thinking_budget=settings.thinking_budget,
                prefill_step_size=settings.prefill_step_size,
                **self.sampling(),
            ):
                if not generated:
                    stats.time_to_first_token = time.perf_counter() - started
                generated.append(response.token)
                new = parser.feed(response.text)
                if response.finish_reason:
                    new, parser_done = new + parser.finish(), True
                pieces += new
                stats.generated_tokens = response.generation_tokens
                stats.generation_tps = response.generation_tps
                stats.peak_memory_gb = response.peak_memory
                cache_consistent = True  # between tokens the cache holds exactly the tokens fed so far
                for piece in new or [OutputPiece(parser.mode, "")]:
                    yield ChatEvent(piece.kind, piece.text, response, piece.tool_call)
                cache_consistent = False
            cache_consistent = True
        finally:
            if not parser_done:
                pieces += parser.finish()  # interrupted: keep what was shown
            if generated:
                self.messages.append(_reply_message(pieces))
            fed = tokens + generated
            self.cache_tokens = fed[: cache_length(self.cache)] if cache_consistent else None
            stats.context_tokens = cache_length(self.cache)


def _has_media(content) -> bool:
    """Whether message content (a string or a list of items) has an image or video item."""
    return isinstance(content, list) and any(
        isinstance(item, dict) and ({"image", "image_url", "video"} & item.keys() or item.get("type") in ("image", "video"))
        for item in content
    )


def _reply_message(pieces: list[OutputPiece]) -> dict:
    """The assistant message for a reply, in the form the chat template renders back as generated."""
    parsed = collect(pieces)
    calls = [c for c in parsed.tool_calls if c.error is None]
    malformed = [c.raw for c in parsed.tool_calls if c.error is not None]
    content = "\n\n".join([parsed.content] + malformed if parsed.content else malformed)
    message = {"role": "assistant", "content": content, "reasoning_content": parsed.reasoning}
    if calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return message
