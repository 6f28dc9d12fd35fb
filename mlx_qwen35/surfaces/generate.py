"""``mlx-qwen35 generate``: one reply to one prompt, streamed to the terminal or printed as one JSON object.

The reasoning shows dimmed under a "Thinking" label and the answer after it (``--hide-thinking``: the
answer only); the ``<think>`` tags never show. ``--json`` splits the reply into ``reasoning``,
``content`` and ``tool_calls`` as the server's chat completion does (the same parser, the same
``ShownAnswer``). Control characters from the model are dropped, as in the chat.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import typer

from ..errors import Qwen35Error
from ..processing.output import OutputPiece, ShownAnswer, collect
from ..runtime.settings import MTPSettings

THINKING_LABEL = "Thinking"


@dataclass(frozen=True)
class MediaOptions:
    """How the images and videos of a prompt are read (None: the checkpoint's default)."""

    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()
    max_pixels: int | None = None
    min_pixels: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    video_start: float | None = None
    video_end: float | None = None
    resize_shape: tuple[int, int] | None = None  # (width, height) each image is fitted into, as mlx-vlm's

    def items(self) -> list[dict]:
        """The message items: each image (fitted into ``resize_shape`` if given), then each video."""
        images = [_fitted(path, self.resize_shape) for path in self.images]
        return [{"type": "image", "image": image} for image in images] + [
            {"type": "video", "video": path} for path in self.videos
        ]


def resize_shape_option(values: list[int] | None) -> tuple[int, int] | None:
    """``--resize-shape S`` or ``W H`` (mlx-vlm's) as (width, height)."""
    if not values:
        return None
    if len(values) > 2 or any(v < 1 for v in values):
        raise Qwen35Error(
            f"--resize-shape {' '.join(map(str, values))}: give one size or a width and a height, each >= 1"
        )
    return (values[0], values[-1])


def _fitted(path: str, shape: tuple[int, int] | None):
    """The image at ``path``, scaled to fit ``shape`` (width, height) keeping its aspect ratio, as mlx-vlm does."""
    if shape is None:
        return path
    from ..processing.image import open_image

    image = open_image(path)
    ratio = min(shape[0] / image.width, shape[1] / image.height)
    return image.resize((max(1, int(image.width * ratio)), max(1, int(image.height * ratio))))


def check_media_files(images: list[str], videos: list[str]) -> None:
    """Each --image / --video names an existing local file (or an image data: URL), in the processor's words."""
    from ..processing.image import DATA_URL, URL_SCHEME

    for kind, source in [("image", path) for path in images] + [("video", path) for path in videos]:
        if kind == "image" and DATA_URL.match(source):
            continue
        if URL_SCHEME.match(source):
            raise Qwen35Error(f"{source}: URLs are not fetched; download the {kind} and pass its local path")
        try:  # "~nobody/…" and NUL bytes raise rather than say False
            found = Path(source).expanduser().is_file()
        except (RuntimeError, OSError, ValueError):
            found = False
        if not found:
            raise Qwen35Error(f"{source}: no such {kind} file; check the path")


class ReplyPrinter:
    """Streams a reply to stdout: reasoning dim under a label, the answer plain, each tool call as a JSON line."""

    def __init__(self, show_reasoning: bool):
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)  # soft_wrap: piped output is not cut at 80 columns
        self.show_reasoning = show_reasoning
        self._kind: str | None = None

    def add(self, kind: str, text: str, tool_call=None) -> None:
        """Print the next piece of the reply."""
        from rich.text import Text

        from .repl import CONTROL_CHARACTERS

        text = CONTROL_CHARACTERS.sub("", text)
        if kind == "reasoning" and not self.show_reasoning:
            return
        if kind != self._kind:
            if self._kind is not None:  # a blank line after the reasoning, a line break between the rest
                self.console.print("\n" if self._kind == "reasoning" else "")
            if kind == "reasoning":
                self.console.print(Text(f"{THINKING_LABEL}:", style="dim bold"))
        self._kind = kind
        if kind == "reasoning":
            self.console.print(Text(text, style="dim"), end="")
        elif kind == "content":
            self.console.print(Text(text), end="")
        else:
            call = tool_call.to_dict() if tool_call is not None else {"raw": text}
            self.console.print(Text(json.dumps(call, ensure_ascii=False)), end="")

    def close(self) -> None:
        """End the reply's last line."""
        if self._kind is not None:
            self.console.print()


def reply_fields(pieces: list[OutputPiece]) -> dict:
    """``reasoning``, ``content`` and ``tool_calls`` of a reply, split as the server's chat completion splits them."""
    parsed = collect(pieces)
    return dict(
        reasoning=parsed.reasoning,
        content=ShownAnswer.of(pieces).text,
        tool_calls=[call.to_dict() for call in parsed.tool_calls if call.error is None],
    )


