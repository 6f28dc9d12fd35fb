"""The ``mlx-qwen35`` command line (Typer). Thin: every command calls the package's Python API.

Heavy modules (mlx, the model, tokenizers) are imported inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ..errors import Qwen35Error
from ..runtime.settings import DEFAULT_MAX_TOKENS, GENERATE_MAX_TOKENS

DEFAULT_BENCH_PROMPTS = (128, 1024, 4096, 16384)

app = typer.Typer(
    name="mlx-qwen35",
    help="Run the Qwen3.5 family (397B-A17B and siblings) on Apple Silicon with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Options that several commands share, named as in mlx-lm where they overlap.
ModelOption = Annotated[str, typer.Option("--model", "-m", help="MLX checkpoint directory or Hub repo id.")]
TopP = Annotated[float | None, typer.Option("--top-p")]
TopK = Annotated[int | None, typer.Option("--top-k")]
MinP = Annotated[float | None, typer.Option("--min-p")]
RepetitionPenalty = Annotated[float | None, typer.Option("--repetition-penalty")]
PresencePenalty = Annotated[float | None, typer.Option("--presence-penalty")]
Seed = Annotated[int | None, typer.Option("--seed")]
SystemPrompt = Annotated[str | None, typer.Option("--system", help="System prompt.")]
ThinkingBudget = Annotated[
    int | None, typer.Option("--thinking-budget", help="Close the reasoning after this many tokens.")
]
KVBits = Annotated[int | None, typer.Option("--kv-bits", help="Quantise the attention K/V cache to 8 or 4 bits.")]
MaxPixels = Annotated[
    int | None,
    typer.Option(
        "--max-pixels", help="Largest area of an image or video frame, in pixels (default 1344×1344, the model card's)."
    ),
]


@app.command()
def convert(
    hf_path: str = typer.Option(..., "--hf-path", help="Hugging Face checkpoint: a local directory or a Hub repo id."),
    mlx_path: Path = typer.Option(..., "--mlx-path", help="Output directory for the MLX checkpoint."),
    recipe: str = typer.Option("4bit", "--recipe", "-q", help="Quantisation recipe (see --list-recipes)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Dtype of unquantised tensors: float32, bfloat16, float16."),
    shard_size_gb: float = typer.Option(5.0, "--shard-size-gb", help="Largest output shard, in GB."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision when --hf-path is a repo id."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --mlx-path."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print the predicted size of each recipe."),
) -> None:
    """Convert a Hugging Face Qwen3.5 checkpoint (bf16, fused or per-expert, or block-FP8) to MLX."""
    from ..runtime.validation import check_numbers
    from ..weights.convert import convert as run_convert

    check_numbers(shard_size_gb=shard_size_gb)
    run_convert(
        hf_path=hf_path,
        mlx_path=mlx_path,
        recipe=recipe,
        dtype=dtype,
        shard_size_gb=shard_size_gb,
        revision=revision,
        overwrite=overwrite,
        dry_run=dry_run,
    )


@app.command()
def generate(
    model: ModelOption,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message ('-' reads standard input)."),
    max_tokens: int = typer.Option(GENERATE_MAX_TOKENS, "--max-tokens", help="Most tokens to generate."),
    temp: float | None = typer.Option(None, "--temp", help="Sampling temperature (0 = greedy)."),
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    presence_penalty: PresencePenalty = None,
    seed: Seed = None,
    system: SystemPrompt = None,
    think: bool = typer.Option(True, "--think/--no-think", help="Let the model reason before answering."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the text and the statistics."),
    image: list[str] | None = typer.Option(None, "--image", help="Image file to ask about (repeat for several)."),
    video: str | None = typer.Option(None, "--video", help="Video file to ask about."),
    max_pixels: MaxPixels = None,
    min_pixels: int | None = typer.Option(
        None, "--min-pixels", help="Smallest image area in pixels (default: the checkpoint's)."
    ),
    fps: float | None = typer.Option(
        None, "--fps", help="Video frames sampled per second (default: the checkpoint's, 2)."
    ),
    max_frames: int | None = typer.Option(None, "--max-frames", help="Most video frames sampled."),
    video_start: float | None = typer.Option(
        None, "--video-start", help="Start of the video window, in seconds (default 0)."
    ),
    video_end: float | None = typer.Option(
        None, "--video-end", help="End of the video window, in seconds (default start + 60)."
    ),
    tools: Path | None = typer.Option(
        None, "--tools", help="JSON file of tool schemas; the model's tool calls are printed as JSON."
    ),
    prompt_cache_file: Path | None = typer.Option(
        None, "--prompt-cache-file", help="Saved conversation directory: continued and updated (created if missing)."
    ),
    thinking_budget: ThinkingBudget = None,
    kv_bits: KVBits = None,
    max_kv_size: int | None = typer.Option(None, "--max-kv-size", help="Most tokens of context (prompt + reply)."),
) -> None:
    """Generate a reply to one prompt (optionally about images or a video), streaming it to the terminal."""
    from dataclasses import replace

    import mlx.core as mx

    from ..processing.output import OutputParser, read_tools_file
    from ..runtime.conversation import ConversationSettings, reply_events
    from ..runtime.generation import prompt_token_ids, stream_text
    from ..runtime.sessions import check_session_target, open_conversation, save_conversation
    from ..runtime.settings import GenerationSettings, KVCacheSettings, max_tokens_within_context, recommended_sampling
    from ..runtime.validation import check_media, check_numbers, check_text
    from ..weights.loading import load

    # Everything that can be wrong without the model is found before it loads (minutes, for a large one).
    prompt_source = "--prompt"
    if prompt == "-":  # bytes that are not UTF-8 kept as lone surrogates, for check_text to name
        prompt, prompt_source = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape"), "standard input"
    check_text(prompt, prompt_source)
    if system is not None:
        check_text(system, "--system")
    check_numbers(seed=seed, max_kv_size=max_kv_size)
    check_media(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        fps=fps,
        max_frames=max_frames,
        video_start=video_start,
        video_end=video_end,
    )
    media = [{"type": "image", "image": path} for path in image or []] + (
        [{"type": "video", "video": video}] if video else []
    )
    if raw and media:
        raise Qwen35Error("--raw sends text only; drop --raw to ask about --image / --video")
    if prompt_cache_file and (raw or media):
        raise Qwen35Error("--prompt-cache-file continues a text chat; drop --raw / --image / --video")
    _check_media_files(image or [], video)
    tool_schemas = read_tools_file(tools) if tools else None
    overrides = dict(
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
    )
    # Built (and so checked) before the model loads: a typo should not wait for a large model.
    if prompt_cache_file:
        settings = ConversationSettings(
            system=system,
            enable_thinking=think,
            tools=tool_schemas,
            max_tokens=max_tokens,
            thinking_budget=thinking_budget,
            kv_bits=kv_bits,
            sampling={k: v for k, v in overrides.items() if v is not None},
        )
    else:
        settings = GenerationSettings(
            sampling=recommended_sampling(think, overrides),
            max_tokens=max_tokens,
            seed=seed,
            enable_thinking=think,
            thinking_budget=thinking_budget,
            tools=tool_schemas,
            kv_cache=KVCacheSettings(bits=kv_bits),
        )
    if prompt_cache_file:
        check_session_target(prompt_cache_file, kv_bits)
    model_obj, processor = load(model)
    vision_tokens, vision_seconds = 0, 0.0
    if raw:
        request = prompt
    else:
        content = media + [{"type": "text", "text": prompt}] if media else prompt
        request = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    if media:
        started = time.perf_counter()
        request = processor(
            request,
            enable_thinking=think,
            max_pixels=max_pixels,
            min_pixels=min_pixels,
            fps=fps,
            max_frames=max_frames,
            video_start=video_start,
            video_end=video_end,
        )
        vision_seconds = time.perf_counter() - started
        vision_tokens = processor.vision_token_count(request)
    conversation = None
    if prompt_cache_file:
        if seed is not None:
            mx.random.seed(seed)
        conversation = open_conversation(prompt_cache_file, model_obj, processor, settings)
        events = conversation.send(prompt)  # renders and reads the settings when the reply starts
        prompt_length = len(conversation.prompt_tokens())
    else:
        prompt_length = len(prompt_token_ids(processor, request, think, tool_schemas))
    max_tokens = max_tokens_within_context(
        max_tokens, prompt_length, max_kv_size, fix="raise --max-kv-size or shorten the prompt"
    )
    if conversation:
        conversation.settings = replace(conversation.settings, max_tokens=max_tokens)
    else:
        responses = stream_text(model_obj, processor, request, replace(settings, max_tokens=max_tokens))
        events = reply_events(responses, OutputParser(think and not raw, tool_schemas))
    # One event stream either way: the text as it comes, or (--tools) each piece with each call as a JSON line.
    text, calls, shown_kind, last = [], [], None, None
    for event in events:
        response = event.response
        if response is not last:
            text.append(response.text)
            if not as_json and not tool_schemas:
                typer.echo(response.text, nl=False)
        if tool_schemas and not as_json and (event.text or event.tool_call):
            if shown_kind not in (None, event.kind):
                typer.echo()
            typer.echo(
                json.dumps(event.tool_call.to_dict(), ensure_ascii=False) if event.tool_call else event.text, nl=False
            )
            shown_kind = event.kind
        if event.tool_call:
            calls.append(event.tool_call.to_dict())
        last = response
    prompt_tokens, prompt_tps = last.prompt_tokens, last.prompt_tps
    if conversation:
        save_conversation(conversation, prompt_cache_file)
        turn = conversation.last_stats  # stream_text only saw the tokens after the reused prefix
        prompt_tokens, prompt_tps = turn.prompt_tokens, turn.prefilled_tokens / max(turn.time_to_first_token, 1e-9)
    if as_json:
        stats = dict(
            text="".join(text),
            prompt_tokens=prompt_tokens,
            generation_tokens=last.generation_tokens,
            prompt_tps=round(prompt_tps, 3),
            generation_tps=round(last.generation_tps, 3),
            peak_memory_gb=round(last.peak_memory, 3),
            finish_reason=last.finish_reason,
            vision_tokens=vision_tokens,
            vision_seconds=round(vision_seconds, 3),
        )
        if tool_schemas:
            stats["tool_calls"] = calls
        if conversation:
            stats |= dict(
                reused_tokens=conversation.last_stats.reused_tokens,
                prefilled_tokens=conversation.last_stats.prefilled_tokens,
            )
        typer.echo(json.dumps(stats, ensure_ascii=False))
    else:
        typer.echo(
            f"\n\n[{prompt_tokens} prompt tokens at {prompt_tps:.1f} tok/s, "
            f"{last.generation_tokens} generated at {last.generation_tps:.1f} tok/s, "
            f"peak memory {last.peak_memory:.2f} GB]",
            err=True,
        )


@app.command()
def chat(
    model: ModelOption,
    system: SystemPrompt = None,
    think: bool = typer.Option(
        True, "--think/--no-think", help="Let the model reason before answering (/think on|off switches)."
    ),
    thinking_budget: ThinkingBudget = None,
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not show the reasoning, only the answer."),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", help="Most tokens to generate per answer."),
    temp: float | None = typer.Option(
        None, "--temp", help="Sampling temperature (0 = greedy; default: the model card's)."
    ),
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    presence_penalty: PresencePenalty = None,
    seed: Seed = None,
    max_kv_size: int | None = typer.Option(
        None, "--max-kv-size", help="Most tokens of context (default: the model's)."
    ),
    kv_bits: KVBits = None,
    sessions_dir: Path | None = typer.Option(
        None, "--sessions-dir", envvar="MLX_QWEN35_SESSIONS_DIR", help="Where /save and /load keep conversations."
    ),
    max_pixels: MaxPixels = None,
) -> None:
    """Chat with a model in the terminal: streaming markdown, reasoning, /commands, a prompt cache across turns."""
    from .repl import run_chat

    run_chat(
        model=model,
        system=system,
        enable_thinking=think,
        thinking_budget=thinking_budget,
        hide_thinking=hide_thinking,
        max_tokens=max_tokens,
        sampling_overrides=dict(
            temp=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
        ),
        seed=seed,
        max_kv_size=max_kv_size,
        kv_bits=kv_bits,
        sessions_dir=sessions_dir,
        max_pixels=max_pixels,
    )


@app.command()
def demo(
    max_tokens: int = typer.Option(48, "--max-tokens", help="Tokens to generate."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild the embedded demo checkpoint."),
) -> None:
    """Build a small random-weight Qwen3.5 checkpoint (no download) and run it through the whole stack."""
    from ..runtime.validation import check_numbers
    from .demo import run_demo

    check_numbers(max_tokens=max_tokens)
    run_demo(max_tokens=max_tokens, rebuild=rebuild)


@app.command()
def serve(
    model: ModelOption,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (localhost only by default)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        help="Require this key on every route but /health: 'Authorization: Bearer KEY'; browsers sign in with it as the password.",
    ),
    max_tokens: int = typer.Option(
        DEFAULT_MAX_TOKENS, "--max-tokens", help="Default and largest max_tokens of a request."
    ),
    allow_local_images: Path | None = typer.Option(
        None,
        "--allow-local-images",
        help="Let image_url name files inside this directory (default: data: URLs only).",
    ),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body, in MB (413 beyond)."),
    max_prompt_tokens: int | None = typer.Option(
        None, "--max-prompt-tokens", help="Longest prompt a request may send (default: the model's context)."
    ),
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and the chat page at /."""
    from ..runtime.validation import check_numbers
    from .server.routes import serve as run_server

    check_numbers(port=port, max_tokens=max_tokens)
    _check_port_free(host, port)  # before the model loads: a busy port would only fail after it
    run_server(
        model,
        host=host,
        port=port,
        api_key=api_key,
        max_tokens=max_tokens,
        allow_local_images=allow_local_images,
        max_body_mb=max_body_mb,
        max_prompt_tokens=max_prompt_tokens,
    )


