"""The OpenAI API's request models and what turns them into our prompts: messages, images, tools, errors."""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

# ---------------------------------------------------------------- request models (the OpenAI API)

MAX_SEED = 2**63 - 1


class ImageURL(BaseModel):
    url: str = Field(
        description="A data: URL (base64 image) or a local file path / file:// URL; remote URLs are refused."
    )
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON object, encoded as a string.")


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="allow")
    enable_thinking: bool | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions; unknown OpenAI fields are accepted and ignored."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (capped by the server's limit).")
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="Only one choice per request.")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    thinking_budget: int | None = Field(None, ge=0, description="Close the thinking block after this many tokens.")


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(description="The text to continue, sent as is (no chat template).")


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and a message that says what to change."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.kind = message, status, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field (pydantic's list is long and repetitive for unions)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


# ---------------------------------------------------------------- prompts


def image_source(url: str) -> Any:
    """What the processor takes for an ``image_url``: a PIL image for data: URLs, a path for local files."""
    if url.startswith(("http://", "https://")):
        raise ApiError(
            "remote image URLs are not fetched; send the image as a data: URL or a local file path", param="image_url"
        )
    if url.startswith("data:"):
        from PIL import Image, UnidentifiedImageError

        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ApiError("image data: URLs must be base64 encoded (data:image/png;base64,...)", param="image_url")
        try:
            image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
            image.load()
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
            raise ApiError(f"image data: URL does not hold a readable image ({e})", param="image_url") from e
        return image
    try:  # "~nobody", NUL bytes or lone surrogates make these raise rather than return False
        path = Path(url.removeprefix("file://")).expanduser()
        found = path.is_file()
    except (RuntimeError, OSError, ValueError):
        found = False
    if not found:
        raise ApiError(f"image file not found: {url!r}; give an existing local file or a data: URL", param="image_url")
    return str(path)


def _template_content(content: str | list[TextPart | ImagePart] | None) -> str | list[dict] | None:
    if not isinstance(content, list):
        return content
    return [
        {"type": "text", "text": part.text}
        if isinstance(part, TextPart)
        else {"type": "image", "image": image_source(part.image_url.url)}
        for part in content
    ]


def _template_tool_call(call: ToolCall) -> dict:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError as e:
        raise ApiError(
            f"tool call {call.function.name}: arguments are not valid JSON ({e})", param="messages.tool_calls"
        ) from e
    if not isinstance(arguments, dict):
        raise ApiError(f"tool call {call.function.name}: arguments must be a JSON object", param="messages.tool_calls")
    return {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template reads them: image parts as ``{"type": "image"}``, tool arguments as dicts."""
    rendered = []
    for message in messages:
        item: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
        item["content"] = _template_content(message.content)
        if message.reasoning_content is not None:
            item["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            item["tool_calls"] = [_template_tool_call(call) for call in message.tool_calls]
        rendered.append(item)
    return rendered


def has_images(messages: list[dict]) -> bool:
    """Whether any message carries an image part."""
    return any(isinstance(m["content"], list) and any(p["type"] == "image" for p in m["content"]) for m in messages)


def offered_tools(request: ChatCompletionRequest) -> list[dict] | None:
    """The tools the template shows the model: none for tool_choice "none", only the named one for a named choice."""
    if not request.tools or request.tool_choice == "none":
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    if isinstance(request.tool_choice, NamedToolChoice):
        tools = [t for t in tools if t["function"]["name"] == request.tool_choice.function.name]
        if not tools:
            raise ApiError(
                f"tool_choice names {request.tool_choice.function.name!r}, which is not in tools", param="tool_choice"
            )
    return tools
