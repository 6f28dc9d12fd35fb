"""Generation settings: typed, checked once where a surface builds them, read by the runtime.

Each surface (the CLI, the chat REPL, the server) turns what the user gave into one frozen
``GenerationSettings``; construction checks every value against its rule in ``RANGES``, so a bad value
is a one-line ``Qwen35Error`` naming the option before any model work, and the runtime reads plain
attributes. The server's request fields take their bounds from ``RANGES`` too (OpenAI's own, tighter
limits stay in the request models). Importing this module imports no MLX: the CLI reads its defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from ..errors import Qwen35Error
from ..weights.memory_plan import PREFILL_STEP_SIZE

# A reply when the user sets no limit (the CLI's generate and chat, a server request): the model card's
# 32,768 for general use, so a thinking model reaches its answer.
DEFAULT_MAX_TOKENS = 32768
GENERATE_MAX_TOKENS = 256  # the Python API's ``generate`` / ``stream_generate`` (mlx-lm's default)
KV_BITS = (8, 4)  # the attention K/V cache quantisations offered (None: float K/V)
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize supports
KV_GROUP_SIZE = 64
MAX_SEED = 2**63 - 1  # mx.random.seed takes a uint64; JSON clients keep 63 bits exactly
PENALTY_CONTEXT = 20  # tokens the repetition and presence penalties look back over
MTP_MAX_TOKENS = 3  # the most tokens the MTP head drafts per step; its acceptance falls with each depth
MTP_DEFAULT_TOKENS = (
    2  # drafted per step when MTP is on and the user names no k (README "MTP", benchmarks/bench_mtp.py)
)


@dataclass(frozen=True)
class Range:
    """The values a numeric option takes: finite, at least ``ge`` / above ``gt``, at most ``le``; an integer if ``integer``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    integer: bool = False

    def check(self, option: str, value: float | None) -> None:
        """Raise a one-line ``Qwen35Error`` naming ``option`` unless ``value`` is None (unset) or in range."""
        if value is None:
            return
        number = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if (
            number
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
        ):
            return
        raise Qwen35Error(f"{option} {value!r}: give {self}")

    def bounds(self) -> dict:
        """The bounds as pydantic ``Field`` keywords (``ge``, ``gt``, ``le``; finite for floats)."""
        given = {name: getattr(self, name) for name in ("ge", "gt", "le") if getattr(self, name) is not None}
        return given if self.integer else given | {"allow_inf_nan": False}

    def __str__(self) -> str:
        limits = [
            f"{op} {bound:g}" if isinstance(bound, float) else f"{op} {bound}"  # an int exactly (the seed's 2^63 - 1)
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le))
            if bound is not None
        ]
        return ("an integer" if self.integer else "a finite number") + (" " + " and ".join(limits) if limits else "")


# Each option's rule, once. ``None`` means "unset" wherever a field allows it.
RANGES: dict[str, Range] = {
    "temp": Range(ge=0),  # 0: greedy
    "top_p": Range(ge=0, le=1),  # 0 or 1: off
    "top_k": Range(ge=0, integer=True),  # 0 (or the whole vocabulary): off
    "min_p": Range(ge=0, le=1),  # 0: off
    "repetition_penalty": Range(gt=0),  # multiplicative; 1: no effect
    "presence_penalty": Range(),  # additive, either sign; 0: no effect
    "frequency_penalty": Range(),  # additive per occurrence, either sign; 0: no effect
    "max_tokens": Range(ge=1, integer=True),
    "seed": Range(ge=0, le=MAX_SEED, integer=True),
    "thinking_budget": Range(ge=0, integer=True),  # 0: close the reasoning at once
    "prefill_step_size": Range(ge=1, integer=True),
    # Options around a generation, checked by the surfaces that take them (runtime/validation.py).
    "max_kv_size": Range(ge=1, integer=True),
    "min_pixels": Range(ge=1, integer=True),
    "max_pixels": Range(ge=1, integer=True),
    "fps": Range(gt=0),
    "max_frames": Range(ge=1, integer=True),
    "video_start": Range(ge=0),  # seconds
    "video_end": Range(gt=0),  # seconds; past the end of the video reads to its end
    "shard_size_gb": Range(gt=0),
    "port": Range(ge=1, le=65535, integer=True),
    "mtp_tokens": Range(ge=1, le=MTP_MAX_TOKENS, integer=True),
}


