"""The one worker thread that owns the model: runs one generation at a time, in arrival order, and hands
plain events (no MLX arrays) back to the event loop."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request

from ...errors import Qwen35Error
from ...runtime.settings import GenerationSettings, MTPSettings
from .protocol import has_vision

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the worker


@dataclass
class Started:
    """The prompt is ready and generation begins."""

    prompt_tokens: int
    cached_tokens: int


LEAST_LOGPROB = -9999.0  # what OpenAI reports for a token that cannot come (JSON has no -inf)


@dataclass
class Logprob:
    """One token's text, its UTF-8 bytes and its log-probability."""

    token: str
    bytes: list[int]
    logprob: float


@dataclass
class TokenLogprobs:
    """The generated token's log-probability and the likeliest alternatives, likeliest first."""

    chosen: Logprob
    top: list[Logprob]


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
    logprobs: TokenLogprobs | None = None
    mtp_drafted: int | None = None  # MTP drafts so far in this reply (None: MTP off)
    mtp_accepted: int | None = None

    @classmethod
    def of(cls, response: Any, logprobs: TokenLogprobs | None = None, mtp_stats: Any = None) -> Token:
        """From an mlx-lm ``GenerationResponse`` (and the reply's ``MTPStats`` when MTP is on)."""
        return cls(
            response.text,
            response.finish_reason,
            response.prompt_tokens,
            response.generation_tokens,
            response.prompt_tps,
            response.generation_tps,
            response.peak_memory,
            logprobs,
            mtp_stats.drafted if mtp_stats is not None else None,
            mtp_stats.accepted if mtp_stats is not None else None,
        )


