"""Benchmark checkpoints `bench --preset` builds once (random weights, no download), with each runtime's conversion.

* ``bench``: the demo architecture resized to the 397B's proportions at a CPU-instant size: hidden 256,
  4 layers (3 DeltaNet : 1 attention), attention 8 query / 1 KV heads of 64, DeltaNet 2 key / 8 value
  heads of 64, 64 experts of 64 with top-8 + a shared expert.
* ``dispatch``: the 397B's 60 layers (45 DeltaNet, 15 attention; 10 experts a token) at tiny widths
  (hidden 128, heads of 32, 64 experts of 64), so a decode step costs what dispatching its primitives
  costs, as on Metal, where compute per token is small and ~60 layers of launches dominate.
* ``397b-layers``: one DeltaNet and one attention layer at the 397B's real dimensions (hidden 4096;
  DeltaNet 16 key / 64 value heads of 128; attention 32 query / 2 KV heads of 256; experts of 1024 with
  top-10 + a shared expert of 1024), but 64 experts instead of 512 so both runtimes' copies fit a 24 GB
  machine: a token reads the same 10 experts either way. No MTP head.

Every runtime gets the same source checkpoint converted by its own converter at 4 bits, group 64,
float32 activations off Metal (the CPU's fastest) and bfloat16 on it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlx.core as mx

from ...errors import Qwen35Error
from ..demo import demo_config
from .runtimes import OURS

BITS, GROUP_SIZE = 4, 64


def _text(**overrides) -> dict:
    config = demo_config()
    config["text_config"].update(overrides)
    config["vision_config"]["out_hidden_size"] = config["text_config"]["hidden_size"]
    return config


PRESETS = {
    "bench": lambda: _text(
        hidden_size=256,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=8,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
    ),
    "dispatch": lambda: _text(
        hidden_size=128,
        num_hidden_layers=60,
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 15,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        num_experts=64,
        num_experts_per_tok=10,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        mtp_num_hidden_layers=0,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    ),
    "397b-layers": lambda: _text(
        hidden_size=4096,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        full_attention_interval=2,  # mlx-lm places attention layers by the interval, not by layer_types
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=64,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        num_experts=64,
        num_experts_per_tok=10,
        moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024,
        mtp_num_hidden_layers=0,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
    ),
}


def bench_cache_dir() -> Path:
    """``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/mlx-qwen35/bench/``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-qwen35" / "bench"


def activation_dtype() -> str:
    return "bfloat16" if mx.metal.is_available() else "float32"


def _built(target: Path, build) -> Path:
    """``target``, built by ``build(staging)`` first if absent; a half-built staging dir is never mistaken for it."""
    if target.is_dir():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        build(staging)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise Qwen35Error(
            f"{target}: cannot build the benchmark checkpoint ({e.strerror or e}); free disk space"
        ) from None
    staging.rename(target)
    return target


def build_preset(name: str, runtimes: list[str]) -> dict[str, Path]:
    """The preset's conversion for each of ``runtimes`` (building what is missing); also ``"source"``."""
    if name not in PRESETS:
        raise Qwen35Error(f"--preset {name}: unknown; choose one of {', '.join(PRESETS)}")
    from ...weights.random_checkpoint import write_random_hf_checkpoint

    dtype = activation_dtype()
    root = bench_cache_dir() / name
    print(f"benchmark checkpoint '{name}' in {root} (built once; random weights, no download)")
    source = _built(root / "hf", lambda d: write_random_hf_checkpoint(d, PRESETS[name](), seed=0, layout="fused"))
    dirs = {"source": source}
    for runtime in runtimes:
        dirs[runtime] = _built(
            root / f"{runtime}-{BITS}bit-{dtype}", lambda d, r=runtime: convert_for(r, source, d, dtype)
        )
    return dirs


def convert_for(
    runtime: str, source: Path, target: Path, dtype: str, bits: int = BITS, group_size: int = GROUP_SIZE
) -> None:
    """Convert ``source`` with ``runtime``'s own converter at ``bits`` / ``group_size``."""
    if runtime == OURS:
        from ...weights.convert import convert

        recipe = {4: "4bit", 3: "3bit", 8: "8bit"}.get(bits)
        if recipe is None or group_size != GROUP_SIZE:
            raise Qwen35Error(
                f"no recipe of ours converts at {bits} bits, group {group_size}; use 3, 4 or 8 bits, group 64"
            )
        convert(str(source), target, recipe=recipe, dtype=dtype)
    elif runtime == "mlx-lm":
        from mlx_lm import convert

        convert(str(source), str(target), quantize=True, q_bits=bits, q_group_size=group_size, dtype=dtype)
    else:
        from mlx_vlm import convert

        convert(str(source), str(target), quantize=True, q_bits=bits, q_group_size=group_size, dtype=dtype)