def _check_ranges(settings) -> None:
    """Check each field of ``settings`` that has a rule in ``RANGES``."""
    for f in fields(settings):
        if f.name in RANGES:
            RANGES[f.name].check(f.name, getattr(settings, f.name))


@dataclass(frozen=True)
class Sampling:
    """How each token is drawn: mlx-lm's sampler (temperature, top-p, top-k, min-p) and the penalties."""

    temp: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None  # None: off
    presence_penalty: float | None = None  # None: off
    frequency_penalty: float | None = None  # None: off

    def __post_init__(self) -> None:
        _check_ranges(self)

    def overridden(self, overrides: Mapping[str, float | int | None]) -> Sampling:
        """These settings with each override that is given (None leaves the field as it is)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise Qwen35Error(f"unknown sampling option {unknown[0]!r}; use {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def keywords(self) -> dict:
        """The fields that are set, as ``stream_generate`` keywords."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


# The model card's general-purpose sampling for each mode (docs/architecture.md §14).
THINKING_PRESET = Sampling(temp=1.0, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=1.5)
NON_THINKING_PRESET = Sampling(temp=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5)


def recommended_sampling(enable_thinking: bool, overrides: Mapping[str, float | int | None] | None = None) -> Sampling:
    """The model card's preset for thinking or non-thinking mode, under the user's ``overrides`` (None: the preset's)."""
    return (THINKING_PRESET if enable_thinking else NON_THINKING_PRESET).overridden(overrides or {})


@dataclass(frozen=True)
class KVCacheSettings:
    """The attention K/V cache of a cache made for a generation: float, or quantised to ``bits``."""

    bits: int | None = None
    group_size: int = KV_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.bits is not None and self.bits not in KV_BITS:
            raise Qwen35Error(f"kv_bits {self.bits}: use {' or '.join(map(str, KV_BITS))}")
        if self.group_size not in KV_GROUP_SIZES:
            raise Qwen35Error(f"kv_group_size {self.group_size}: use {', '.join(map(str, KV_GROUP_SIZES))}")


@dataclass(frozen=True)
class MTPSettings:
    """Speculative decoding with the checkpoint's MTP head (docs/architecture.md §20): on or off, up to
    ``mtp_tokens`` drafted per step, fewer or none while they do not pay if ``adaptive``."""

    enabled: bool = False
    mtp_tokens: int = MTP_DEFAULT_TOKENS
    adaptive: bool = True

    def __post_init__(self) -> None:
        _check_ranges(self)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything one generation reads besides its prompt and cache; every value is checked when it is built."""

    sampling: Sampling = Sampling()  # greedy, no penalties
    max_tokens: int = GENERATE_MAX_TOKENS
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    seed: int | None = None  # seeds mx.random when the generation starts
    enable_thinking: bool = True  # the chat template opens a <think> block (prompts given as messages)
    thinking_budget: int | None = None  # close an open <think> block after this many tokens
    tools: list[dict] | None = None  # tool schemas the chat template shows (prompts given as messages)
    prefill_step_size: int = PREFILL_STEP_SIZE
    kv_cache: KVCacheSettings = KVCacheSettings()  # for a cache the generation makes itself
    json_schema: dict | None = None  # the answer (after any thinking) is JSON matching this schema
    mtp: MTPSettings = MTPSettings()  # speculative decoding with the MTP head (off by default in the API)

    def __post_init__(self) -> None:
        _check_ranges(self)


def max_tokens_within_context(
    max_tokens: int, prompt_tokens: int, context_tokens: int | None, *, what: str = "the prompt", fix: str
) -> int:
    """``max_tokens`` cut to the room ``context_tokens`` leaves after the prompt (None: no limit).

    The cache cannot drop tokens, so a prompt that fills the context is an error; ``fix`` says what to do.
    """
    if context_tokens is None:
        return max_tokens
    room = context_tokens - prompt_tokens
    if room <= 0:
        raise Qwen35Error(f"{what} ({prompt_tokens} tokens) fills the context ({context_tokens}); {fix}")
    return min(max_tokens, room)
