"""Command-line options several commands share, named as mlx-lm and mlx-vlm name them (README "Flags").

A user coming from ``mlx_lm.generate`` / ``mlx_vlm.generate`` types the flags they know: ``-m`` is
``--max-tokens``, ``-p`` ``--prompt``, ``--temp``, ``--system-prompt``, ``--image a.png b.png``. Our
own earlier names stay as aliases (``--system``, ``--raw``, ``--think/--no-think``). argparse's
multi-value options (``nargs="+"``) and mlx-lm's ``--verbose False`` are rewritten into Typer's
repeated form by ``peer_argv`` before parsing. Importing this module imports no MLX.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import Qwen35Error
from ..runtime.settings import MTP_MAX_TOKENS, NON_THINKING_PRESET, THINKING_PRESET, MTPSettings


def _preset(field: str) -> str:
    """The help text's default of a sampling option: the model card's value in each mode."""
    thinking, plain = getattr(THINKING_PRESET, field), getattr(NON_THINKING_PRESET, field)
    return (
        f"model card preset: {thinking} thinking, {plain} not" if thinking != plain else f"model card preset: {plain}"
    )


ModelArgument = Annotated[
    str | None,
    typer.Argument(
        hidden=True, show_default=False, metavar="MODEL", help="The model, as --model."
    ),  # shown once, as --model
]
ModelFlag = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="MLX checkpoint directory or Hub repo id (or give it first: 'mlx-qwen35 chat MODEL'; 'mlx-qwen35 models' lists them).",
        show_default=False,
    ),
]
Prompt = Annotated[str, typer.Option("--prompt", "-p", help="The user message ('-' reads standard input).")]
MaxTokens = Annotated[
    int, typer.Option("--max-tokens", "-m", help="Most tokens to generate (reasoning and answer together).")
]
Temp = Annotated[
    float | None,
    typer.Option(
        "--temp", "--temperature", help=f"Sampling temperature, 0 = greedy ({_preset('temp')}).", show_default=False
    ),
]
TopP = Annotated[
    float | None,
    typer.Option("--top-p", help=f"Nucleus sampling, 0 or 1 = off ({_preset('top_p')}).", show_default=False),
]
TopK = Annotated[
    int | None,
    typer.Option("--top-k", help=f"Sample from the k likeliest, 0 = off ({_preset('top_k')}).", show_default=False),
]
MinP = Annotated[
    float | None,
    typer.Option("--min-p", help=f"Drop tokens below min-p × the top one's ({_preset('min_p')}).", show_default=False),
]
RepetitionPenalty = Annotated[
    float | None,
    typer.Option(
        "--repetition-penalty", help="Divide repeated tokens' logits by this (default: off).", show_default=False
    ),
]
PresencePenalty = Annotated[
    float | None,
    typer.Option(
        "--presence-penalty",
        help=f"Subtract this from seen tokens' logits ({_preset('presence_penalty')}).",
        show_default=False,
    ),
]
Seed = Annotated[int | None, typer.Option("--seed", help="PRNG seed (default: random).", show_default=False)]
SystemPrompt = Annotated[
    str | None, typer.Option("--system-prompt", "--system", help="System prompt (default: none).", show_default=False)
]
Thinking = Annotated[
    bool,
    typer.Option(
        "--enable-thinking/--disable-thinking",
        "--think/--no-think",
        help="Let the model reason before answering.",
    ),
]
ThinkingBudget = Annotated[
    int | None,
    typer.Option(
        "--thinking-budget", help="Close the reasoning after this many tokens (default: no limit).", show_default=False
    ),
]
HideThinking = Annotated[bool, typer.Option("--hide-thinking", help="Do not show the reasoning, only the answer.")]
PrefillStepSize = Annotated[
    int,
    typer.Option("--prefill-step-size", help="Prompt tokens per forward pass; smaller lowers peak memory in prefill."),
]
MaxKVSize = Annotated[
    int | None,
    typer.Option(
        "--max-kv-size", help="Most tokens of context, prompt + reply (default: the model's).", show_default=False
    ),
]
KVBits = Annotated[
    int | None,
    typer.Option(
        "--kv-bits",
        help="Quantise the attention K/V cache to 8 or 4 bits (default: not quantised).",
        show_default=False,
    ),
]
KVGroupSize = Annotated[int, typer.Option("--kv-group-size", help="Group size of the K/V cache quantisation.")]
QuantizedKVStart = Annotated[
    int,
    typer.Option(
        "--quantized-kv-start",
        help="Step from which --kv-bits quantises the cache; only 0 (quantised from the first token) is supported.",
    ),
]
ExtraEosToken = Annotated[
    list[str] | None,
    typer.Option(
        "--extra-eos-token",
        help="Also stop at this token or text (repeat or list several; default: none).",
        show_default=False,
    ),
]
ChatTemplateConfig = Annotated[
    str | None,
    typer.Option(
        "--chat-template-config",
        help="JSON keywords for the chat template, e.g. '{\"enable_thinking\": false}' (default: none).",
        show_default=False,
    ),
]
IgnoreChatTemplate = Annotated[
    bool, typer.Option("--ignore-chat-template", "--raw", help="Send the prompt as is, without the chat template.")
]
Verbose = Annotated[
    bool,
    typer.Option("--verbose/--no-verbose", help="Print the statistics after the reply ('--verbose False' as mlx-lm)."),
]
MaxPixels = Annotated[
    int | None,
    typer.Option(
        "--max-pixels",
        help="Largest area of an image or video frame, in pixels (default 1344×1344, the model card's).",
        show_default=False,
    ),
]

# Speculative decoding with the checkpoint's MTP head (docs/architecture.md §20), on generate, chat and serve.
MTP = Annotated[
    bool,
    typer.Option(
        "--mtp/--no-mtp",
        help="Draft tokens with the checkpoint's MTP head and check them in one forward (same output; "
        "drafting turns itself down or off while it does not pay).",
    ),
]
MTPTokens = Annotated[
    int,
    typer.Option("--mtp-tokens", help=f"Most tokens the MTP head drafts per step (1 to {MTP_MAX_TOKENS})."),
]
MTP_DEFAULT = False  # README "MTP": measured slower on the CPU backend, where a verify costs ~k+1 decode steps


def mtp_settings(mtp: bool, mtp_tokens: int) -> MTPSettings:
    """The MTP flags as settings, checked before any model loads: ``--mtp-tokens``, and ``--mtp`` in one process only
    (the ranks of several hold no MTP head, docs/architecture.md §21)."""
    if mtp:
        refuse_ranks("--mtp", "--no-mtp")
    return MTPSettings(enabled=mtp, mtp_tokens=mtp_tokens)


def refuse_ranks(command: str, instead: str) -> None:
    """A command that runs in one process only stops at once under mlx.launch instead of hanging its ranks."""
    from ..runtime.distributed import launched

    if launched():
        raise Qwen35Error(f"{command} runs in one process, not under mlx.launch; use {instead} on several ranks")


# argparse options that take several values (``nargs="+"``) in mlx-lm / mlx-vlm; Typer takes them repeated.
MULTI_VALUE_OPTIONS = ("--image", "--video", "--extra-eos-token", "--resize-shape")
BOOLEAN_WORDS = {"true": True, "t": True, "1": True, "yes": True, "false": False, "f": False, "0": False, "no": False}


def _is_value(token: str, option: str) -> bool:
    """Whether ``token`` after a multi-value ``option`` is one of its values (not an option, not the model dir)."""
    if token.startswith("-") and not (option == "--resize-shape" and token.lstrip("-").isdigit()):
        return False
    if option == "--resize-shape":
        return token.isdigit()
    try:
        return not Path(token).expanduser().is_dir()  # a directory is the model given positionally
    except (OSError, ValueError):
        return True


def peer_argv(argv: list[str]) -> list[str]:
    """``argv`` with mlx-lm / mlx-vlm syntax in Typer's form: ``--image a b`` → ``--image a --image b``, ``--verbose F`` → ``--no-verbose``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return out + argv[i:]
        if token == "--verbose" and i + 1 < len(argv) and argv[i + 1].lower() in BOOLEAN_WORDS:
            out.append("--verbose" if BOOLEAN_WORDS[argv[i + 1].lower()] else "--no-verbose")
            i += 2
            continue
        out.append(token)
        i += 1
        if token in MULTI_VALUE_OPTIONS and i < len(argv):
            out.append(argv[i])  # the first value, whatever it looks like, as Typer would take it
            i += 1
            while i < len(argv) and _is_value(argv[i], token):
                out += [token, argv[i]]
                i += 1
    return out


