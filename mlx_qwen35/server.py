"""OpenAI-compatible HTTP server (FastAPI + uvicorn) and the chat page at ``/``.

One model in memory, owned by one worker thread that runs one generation at a time in arrival
order: MLX work never interleaves, and every request waits its turn in the queue. Handlers are thin:
they validate the request (typed models below), hand a ``GenerationJob`` to the worker, and turn
the worker's events into an OpenAI response, streamed as server-sent events or whole.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from .errors import Qwen35Error

log = logging.getLogger("mlx_qwen35.server")

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


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
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


# ---------------------------------------------------------------- the worker


@dataclass
class Started:
    """The prompt is ready and generation begins."""

    prompt_tokens: int
    cached_tokens: int


@dataclass
class Token:
    """One generated token's text and the running statistics, as plain Python values.

    The worker never hands MLX arrays (the logprobs) to the event-loop thread: an array freed
    there while the worker evaluates its graph races with the evaluation.
    """

    text: str
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float

    @classmethod
    def of(cls, response: Any) -> Token:
        """From an mlx-lm ``GenerationResponse``."""
        return cls(
            response.text,
            response.finish_reason,
            response.prompt_tokens,
            response.generation_tokens,
            response.prompt_tps,
            response.generation_tps,
            response.peak_memory,
        )


@dataclass
class Failed:
    """The job could not run; ``message`` says why (a user error unless ``internal``)."""

    message: str
    internal: bool = False


@dataclass
class Finished:
    """The worker is done with the job (after the last token, a cancel or a failure)."""


@dataclass
class GenerationJob:
    """One request's generation: the prompt (chat messages or raw text) and ``stream_generate``'s options."""

    prompt: list[dict] | str
    options: dict
    emit: Callable[[Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


Generate = Callable[..., Iterator[Any]]


class GenerationWorker:
    """Owns the model: loads it and runs every job on one thread, one at a time, in arrival order.

    MLX arrays stay on the thread that made them (Metal streams are per thread), so loading,
    image preprocessing and generation all happen here, never in a request handler.

    The model's one cache (a ``ConversationCache``) goes from request to request: a chat client sends
    the whole history every time, and the cache's checkpoints at turn boundaries and prompt ends let
    the next request prefill only what follows the longest prefix it shares with an earlier one.
    ``generate`` replaces all that with a stand-in for ``stream_generate`` (tests script replies with it).
    """

    def __init__(self, loader: Callable[[], tuple[Any, Any]], generate: Generate | None = None):
        self._loader = loader
        self._generate = generate
        self.prompt_cache = None  # the ConversationCache, made on the worker thread once the model is loaded
        self._jobs: queue.Queue[GenerationJob | None] = queue.Queue()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.model = self.processor = None
        self.busy = False
        self.last_stats: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="mlx-qwen35-generation", daemon=True)

    def start(self, wait: bool = True) -> None:
        """Start the thread (it loads the model first); with ``wait``, return once the model is loaded."""
        self._thread.start()
        if wait:
            self._ready.wait()
            if self._load_error is not None:
                raise self._load_error

    def stop(self) -> None:
        """Finish the job in hand and stop the thread; queued jobs are dropped."""
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: GenerationJob) -> None:
        """Queue a job; its events arrive through ``job.emit``."""
        self._jobs.put(job)

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def _run(self) -> None:
        try:
            self.model, self.processor = self._loader()
            if self._generate is None:
                from .conversation import ConversationCache

                self.prompt_cache = ConversationCache(self.model, self.processor)
        except BaseException as e:  # reported to start(); the thread has nothing left to do
            self._load_error = e
            return
        finally:
            self._ready.set()
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            self.busy = True
            try:
                self._run_job(job)
            finally:
                self.busy = False
                job.emit(Finished())

    def _prompt(self, job: GenerationJob) -> tuple[Any, int]:
        """The prompt as ``stream_generate`` takes it (ids, or ModelInputs with images) and its length."""
        from .generation import prompt_token_ids

        thinking, tools = job.options.get("enable_thinking", True), job.options.get("tools")
        if isinstance(job.prompt, list) and has_images(job.prompt):
            if not callable(self.processor):
                raise Qwen35Error("this build's processor cannot read images yet; send text only")
            inputs = self.processor(job.prompt, enable_thinking=thinking, tools=tools)
            return inputs, len(prompt_token_ids(self.processor, inputs))
        ids = prompt_token_ids(self.processor, job.prompt, thinking, tools)
        return ids, len(ids)

    def _start(self, prompt: Any, options: dict) -> tuple[Iterator[Any], int]:
        """The generation of ``prompt`` and how many of its tokens came from the cache (prefilled up to the reply start)."""
        if self.prompt_cache is None:
            return self._generate(self.model, self.processor, prompt, **options), 0
        from .processing.inputs import ModelInputs

        inputs = prompt if isinstance(prompt, ModelInputs) else ModelInputs(prompt)
        generation = self.prompt_cache.stream(inputs, **options)
        return generation, self.prompt_cache.reused_tokens

    def _run_job(self, job: GenerationJob) -> None:
        from jinja2 import TemplateError

        try:
            prompt, prompt_tokens = self._prompt(job)
        except (Qwen35Error, TemplateError, ValueError, TypeError) as e:
            job.emit(Failed(f"cannot build the prompt: {e}"))
            return
        generation = None
        try:
            generation, cached_tokens = self._start(prompt, job.options)
            job.emit(Started(prompt_tokens=prompt_tokens, cached_tokens=cached_tokens))
            for response in generation:
                token = Token.of(response)
                job.emit(token)
                self.last_stats = {k: v for k, v in vars(token).items() if k not in ("text", "finish_reason")}
                if job.cancelled.is_set():
                    return
        except Qwen35Error as e:
            job.emit(Failed(str(e)))
        except Exception as e:  # the server must outlive a bad generation; the client gets a 500-class error
            log.exception("generation failed (options %s)", job.options)
            job.emit(Failed(f"{type(e).__name__}: {e}", internal=True))
        finally:
            # A cancelled generation has the next token in flight (async_eval); let it land before
            # the next job touches the model or the random state.
            if generation is not None:
                generation.close()
            import mlx.core as mx

            mx.synchronize()


@dataclass
class Cancelled:
    """The client went away (or the handler gave up); the worker stops at its next token."""


class JobEvents:
    """The async side of a job: the handler awaits the worker's events; a client that disconnects cancels the job."""

    def __init__(self, worker: GenerationWorker, request: Request, prompt: list[dict] | str, options: dict):
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()

        def emit(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(self._events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                self.job.cancelled.set()

        self.job = GenerationJob(prompt=prompt, options=options, emit=emit)
        worker.submit(self.job)
        self._watcher = asyncio.create_task(self._watch_disconnect(request))

    async def _watch_disconnect(self, request: Request) -> None:
        # uvicorn answers every pending receive() with http.disconnect, so this can run beside
        # StreamingResponse's own listener.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()

    async def next(self) -> Any:
        """The next event from the worker (``Cancelled`` once the client has gone)."""
        return await self._events.get()

    def cancel(self) -> None:
        """Stop the generation at its next token (or skip it if it has not started)."""
        if not self.job.cancelled.is_set():
            self.job.cancelled.set()
            self._events.put_nowait(Cancelled())

    def close(self) -> None:
        """The handler is done: stop watching, and stop the generation if it is still running."""
        self._watcher.cancel()
        self.job.cancelled.set()


# ---------------------------------------------------------------- generation options


@dataclass
class ServerSettings:
    """What the server was started with."""

    model_id: str
    api_key: str | None = None
    max_tokens: int = 32768  # the default and the cap of a request's max_tokens


def generation_options(request: SamplingRequest, settings: ServerSettings, enable_thinking: bool) -> dict:
    """``stream_generate`` keyword arguments: the model card's preset for the mode, overridden by the request."""
    from .generation import recommended_sampling

    options = recommended_sampling(enable_thinking)
    overrides = dict(
        temp=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        presence_penalty=request.presence_penalty,
    )
    options.update({k: v for k, v in overrides.items() if v is not None})
    requested = request.max_completion_tokens or request.max_tokens or settings.max_tokens
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    options.update(
        max_tokens=min(requested, settings.max_tokens),
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
        stop=[s for s in stop or [] if s] or None,
        enable_thinking=enable_thinking,
    )
    return options


# ---------------------------------------------------------------- responses


def _usage(started: Started, last: Any) -> dict:
    completion = last.generation_tokens if last is not None else 0
    return {
        "prompt_tokens": started.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": started.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": started.cached_tokens},
    }


def _timings(last: Any) -> dict:
    """Speed and memory of the generation (llama.cpp's server reports ``timings`` the same way)."""
    if last is None:
        return {}
    return {
        "prompt_tps": round(last.prompt_tps, 2),
        "generation_tps": round(last.generation_tps, 2),
        "peak_memory_gb": round(last.peak_memory_gb, 3),
    }


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def first_event(events: JobEvents) -> Started:
    """Wait for the job to reach the model; prompt errors become a 400 before any response starts."""
    event = await events.next()
    if isinstance(event, Failed):
        raise ApiError(
            event.message,
            status=500 if event.internal else 400,
            kind="server_error" if event.internal else "invalid_request_error",
        )
    if not isinstance(event, Started):
        raise ApiError("the request was cancelled before it started", status=499)
    return event


class ChatReply:
    """Accumulates a chat reply from the model's text: reasoning, answer, tool calls (OpenAI shapes)."""

    def __init__(self, thinking: bool, tools: list[dict] | None):
        from .processing.output import OutputParser

        self._parser = OutputParser(thinking, tools)
        self.reasoning, self.content, self.tool_calls = "", "", []

    def feed(self, text: str) -> list[dict]:
        """Deltas (OpenAI ``delta`` objects) completed by ``text``."""
        return self._deltas(self._parser.feed(text))

    def finish(self) -> list[dict]:
        """Deltas for what the parser held back until the end."""
        return self._deltas(self._parser.finish())

    def _deltas(self, pieces: list) -> list[dict]:
        deltas = []
        for piece in pieces:
            if piece.kind == "reasoning":
                self.reasoning += piece.text
                deltas.append({"reasoning_content": piece.text})
            elif piece.kind == "content" or piece.tool_call.error is not None:
                # A malformed call stays visible as text rather than vanishing.
                text = ("\n\n" if self.content else "") + piece.text if piece.kind == "tool_call" else piece.text
                self.content += text
                deltas.append({"content": text})
            else:
                call = {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {
                        "name": piece.tool_call.name,
                        "arguments": json.dumps(piece.tool_call.arguments, ensure_ascii=False),
                    },
                }
                deltas.append({"tool_calls": [{"index": len(self.tool_calls), **call}]})
                self.tool_calls.append(call)
        return deltas

    def finish_reason(self, model_reason: str | None) -> str:
        """ "tool_calls" when the model called tools, else the generation's reason ("stop", "length")."""
        return "tool_calls" if self.tool_calls and model_reason == "stop" else model_reason or "stop"


class Completion:
    """Fields every response of one request shares."""

    def __init__(self, kind: Literal["chat.completion", "text_completion"], model_id: str):
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        self.id, self.kind, self.model_id, self.created = (
            f"{prefix}-{uuid.uuid4().hex}",
            kind,
            model_id,
            int(time.time()),
        )

    def body(self, choices: list[dict], **extra: Any) -> dict:
        """A response (or, with ``chunk``, an SSE chunk) object around ``choices``."""
        chunk = extra.pop("chunk", False)
        kind = self.kind + (".chunk" if chunk and self.kind == "chat.completion" else "")
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
            **extra,
        }


