"""The ``mlx-qwen35`` command line (Typer). Thin: every command calls the package's Python API.

Heavy modules (mlx, the model, tokenizers) are imported inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..errors import Qwen35Error
from ..runtime.settings import DEFAULT_MAX_TOKENS, KV_GROUP_SIZE, MTP_DEFAULT_TOKENS, PREFILL_STEP_SIZE
from .options import (
    MTP,
    MTP_DEFAULT,
    ChatTemplateConfig,
    ExpertMemory,
    ExtraEosToken,
    HideThinking,
    IgnoreChatTemplate,
    KVBits,
    KVGroupSize,
    MaxKVSize,
    MaxPixels,
    MaxTokens,
    MinP,
    ModelArgument,
    ModelFlag,
    MTPTokens,
    Parallel,
    PrefillStepSize,
    PresencePenalty,
    Prompt,
    QuantizedKVStart,
    RepetitionPenalty,
    Seed,
    Split,
    SystemPrompt,
    Temp,
    Thinking,
    ThinkingBudget,
    TopK,
    TopP,
    Verbose,
    check_expert_memory,
    check_quantized_kv_start,
    mtp_settings,
    peer_argv,
    plain_help,
    resolve_model,
    template_thinking,
)

DEFAULT_BENCH_PROMPTS = (128, 1024, 4096, 16384)

app = typer.Typer(
    name="mlx-qwen35",
    help="Run the Qwen3.5 family (397B-A17B and siblings) on Apple Silicon with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    """``--version``: print the installed version and exit."""
    if value:
        from importlib.metadata import version

        typer.echo(f"mlx-qwen35 {version('mlx-qwen35')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run the Qwen3.5 family (397B-A17B and siblings) on Apple Silicon with MLX."""


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
    expert_store: bool = typer.Option(
        False, "--expert-store", help="Write the routed experts one by one (experts/) to stream them from the SSD."
    ),
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
        expert_store=expert_store,
    )