def token_logprobs(response: Any, top: int, token_bytes: Callable[[int], bytes]) -> TokenLogprobs:
    """The response's token's log-probability and the ``top`` likeliest, as plain values (read on the worker thread)."""
    import mlx.core as mx

    def entry(token_id: int, value: float) -> Logprob:
        spelt = token_bytes(token_id)
        return Logprob(spelt.decode("utf-8", errors="replace"), list(spelt), max(value, LEAST_LOGPROB))

    logprobs = response.logprobs
    chosen = entry(response.token, logprobs[response.token].item())
    if top == 0:
        return TokenLogprobs(chosen, [])
    ids = mx.argpartition(-logprobs, top - 1)[:top]
    pairs = sorted(zip(ids.tolist(), logprobs[ids].tolist()), key=lambda pair: (-pair[1], pair[0]))
    return TokenLogprobs(chosen, [entry(token_id, value) for token_id, value in pairs])


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
    """One request's generation: the prompt (chat messages or raw text) and its settings."""

    prompt: list[dict] | str
    settings: GenerationSettings
    emit: Callable[[Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    top_logprobs: int | None = None  # None: no logprobs; N: the token's and the N likeliest


Generate = Callable[..., Iterator[Any]]


class GenerationWorker:
    """Owns the model: loads it and runs every job on one thread, one at a time, in arrival order.

    MLX arrays stay on the thread that made them (Metal streams are per thread), so loading,
    image preprocessing and generation all happen here, never in a request handler.

    The model's one cache (a ``ConversationCache``) goes from request to request: a chat client sends
    the whole history every time, and the cache's checkpoints at turn boundaries and prompt ends let
    the next request prefill only what follows the longest prefix it shares with an earlier one.
    ``generate`` replaces all that with a stand-in for ``stream_text`` (tests script replies with it).
    """

    def __init__(
        self,
        loader: Callable[[], tuple[Any, Any]],
        generate: Generate | None = None,
        max_prompt_tokens: int | None = None,
        share: Any = None,
        mtp: MTPSettings = MTPSettings(),
    ):
        self._loader = loader
        # Rank 0 of several (a RankShare, docs/architecture.md §21): each job goes to the other ranks first.
        self._share = share
        self._generate = generate
        self._mtp = mtp  # speculative decoding with the MTP head, for every request (serve --mtp)
        self._max_prompt_tokens = max_prompt_tokens  # the model's context is the limit too
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

    @property
    def context_length(self) -> int | None:
        """The model's context in tokens (None until it is loaded, or for a stand-in)."""
        config = getattr(self.model, "config", None)
        return config.text.max_position_embeddings if config is not None else None

    def _run(self) -> None:
        try:
            self.model, self.processor = self._loader()
            if self._generate is None:
                from ...runtime.conversation import ConversationCache

                if self._share is None:
                    self.prompt_cache = ConversationCache(self.model, self.processor)
                else:
                    from ...runtime.rank_jobs import LeadingCache

                    self.prompt_cache = LeadingCache(self.model, self.processor, self._share)
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
        if self._share is not None:
            from ...runtime.rank_jobs import end_jobs

            end_jobs(self._share)

    def _prompt(self, job: GenerationJob) -> tuple[Any, int]:
        """The prompt as ``stream_generate`` takes it (ids, or ModelInputs with images) and its length."""
        from ...runtime.generation import prompt_token_ids

        thinking, tools = job.settings.enable_thinking, job.settings.tools
        if isinstance(job.prompt, list) and has_vision(job.prompt):
            inputs = self.processor(job.prompt, enable_thinking=thinking, tools=tools)
            return inputs, len(prompt_token_ids(self.processor, inputs))
        ids = prompt_token_ids(self.processor, job.prompt, thinking, tools)
        return ids, len(ids)

    def _prompt_limit(self) -> tuple[int, str] | None:
        """The most prompt tokens a request may have, and where that limit comes from."""
        limits = []
        if self._max_prompt_tokens is not None:
            limits.append((self._max_prompt_tokens, "the server's --max-prompt-tokens"))
        if self.model is not None:
            limits.append((self.model.config.text.max_position_embeddings, "the model's context"))
        return min(limits, default=None)

    def _start(
        self, prompt: Any, settings: GenerationSettings, should_stop: Callable[[], bool], mtp_stats: Any
    ) -> tuple[Iterator[Any], int]:
        """The generation of ``prompt`` and how many of its tokens came from the cache (prefilled up to the reply start)."""
        if self.prompt_cache is None:
            return self._generate(self.model, self.processor, prompt, settings=settings, should_stop=should_stop), 0
        from ...model.inputs import ModelInputs

        inputs = prompt if isinstance(prompt, ModelInputs) else ModelInputs(prompt)
        generation = self.prompt_cache.stream(inputs, replace(settings, mtp=self._mtp), should_stop, mtp_stats)
        return generation, self.prompt_cache.reused_tokens

    def _run_job(self, job: GenerationJob) -> None:
        from jinja2 import TemplateError

        from ...runtime.prefill import PrefillCancelled

        try:
            prompt, prompt_tokens = self._prompt(job)
        except (Qwen35Error, TemplateError, ValueError, TypeError) as e:
            job.emit(Failed(f"cannot build the prompt: {e}"))
            return
        limit = self._prompt_limit()
        if limit is not None and prompt_tokens > limit[0]:
            job.emit(
                Failed(f"the prompt is {prompt_tokens} tokens, more than the {limit[0]} of {limit[1]}; shorten it")
            )
            return
        generation = None
        try:
            # A client that leaves during a long prefill frees the model at the next prefill chunk.
            mtp_stats = None
            if self._mtp.enabled and self.prompt_cache is not None:
                from ...runtime.speculative import MTPStats

                mtp_stats = MTPStats()
            generation, cached_tokens = self._start(prompt, job.settings, job.cancelled.is_set, mtp_stats)
            job.emit(Started(prompt_tokens=prompt_tokens, cached_tokens=cached_tokens))
            spelling = None
            for response in generation:
                logprobs = None
                if job.top_logprobs is not None:
                    from ...runtime.text_stream import TextStream

                    spelling = spelling or TextStream(self.processor.tokenizer)
                    logprobs = token_logprobs(response, job.top_logprobs, spelling.token_bytes)
                token = Token.of(response, logprobs, mtp_stats)
                if job.cancelled.is_set() and self._share is not None:
                    from ...runtime.distributed import stop_reply

                    stop_reply()  # every rank ends the reply within two tokens: read on to that end, showing nobody
                    continue
                job.emit(token)
                self.last_stats = {
                    k: v
                    for k, v in vars(token).items()
                    if k not in ("text", "finish_reason", "logprobs") and v is not None  # mtp_*: with MTP on
                }
                if job.cancelled.is_set():
                    return
        except PrefillCancelled:
            return  # nobody is waiting for the answer
        except Qwen35Error as e:
            job.emit(Failed(str(e)))
        except Exception as e:  # the server must outlive a bad generation; the client gets a 500-class error
            if self._share is not None:
                from ...runtime.distributed import exit_on_lost_peer

                exit_on_lost_peer(self._share, e)
            log.exception("generation failed (settings %s)", job.settings)
            job.emit(Failed(f"{type(e).__name__}: {e}", internal=True))
        finally:
            # A cancelled generation has the next token in flight (async_eval); let it land before
            # the next job touches the model or the random state.
            if generation is not None:
                generation.close()
            import mlx.core as mx

            mx.synchronize()
            if self._share is not None:
                from ...runtime.distributed import idle

                idle()


@dataclass
class Cancelled:
    """The client went away (or the handler gave up); the worker stops at its next token."""


class JobEvents:
    """The async side of a job: the handler awaits the worker's events; a client that disconnects cancels the job."""

    def __init__(
        self,
        worker: GenerationWorker,
        request: Request,
        prompt: list[dict] | str,
        settings: GenerationSettings,
        top_logprobs: int | None = None,
    ):
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._record = RequestRecord(f"{request.method} {request.url.path}")

        def emit(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(self._events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                self.job.cancelled.set()

        self.job = GenerationJob(prompt=prompt, settings=settings, emit=emit, top_logprobs=top_logprobs)
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
        event = await self._events.get()
        self._record.see(event)
        return event

    def cancel(self) -> None:
        """Stop the generation at its next token (or skip it if it has not started)."""
        if not self.job.cancelled.is_set():
            self.job.cancelled.set()
            self._events.put_nowait(Cancelled())

    def close(self) -> None:
        """The handler is done: stop watching, and stop the generation if it is still running."""
        self._watcher.cancel()
        self.job.cancelled.set()
        self._record.log()


class RequestRecord:
    """What the operator's log says about one request: its tokens, time to first token and speed."""

    def __init__(self, route: str):
        self.route, self.arrived = route, time.perf_counter()
        self.started: Started | None = None
        self.first_token_at: float | None = None
        self.last: Token | None = None
        self.outcome = "ok"
        self._logged = False

    def see(self, event: Any) -> None:
        """Note an event on its way to the handler."""
        if isinstance(event, Started):
            self.started = event
        elif isinstance(event, Token):
            self.first_token_at = self.first_token_at or time.perf_counter()
            self.last = event
            self.outcome = event.finish_reason or self.outcome
        elif isinstance(event, Cancelled):
            self.outcome = "cancelled"
        elif isinstance(event, Failed):
            self.outcome = f"failed: {event.message}"

    def line(self) -> str:
        """One line: route, prompt / cached / generated tokens, TTFT, tokens/s and how it ended."""
        if self.started is None:
            return f"{self.route}: {self.outcome} before generation"
        generated = self.last.generation_tokens if self.last else 0
        ttft = f"{self.first_token_at - self.arrived:.2f} s" if self.first_token_at else "-"
        speed = f"{self.last.generation_tps:.1f} tok/s" if self.last else "-"
        return (
            f"{self.route}: prompt {self.started.prompt_tokens} tokens ({self.started.cached_tokens} cached), "
            f"generated {generated}, TTFT {ttft}, {speed}, {self.outcome}"
        )

    def log(self) -> None:
        """Log the line once."""
        if not self._logged:
            self._logged = True
            log.info(self.line())