async def stream_chat(
    events: JobEvents, started: Started, reply: ChatReply, completion: Completion, include_usage: bool
) -> AsyncIterator[str]:
    """SSE chunks of a chat completion: role, then reasoning/content/tool-call deltas, then the finish reason."""
    try:
        yield _sse(
            completion.body(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], chunk=True
            )
        )
        last = None
        while not isinstance(event := await events.next(), (Finished, Cancelled)):
            if isinstance(event, Failed):
                yield _sse(error_body(event.message, "server_error" if event.internal else "invalid_request_error"))
                return
            last = event
            deltas = reply.feed(event.text) + (reply.finish() if event.finish_reason else [])
            for delta in deltas:
                yield _sse(completion.body([{"index": 0, "delta": delta, "finish_reason": None}], chunk=True))
            if event.finish_reason:
                final = completion.body(
                    [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason(event.finish_reason)}],
                    chunk=True,
                    usage=_usage(started, last),
                    timings=_timings(last),
                )
                yield _sse(final)
        if include_usage and last is not None:
            yield _sse(completion.body([], chunk=True, usage=_usage(started, last)))
        yield _sse("[DONE]")
    finally:
        events.close()


async def stream_text(
    events: JobEvents, started: Started, completion: Completion, include_usage: bool
) -> AsyncIterator[str]:
    """SSE chunks of a text completion."""
    try:
        last = None
        while not isinstance(event := await events.next(), (Finished, Cancelled)):
            if isinstance(event, Failed):
                yield _sse(error_body(event.message, "server_error" if event.internal else "invalid_request_error"))
                return
            last = event
            choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason}
            extra = dict(usage=_usage(started, last), timings=_timings(last)) if event.finish_reason else {}
            yield _sse(completion.body([choice], **extra))
        if include_usage and last is not None:
            yield _sse(completion.body([], usage=_usage(started, last)))
        yield _sse("[DONE]")
    finally:
        events.close()


