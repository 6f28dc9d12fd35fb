"""OpenAI-compatible HTTP server (FastAPI + uvicorn) and the chat page at ``/``.

One model in memory, owned by one worker thread that runs one generation at a time in arrival
order: MLX work never interleaves, and every request waits its turn in the queue. Handlers are thin:
they validate the request (typed models below), hand a ``GenerationJob`` to the worker, and turn
the worker's events into an OpenAI response, streamed as server-sent events or whole.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ...errors import Qwen35Error
from ...runtime.settings import DEFAULT_MAX_TOKENS, GenerationSettings, MTPSettings, recommended_sampling
from .guard import BodyTooLarge, Guard, exposure_warning, key_matches
from .protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    check_unicode,
    error_body,
    offered_tools,
    requested_logprobs,
    response_schema,
    template_messages,
    validation_message,
)
from .worker import Cancelled, Failed, Finished, GenerationWorker, JobEvents, Started, Token, TokenLogprobs

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- generation settings


DEFAULT_MAX_BODY_MB = 64
REASONING_FIELDS = {  # --reasoning-field: where the thinking goes (DeepSeek's and vLLM's name, mlx_lm.server's)
    "both": ("reasoning_content", "reasoning"),
    "reasoning_content": ("reasoning_content",),
    "reasoning": ("reasoning",),
}


@dataclass
class ServerSettings:
    """What the server was started with."""

    model_id: str
    api_key: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS  # the default and the cap of a request's max_tokens
    host: str = "127.0.0.1"  # the address it is bound to: requests naming another host are refused
    allow_local_images: Path | None = None  # image_url may name files inside this directory (else data: URLs only)
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * 2**20
    reasoning_field: str = "both"  # a key of REASONING_FIELDS
    allowed_origins: tuple[str, ...] = ()  # web origins allowed to call the API from a browser (CORS); none by default

    def __post_init__(self) -> None:
        if self.reasoning_field not in REASONING_FIELDS:
            raise Qwen35Error(f"--reasoning-field {self.reasoning_field}: use {', '.join(REASONING_FIELDS)}")
        if self.api_key is not None and not self.api_key.strip():
            raise Qwen35Error("--api-key is empty; give a key, or leave the option out to serve without one")
        if self.max_body_bytes <= 0:
            raise Qwen35Error(f"--max-body-mb must be positive, got {self.max_body_bytes} bytes")
        if self.allow_local_images is not None:
            root = Path(os.path.abspath(Path(self.allow_local_images).expanduser()))
            if not root.is_dir():
                raise Qwen35Error(f"--allow-local-images {self.allow_local_images}: not a directory; give one")
            self.allow_local_images = root


def generation_settings(
    request: SamplingRequest,
    settings: ServerSettings,
    enable_thinking: bool,
    tools: list[dict] | None = None,
    thinking_budget: int | None = None,
) -> GenerationSettings:
    """The request's settings: the model card's preset for the mode under the request's sampling fields."""
    sampling = recommended_sampling(
        enable_thinking,
        dict(
            temp=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            min_p=request.min_p,
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
        ),
    )
    requested = request.max_completion_tokens or request.max_tokens or settings.max_tokens
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    return GenerationSettings(
        sampling=sampling,
        max_tokens=min(requested, settings.max_tokens),
        stop=tuple(s for s in stop if s),
        seed=request.seed,
        enable_thinking=enable_thinking,
        thinking_budget=thinking_budget,
        tools=tools,
        json_schema=response_schema(request.response_format),
    )


# ---------------------------------------------------------------- responses


def _usage(started: Started, last: Any) -> dict:
    completion = last.generation_tokens if last is not None else 0
    usage = {
        "prompt_tokens": started.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": started.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": started.cached_tokens},
    }
    if last is not None and last.mtp_drafted is not None:  # serve --mtp: the MTP head's drafts, as generate --json
        usage |= {"mtp_drafted": last.mtp_drafted, "mtp_accepted": last.mtp_accepted}
    return usage


def _timings(last: Any) -> dict:
    """Speed and memory of the generation (llama.cpp's server reports ``timings`` the same way)."""
    if last is None:
        return {}
    return {
        "prompt_tps": round(last.prompt_tps, 2),
        "generation_tps": round(last.generation_tps, 2),
        "peak_memory_gb": round(last.peak_memory_gb, 3),
    }