@app.command(name="expert-store")
def expert_store(
    model: ModelArgument = None,
    model_option: ModelFlag = None,
    out: Path = typer.Option(
        ..., "--out", help="Output directory: the checkpoint with its routed experts in experts/."
    ),
    calibration: Path | None = typer.Option(
        None,
        "--calibration",
        help="Text like your prompts: each expert's share of its routing seeds the cache (default: none).",
        show_default=False,
    ),
    calibration_tokens: int = typer.Option(4096, "--calibration-tokens", help="Tokens of --calibration to run."),
    shard_size_gb: float = typer.Option(5.0, "--shard-size-gb", help="Largest output shard, in GB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Repack an MLX MoE checkpoint (ours, mlx-lm's or mlx-vlm's) so its experts stream from the SSD (--expert-memory-gb)."""
    from ..runtime.validation import check_numbers
    from .expert_store import run_expert_store

    check_numbers(shard_size_gb=shard_size_gb)
    if calibration_tokens < 1:
        raise Qwen35Error(f"--calibration-tokens {calibration_tokens}: give at least 1")
    run_expert_store(
        resolve_model(model, model_option, "expert-store"),
        out,
        overwrite,
        calibration,
        calibration_tokens,
        shard_size_gb,
    )


@app.command()
def generate(
    model: ModelArgument = None,
    model_option: ModelFlag = None,
    prompt: Prompt = ...,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    temp: Temp = None,
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    presence_penalty: PresencePenalty = None,
    seed: Seed = None,
    system: SystemPrompt = None,
    think: Thinking = True,
    chat_template_config: ChatTemplateConfig = None,
    thinking_budget: ThinkingBudget = None,
    hide_thinking: HideThinking = False,
    raw: IgnoreChatTemplate = False,
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: reasoning, content, tool_calls, text and the statistics."
    ),
    verbose: Verbose = True,
    image: list[str] | None = typer.Option(
        None, "--image", help="Image file to ask about (repeat or list several; default: none).", show_default=False
    ),
    video: list[str] | None = typer.Option(
        None, "--video", help="Video file to ask about (repeat or list several; default: none).", show_default=False
    ),
    resize_shape: list[int] | None = typer.Option(
        None,
        "--resize-shape",
        help="Fit each image into SIZE or WIDTH HEIGHT pixels, keeping its shape, as mlx-vlm (default: as given).",
        show_default=False,
    ),
    max_pixels: MaxPixels = None,
    min_pixels: int | None = typer.Option(
        None, "--min-pixels", help="Smallest image area in pixels (default: the checkpoint's).", show_default=False
    ),
    fps: float | None = typer.Option(
        None, "--fps", help="Video frames sampled per second (default: the checkpoint's, 2).", show_default=False
    ),
    max_frames: int | None = typer.Option(
        None, "--max-frames", help="Most video frames sampled (default: the checkpoint's).", show_default=False
    ),
    video_start: float | None = typer.Option(
        None, "--video-start", help="Start of the video window, in seconds (default 0).", show_default=False
    ),
    video_end: float | None = typer.Option(
        None, "--video-end", help="End of the video window, in seconds (default start + 60).", show_default=False
    ),
    tools: Path | None = typer.Option(
        None,
        "--tools",
        help="JSON file of tool schemas; the model's tool calls are printed as JSON (default: none).",
        show_default=False,
    ),
    prompt_cache_file: Path | None = typer.Option(
        None,
        "--prompt-cache-file",
        help="Saved conversation directory: continued and updated (created if missing; default: none).",
        show_default=False,
    ),
    extra_eos_token: ExtraEosToken = None,
    kv_bits: KVBits = None,
    kv_group_size: KVGroupSize = KV_GROUP_SIZE,
    quantized_kv_start: QuantizedKVStart = 0,
    max_kv_size: MaxKVSize = None,
    prefill_step_size: PrefillStepSize = PREFILL_STEP_SIZE,
    expert_memory_gb: ExpertMemory = None,
    parallel: Parallel = None,
    split: Split = None,
    mtp: MTP = MTP_DEFAULT,
    mtp_tokens: MTPTokens = MTP_DEFAULT_TOKENS,
) -> None:
    """Generate a reply to one prompt (optionally about images or videos), streaming it to the terminal."""
    from .generate import MediaOptions, resize_shape_option, run_generate

    check_quantized_kv_start(quantized_kv_start)
    speculative = mtp_settings(mtp, mtp_tokens)
    run_generate(
        expert_memory=check_expert_memory(expert_memory_gb),
        model=resolve_model(model, model_option, "generate"),
        prompt=prompt,
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
        system=system,
        enable_thinking=template_thinking(chat_template_config, think),
        hide_thinking=hide_thinking,
        raw=raw,
        as_json=as_json,
        verbose=verbose,
        media=MediaOptions(
            images=tuple(image or ()),
            videos=tuple(video or ()),
            max_pixels=max_pixels,
            min_pixels=min_pixels,
            fps=fps,
            max_frames=max_frames,
            video_start=video_start,
            video_end=video_end,
            resize_shape=resize_shape_option(resize_shape),
        ),
        tools=tools,
        prompt_cache_file=prompt_cache_file,
        thinking_budget=thinking_budget,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        max_kv_size=max_kv_size,
        prefill_step_size=prefill_step_size,
        extra_eos_tokens=list(extra_eos_token or ()),
        parallel=parallel,
        split=split,
        mtp=speculative,
    )


@app.command()
def chat(
    model: ModelArgument = None,
    model_option: ModelFlag = None,
    system: SystemPrompt = None,
    think: Thinking = True,
    chat_template_config: ChatTemplateConfig = None,
    thinking_budget: ThinkingBudget = None,
    hide_thinking: HideThinking = False,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    temp: Temp = None,
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    presence_penalty: PresencePenalty = None,
    seed: Seed = None,
    max_kv_size: MaxKVSize = None,
    kv_bits: KVBits = None,
    kv_group_size: KVGroupSize = KV_GROUP_SIZE,
    quantized_kv_start: QuantizedKVStart = 0,
    prefill_step_size: PrefillStepSize = PREFILL_STEP_SIZE,
    sessions_dir: Path | None = typer.Option(
        None,
        "--sessions-dir",
        envvar="MLX_QWEN35_SESSIONS_DIR",
        help="Where /save and /load keep conversations (default: $XDG_STATE_HOME/mlx-qwen35/sessions, ~/.local/state without it).",
        show_default=False,
    ),
    max_pixels: MaxPixels = None,
    no_history: bool = typer.Option(
        False, "--no-history", help="Keep no input history file ($XDG_STATE_HOME/mlx-qwen35/chat_history)."
    ),
    context_policy: str = typer.Option(
        "refuse",
        "--context-policy",
        help="When the conversation fills the context: refuse (say what to do) or drop-oldest (drop the oldest turns).",
    ),
    expert_memory_gb: ExpertMemory = None,
    parallel: Parallel = None,
    split: Split = None,
    mtp: MTP = MTP_DEFAULT,
    mtp_tokens: MTPTokens = MTP_DEFAULT_TOKENS,
) -> None:
    """Chat with a model in the terminal: streaming markdown, reasoning, /commands, a prompt cache across turns."""
    from .repl import run_chat

    check_quantized_kv_start(quantized_kv_start)
    speculative = mtp_settings(mtp, mtp_tokens)
    run_chat(
        expert_memory=check_expert_memory(expert_memory_gb),
        model=resolve_model(model, model_option, "chat"),
        system=system,
        enable_thinking=template_thinking(chat_template_config, think),
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
        kv_group_size=kv_group_size,
        prefill_step_size=prefill_step_size,
        sessions_dir=sessions_dir,
        max_pixels=max_pixels,
        no_history=no_history,
        context_policy=context_policy,
        mtp=speculative,
        parallel=parallel,
        split=split,
    )


@app.command()
def demo(
    max_tokens: int = typer.Option(48, "--max-tokens", "-m", help="Tokens to generate."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild the embedded demo checkpoint."),
    chat: bool = typer.Option(False, "--chat", help="Then chat with the demo model in the terminal."),
) -> None:
    """Run the tiny Qwen3.5 MoE shipped in the package (trained on Python docs; no download) through the whole stack."""
    from ..runtime.validation import check_numbers
    from .demo import run_demo

    check_numbers(max_tokens=max_tokens)
    run_demo(max_tokens=max_tokens, rebuild=rebuild, chat=chat)


@app.command()
def serve(
    model: ModelArgument = None,
    model_option: ModelFlag = None,
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
    served_model_name: str | None = typer.Option(
        None,
        "--served-model-name",
        help="The model id the API reports in /v1/models and responses (default: the model directory's name).",
    ),
    reasoning_field: str = typer.Option(
        "both",
        "--reasoning-field",
        help="Where replies carry the thinking: reasoning_content, reasoning (mlx_lm.server's name) or both.",
    ),
    allowed_origins: list[str] = typer.Option(
        [],
        "--allowed-origins",
        help="Web origins that may call the API from a browser (CORS), e.g. http://localhost:3000; repeat or comma-separate. Default: none.",
    ),
    expert_memory_gb: ExpertMemory = None,
    parallel: Parallel = None,
    split: Split = None,
    mtp: MTP = MTP_DEFAULT,
    mtp_tokens: MTPTokens = MTP_DEFAULT_TOKENS,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and the chat page at / (no MODEL: the demo)."""
    from ..runtime.validation import check_numbers
    from .server.routes import serve as run_server

    check_numbers(port=port, max_tokens=max_tokens)
    expert_memory = check_expert_memory(expert_memory_gb)
    speculative = mtp_settings(mtp, mtp_tokens)
    _check_port_free(host, port)  # before the model loads: a busy port would only fail after it
    if model or model_option:
        model_path = resolve_model(model, model_option, "serve")
    else:
        from .demo import DEMO_SERVED_NAME, serve_default_model

        model_path, served_model_name = serve_default_model(), served_model_name or DEMO_SERVED_NAME
    run_server(
        model_path,
        expert_memory=expert_memory,
        host=host,
        port=port,
        api_key=api_key,
        max_tokens=max_tokens,
        allow_local_images=allow_local_images,
        max_body_mb=max_body_mb,
        max_prompt_tokens=max_prompt_tokens,
        served_model_name=served_model_name,
        reasoning_field=reasoning_field,
        allowed_origins=tuple(o.strip() for option in allowed_origins for o in option.split(",") if o.strip()),
        parallel=parallel,
        split=split,
        mtp=speculative,
    )


@app.command()
def models(
    search: list[Path] | None = typer.Option(
        None,
        "--dir",
        help="Also look in this directory and its subdirectories (repeat for several).",
        show_default=False,
    ),
) -> None:
    """List the Qwen3.5 checkpoints on this machine (model folders, the Hub cache, the demo): size, quantisation, fit."""
    from .models import list_models

    list_models(list(search or ()))


app.command(name="ls", hidden=True, help="Same as 'models'.")(models)


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
    expert_store: bool = typer.Option(
        False, "--expert-store", help="Also project streaming the experts that do not fit from the SSD."
    ),
    hit_rate: float | None = typer.Option(
        None, "--hit-rate", help="The expert cache's hit rate to project with (default: measured on the demo model)."
    ),
) -> None:
    """Memory each model and recipe needs (weights, KV cache, state, prefill), what fits, and decode ceilings."""
    from .plan import run_plan

    run_plan(model, config, memory_gb, context, recipe, kv_bits, as_json, expert_store, hit_rate)


@app.command()
def bench(
    model: str | None = typer.Argument(None, help="Our MLX conversion, or a peer's (mlx-community), dir or Hub id."),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help="Build and time a random checkpoint instead: bench, dispatch or 397b-layers (no download).",
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
        # Typer's own command object, with mlx-lm's argv syntax rewritten and the help's type column quiet.
        plain_help(typer.main.get_command(app)).main(args=peer_argv(sys.argv[1:]), prog_name="mlx-qwen35")
    except Qwen35Error as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        typer.echo("error: out of memory; use a smaller recipe (e.g. --recipe 3bit) or a smaller model", err=True)
        sys.exit(1)