def run_generate(
    *,
    model: str,
    prompt: str,
    max_tokens: int,
    sampling_overrides: dict,
    seed: int | None,
    system: str | None,
    enable_thinking: bool,
    hide_thinking: bool,
    raw: bool,
    as_json: bool,
    verbose: bool,
    media: MediaOptions,
    tools: Path | None,
    prompt_cache_file: Path | None,
    thinking_budget: int | None,
    kv_bits: int | None,
    kv_group_size: int,
    max_kv_size: int | None,
    prefill_step_size: int,
    extra_eos_tokens: list[str],
    expert_memory: str | None = None,
    parallel: str | None = None,
    split: str | None = None,
    mtp: MTPSettings = MTPSettings(),
) -> None:
    """Load ``model`` and stream its reply to ``prompt`` (with ``media``), or print it as JSON.

    Under mlx.launch every rank runs this with the same arguments; ``parallel`` / ``split`` say how they share
    the model, rank 0 reads standard input and prints, the others follow (docs/architecture.md §21).
    """
    import mlx.core as mx

    from ..model.cache import make_cache
    from ..processing.output import OutputParser, read_tools_file
    from ..runtime.conversation import ConversationSettings, reply_events
    from ..runtime.distributed import broadcast_text, join_launched, rank_errors
    from ..runtime.generation import prompt_token_ids, stream_text
    from ..runtime.sessions import check_session_target, open_conversation, save_conversation
    from ..runtime.settings import GenerationSettings, KVCacheSettings, max_tokens_within_context, recommended_sampling
    from ..runtime.speculative import MTPStats
    from ..runtime.validation import check_media, check_numbers, check_text
    from ..weights.loading import load
    from .progress import PrefillProgress, StatusLine

    if prompt_cache_file and (parallel or split):
        raise Qwen35Error("--prompt-cache-file saves one process's cache; drop it to run on several ranks")
    share = join_launched(parallel, split, model)
    speaks = share is None or share.leads
    # Everything that can be wrong without the model is found before it loads (minutes, for a large one).
    prompt_source = "--prompt"
    if prompt == "-":  # bytes that are not UTF-8 kept as lone surrogates, for check_text to name
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape") if speaks else None
        prompt, prompt_source = (prompt if share is None else broadcast_text(prompt, share)), "standard input"
    check_text(prompt, prompt_source)
    if system is not None:
        check_text(system, "--system-prompt")
    for token in extra_eos_tokens:
        check_text(token, "--extra-eos-token")
        if not token:
            raise Qwen35Error("--extra-eos-token: give a token or text, not an empty string")
    check_numbers(seed=seed, max_kv_size=max_kv_size)
    check_media(
        min_pixels=media.min_pixels,
        max_pixels=media.max_pixels,
        fps=media.fps,
        max_frames=media.max_frames,
        video_start=media.video_start,
        video_end=media.video_end,
    )
    has_media = bool(media.images or media.videos)
    if raw and has_media:
        raise Qwen35Error("--raw sends text only; drop --raw to ask about --image / --video")
    if prompt_cache_file and (raw or has_media):
        raise Qwen35Error("--prompt-cache-file continues a text chat; drop --raw / --image / --video")
    if prompt_cache_file and extra_eos_tokens:
        raise Qwen35Error(
            "--prompt-cache-file continues a chat, which stops at the model's own tokens; drop --extra-eos-token"
        )
    if speaks:  # rank 0 reads the files and shares the prompt they make
        check_media_files(list(media.images), list(media.videos))
    tool_schemas = read_tools_file(tools) if tools else None
    # Built (and so checked) before the model loads: a typo should not wait for a large model.
    if prompt_cache_file:
        settings = ConversationSettings(
            system=system,
            enable_thinking=enable_thinking,
            tools=tool_schemas,
            max_tokens=max_tokens,
            thinking_budget=thinking_budget,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            prefill_step_size=prefill_step_size,
            sampling={k: v for k, v in sampling_overrides.items() if v is not None},
        )
        check_session_target(prompt_cache_file, kv_bits)
    else:
        settings = GenerationSettings(
            sampling=recommended_sampling(enable_thinking, sampling_overrides),
            max_tokens=max_tokens,
            stop=tuple(extra_eos_tokens),
            seed=seed,
            enable_thinking=enable_thinking,
            thinking_budget=thinking_budget,
            tools=tool_schemas,
            prefill_step_size=prefill_step_size,
            kv_cache=KVCacheSettings(bits=kv_bits, group_size=kv_group_size),
            mtp=mtp,
        )
    items = media.items() if speaks else []  # images opened (to fit --resize-shape) before the model loads
    model_obj, processor = load(model, expert_memory=expert_memory, share=share)
    experts = model_obj.expert_cache
    vision_tokens, vision_seconds = 0, 0.0
    if raw:
        request = prompt
    else:
        content = items + [{"type": "text", "text": prompt}] if items else prompt
        request = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    if items:
        started = time.perf_counter()
        request = processor(
            request,
            enable_thinking=enable_thinking,
            max_pixels=media.max_pixels,
            min_pixels=media.min_pixels,
            fps=media.fps,
            max_frames=media.max_frames,
            video_start=media.video_start,
            video_end=media.video_end,
        )
        vision_seconds = time.perf_counter() - started
        vision_tokens = processor.vision_token_count(request)
    if share is not None:
        from ..model.inputs import ModelInputs
        from ..runtime.rank_jobs import shared_prompt

        if speaks and not isinstance(request, ModelInputs):
            request = ModelInputs(prompt_token_ids(processor, request, enable_thinking, tool_schemas))
        request = shared_prompt(share, request if speaks else None)
    conversation = None
    started = time.perf_counter()
    if prompt_cache_file:
        if seed is not None:
            mx.random.seed(seed)
        conversation = open_conversation(prompt_cache_file, model_obj, processor, settings)
        conversation.mtp = mtp
        events = conversation.send(prompt)  # renders and reads the settings when the reply starts
        prompt_length = len(conversation.prompt_tokens())
    else:
        prompt_length = len(prompt_token_ids(processor, request, enable_thinking, tool_schemas))
    max_tokens = max_tokens_within_context(
        max_tokens, prompt_length, max_kv_size, fix="raise --max-kv-size or shorten the prompt"
    )
    status = StatusLine()
    mtp_stats = MTPStats()
    if conversation:
        conversation.settings = replace(conversation.settings, max_tokens=max_tokens)
        conversation.should_stop = PrefillProgress(
            conversation.cache.model_cache, prompt_length, prefill_step_size, status.show
        )
    else:
        cache = make_cache(model_obj, kv_bits, kv_group_size)
        responses = stream_text(
            model_obj,
            processor,
            request,
            replace(settings, max_tokens=max_tokens),
            cache=cache,
            should_stop=PrefillProgress(cache, prompt_length, prefill_step_size, status.show),
            mtp_stats=mtp_stats,
        )
        events = reply_events(responses, OutputParser(enable_thinking and not raw, tool_schemas))
    printer = None if as_json or not speaks else ReplyPrinter(show_reasoning=not hide_thinking)
    text, pieces, last, first_token_at, decode_start = [], [], None, None, None
    with rank_errors(share):
        for event in events:
            response = event.response
            if first_token_at is None:
                first_token_at = time.perf_counter()
                status.close()
                decode_start = experts.snapshot() if experts else None
            if response is not last:
                text.append(response.text)
            if event.text or event.tool_call:
                pieces.append(OutputPiece(event.kind, event.text, event.tool_call))
                if printer:
                    printer.add(event.kind, event.text, event.tool_call)
            last = response
    if printer:
        printer.close()
    prompt_tokens, prompt_tps = last.prompt_tokens, last.prompt_tps
    if conversation:
        save_conversation(conversation, prompt_cache_file)
        turn = conversation.last_stats  # stream_text only saw the tokens after the reused prefix
        prompt_tokens, prompt_tps = turn.prompt_tokens, turn.prefilled_tokens / max(turn.time_to_first_token, 1e-9)
        mtp_stats.drafted, mtp_stats.accepted = turn.mtp_drafted, turn.mtp_accepted
    fields = reply_fields(pieces)
    cut_while_reasoning = last.finish_reason == "length" and enable_thinking and not raw and not fields["content"]
    cut_while_reasoning = cut_while_reasoning and not fields["tool_calls"] and bool(fields["reasoning"])
    time_to_first_token = (first_token_at or started) - started
    if as_json:
        stats = dict(
            text="".join(text),
            **fields,
            prompt_tokens=prompt_tokens,
            generation_tokens=last.generation_tokens,
            prompt_tps=round(prompt_tps, 3),
            generation_tps=round(last.generation_tps, 3),
            time_to_first_token=round(time_to_first_token, 3),
            peak_memory_gb=round(last.peak_memory, 3),
            finish_reason=last.finish_reason,
            vision_tokens=vision_tokens,
            vision_seconds=round(vision_seconds, 3),
            mtp_drafted=mtp_stats.drafted,
            mtp_accepted=mtp_stats.accepted,
        )
        if experts:
            stats["experts"] = experts.report(decode_start, last.generation_tokens - 1)
        if conversation:
            stats |= dict(
                reused_tokens=conversation.last_stats.reused_tokens,
                prefilled_tokens=conversation.last_stats.prefilled_tokens,
            )
        typer.echo(json.dumps(stats, ensure_ascii=False))
    elif verbose and speaks:
        typer.echo(
            f"\n[{prompt_tokens} prompt tokens at {prompt_tps:.1f} tok/s, first token after {time_to_first_token:.2f} s, "
            f"{last.generation_tokens} generated at {last.generation_tps:.1f} tok/s, "
            f"peak memory {last.peak_memory:.2f} GB"
            + (f", MTP drafts accepted {mtp_stats.accepted}/{mtp_stats.drafted}" if mtp_stats.drafted else "")
            + "]",
            err=True,
        )
    if cut_while_reasoning and speaks:
        typer.echo(
            f"the reply ended while reasoning: --max-tokens {max_tokens} ended it before the answer; "
            "raise --max-tokens or set --thinking-budget",
            err=True,
        )