def resolve_model(positional: str | None, option: str | None, command: str) -> str:
    """The model given positionally or by ``--model`` (one of them, or both the same)."""
    if positional and option and positional != option:
        raise Qwen35Error(f"two models given ({positional} and --model {option}); give one")
    model = positional or option
    if not model:
        raise Qwen35Error(
            f"no model given; run 'mlx-qwen35 {command} MODEL' with an MLX dir or Hub id ('mlx-qwen35 models' lists local ones)"
        )
    return model


def template_thinking(chat_template_config: str | None, enable_thinking: bool) -> bool:
    """Thinking on or off: ``--chat-template-config``'s ``enable_thinking`` if it sets one, else the flag's."""
    if chat_template_config is None:
        return enable_thinking
    try:
        config = json.loads(chat_template_config)
    except ValueError as e:
        raise Qwen35Error(
            f"--chat-template-config: not valid JSON ({e}); give e.g. '{{\"enable_thinking\": false}}'"
        ) from None
    if not isinstance(config, dict):
        raise Qwen35Error("--chat-template-config: give a JSON object, e.g. '{\"enable_thinking\": false}'")
    unknown = sorted(set(config) - {"enable_thinking"})
    if unknown:
        raise Qwen35Error(
            f"--chat-template-config: the Qwen3.5 template reads only enable_thinking, not {unknown[0]!r}"
        )
    if "enable_thinking" in config and not isinstance(config["enable_thinking"], bool):
        raise Qwen35Error("--chat-template-config: enable_thinking is true or false")
    return config.get("enable_thinking", enable_thinking)


