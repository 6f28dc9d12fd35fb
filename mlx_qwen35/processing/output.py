"""What the model wrote, split into reasoning, answer text and tool calls — whole or while streaming.

With thinking on, the generation prompt opens ``<think>\\n`` and the model closes it with
``</think>``; everything before that is reasoning. Tool calls come in the qwen3_coder XML format
that the chat template teaches (docs/architecture.md §13)::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

Values are typed by the tool's JSON schema when it names a type, else JSON-decoded when they are
valid JSON (numbers, booleans, objects, arrays, null), else kept as the string. A call that cannot
be parsed is reported as a ``ToolCall`` with ``error`` and the raw text, never dropped; in the answer
a reader sees (``ShownAnswer``) it stays as text where it was.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import Qwen35Error

THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)

PieceKind = Literal["reasoning", "content", "tool_call"]


@dataclass
class ToolCall:
    """One call the model asked for; ``error`` (with ``raw``) when the block could not be parsed."""

    name: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""
    error: str | None = None

    def to_dict(self) -> dict:
        """``{name, arguments}``, or ``{error, raw}`` for a malformed call."""
        if self.error is not None:
            return {"error": self.error, "raw": self.raw}
        return {"name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class OutputPiece:
    """A run of output of one kind; for ``tool_call``, ``text`` is the raw block and ``tool_call`` the parsed call."""

    kind: PieceKind
    text: str
    tool_call: ToolCall | None = None


@dataclass
class ParsedOutput:
    """A whole reply, split: reasoning, answer text, tool calls (malformed ones included, with ``error``)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def _parameter_schemas(function_name: str, tools: list[dict] | None) -> dict:
    """The ``properties`` of the named tool's parameters schema (OpenAI ``{"function": …}`` or bare form)."""
    for tool in tools or []:
        spec = tool.get("function", tool)
        if spec.get("name") == function_name:
            return (spec.get("parameters") or {}).get("properties") or {}
    return {}


def _typed_value(raw: str, schema: dict | None) -> Any:
    """The parameter value as its schema's type says, else as JSON when it is valid JSON, else the string."""
    types = (schema or {}).get("type")
    types = {types} if isinstance(types, str) else set(types or [])
    if types and types <= {"string"}:
        return raw
    if "boolean" in types and raw in ("True", "False"):
        return raw == "True"  # the chat template renders a bool argument of a past call Python-style
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    # A declared string type wins over JSON that happens to parse ("007", "true" for a name field).
    if "string" in types and not _matches_type(value, types - {"string"}):
        return raw
    return value


def _matches_type(value: Any, types: set[str]) -> bool:
    """Whether a decoded JSON value is of one of the JSON-schema ``types``."""
    checks = {
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "null": lambda v: v is None,
    }
    return any(checks.get(t, lambda v: False)(value) for t in types)