def _logprob_entry(logprobs: TokenLogprobs) -> dict:
    """A chat ``logprobs.content`` item."""
    chosen = logprobs.chosen
    return {
        "token": chosen.token,
        "logprob": chosen.logprob,
        "bytes": chosen.bytes,
        "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in logprobs.top],
    }


def text_logprobs(tokens: list[TokenLogprobs], offset: int = 0) -> dict:
    """A text completion's ``logprobs`` (the legacy shape: parallel lists, alternatives as {token: logprob});
    ``offset``: where in the text the first token starts (a streamed chunk's place)."""
    offsets = []
    for item in tokens:
        offsets.append(offset)
        offset += len(item.chosen.token)
    return {
        "tokens": [item.chosen.token for item in tokens],
        "token_logprobs": [item.chosen.logprob for item in tokens],
        "top_logprobs": [{t.token: t.logprob for t in item.top} for item in tokens],
        "text_offset": offsets,
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

    def __init__(
        self, thinking: bool, tools: list[dict] | None, reasoning_fields: tuple[str, ...] = REASONING_FIELDS["both"]
    ):
        from ...processing.output import OutputParser, ShownAnswer

        self.reasoning_fields = reasoning_fields
        self._parser = OutputParser(thinking, tools)
        self._answer = ShownAnswer()
        self.reasoning, self.tool_calls = "", []

    @property
    def content(self) -> str:
        """The answer so far, a malformed call in it as text."""
        return self._answer.text

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
                deltas.append(dict.fromkeys(self.reasoning_fields, piece.text))
                continue
            text = self._answer.add(piece)
            if piece.kind == "content" or piece.tool_call.error is not None:
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
        self.fingerprint = f"mlx-qwen35-{importlib.metadata.version('mlx-qwen35')}"
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
            "system_fingerprint": self.fingerprint,
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
        pending: list[dict] = []  # logprobs of tokens whose text has not been sent yet
        while not isinstance(event := await events.next(), (Finished, Cancelled)):
            if isinstance(event, Failed):
                yield _sse(error_body(event.message, "server_error" if event.internal else "invalid_request_error"))
                return
            last = event
            if event.logprobs is not None:
                pending.append(_logprob_entry(event.logprobs))
            deltas = reply.feed(event.text) + (reply.finish() if event.finish_reason else [])
            for delta in deltas:
                choice = {"index": 0, "delta": delta, "finish_reason": None}
                if pending:
                    choice["logprobs"], pending = {"content": pending}, []
                yield _sse(completion.body([choice], chunk=True))
            if event.finish_reason:
                choice = {"index": 0, "delta": {}, "finish_reason": reply.finish_reason(event.finish_reason)}
                if pending:
                    choice["logprobs"], pending = {"content": pending}, []
                final = completion.body(
                    [choice],
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
        last, offset = None, 0
        while not isinstance(event := await events.next(), (Finished, Cancelled)):
            if isinstance(event, Failed):
                yield _sse(error_body(event.message, "server_error" if event.internal else "invalid_request_error"))
                return
            last = event
            logprobs = None
            if event.logprobs is not None:
                logprobs = text_logprobs([event.logprobs], offset)
                offset += len(event.logprobs.chosen.token)
            choice = {"index": 0, "text": event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}
            extra = dict(usage=_usage(started, last), timings=_timings(last)) if event.finish_reason else {}
            yield _sse(completion.body([choice], **extra))
        if include_usage and last is not None:
            yield _sse(completion.body([], usage=_usage(started, last)))
        yield _sse("[DONE]")
    finally:
        events.close()


async def collect_events(events: JobEvents) -> tuple[str, Token | None, list[TokenLogprobs]]:
    """All the text of a job, its last response and the tokens' logprobs; a failure or cancel raises ``ApiError``."""
    try:
        text, last, logprobs = [], None, []
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
            if event.logprobs is not None:
                logprobs.append(event.logprobs)
            last = event
        return "".join(text), last, logprobs
    finally:
        events.close()


# ---------------------------------------------------------------- the app


def web_root() -> Path:
    """The chat page: ``mlx_qwen35/app/web`` inside a wheel, ``app/web`` beside the package in a source checkout."""
    package = Path(__file__).resolve().parents[2]  # mlx_qwen35/ (this file is surfaces/server/routes.py)
    for candidate in (package / "app" / "web", package.parent / "app" / "web"):
        if (candidate / "index.html").is_file():
            return candidate
    raise Qwen35Error(
        f"the chat page is missing (looked in {package / 'app' / 'web'} and {package.parent / 'app' / 'web'}); reinstall mlx-qwen35"
    )


def create_app(worker: GenerationWorker, settings: ServerSettings) -> FastAPI:
    """The FastAPI app: the OpenAI routes under /v1, /health, and the chat page at /."""
    app = FastAPI(
        title="mlx-qwen35",
        version=importlib.metadata.version("mlx-qwen35"),  # pyproject.toml's, as mlx_qwen35.__version__ reads it
        description="OpenAI-compatible API for Qwen3.5 on MLX.",
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(ApiError)
    async def refused(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(Qwen35Error)
    async def user_error(_: Request, exc: Qwen35Error) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse(error_body(exc.detail), status_code=413)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """404, 405 and the rest in OpenAI's shape, not FastAPI's ``{"detail": ...}``."""
        status, headers, path = exc.status_code, exc.headers, request.url.path
        if status in (404, 405) and (path == "/v1" or path.startswith("/v1/")):
            # The page's mount at / answers every path no route took: say what the API has there instead.
            methods = sorted(
                {m for r in app.routes if isinstance(r, APIRoute) and r.path_regex.match(path) for m in r.methods}
            )
            status, headers = (405, {"allow": ", ".join(methods)}) if methods else (404, None)
        if status == 404:
            message = f"nothing at {path}; the API is /v1/chat/completions, /v1/completions, /v1/models"
        elif status == 405:
            message = f"{request.method} is not allowed on {path}"
        else:
            message = str(exc.detail)
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        return JSONResponse(error_body(message, kind), status_code=status, headers=headers)

    app.add_middleware(
        Guard, bound_host=settings.host, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes
    )
    if settings.allowed_origins:  # outside Guard: a preflight carries no key, and every answer needs the headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    # The key itself is checked by Guard, for every route; this documents it in the schema.
    error_responses = {
        400: {"description": "Invalid request"},
        401: {"description": "Missing or wrong API key"},
        413: {"description": "Request body too large"},
    }
    model_card = {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "mlx-qwen35"}

    @app.get("/health")
    def health(request: Request) -> dict:
        """Liveness (open to all); with the API key (or without one set), the model, queue and last speed and memory."""
        if settings.api_key and not key_matches(request.headers, settings.api_key):
            return {"status": "ok"}
        return {
            "status": "ok",
            "model": settings.model_id,
            "context_length": worker.context_length,
            "busy": worker.busy,
            "queued": worker.queued,
            **worker.last_stats,
        }

    @app.get("/stats", responses=error_responses)
    def stats() -> dict:
        """The last request's speed, memory and MTP drafts (§20), and the streamed experts' counters since the model loaded (§6.1)."""
        cache = getattr(worker.model, "expert_cache", None)
        return {**worker.last_stats, "experts": cache.report() if cache else None}

    @app.get("/v1/models", responses=error_responses)
    def models() -> dict:
        """The one model this server holds."""
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}", responses={**error_responses, 404: {"description": "No such model"}})
    def model(model_id: str) -> dict:
        """The model, if ``model_id`` names the one this server holds."""
        if model_id != settings.model_id:
            raise ApiError(
                f"the model {model_id!r} is not served here; this server holds {settings.model_id!r}",
                status=404,
                param="model",
                kind="not_found_error",
            )
        return model_card

    @app.post("/v1/chat/completions", responses=error_responses)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Chat completion (streamed as server-sent events with ``stream: true``)."""
        check_unicode(body)
        thinking = (body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else None) is not False
        tools = offered_tools(body)
        generation = generation_settings(body, settings, thinking, tools, body.thinking_budget)
        messages = template_messages(body.messages, settings.allow_local_images)
        events = JobEvents(worker, request, messages, generation, requested_logprobs(body))
        try:
            started = await first_event(events)
        except ApiError:
            events.close()
            raise
        reasoning_fields = REASONING_FIELDS[settings.reasoning_field]
        completion = Completion("chat.completion", settings.model_id)
        reply = ChatReply(thinking, tools, reasoning_fields)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_chat(events, started, reply, completion, include_usage), media_type="text/event-stream"
            )
        text, last, logprobs = await collect_events(events)
        reply.feed(text)
        reply.finish()
        message = {
            "role": "assistant",
            "content": reply.content or (None if reply.tool_calls else ""),
            **dict.fromkeys(reasoning_fields, reply.reasoning or None),
        }
        if reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": reply.finish_reason(last.finish_reason if last else None),
            "logprobs": {"content": [_logprob_entry(item) for item in logprobs]} if body.logprobs else None,
        }
        return completion.body([choice], usage=_usage(started, last), timings=_timings(last))

    @app.post("/v1/completions", responses=error_responses)
    async def completions(body: CompletionRequest, request: Request):
        """Text completion of a raw prompt (no chat template; streamed with ``stream: true``)."""
        check_unicode(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise ApiError("prompt must be one non-empty string", param="prompt")
        generation = generation_settings(body, settings, enable_thinking=False)
        events = JobEvents(worker, request, prompts[0], generation, body.logprobs)
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
        text, last, logprobs = await collect_events(events)
        choice = {
            "index": 0,
            "text": text,
            "logprobs": text_logprobs(logprobs) if body.logprobs is not None else None,
            "finish_reason": last.finish_reason if last else "stop",
        }
        return completion.body([choice], usage=_usage(started, last), timings=_timings(last))

    app.mount("/", StaticFiles(directory=web_root(), html=True), name="chat-page")
    return app


def _log_to_stderr() -> None:
    """The server's own lines (startup, one per request) on stderr beside uvicorn's."""
    logger = logging.getLogger("mlx_qwen35.surfaces.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    allow_local_images: Path | None = None,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    max_prompt_tokens: int | None = None,
    served_model_name: str | None = None,
    reasoning_field: str = "both",
    allowed_origins: tuple[str, ...] = (),
    expert_memory: str | None = None,
    parallel: str | None = None,
    split: str | None = None,
    mtp: MTPSettings = MTPSettings(),
) -> None:
    """Load ``model`` and serve the API and the chat page until interrupted; ``expert_memory``: ``load``'s budget.

    Under mlx.launch rank 0 serves and hands each request to the other ranks, which follow (§21).
    """
    web_root()  # fail before loading a large model if the page is missing, or on a bad option
    if not (math.isfinite(max_body_mb) and max_body_mb > 0):
        raise Qwen35Error(f"--max-body-mb must be a positive number of megabytes, got {max_body_mb}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise Qwen35Error(f"--max-prompt-tokens must be at least 1, got {max_prompt_tokens}")
    settings = ServerSettings(
        model_id=served_model_name or Path(model).name or model,
        api_key=api_key,
        max_tokens=max_tokens,
        host=host,
        allow_local_images=allow_local_images,
        max_body_bytes=int(max_body_mb * 2**20),
        reasoning_field=reasoning_field,
        allowed_origins=tuple(allowed_origins),
    )
    if warning := exposure_warning(host, api_key):
        print(warning, file=sys.stderr)
    import uvicorn

    from ...runtime.distributed import join_launched
    from ...runtime.rank_jobs import follow_jobs
    from ...weights.loading import load

    share = join_launched(parallel, split, model)
    if share is not None and not share.leads:
        follow_jobs(*load(model, expert_memory=expert_memory, share=share), share)
        return
    worker = GenerationWorker(
        lambda: load(model, expert_memory=expert_memory, share=share),
        max_prompt_tokens=max_prompt_tokens,
        share=share,
        mtp=mtp,
    )
    worker.start()
    _log_to_stderr()
    shown = f"[{host}]" if ":" in host else host
    log.info(f"mlx-qwen35: chat page http://{shown}:{port}/ · API http://{shown}:{port}/v1 · model {settings.model_id}")
    try:
        uvicorn.run(create_app(worker, settings), host=host, port=port, log_level="info")
    finally:
        worker.stop()
