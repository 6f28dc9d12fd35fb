"""The OpenAI API's request models and what turns them into our prompts: messages, images, tools, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from ...errors import Qwen35Error
from ...runtime.settings import RANGES

# ---------------------------------------------------------------- request models (the OpenAI API)

# A field the server does not know is refused (400 naming it) rather than dropped: a client that sends
# logit_bias must learn it had no effect. The few that change nothing about the answer are accepted.
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class ImageURL(BaseModel):
    url: str = Field(
        description="A data: URL (base64 image); a file path or file:// URL only inside the server's"
        " --allow-local-images directory. Remote URLs are not fetched."
    )
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    url: str = Field(description="A video file path or file:// URL inside the server's --allow-local-images directory.")


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


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
    model_config = ConfigDict(extra="forbid")  # the template reads no other switch
    enable_thinking: bool | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # always strict: constrained decoding cannot produce anything else


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions; a field not listed here is a 400.

    Bounds come from the runtime's rules (``RANGES``); an ``le`` / ``ge`` written here is the API's own, tighter limit.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(
        None, **RANGES["max_tokens"].bounds(), description="Most tokens to generate (capped by the server's limit)."
    )
    max_completion_tokens: int | None = Field(None, **RANGES["max_tokens"].bounds())
    temperature: float | None = Field(None, **RANGES["temp"].bounds(), le=2)
    top_p: float | None = Field(None, **RANGES["top_p"].bounds())
    top_k: int | None = Field(None, **RANGES["top_k"].bounds())
    min_p: float | None = Field(None, **RANGES["min_p"].bounds())
    presence_penalty: float | None = Field(None, **RANGES["presence_penalty"].bounds(), ge=-2, le=2)
    frequency_penalty: float | None = Field(None, **RANGES["frequency_penalty"].bounds(), ge=-2, le=2)
    repetition_penalty: float | None = Field(None, **RANGES["repetition_penalty"].bounds(), le=10)
    seed: int | None = Field(None, **RANGES["seed"].bounds())
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="Only one choice per request.")
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: the answer is constrained to JSON (matching the schema)."
    )
    user: str | None = None  # from here on: bookkeeping that changes nothing about the answer
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    thinking_budget: int | None = Field(
        None, **RANGES["thinking_budget"].bounds(), description="Close the thinking block after this many tokens."
    )
    logprobs: bool = Field(False, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: the likeliest N too.")


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(description="The text to continue, sent as is (no chat template).")
    logprobs: int | None = Field(None, ge=0, le=5, description="Each token's log-probability and the likeliest N.")


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and a message that says what to change."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.kind = message, status, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """The OpenAI error object; lone surrogates a client sent (and a message quotes) are escaped so it encodes."""
    message, param = (_encodable(text) if text is not None else None for text in (message, param))
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_unicode(body: BaseModel) -> None:
    """Refuse text holding lone UTF-16 surrogates (JSON escapes like \\ud800 alone): it is not Unicode, so it
    cannot be tokenised or sent back."""
    found = _lone_surrogate(body.model_dump(), "")
    if found is not None:
        where, char = found
        raise ApiError(f"{where}: {char!r} is a lone surrogate, not Unicode text; send valid UTF-8", param=where)


def _lone_surrogate(value: Any, where: str) -> tuple[str, str] | None:
    """Where the first lone surrogate is in a JSON-like value, and which it is."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return where or "body", e.object[e.start]
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        at = f"{where}.{key}" if where else str(key)
        found = (_lone_surrogate(key, at) if isinstance(key, str) else None) or _lone_surrogate(item, at)
        if found is not None:
            return found
    return None


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
    if first.get("type") == "extra_forbidden":
        return f"{param} is not supported by this server; leave it out", param
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


# ---------------------------------------------------------------- prompts


def image_source(url: str, local_images: Path | None = None) -> Any:
    """The PIL image an ``image_url`` names: a base64 data: URL, or a file inside ``local_images`` if the server allows one.

    Nothing is fetched from the network, and local files are off unless ``--allow-local-images DIR`` is given.
    """
    from ...processing.image import DATA_URL, URL_SCHEME, open_image

    if url[:5].lower() == "data:":
        if not DATA_URL.match(url):
            raise ApiError("image data: URLs must be base64 images: data:image/png;base64,...", param="image_url")
        source: str | Path = url
    elif URL_SCHEME.match(url) and url[:7].lower() != "file://":
        raise ApiError(
            f"remote image URLs are not fetched ({url[:80]!r}); send the image as a data: URL", param="image_url"
        )
    else:
        source = local_image_path(url, local_images)
    try:
        return open_image(source)
    except Qwen35Error as e:
        raise ApiError(str(e), param="image_url") from None