@app.command(name="app")
def menubar_app(
    model: str | None = typer.Option(None, "--model", "-m", help="Model to start with (default: the first one found)."),
    port: int = typer.Option(8080, "--port", help="Port of the local server."),
) -> None:
    """The macOS menu-bar app: start/stop the local server, pick a model, open the chat."""
    from ..runtime.validation import check_numbers
    from .menubar import run_menubar_app

    check_numbers(port=port)
    run_menubar_app(model=model, port=port)


@app.command()
def plan(
    model: str | None = typer.Option(
        None, "--model", help="A checkpoint dir or Hub id: a conversion as it is, a source as each recipe makes it."
    ),
    config: str | None = typer.Option(None, "--config", help="A config.json (file or its directory) to plan instead."),
    memory_gb: float | None = typer.Option(
        None, "--memory-gb", help="Unified memory of the Mac to plan for, in GiB (default: this machine's)."
    ),
    context: int | None = typer.Option(
        None, "--context", help="Conversation length the cache must hold, in tokens (default 131072 or the model's)."
    ),
    recipe: str | None = typer.Option(None, "--recipe", help="Only this conversion recipe (default: all)."),
    kv_bits: KVBits = None,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row."),
) -> None:
    """Memory each model and recipe needs (weights, KV cache, state, prefill), what fits, and decode ceilings."""
    from .plan import run_plan

    run_plan(model, config, memory_gb, context, recipe, kv_bits, as_json)