async def collect_events(events: JobEvents) -> tuple[str, Any]:
    """All the text of a job and its last response; a failure or cancel raises ``ApiError``."""
    try:
        text, last = [], None
        while not isinstance(event := await events.next(), Finished):
            if isinstance(event, Cancelled):
                raise ApiError("the client closed the request", status=499)
            if isinstance(event, Failed):
                raise ApiError(
                    event.message,
                    status=500 if event.internal else 400,
                    kind="server_error" if event.internal else "invalid_request_error",
                )
            text.append(event.text)
            last = event
        return "".join(text), last
    finally:
        events.close()


# ---------------------------------------------------------------- the app


def web_root() -> Path:
    """The chat page: ``mlx_qwen35/app/web`` inside a wheel, ``app/web`` beside the package in a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "app" / "web", package.parent / "app" / "web"):
        if (candidate / "index.html").is_file():
            return candidate
    raise Qwen35Error(
        f"the chat page is missing (looked in {package / 'app' / 'web'} and {package.parent / 'app' / 'web'}); reinstall mlx-qwen35"
    )


def create_app(worker: GenerationWorker, settings: ServerSettings) -> FastAPI:
    """The FastAPI app: the OpenAI routes under /v1, /health, and the chat page at /."""
    app = FastAPI(title="mlx-qwen35", version="0.1.0", description="OpenAI-compatible API for Qwen3.5 on MLX.")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(ApiError)
    async def refused(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(Qwen35Error)
    async def user_error(_: Request, exc: Qwen35Error) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), status_code=400)

    def authorized(request: Request) -> None:
        if settings.api_key and request.headers.get("authorization") != f"Bearer {settings.api_key}":
            raise ApiError(
                "missing or wrong API key: send 'Authorization: Bearer <key>'", status=401, kind="authentication_error"
            )

    api = [Depends(authorized)]
    error_responses = {400: {"description": "Invalid request"}, 401: {"description": "Missing or wrong API key"}}

    @app.get("/health")
    def health() -> dict:
        """Liveness and the worker's state: queue length and the last generation's speed and memory."""
        return {
            "status": "ok",
            "model": settings.model_id,
            "busy": worker.busy,
            "queued": worker.queued,
            **worker.last_stats,
        }

    @app.get("/v1/models", dependencies=api, responses=error_responses)
    def models() -> dict:
        """The one model this server holds."""
        return {
            "object": "list",
            "data": [{"id": settings.model_id, "object": "model", "created": 0, "owned_by": "mlx-qwen35"}],
        }

    @app.post("/v1/chat/completions", dependencies=api, responses=error_responses)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Chat completion (streamed as server-sent events with ``stream: true``)."""
        thinking = (body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else None) is not False
        tools = offered_tools(body)
        options = generation_options(body, settings, thinking) | {
            "tools": tools,
            "thinking_budget": body.thinking_budget,
        }
        events = JobEvents(worker, request, template_messages(body.messages), options)
        try:
            started = await first_event(events)
        except ApiError:
            events.close()
            raise
        completion, reply = Completion("chat.completion", settings.model_id), ChatReply(thinking, tools)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_chat(events, started, reply, completion, include_usage), media_type="text/event-stream"
            )
        text, last = await collect_events(events)
        reply.feed(text)
        reply.finish()
        message = {
            "role": "assistant",
            "content": reply.content or (None if reply.tool_calls else ""),
            "reasoning_content": reply.reasoning or None,
        }
        if reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": reply.finish_reason(last.finish_reason if last else None),
            "logprobs": None,
        }
        return completion.body([choice], usage=_usage(started, last), timings=_timings(last))

    @app.post("/v1/completions", dependencies=api, responses=error_responses)
    async def completions(body: CompletionRequest, request: Request):
        """Text completion of a raw prompt (no chat template; streamed with ``stream: true``)."""
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise ApiError("prompt must be one non-empty string", param="prompt")
        events = JobEvents(worker, request, prompts[0], generation_options(body, settings, enable_thinking=False))
        try:
            started = await first_event(events)
        except ApiError:
            events.close()
            raise
        completion = Completion("text_completion", settings.model_id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_text(events, started, completion, include_usage), media_type="text/event-stream"
            )
        text, last = await collect_events(events)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason if last else "stop"}
        return completion.body([choice], usage=_usage(started, last), timings=_timings(last))

    app.mount("/", StaticFiles(directory=web_root(), html=True), name="chat-page")
    return app


def serve(
    model: str, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None, max_tokens: int = 32768
) -> None:
    """Load ``model`` and serve the API and the chat page until interrupted."""
    import uvicorn

    from .loading import load

    web_root()  # fail before loading a large model if the page is missing
    worker = GenerationWorker(lambda: load(model))
    worker.start()
    settings = ServerSettings(model_id=Path(model).name or model, api_key=api_key, max_tokens=max_tokens)
    try:
        uvicorn.run(create_app(worker, settings), host=host, port=port, log_level="info")
    finally:
        worker.stop()
