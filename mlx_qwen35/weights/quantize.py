"""Precision policy: how every tensor of a converted checkpoint is stored, and the named recipes.

A recipe decides, per quantisable weight, its bits and group size; everything else is stored in the
requested dtype, except the tensors whose math is fp32 in the reference (zero-centred norm weights
after the +1 shift, ``A_log``, ``dt_bias``). The same functions drive the converter and the size
prediction, so the predicted size is the written size.

Tensor names here are ours (``language_model.…``, ``mtp.…``, ``visual.…``; docs/architecture.md §2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import Qwen35Error
from .layout import is_zero_centred_norm

QUANT_MODE = "affine"
# In order of preference: when the last dim is not a multiple of 64, a group of 32 still quantises it;
# else the weight stays unquantised (recorded as false in the map).
GROUP_SIZES = (64, 32)
# Router and shared-expert gate: tiny, and a flipped expert choice costs more than their bytes
# (the mlx-community convention for Qwen MoE conversions).
ROUTER_SPEC_BITS = 8

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "uint32": "U32"}

_ROUTER = re.compile(r"\.mlp\.(gate|shared_expert_gate)\.weight$")
# The bulk of the parameters: routed experts in MoE members, the MLP in dense members.
_BULK = re.compile(r"\.mlp\.experts\.(gate|up|down)_proj\.weight$|\.mlp\.(gate|up|down)_proj\.weight$")


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantised (the mlx-lm per-module entry)."""

    bits: int
    group_size: int
    mode: str = QUANT_MODE

    def as_dict(self) -> dict:
        """The ``config.json`` entry for this module."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


@dataclass(frozen=True)
class Recipe:
    """A named quantisation recipe: bits for the bulk weights and for every other quantisable weight."""

    name: str
    description: str
    bulk_bits: int | None
    other_bits: int | None

    @property
    def quantizes(self) -> bool:
        return self.bulk_bits is not None

    def spec_for(self, name: str, shape: tuple[int, ...]) -> QuantSpec | None:
        """The quantisation of tensor ``name`` (ours) of ``shape``, or None to store it unquantised."""
        if not self.quantizes or not is_quantizable(name, shape):
            return None
        if _ROUTER.search(name):
            bits = ROUTER_SPEC_BITS
        elif _BULK.search(name):
            bits = self.bulk_bits
        else:
            bits = self.other_bits
        group_size = next((g for g in GROUP_SIZES if shape[-1] % g == 0), None)
        return QuantSpec(bits, group_size) if group_size else None


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("bf16", "no quantisation (tensors in --dtype)", None, None),
        Recipe("8bit", "every quantisable weight 8-bit", 8, 8),
        Recipe("4bit", "every quantisable weight 4-bit; router gates 8-bit", 4, 4),
        Recipe("3bit", "every quantisable weight 3-bit; router gates 8-bit", 3, 3),
        Recipe("mixed-4-6", "routed experts 4-bit; attention, DeltaNet, shared expert, embeddings 6-bit", 4, 6),
        Recipe("mixed-3-6", "routed experts 3-bit; attention, DeltaNet, shared expert, embeddings 6-bit", 3, 6),
        Recipe("mixed-3-4", "routed experts 3-bit; attention, DeltaNet, shared expert, embeddings 4-bit", 3, 4),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a clear error lists the valid names."""
    if name not in RECIPES:
        raise Qwen35Error(f"--recipe '{name}' is unknown; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Linear, stacked-expert and embedding weights of the LM and MTP; never vision, norms, conv1d, A_log, dt_bias."""
    return (
        name.startswith(("language_model.", "mtp."))
        and name.endswith(".weight")
        and len(shape) in (2, 3)
        and ".conv1d." not in name
    )


def stored_dtype(name: str, dtype: str) -> str:
    """The dtype an unquantised tensor is written in: fp32 where the reference computes in fp32."""
    if is_zero_centred_norm(name) or name.endswith((".A_log", ".dt_bias")):
        return "float32"
    return dtype


def stored_tensors(
    name: str, shape: tuple[int, ...], spec: QuantSpec | None, dtype: str
) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of what tensor ``name`` becomes on disk: itself, or weight + scales + biases."""
    if spec is None:
        return [(name, tuple(shape), stored_dtype(name, dtype))]
    prefix, last = name[: -len(".weight")], shape[-1]
    lead = tuple(shape[:-1])
    groups = lead + (last // spec.group_size,)
    return [
        (f"{prefix}.weight", lead + (last * spec.bits // 32,), "uint32"),
        (f"{prefix}.scales", groups, dtype),
        (f"{prefix}.biases", groups, dtype),
    ]


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of a dense tensor."""
    n = 4 if dtype == "uint32" else DTYPE_BYTES[dtype]
    for d in shape:
        n *= d
    return n


def quantization_config(recipe: Recipe, tensors: dict[str, tuple[int, ...]]) -> dict | None:
    """The mlx-lm style ``quantization`` block: defaults plus every quantisable module, explicitly."""
    if not recipe.quantizes:
        return None
    block: dict = QuantSpec(recipe.bulk_bits, GROUP_SIZES[0]).as_dict()
    for name, shape in tensors.items():
        if is_quantizable(name, shape):
            spec = recipe.spec_for(name, shape)
            block[name[: -len(".weight")]] = spec.as_dict() if spec else False
    return block


@dataclass(frozen=True)
class SizePrediction:
    """Predicted weight bytes of a converted checkpoint."""

    recipe: str
    bytes: int
    parameters: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.parameters


def predict_size(tensors: dict[str, tuple[int, ...]], recipe: Recipe, dtype: str) -> SizePrediction:
    """Bytes of tensor data the converter writes for ``tensors`` (ours, unquantised shapes) under ``recipe``."""
    total = params = 0
    for name, shape in tensors.items():
        params += nbytes(shape, "float32") // 4
        for _, s, d in stored_tensors(name, shape, recipe.spec_for(name, shape), dtype):
            total += nbytes(s, d)
    return SizePrediction(recipe.name, total, params)
