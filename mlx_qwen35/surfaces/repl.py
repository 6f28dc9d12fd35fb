"""The terminal chat behind ``mlx-qwen35 chat``: line input, /commands, streamed reasoning and markdown.

Input (prompt_toolkit): Enter sends; Esc then Enter (what Alt-Enter sends in most terminals) or
Ctrl-J starts a new line, and pasted text keeps its newlines. Up/Down walk the input history, kept
in ``$XDG_STATE_HOME/mlx-qwen35/chat_history`` (``--no-history``: not kept). Ctrl-C at the prompt clears the line; Ctrl-D or /exit leaves.
A line starting with ``//`` is sent as a message starting with ``/``.

Output (rich): a spinner until the first token; reasoning streams as dim plain text (``--hide-thinking``:
a spinner instead);
the answer streams as live markdown showing its last screenful — a live region taller than the
terminal cannot be repainted — and is printed once in full when it ends. A status line follows.

Ctrl-C while generating stops the answer at the next token (so the cache is never left half
written); a second Ctrl-C interrupts at once, e.g. during a long prefill. The conversation keeps
the partial answer, as far as it got, and the next message continues after it.

A message, /retry or /edit that fails or is stopped before the first token of its answer (an
unreadable image, a full context) leaves the conversation as it was; a failed message comes back
at the prompt to be edited. A failed /load keeps the current conversation.

A long prompt shows a progress bar while it is read (surfaces/progress.py), and the first Ctrl-C
stops it at the next chunk. When the conversation fills the context the chat refuses and says what
to do (``--context-policy refuse``), or drops the oldest turns until a whole reply fits
(``drop-oldest``). Piped output is the answer's own text, not rendered markdown cut at 80 columns.

Under mlx.launch (docs/architecture.md §21) rank 0 runs this loop and its conversation's cache hands each
prompt to the other ranks (``rank_jobs``), which print nothing and read no input. There a prompt is read whole
(one rank cannot stop its prefill alone), Ctrl-C ends the reply on every rank within two tokens
(``stop_reply``), a second Ctrl-C does no more, and /save and /load (one process's cache) are refused.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.spinner import Spinner
from rich.text import Text

from ..errors import Qwen35Error
from ..runtime.settings import KV_GROUP_SIZE, PREFILL_STEP_SIZE, MTPSettings, max_tokens_within_context
from ..runtime.validation import check_text

# Where the history and sessions lived before they followed XDG_STATE_HOME.
LEGACY_STATE_DIR = Path("~/.cache/mlx-qwen35")
SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Control characters in model output would drive the terminal (escape sequences, backspaces); tabs and newlines are text.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class CommandSpec:
    """How a /command is written and what it does; ``argument``: "none", "optional" or "required"."""

    usage: str
    help: str
    argument: str = "none"


# What /set changes (Ollama's habit): the sampling overrides, the reply's length and the reasoning's budget.
SETTABLE: dict[str, type] = {
    "temp": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "presence_penalty": float,
    "repetition_penalty": float,
    "max_tokens": int,
    "thinking_budget": int,
}
SETTING_ALIASES = {
    "temperature": "temp",
    "top-p": "top_p",
    "top-k": "top_k",
    "min-p": "min_p",
    "max-tokens": "max_tokens",
}
CONTEXT_POLICIES = ("refuse", "drop-oldest")
ONE_PROCESS_COMMANDS = ("save", "load")  # a saved cache is one process's: refused under mlx.launch

COMMANDS: dict[str, CommandSpec] = {
    "help": CommandSpec("/help", "show this help"),
    "reset": CommandSpec("/reset", "start a new conversation (the system prompt stays)"),
    "retry": CommandSpec("/retry", "answer the last message again"),
    "edit": CommandSpec(
        "/edit [TEXT]", "replace the last message and answer it (no TEXT: edit it at the prompt)", "optional"
    ),
    "think": CommandSpec("/think on|off", "switch reasoning on or off", "required"),
    "image": CommandSpec("/image PATH", "attach an image to the next message", "required"),
    "video": CommandSpec("/video PATH", "attach a video to the next message", "required"),
    "system": CommandSpec("/system [TEXT|off]", "show, set or clear (off) the system prompt", "optional"),
    "set": CommandSpec(
        "/set [NAME VALUE]", "show or change a setting: " + ", ".join(SETTABLE) + " (default: the preset's)", "optional"
    ),
    "save": CommandSpec("/save NAME", "save the conversation and its cache", "required"),
    "load": CommandSpec("/load NAME", "load a saved conversation", "required"),
    "sessions": CommandSpec("/sessions", "list the saved conversations"),
    "stats": CommandSpec("/stats", "tokens prefilled and reused, context used, memory"),
    "exit": CommandSpec("/exit", "leave (Ctrl-D too)"),
}

INPUT_HELP = (
    "Enter sends; Esc Enter (Alt-Enter) or Ctrl-J adds a line. Ctrl-C stops an answer (the partial "
    "answer is kept). Start a message with // to send a leading /."
)


@dataclass(frozen=True)
class Command:
    """A parsed /command: its name and the rest of the line (stripped, possibly empty)."""

    name: str
    argument: str


def parse_command(line: str) -> Command | None:
    """The /command on ``line``, or None when the line is a message for the model."""
    stripped = line.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    name, _, argument = stripped[1:].partition(" ")
    name, argument = name.lower(), argument.strip()
    spec = COMMANDS.get(name)
    if spec is None:
        raise Qwen35Error(f"unknown command /{name}; /help lists the commands")
    if spec.argument == "required" and not argument:
        raise Qwen35Error(f"{spec.usage}: missing argument")
    if spec.argument == "none" and argument:
        raise Qwen35Error(f"/{name} takes no argument")
    if name == "think" and argument.lower() not in ("on", "off"):
        raise Qwen35Error(f"/think takes on or off, not {argument!r}")
    if name == "set" and argument:
        parse_setting(argument)
    return Command(name, argument)


def parse_setting(argument: str) -> tuple[str, float | int | None]:
    """``NAME VALUE`` of /set → (setting, value); ``default`` (None) goes back to the preset's."""
    key, _, value = argument.partition(" ")
    key, value = SETTING_ALIASES.get(key.lower(), key.lower()), value.strip()
    if key not in SETTABLE:
        raise Qwen35Error(f"/set {key}: not a setting; use one of {', '.join(SETTABLE)}")
    if not value:
        raise Qwen35Error(f"/set {key}: give a value (or 'default')")
    if value.lower() == "default":
        if key == "max_tokens":
            raise Qwen35Error("/set max_tokens: give a number of tokens")
        return key, None
    try:
        return key, SETTABLE[key](value)
    except ValueError:
        kind = "an integer" if SETTABLE[key] is int else "a number"
        raise Qwen35Error(f"/set {key} {value}: give {kind} (or 'default')") from None