def local_image_path(url: str, root: Path | None) -> Path:
    """The file a path or file:// ``image_url`` names, if it lies inside ``root`` before and after resolving symlinks.

    Every refusal has the same message, whether or not the file exists, so a client learns nothing about the
    disk outside ``root``; ``..`` is refused outright so no path passes through directories outside it.
    """
    shown = repr(url[:200])
    if root is None:
        raise ApiError(
            f"local image files are off ({shown}); send the image as a data: URL, "
            "or start the server with --allow-local-images DIR",
            param="image_url",
        )
    refused = (
        f"image_url {shown} is not an image file inside the directory the server allows; give a path relative "
        "to it (or absolute, or a file:// URL) without '..', or send a data: URL"
    )
    try:
        text = url
        if url[:7].lower() == "file://":
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise ApiError(refused, param="image_url")
            text = unquote(parts.path)
        path = root / text  # an absolute path replaces root (itself absolute and normalised)
        real_root = root.resolve()
        # Lexically inside first, so resolving never walks (or probes) directories outside root.
        if ".." not in path.parts and (path.is_relative_to(root) or path.is_relative_to(real_root)):
            real = path.resolve()
            if real.is_relative_to(real_root) and real.is_file():
                return real
    except (OSError, ValueError, RuntimeError):  # NUL bytes, lone surrogates, symlink loops
        pass
    raise ApiError(refused, param="image_url")


def video_source(url: str, local_media: Path | None) -> str:
    """The path of the video file a ``video_url`` names, inside ``local_media`` (videos come from files only)."""
    from ...processing.image import URL_SCHEME

    if url[:5].lower() == "data:" or (URL_SCHEME.match(url) and url[:7].lower() != "file://"):
        raise ApiError(
            f"video_url {url[:80]!r}: videos are read from files only; give a path inside the server's "
            "--allow-local-images directory",
            param="video_url",
        )
    return str(local_image_path(url, local_media))


def _template_part(part: TextPart | ImagePart | VideoPart, local_images: Path | None) -> dict:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        return {"type": "image", "image": image_source(part.image_url.url, local_images)}
    return {"type": "video", "video": video_source(part.video_url.url, local_images)}


def _template_content(
    content: str | list[TextPart | ImagePart | VideoPart] | None, local_images: Path | None
) -> str | list[dict] | None:
    if not isinstance(content, list):
        return content
    return [_template_part(part, local_images) for part in content]


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


def template_messages(messages: list[ChatMessage], local_images: Path | None = None) -> list[dict]:
    """Messages as the chat template reads them: images as PIL images (see ``image_source``), tool arguments as dicts."""
    rendered = []
    for message in messages:
        item: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
        item["content"] = _template_content(message.content, local_images)
        if message.reasoning_content is not None:
            item["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            item["tool_calls"] = [_template_tool_call(call) for call in message.tool_calls]
        rendered.append(item)
    return rendered


def has_vision(messages: list[dict]) -> bool:
    """Whether any message carries an image or a video part."""
    return any(
        isinstance(m["content"], list) and any(p["type"] in ("image", "video") for p in m["content"]) for m in messages
    )


def requested_logprobs(request: ChatCompletionRequest) -> int | None:
    """How many alternatives each token's logprobs list (None: no logprobs); top_logprobs alone is refused."""
    if not request.logprobs:
        if request.top_logprobs is not None:
            raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return request.top_logprobs or 0


def response_schema(response_format: ResponseFormat | None) -> dict | None:
    """The JSON schema the answer must match (None: free text); json_object is any object."""
    from ...runtime.structured_output import ANY_OBJECT, check_schema

    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return ANY_OBJECT
    if response_format.json_schema is None:
        raise ApiError(
            "response_format json_schema needs a json_schema object: {name, schema}", param="response_format"
        )
    schema = response_format.json_schema.schema_ or ANY_OBJECT
    try:
        check_schema(schema)
    except Qwen35Error as e:
        raise ApiError(str(e), param="response_format.json_schema.schema") from None
    return schema


def offered_tools(request: ChatCompletionRequest) -> list[dict] | None:
    """The tools the template shows the model: none for tool_choice "none", only the named one for a named choice."""
    if request.tool_choice == "required":
        raise ApiError(
            "tool_choice 'required' is not supported (the server cannot force a call); use 'auto' or name the tool",
            param="tool_choice",
        )
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
