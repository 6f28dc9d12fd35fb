"""Checkpoints written by the peers (mlx-lm, mlx-vlm) load as they are: their names map onto ours.

Both peers already store MLX layouts (conv1d [C, K, 1], zero-centred norms as 1 + w, experts
stacked [E, out, in] as ``switch_mlp``); only the module paths differ. The quantisation map in
their config.json is renamed the same way, so per-module overrides and modes (affine, mxfp4,
nvfp4, mxfp8) apply unchanged.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from .config import ModelConfig

# (peer prefix, our prefix), first match wins.
_PREFIXES = (
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("vision_tower.", "visual."),
)


def detect_format(weights: dict[str, mx.array]) -> str:
    """Which writer produced these tensor names: 'ours', 'hf', 'mlx-lm' or 'mlx-vlm'."""
    keys = weights.keys()
    if any(k.startswith("model.language_model.") for k in keys):
        return "hf"
    if any(k.startswith("language_model.model.") for k in keys):
        return "mlx-vlm" if any(k.startswith("vision_tower.") for k in keys) else "mlx-lm"
    return "ours"


def peer_key(key: str) -> str:
    """Our name for a peer's tensor or module path."""
    for theirs, ours in _PREFIXES:
        if key.startswith(theirs):
            key = ours + key[len(theirs) :]
            break
    return key.replace(".mlp.switch_mlp.", ".mlp.experts.")


def translate_peer_checkpoint(weights: dict, config: ModelConfig, fmt: str) -> tuple[dict, ModelConfig]:
    """Rename a peer's tensors and quantisation map to ours (the arrays themselves are not touched)."""
    renamed = {peer_key(k): v for k, v in weights.items()}
    quantization = config.quantization
    if quantization:
        quantization = {peer_key(k) if isinstance(v, (dict, bool)) else k: v for k, v in quantization.items()}
    return renamed, dataclasses.replace(config, quantization=quantization)
