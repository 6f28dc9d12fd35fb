"""Float32 parity judged against exact arithmetic: transformers in float64 is the truth, in float32 the yardstick.

A float32 forward differs from exact arithmetic by rounding whose size depends on the input's conditioning
and on the CPU's kernels (BLAS blocking, SIMD width, thread count). A fixed bound against transformers'
float32 output has no margin where that output is itself 1e-4 off, and which side of it a run lands on
depends on the machine (issue 9: two vision cases failed on an AVX2 CPU). So every case runs transformers
twice on the same input, in float64 (the truth) and in float32 (what a careful float32 implementation
achieves on this input, on this machine), and allows our float32 a small multiple of the latter::

    max |ours − fp64|  ≤  max(floor, FP32_ERROR_FACTOR · max |hf fp32 − fp64|)

Both errors grow and shrink together with the input's conditioning and the machine's rounding, so the
bound follows them; the floor (the absolute tolerance each test had before, which our float32 meets
by itself here) keeps the bound from shrinking where transformers happens to round luckily.

FP32_ERROR_FACTOR: measured ours / transformers' own error ≤ 3.3 over every case, 8 leaves ≥ 2.4×
headroom. The 3.3 is an ill-conditioned spot, bounded here rather than hidden: on the MoE checkpoint's
two-image prompt one text position after the images carries our largest error (8.3e-5; the next is
4.4e-5). Its output is sensitive to its input there: entering layer 2 our and transformers' float32
hidden states are equally far from float64 at that position (5.7e-6, 6.3e-6), leaving its linear
attention 8.3e-6 and 2.9e-6 away; our Gated DeltaNet on identical inputs is as close to float64 as a
float32 recurrence (4e-8). Which float32 lands in the sensitive direction is chance, and the chance is
the CPU's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from checkpoints import TinyCheckpoint
from transformers import PreTrainedModel

FP32_ERROR_FACTOR = 8
# Logits of the tiny checkpoints have unit scale (|logit| ≤ 6.5): 1e-4 is the absolute tolerance the
# parity tests had against transformers' float32; our float32 is within it of float64 on every case here.
LOGIT_FLOOR = 1e-4


@dataclass(frozen=True)
class Parity:
    """How far our float32 and transformers' float32 are from float64, and the bound that follows."""

    ours: float  # max |ours − fp64|
    reference: float  # max |hf fp32 − fp64|
    bound: float

    def __str__(self) -> str:
        return (
            f"|ours − fp64| {self.ours:.2e}, |hf32 − fp64| {self.reference:.2e}, "
            f"bound {self.bound:.2e} ({self.bound / self.ours:.1f}× headroom)"
        )


def assert_parity(label: str, ours, fp32: np.ndarray, fp64: np.ndarray, floor: float = LOGIT_FLOOR) -> Parity:
    """Assert our float32 output is within the derived bound of float64; prints the margins (``pytest -s``)."""
    ours = np.asarray(ours, dtype=np.float64)
    assert ours.shape == fp32.shape == fp64.shape, (ours.shape, fp32.shape, fp64.shape)
    reference = float(np.abs(fp32 - fp64).max())
    result = Parity(float(np.abs(ours - fp64).max()), reference, max(floor, FP32_ERROR_FACTOR * reference))
    print(f"{label}: {result}")
    assert result.ours <= result.bound, f"{label}: {result}"
    return result


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    """Floating tensors (pixels) in ``dtype``; ids and grids as they are."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


@dataclass(frozen=True)
class Reference:
    """A checkpoint's transformers model twice: float32 (the yardstick) and float64 (the truth), eval mode."""

    fp32: PreTrainedModel
    fp64: PreTrainedModel

    def both(self, run, **inputs) -> tuple[np.ndarray, np.ndarray]:
        """``run(model, **inputs)`` on each model, floating inputs in its dtype: (fp32, fp64) as float64 arrays."""
        with torch.no_grad():
            return tuple(
                run(model, **cast_inputs(inputs, model.dtype)).double().numpy() for model in (self.fp32, self.fp64)
            )

    def logits(self, **inputs) -> tuple[np.ndarray, np.ndarray]:
        """Logits [T, V] of one sequence (``input_ids`` [1, T] and any vision inputs): (fp32, fp64)."""
        return self.both(lambda model, **kw: model(**kw).logits[0], **inputs)


class References:
    """Reference models by checkpoint, each loaded once per session."""

    def __init__(self) -> None:
        self._loaded: dict[Path, Reference] = {}

    def __call__(self, ckpt: TinyCheckpoint) -> Reference:
        if ckpt.reference_path not in self._loaded:
            self._loaded[ckpt.reference_path] = Reference(
                ckpt.load_reference(torch.float32), ckpt.load_reference(torch.float64)
            )
        return self._loaded[ckpt.reference_path]
