"""Checkpoints written by the peers (mlx-lm, mlx-vlm) load as they are: their names map onto ours.

What the peers store (mlx-lm 0.32 ``models/qwen3_5*.py``, mlx-vlm 0.7 ``models/qwen3_5*/``), checked
against our layout, so only names change and no tensor is rewritten on disk:

* LM under ``language_model.model.*``, the head under ``language_model.lm_head.*`` (absent when
  tied); mlx-vlm adds the vision tower under ``vision_tower.*`` (mlx-lm drops it, and its
  ``vision_config``). Neither writes ``mtp.*``: mlx-vlm splits MTP into a separate drafter dir.
* Zero-centred norms already hold ``1 + w`` and conv1d is already [C, K, 1] — the same as ours.
  Both shift the norms only when conv1d is still [C, 1, K], i.e. on a raw HF source, so a peer
  directory never holds unshifted norms.
* Routed experts stacked [E, out, in] as ``mlp.switch_mlp.{gate,up,down}_proj`` (ours:
  ``mlp.experts``, the same mlx-lm SwitchGLU), quantised tensors alongside (``.scales``,
  ``.biases`` for affine, ``.global_scale`` for nvfp4 with one scale per expert).
* ``A_log`` keeps its source dtype (their cast predicate skips it); the loader computes in fp32
  off Metal either way.
* ``config.json`` keeps the HF ``text_config`` and adds ``quantization`` (and a copy,
  ``quantization_config``): the defaults ``group_size``/``bits``/``mode`` plus per-module entries
  keyed by *their* module path — a dict of overrides (the 8-bit router, the mixed recipes; an
  entry without ``mode`` means affine, as ``to_quantized`` defaults it) or ``False``. Renaming the
  keys is all our loader needs: it quantises from the same map with the same ``nn.quantize``.
* mlx-vlm stores the patch-embedding Conv3d channels-last [O, T, P, P, C]; our converter keeps the
  HF layout [O, C, T, P, P], so it is moved back (a lazy transpose) and the vision tower sees one layout.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from ..config import ModelConfig

# (peer prefix, our prefix) for tensor names and module paths; ``language_model.lm_head`` is already ours.
_PREFIXES = (
    ("language_model.model.", "language_model."),
    ("vision_tower.", "visual."),
)
_PATCH_EMBED = "visual.patch_embed.proj.weight"


def detect_format(weights: dict[str, mx.array]) -> str:
    """Which writer produced these tensor names: 'ours', 'hf', 'mlx-lm' or 'mlx-vlm'."""
    keys = weights.keys()
    if any(k.startswith("model.language_model.") for k in keys):
        return "hf"
    if any(k.startswith("language_model.model.") for k in keys):
        return "mlx-vlm" if any(k.startswith("vision_tower.") for k in keys) else "mlx-lm"
    return "ours"


def peer_key(key: str) -> str:
    """Our name for a peer's tensor name or module path."""
    for theirs, ours in _PREFIXES:
        if key.startswith(theirs):
            key = ours + key[len(theirs) :]
            break
    return key.replace(".mlp.switch_mlp.", ".mlp.experts.")


def _patch_embed_to_ours(weight: mx.array, in_channels: int) -> mx.array:
    """mlx-vlm's channels-last Conv3d kernel [O, T, P, P, C] → the HF layout our converter stores [O, C, T, P, P]."""
    if weight.ndim == 5 and weight.shape[-1] == in_channels and weight.shape[1] != in_channels:
        return weight.transpose(0, 4, 1, 2, 3)
    return weight


def translate_peer_checkpoint(weights: dict, config: ModelConfig, fmt: str) -> tuple[dict, ModelConfig]:
    """Rename a peer's tensors and quantisation map to ours; values are untouched (the patch kernel is only re-laid)."""
    renamed = {peer_key(k): v for k, v in weights.items()}
    if fmt == "mlx-vlm" and _PATCH_EMBED in renamed and config.vision is not None:
        renamed[_PATCH_EMBED] = _patch_embed_to_ours(renamed[_PATCH_EMBED], config.vision.in_channels)
    quantization = config.quantization
    if quantization:
        # Per-module entries (dict or False) are keyed by module path; the defaults are scalars.
        quantization = {peer_key(k) if isinstance(v, (dict, bool)) else k: v for k, v in quantization.items()}
    return renamed, dataclasses.replace(config, quantization=quantization)