@app.command()
def bench(
    model: str | None = typer.Argument(None, help="Our MLX conversion, or a peer's (mlx-community), dir or Hub id."),
    preset: str | None = typer.Option(
        None, "--preset", help="Build and time a random checkpoint instead: bench or 397b-layers (no download)."
    ),
    compare: list[str] = typer.Option([], "--compare", help="Also time this runtime: mlx-lm or mlx-vlm (repeatable)."),
    peer_model: str | None = typer.Option(None, "--peer-model", help="The peer's conversion of the same checkpoint."),
    source: str | None = typer.Option(
        None, "--source", help="The checkpoint MODEL was converted from: the peer converts it at the same bits."
    ),
    prompt_lengths: str = typer.Option(
        ",".join(map(str, DEFAULT_BENCH_PROMPTS)), "--prompt-lengths", help="Prompt lengths to time, in tokens."
    ),
    decode_tokens: int = typer.Option(64, "--decode-tokens", help="Tokens to decode after each prompt."),
    repeats: int = typer.Option(3, "--repeats", help="Rounds (alternating between runtimes); medians are reported."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed short runs per runtime first."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Prefill and decode tokens/s, time to first token, peak memory and launches per token, vs the peers."""
    from .bench import run_bench

    try:
        lengths = [int(n) for n in prompt_lengths.split(",") if n.strip()]
    except ValueError:
        raise Qwen35Error(
            f"--prompt-lengths {prompt_lengths}: give comma-separated token counts, e.g. 128,1024"
        ) from None
    run_bench(model, preset, compare, peer_model, source, lengths, decode_tokens, repeats, warmup, as_json)


@app.command()
def doctor(
    model: str | None = typer.Option(None, "--model", "-m", help="Also check the kernels at this model's shapes."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (the fields are in the README)."),
    emulate: bool = typer.Option(False, "--emulate", help="Run the Metal kernels on the CPU emulator (needs g++)."),
) -> None:
    """What a bug report needs: OS, chip, memory, MLX, Metal, the wired limit, and each kernel's self-check."""
    from .doctor import run_doctor

    run_doctor(model=model, as_json=as_json, emulate=emulate)


def _check_media_files(images: list[str], video: str | None) -> None:
    """Each --image / --video names an existing local file (or an image data: URL), in the processor's words."""
    from ..processing.image import DATA_URL, URL_SCHEME

    for kind, source in [("image", path) for path in images] + ([("video", video)] if video else []):
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


def _check_port_free(host: str, port: int) -> None:
    """``host`` is an address of this machine and ``port`` is free on each of its addresses (as the server binds)."""
    import errno
    import socket

    try:
        addresses = {info[4][:2]: info[:3] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError, ValueError) as e:
        raise Qwen35Error(f"--host {host}: not an address to listen on ({e}); use 127.0.0.1, ::1 or 0.0.0.0") from None
    for address, (family, kind, protocol) in addresses.items():
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is free
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise Qwen35Error(
                        f"--port {port}: already in use on {address[0]}; stop what listens there or pick another --port"
                    ) from None
                raise Qwen35Error(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    try:
        app(prog_name="mlx-qwen35")
    except Qwen35Error as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        typer.echo("error: out of memory; use a smaller recipe (e.g. --recipe 3bit) or a smaller model", err=True)
        sys.exit(1)