def check_quantized_kv_start(start: int) -> None:
    """Only 0 is offered: the K/V cache is quantised from its first token (mlx-lm's default is 5000)."""
    if start != 0:
        raise Qwen35Error(
            f"--quantized-kv-start {start}: the cache here is quantised from the first token; give 0 or drop the option"
        )


def _value_name(param) -> str:
    """A short word for what an option takes (N, NUM, PATH, TEXT), instead of Typer's ``<int>`` type column."""
    name = param.display_type(None) if param.type_descriptor.is_path else param.bare_type()
    for kind, word in (("int", "N"), ("float", "NUM"), ("file", "PATH"), ("path", "PATH"), ("directory", "PATH")):
        if kind in name.lower():
            return word
    return "TEXT"


def plain_help(command):
    """``command`` (a Typer click command) and its subcommands: no type column for flags, a value word for the rest."""
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)
    help_option = command.get_help_option(command.context_class(command))  # made once and cached by click
    for param in [*command.params, *([help_option] if help_option else [])]:
        if param.param_type_name == "option" and param.metavar is None:
            param.metavar = "" if param.is_flag else _value_name(param)
    return command


# ---------------------------------------------------------------------------------------------- streamed experts

ExpertMemory = Annotated[
    str | None,
    typer.Option(
        "--expert-memory-gb",
        help="With an expert store (convert --expert-store, mlx-qwen35 expert-store): GB of routed experts kept "
        "in memory, or a share of them such as 25%; the rest is read from the SSD (default: all of them).",
        show_default=False,
    ),
]


def check_expert_memory(spec: str | None) -> str | None:
    """``--expert-memory-gb`` checked before the model loads (one line naming the option); returned as given."""
    from ..weights.expert_store import parse_expert_memory

    parse_expert_memory(spec)
    return spec


# ------------------------------------------------------------------ several Macs (mlx.launch; docs/architecture.md §21)
Parallel = Annotated[
    str | None,
    typer.Option(
        "--parallel",
        help="Under mlx.launch: pipeline (each Mac holds a run of layers: fits what one Mac cannot; the default), "
        "tensor (each Mac holds 1/n of every expert or MLP and attention/DeltaNet head: the fastest decode over "
        "RDMA) or expert (1/n of every expert only: one collective per layer, for slower links).",
        show_default=False,
    ),
]
Split = Annotated[
    str | None,
    typer.Option(
        "--split",
        help="Pipeline layers per rank, e.g. 40,20 (default: in proportion to each host's free memory).",
        show_default=False,
    ),
]