def message_text(line: str) -> str:
    """The message a non-command line sends: ``//x`` escapes a leading slash."""
    stripped = line.strip()
    return stripped[1:] if stripped.startswith("//") else stripped


def state_dir() -> Path:
    """The chat's own files (input history, saved sessions): ``$XDG_STATE_HOME`` (or ``~/.local/state``) ``/mlx-qwen35``."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "mlx-qwen35"


def default_sessions_dir() -> Path:
    """Where /save writes without ``--sessions-dir``; the old ``~/.cache`` one while it exists, so no saved chat goes missing."""
    legacy = LEGACY_STATE_DIR.expanduser() / "sessions"
    return legacy if legacy.is_dir() else state_dir() / "sessions"


def session_path(sessions_dir: Path, name: str) -> Path:
    """Where /save NAME writes: a plain name (letters, digits, ``.``, ``_``, ``-``) inside ``sessions_dir``."""
    if not SESSION_NAME.fullmatch(name):
        raise Qwen35Error(f"{name!r} is not a session name; use letters, digits, '.', '_' or '-'")
    return sessions_dir / name


def saved_sessions(sessions_dir: Path) -> list[str]:
    """Names of the saved conversations (directories) in ``sessions_dir``."""
    return sorted(p.name for p in sessions_dir.iterdir() if p.is_dir()) if sessions_dir.is_dir() else []


def media_item(kind: str, path: str) -> dict:
    """The message item attaching the image or video at ``path`` (checked to exist now, not at send time)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise Qwen35Error(f"{path}: no such file")
    return {"type": kind, kind: str(file)}