def _strip_one_newline(value: str) -> str:
    """The template writes ``\\nVALUE\\n`` between the parameter tags; take off exactly that."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def parse_tool_call(block: str, tools: list[dict] | None = None) -> ToolCall:
    """Parse one ``<tool_call>…</tool_call>`` block (tags included or not) into a ``ToolCall``."""
    body = block.strip()
    body = body.removeprefix(TOOL_CALL_OPEN).removesuffix(TOOL_CALL_CLOSE)
    match = _FUNCTION.fullmatch(body)
    if match is None:
        return ToolCall(None, raw=block, error="expected <function=NAME> … </function> inside <tool_call>")
    name, inner = match.group(1).strip(), match.group(2)
    schemas = _parameter_schemas(name, tools)
    arguments: dict[str, Any] = {}
    for parameter in _PARAMETER.finditer(inner):
        key = parameter.group(1).strip()
        if key in arguments:
            return ToolCall(name, raw=block, error=f"parameter {key!r} given twice")
        arguments[key] = _typed_value(_strip_one_newline(parameter.group(2)), schemas.get(key))
    leftover = _PARAMETER.sub("", inner).strip()
    if leftover:
        return ToolCall(name, raw=block, error=f"unexpected text in <function={name}>: {leftover[:80]!r}")
    return ToolCall(name, arguments, raw=block)


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is the start of ``tag`` (held back: it may be the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class OutputParser:
    """Splits streamed text into reasoning, answer and tool-call pieces; never emits part of a tag as text.

    ``feed`` each new text segment, then ``finish`` once; ``pieces`` keeps every piece returned so far.
    Whitespace around the tags (the template's ``\\n</think>\\n\\n`` and the newlines around calls) is
    dropped, as the template drops it on re-rendering.
    """

    def __init__(self, thinking: bool, tools: list[dict] | None = None):
        self.mode: PieceKind = "reasoning" if thinking else "content"
        self.tools = tools
        self.pieces: list[OutputPiece] = []
        self.finished = False
        self._pending = ""
        self._at_start = True  # at the start, after </think> or after a call: leading whitespace is layout

    def feed(self, text: str) -> list[OutputPiece]:
        """Pieces completed by ``text`` (possibly none while a tag may be forming)."""
        pieces = self._split(text)
        self.pieces += pieces
        return pieces

    def finish(self) -> list[OutputPiece]:
        """What is left at the end of the output; an unterminated tool call is reported as malformed."""
        pieces = self._rest()
        self.pieces += pieces
        self.finished = True
        return pieces

    def _split(self, text: str) -> list[OutputPiece]:
        self._pending += text
        pieces: list[OutputPiece] = []
        while True:
            if self._at_start and self.mode != "tool_call":
                self._pending = self._pending.lstrip()
                if not self._pending:
                    return pieces
                self._at_start = False
            if self.mode == "reasoning":
                end = self._pending.find(THINK_CLOSE)
                if end == -1:
                    self._emit_safe(pieces, THINK_CLOSE)
                    return pieces
                self._emit(pieces, self._pending[:end].rstrip())
                self._pending = self._pending[end + len(THINK_CLOSE) :]
                self.mode, self._at_start = "content", True
            elif self.mode == "content":
                start = self._pending.find(TOOL_CALL_OPEN)
                if start == -1:
                    self._emit_safe(pieces, TOOL_CALL_OPEN)
                    return pieces
                self._emit(pieces, self._pending[:start].rstrip())
                self._pending = self._pending[start:]
                self.mode = "tool_call"
            else:
                end = self._pending.find(TOOL_CALL_CLOSE)
                if end == -1:
                    return pieces
                end += len(TOOL_CALL_CLOSE)
                block, self._pending = self._pending[:end], self._pending[end:]
                pieces.append(OutputPiece("tool_call", block, parse_tool_call(block, self.tools)))
                self.mode, self._at_start = "content", True

    def _rest(self) -> list[OutputPiece]:
        rest, self._pending = self._pending, ""
        if self.mode == "tool_call":
            call = ToolCall(None, raw=rest, error=f"the output ended inside <tool_call> (no {TOOL_CALL_CLOSE})")
            return [OutputPiece("tool_call", rest, call)]
        rest = rest.rstrip()
        return [OutputPiece(self.mode, rest)] if rest else []

    def _emit(self, pieces: list[OutputPiece], text: str) -> None:
        if text:
            pieces.append(OutputPiece(self.mode, text))

    def _emit_safe(self, pieces: list[OutputPiece], tag: str) -> None:
        """Emit the pending text except what may start ``tag`` and trailing whitespace (it may precede the tag)."""
        held = _partial_tag_length(self._pending, tag)
        safe = self._pending[: len(self._pending) - held]
        text = safe.rstrip()
        self._emit(pieces, text)
        self._pending = self._pending[len(text) :]


def parse_output(text: str, thinking: bool, tools: list[dict] | None = None) -> ParsedOutput:
    """Split a whole reply (``thinking``: the prompt left a ``<think>`` block open) into its parts."""
    parser = OutputParser(thinking, tools)
    return collect(parser.feed(text) + parser.finish())


def collect(pieces: list[OutputPiece]) -> ParsedOutput:
    """Join streamed pieces into one ``ParsedOutput``."""
    parsed = ParsedOutput()
    previous = None
    for piece in pieces:
        if piece.kind == "reasoning":
            parsed.reasoning += piece.text
        elif piece.kind == "content":
            # Text on both sides of a call was separated by it: keep them apart.
            parsed.content += ("\n\n" if previous == "tool_call" and parsed.content else "") + piece.text
        else:
            parsed.tool_calls.append(piece.tool_call)
        previous = piece.kind
    return parsed


class ShownAnswer:
    """The answer as a reader sees it: the text, and each malformed tool call's raw block where it was.

    A call that cannot be parsed stays visible as text rather than vanishing. A blank line separates the
    text on either side of a call, as ``collect`` does; text streamed in several pieces joins as it came.
    """

    def __init__(self):
        self.text = ""
        self._after_call = False

    @classmethod
    def of(cls, pieces: list[OutputPiece]) -> ShownAnswer:
        """The answer of a whole reply."""
        answer = cls()
        for piece in pieces:
            answer.add(piece)
        return answer

    def add(self, piece: OutputPiece) -> str:
        """The text ``piece`` adds to the answer: "" for reasoning and for a well-formed call."""
        if piece.kind == "reasoning":
            return ""
        malformed = piece.kind == "tool_call" and piece.tool_call.error is not None
        if piece.kind == "tool_call" and not malformed:
            self._after_call = True
            return ""
        text = ("\n\n" if (malformed or self._after_call) and self.text else "") + piece.text
        self._after_call = malformed
        self.text += text
        return text


def read_tools_file(path: str | Path) -> list[dict]:
    """Tool schemas from a JSON file: a list of OpenAI-style tools, or an object with a ``tools`` list."""
    path = Path(path)
    try:
        tools = json.loads(path.read_text())
    except OSError as e:
        raise Qwen35Error(f"{path}: cannot read the tools file ({e.strerror})") from None
    except ValueError as e:
        raise Qwen35Error(f"{path}: not valid JSON ({e}); give a list of tool schemas") from None
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "name" in t.get("function", t) for t in tools):
        raise Qwen35Error(
            f'{path}: expected a list of tools like [{{"type": "function", "function": {{"name": …, "parameters": …}}}}]'
        )
    return tools