def status_line(stats, context_max: int) -> str:
    """One line after an answer (from the conversation's ``TurnStats``): speed, prompt reuse, context, memory, time to first token."""
    prompt_tps = stats.prefilled_tokens / stats.time_to_first_token if stats.time_to_first_token > 0 else 0.0
    return (
        f"{stats.generated_tokens} tokens, {stats.generation_tps:.1f} tok/s · "
        f"prompt {stats.prefilled_tokens} new + {stats.reused_tokens} cached · "
        f"context {stats.context_tokens}/{context_max} · peak {stats.peak_memory_gb:.2f} GB · "
        f"first token {stats.time_to_first_token:.2f} s, prompt {prompt_tps:.0f} tok/s"
        + (f" · MTP drafts accepted {stats.mtp_accepted}/{stats.mtp_drafted}" if stats.mtp_drafted else "")
    )


class _LastLines:
    """The bottom of a renderable, one line shorter than the terminal, so Live can always repaint it."""

    def __init__(self, renderable):
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options, pad=False)
        shown = lines[-max(1, console.size.height - 1) :]
        for i, line in enumerate(shown):
            yield from line
            if i < len(shown) - 1:
                yield Segment.line()


class ReplyView:
    """Shows one streamed reply: reasoning dim (or a spinner when hidden), the answer as markdown, tool calls as JSON."""

    def __init__(self, console: Console, show_reasoning: bool, markdown: bool = True):
        self.console = console
        self.show_reasoning = show_reasoning
        self.markdown = markdown  # False (piped output): the answer's own text, unwrapped, for the next program
        self.answer = ""
        self._live: Live | None = None
        self._kind: str | None = None
        self._switch("prompt")  # a spinner while the prompt is prefilled

    def add(self, kind: str, text: str, tool_call=None) -> None:
        """Show the next piece of the reply (``kind``: "reasoning", "content" or "tool_call")."""
        text = CONTROL_CHARACTERS.sub("", text)
        if kind != self._kind:
            self._switch(kind)
        if kind == "reasoning":
            if self.show_reasoning:
                self.console.print(Text(text, style="dim"), end="", soft_wrap=True)
        elif kind == "content":
            self.answer += text
            self._live.update(_LastLines(self._rendered(self.answer)))
        else:
            call = tool_call.to_dict() if tool_call is not None else {"raw": text}
            self.console.print(Text(f"tool call: {json.dumps(call, ensure_ascii=False)}", style="yellow"))

    def show_prefill(self, renderable) -> None:
        """Replace the prompt spinner by ``renderable`` (the prefill's progress bar) while the prompt is read."""
        if self._kind == "prompt" and self._live is not None:
            self._live.update(renderable, refresh=True)  # each chunk drawn: a fast prefill shows too

    def close(self, stopped: bool) -> None:
        """End the reply: the full answer rendered once, and a mark when Ctrl-C stopped it."""
        hidden_reasoning_only = self._kind == "reasoning" and not self.show_reasoning
        self._switch(None)
        if stopped:
            self.console.print(Text("[stopped]", style="yellow"))
        elif hidden_reasoning_only:
            self.console.print(Text("(the reply ended while reasoning; --thinking-budget limits it)", style="dim"))

    def _switch(self, kind: str | None) -> None:
        """Finish showing the current kind of output and start the next."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._kind == "reasoning" and self.show_reasoning:
            self.console.print("\n")
        elif self._kind == "content":
            self.console.print(self._rendered(self.answer), soft_wrap=not self.markdown)
            self.answer = ""
        if kind == "prompt":
            self._start_live(Spinner("dots", Text("reading the prompt…", style="cyan")))
        elif kind == "reasoning" and not self.show_reasoning:
            self._start_live(Spinner("dots", Text("thinking…", style="cyan")))
        elif kind == "content":
            self._start_live(Text(""))
        self._kind = kind

    def _rendered(self, answer: str):
        return Markdown(answer) if self.markdown else Text(answer)

    def _start_live(self, renderable) -> None:
        # transient: a spinner leaves nothing behind, the live answer is replaced by its final render.
        self._live = Live(renderable, console=self.console, transient=True, refresh_per_second=8)
        self._live.start()


class StopRequest:
    """Ctrl-C while a reply streams: the first asks to stop at the next token, a second interrupts at once.

    ``interrupts=False`` (several ranks, which must stay in step): a second Ctrl-C only asks again.
    """

    def __init__(self, interrupts: bool = True):
        self.requested = False
        self.interrupts = interrupts
        self._previous = None

    def __enter__(self) -> StopRequest:
        self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _on_interrupt(self, signum, frame) -> None:
        if self.requested and self.interrupts:
            raise KeyboardInterrupt
        self.requested = True


class ChatRepl:
    """The read–command–stream loop around one conversation."""

    def __init__(
        self,
        conversation,
        console: Console,
        read_line: Callable[[str], str],
        *,
        model,
        processor,
        hide_thinking: bool,
        sessions_dir: Path,
        context_max: int,
        max_tokens: int,
        context_policy: str = "refuse",
    ):
        self.conversation = conversation
        self.console = console
        self.read_line = read_line  # read_line(default_text) -> the next input; raises EOFError / KeyboardInterrupt
        self.model = model
        self.processor = processor
        self.hide_thinking = hide_thinking
        self.sessions_dir = sessions_dir
        self.context_max = context_max
        self.max_tokens = max_tokens  # per reply, before the cap by the context left
        self.context_policy = context_policy  # when the conversation fills the context: refuse, or drop old turns
        self.attachments: list[dict] = []
        self.share = getattr(model, "share", None)  # rank 0 of several (mlx.launch), or None

    def run(self) -> None:
        """Read and handle lines until /exit or Ctrl-D."""
        self.console.print(Text(f"/help for commands. {INPUT_HELP}", style="dim"))
        default = ""
        while True:
            try:
                line = self.read_line(default)
            except KeyboardInterrupt:
                default = ""
                continue
            except EOFError:
                return
            default = ""
            sending, messages = False, len(self.conversation.messages)
            try:
                check_text(line, "the line")
                command = parse_command(line)
                if command is None:
                    text = message_text(line)
                    if text:
                        sending = True
                        self._send(text)
                elif command.name == "exit":
                    return
                elif command.name == "edit" and not command.argument:
                    default = self._last_user_text()
                else:
                    self._run_command(command)
            except Exception as e:  # a bug must not cost the conversation: one line, and the chat goes on
                if self._lost_peer(e):
                    raise  # no reply can run again: the chat ends with the one-line error (rank_errors)
                message = (
                    str(e) if isinstance(e, Qwen35Error) else f"unexpected {type(e).__name__}: {e} (please report it)"
                )
                self.console.print(Text(f"error: {message}", style="red"))
                if sending and len(self.conversation.messages) == messages:
                    default = line.strip()  # the message was not sent: back at the prompt, to edit

    def _send(self, text: str) -> None:
        content = self.attachments + [{"type": "text", "text": text}] if self.attachments else text
        self.attachments = []
        self._reply(lambda: self.conversation.send(content))

    def _reply(self, start: Callable[[], Iterator]) -> None:
        """Start a reply (send, retry or edit) and stream it; without a single token, the messages are as before."""
        before = list(self.conversation.messages)
        answered = False
        try:
            answered = self._stream_within_context(start())
        finally:
            if not answered:
                self.conversation.messages[:] = before
            if self.share is not None:
                from ..runtime.distributed import idle

                idle()  # waiting for the next line may take as long as it likes

    def _stream_within_context(self, events: Iterator) -> bool:
        """Stream a reply capped to the context left; refuse when the prompt alone fills it (the cache cannot drop tokens)."""
        # send/retry/edit change the messages at once and render lazily, so the prompt can be measured first.
        prompt_tokens = len(self.conversation.prompt_tokens())
        if self.context_policy == "drop-oldest":
            prompt_tokens = self._drop_oldest_turns(prompt_tokens)
        max_tokens = max_tokens_within_context(
            self.max_tokens,
            prompt_tokens,
            self.context_max,
            what="the conversation",
            fix="/edit the last message shorter or /reset"
            + (", or chat with --context-policy drop-oldest" if self.context_policy == "refuse" else ""),
        )
        self.conversation.settings = replace(self.conversation.settings, max_tokens=max_tokens)
        return self._stream(events, prompt_tokens)

    def _drop_oldest_turns(self, prompt_tokens: int) -> int:
        """Drop the oldest turns until a whole reply fits (or only the last message is left); the prompt's new length."""
        room_wanted = min(self.max_tokens, self.context_max // 2)
        messages, dropped = self.conversation.messages, 0
        while self.context_max - prompt_tokens < room_wanted:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if len(users) < 2:
                break
            dropped += users[1]
            del messages[: users[1]]
            prompt_tokens = len(self.conversation.prompt_tokens())
        if dropped:
            self.console.print(
                Text(
                    f"dropped the {dropped} oldest messages to fit the context ({self.context_max} tokens)", style="dim"
                )
            )
        return prompt_tokens

    def _lost_peer(self, error: Exception) -> bool:
        if self.share is None:
            return False
        from ..runtime.distributed import peer_lost

        return peer_lost(self.share, error) is not None

    def _run_command(self, command: Command) -> None:
        name, argument = command.name, command.argument
        if self.share is not None and name in ONE_PROCESS_COMMANDS:
            raise Qwen35Error(
                f"/{name} keeps one process's prompt cache, and each rank holds only its part: not under mlx.launch"
            )
        if name == "help":
            self._print_help()
        elif name == "reset":
            self.conversation.reset()
            self.attachments = []
            self.console.print(Text("new conversation", style="dim"))
        elif name == "retry":
            self._reply(self.conversation.retry)
        elif name == "edit":
            self._reply(lambda: self.conversation.edit(argument))
        elif name == "think":
            self.conversation.set_thinking(argument.lower() == "on")
            self.console.print(Text(f"reasoning {argument.lower()}", style="dim"))
        elif name in ("image", "video"):
            self.attachments.append(media_item(name, argument))
            self.console.print(Text(f"{name} {argument} goes with your next message", style="dim"))
        elif name == "save":
            from ..runtime.sessions import save_conversation

            path = save_conversation(self.conversation, session_path(self.sessions_dir, argument))
            self.console.print(Text(f"saved to {path}", style="dim"))
        elif name == "load":
            self._load(argument)
        elif name == "stats":
            self._print_stats()
        elif name == "sessions":
            names = saved_sessions(self.sessions_dir)
            listing = "\n".join(names) if names else f"no saved conversation in {self.sessions_dir} yet (/save NAME)"
            self.console.print(listing, highlight=False, markup=False)
        elif name == "system":
            self._system(argument)
        elif name == "set":
            self._set(argument)

    def _system(self, text: str) -> None:
        """Show the system prompt, or set it (``off``: none) for the next message on; the messages stay."""
        settings = self.conversation.settings
        if not text:
            self.console.print(Text(f"system prompt: {settings.system or '(none)'}", style="dim"))
            return
        system = None if text.lower() == "off" else text
        self.conversation.settings = replace(settings, system=system)
        said = "cleared" if system is None else "set"
        self.console.print(Text(f"system prompt {said}; it applies from the next message", style="dim"))

    def _set(self, argument: str) -> None:
        """Show the settings, or change one (``default``: back to the model card's preset)."""
        settings = self.conversation.settings
        if not argument:
            values = self.conversation.sampling() | {
                "max_tokens": self.max_tokens,
                "thinking_budget": settings.thinking_budget,
            }
            for key in SETTABLE:
                self.console.print(f"{key:<20} {values.get(key)}", highlight=False, markup=False)
            return
        key, value = parse_setting(argument)
        if key == "max_tokens":
            replace(settings, max_tokens=value)  # checked as the conversation's own settings are
            self.max_tokens = value
        elif key == "thinking_budget":
            self.conversation.settings = replace(settings, thinking_budget=value)
        else:
            sampling = {k: v for k, v in settings.sampling.items() if k != key}
            self.conversation.settings = replace(
                settings, sampling=sampling | ({key: value} if value is not None else {})
            )
        shown = "the preset's" if value is None else value
        self.console.print(Text(f"{key} {shown}", style="dim"))

    def _load(self, name: str) -> None:
        """Replace the conversation by a saved one, which brings its own settings (reasoning, sampling)."""
        from ..runtime.sessions import load_conversation

        path = session_path(self.sessions_dir, name)
        if not path.exists():
            known = ", ".join(saved_sessions(self.sessions_dir)) or "none"
            raise Qwen35Error(f"no saved conversation {name!r} in {self.sessions_dir} (saved: {known})")
        mtp = self.conversation.mtp  # the command line's choice, not the saved conversation's
        self.conversation = load_conversation(path, self.model, self.processor)
        self.conversation.mtp = mtp
        self.attachments = []
        reasoning = "on" if self.conversation.settings.enable_thinking else "off"
        self.console.print(
            Text(
                f"loaded {name}: {len(self.conversation.messages)} messages, "
                f"context {self.conversation.context_tokens} tokens, reasoning {reasoning}",
                style="dim",
            )
        )

    def _stream(self, events: Iterator, prompt_tokens: int) -> bool:
        """Show a reply as it streams; Ctrl-C stops it and leaves the session as it is. Whether a token came."""
        from ..runtime.prefill import PrefillCancelled
        from .progress import PrefillProgress

        view = ReplyView(self.console, show_reasoning=not self.hide_thinking, markdown=self.console.is_terminal)
        answered = cancelled = False
        alone = self.share is None
        with StopRequest(interrupts=alone) as stop:
            self.conversation.should_stop = PrefillProgress(
                self.conversation.cache.model_cache,
                prompt_tokens,
                self.conversation.settings.prefill_step_size,
                view.show_prefill,
                lambda: stop.requested,  # the first Ctrl-C during the prefill stops it at the next chunk
            )
            try:
                for event in events:
                    if event.text or event.kind == "tool_call":
                        view.add(event.kind, event.text, event.tool_call)
                    answered = True
                    if stop.requested:
                        if alone:
                            break
                        from ..runtime.distributed import stop_reply

                        stop_reply()  # every rank ends the reply within two tokens: read on to that end
            except KeyboardInterrupt:
                pass  # the second Ctrl-C: already marked as stopped
            except PrefillCancelled:
                cancelled = True
            finally:
                self.conversation.should_stop = None
                events.close()
                view.close(stop.requested and not cancelled)
        if cancelled:
            raise Qwen35Error(
                "stopped while reading the prompt, before the answer began; the conversation is as it was"
            )
        if answered:
            status = status_line(self.conversation.last_stats, self.context_max)
            self.console.print(Text(status, style="dim"), soft_wrap=True)
        return answered

    def _last_user_text(self) -> str:
        for message in reversed(self.conversation.messages):
            if message["role"] == "user":
                content = message["content"]
                return (
                    content
                    if isinstance(content, str)
                    else "".join(item.get("text", "") for item in content if item.get("type") == "text")
                )
        raise Qwen35Error("no message to edit yet")

    def _print_help(self) -> None:
        width = max(len(spec.usage) for spec in COMMANDS.values())
        for spec in COMMANDS.values():
            self.console.print(f"{spec.usage:<{width}}  {spec.help}", highlight=False, markup=False)
        self.console.print(Text(INPUT_HELP, style="dim"))

    def _print_stats(self) -> None:
        conversation = self.conversation
        last = conversation.last_stats
        sampling = ", ".join(f"{k} {v}" for k, v in conversation.sampling().items())
        # After /reset (or /load) nothing has run yet: the cache still holds the old tokens, but none is in use.
        ran = last.prompt_tokens > 0
        rows = [
            ("messages", len(conversation.messages)),
            ("context", f"{conversation.context_tokens if conversation.messages else 0}/{self.context_max} tokens"),
            (
                "last prompt",
                f"{last.prompt_tokens} tokens: {last.reused_tokens} reused from the cache, {last.prefilled_tokens} prefilled"
                if ran
                else "none yet",
            ),
            (
                "last reply",
                f"{last.generated_tokens} tokens at {last.generation_tps:.1f} tok/s, first after {last.time_to_first_token:.2f} s"
                if ran
                else "none yet",
            ),
            ("reasoning", "on" if conversation.settings.enable_thinking else "off"),
            ("system", conversation.settings.system or "(none)"),
            ("sampling", sampling),
            ("peak memory", f"{last.peak_memory_gb:.2f} GB" if ran else "none yet"),
        ]
        for label, value in rows:
            self.console.print(f"{label:<12} {value}", highlight=False, markup=False)


def banner(model: str, model_dir: Path | None, context_max: int, enable_thinking: bool) -> str:
    """The chat's first line: which model, how it is quantised, how much context, reasoning on or off."""
    from ..weights.local_models import quantization_label

    try:
        quantization = quantization_label(json.loads((Path(model_dir) / "config.json").read_text()))
    except (OSError, TypeError, ValueError):  # no directory (a processor made in code) or an unreadable config
        quantization = "unknown quantisation"
    thinking = "on" if enable_thinking else "off"
    return f"{model} · {quantization} · context {context_max:,} tokens · thinking {thinking}"


def prompt_reader(history_file: Path | None) -> Callable[[str], str]:
    """A line reader for a terminal: prompt_toolkit with history (None: this session's only); Esc-Enter and Ctrl-J insert a newline."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    @bindings.add("c-j")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    if history_file is not None:
        history_file.parent.mkdir(parents=True, exist_ok=True)
    history = FileHistory(str(history_file)) if history_file is not None else InMemoryHistory()
    session = PromptSession(
        history=history,
        key_bindings=bindings,
        prompt_continuation="… ",
        completer=_command_completer(),
        complete_while_typing=False,  # Tab completes; typing a message shows no menu
    )
    return lambda default: session.prompt("> ", default=default)


def command_completions(text: str) -> list[str]:
    """The /commands that complete ``text`` (the line so far), for Tab."""
    if not text.startswith("/") or text.startswith("//") or " " in text:
        return []
    return ["/" + name for name in COMMANDS if name.startswith(text[1:].lower())]


def _command_completer():
    """A prompt_toolkit completer over ``command_completions``."""
    from prompt_toolkit.completion import Completer, Completion

    class CommandCompleter(Completer):
        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            for command in command_completions(text):
                yield Completion(command, start_position=-len(text))

    return CommandCompleter()


def plain_reader(lines: Iterable[str]) -> Callable[[str], str]:
    """A line reader for piped input: one message per line, EOFError at the end."""
    iterator = iter(lines)

    def read(default: str) -> str:
        try:
            return next(iterator).rstrip("\n")
        except StopIteration:
            raise EOFError from None

    return read


def run_chat(
    *,
    model: str,
    system: str | None,
    enable_thinking: bool,
    thinking_budget: int | None,
    hide_thinking: bool,
    max_tokens: int,
    sampling_overrides: dict,
    seed: int | None,
    max_kv_size: int | None,
    kv_bits: int | None,
    sessions_dir: Path | None,
    max_pixels: int | None = None,
    kv_group_size: int = KV_GROUP_SIZE,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    no_history: bool = False,
    context_policy: str = "refuse",
    expert_memory: str | None = None,
    mtp: MTPSettings = MTPSettings(),
    parallel: str | None = None,
    split: str | None = None,
) -> None:
    """Load ``model`` and chat with it in the terminal until /exit or Ctrl-D.

    Under mlx.launch every rank runs this with the same arguments (``parallel`` / ``split``: how they share the
    model); rank 0 chats and hands each prompt to the others, which follow until it leaves.
    """
    import sys

    from ..runtime.conversation import Conversation, ConversationSettings
    from ..runtime.distributed import join_launched, rank_errors
    from ..runtime.rank_jobs import LeadingCache, end_jobs, follow_jobs
    from ..runtime.validation import check_numbers
    from ..weights.loading import load

    # Everything that can be wrong without the model is found before it loads (minutes, for a large one).
    settings = ConversationSettings(  # checks the sampling, lengths and --kv-bits
        system=system,
        enable_thinking=enable_thinking,
        sampling={k: v for k, v in sampling_overrides.items() if v is not None},
        max_tokens=max_tokens,
        thinking_budget=thinking_budget,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        prefill_step_size=prefill_step_size,
        max_pixels=max_pixels,
    )
    check_numbers(seed=seed, max_kv_size=max_kv_size)
    if system is not None:
        check_text(system, "--system-prompt")
    if context_policy not in CONTEXT_POLICIES:
        raise Qwen35Error(f"--context-policy {context_policy}: use {' or '.join(CONTEXT_POLICIES)}")
    share = join_launched(parallel, split, model)
    if share is not None and not share.leads:
        follow_jobs(*load(model, expert_memory=expert_memory, share=share), share, kv_bits, kv_group_size)
        return
    console = Console(highlight=False)
    with console.status(f"loading {model}"):
        model_obj, processor = load(model, expert_memory=expert_memory, share=share)
    context_max = min(max_kv_size or sys.maxsize, model_obj.config.text.max_position_embeddings)
    cache = None if share is None else LeadingCache(model_obj, processor, share, kv_bits, kv_group_size)
    conversation = Conversation(model_obj, processor, settings, seed=seed, cache=cache)
    conversation.mtp = mtp
    console.print(Text(banner(model, processor.model_dir, context_max, enable_thinking), style="bold"), soft_wrap=True)
    if sys.stdin.isatty():
        read_line = prompt_reader(None if no_history else state_dir() / "chat_history")
    else:  # bytes that are not UTF-8 kept as lone surrogates, for check_text to name, whatever the locale
        read_line = plain_reader(line.decode("utf-8", errors="surrogateescape") for line in sys.stdin.buffer)
    repl = ChatRepl(
        conversation,
        console,
        read_line,
        model=model_obj,
        processor=processor,
        hide_thinking=hide_thinking,
        sessions_dir=sessions_dir or default_sessions_dir(),
        context_max=context_max,
        max_tokens=max_tokens,
        context_policy=context_policy,
    )
    with rank_errors(share):
        try:
            repl.run()
        finally:
            if share is not None:
                end_jobs(share)  # every follower returns: all ranks end together
