"""Routed experts: the pure path against SwitchGLU, and the expert-dispatch Metal kernels (through the CPU
emulator here, through mx.fast.metal_kernel on a Mac) against mx.gather_qmm on the same quantised weights."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.kernels import set_use_kernels
from mlx_qwen35.kernels.expert_dispatch import SORT_MIN_PAIRS, routed_experts

TOL = 1e-4  # × the reference's largest magnitude, fp32 (issue 3)
BF16_TOL = 2.0**-8  # × largest magnitude: the kernel's bf16 output is rounded once (2^-9 relative) from fp32
ON_METAL = mx.metal.is_available()
E, H, I, K = 6, 64, 128, 2  # expert E - 1 is never chosen


def make_experts(bits: int | None, group_size: int, seed: int = 0, scale_dtype=mx.float32) -> SwitchGLU:
    """Seeded SwitchGLU with the router-scale weights of a real checkpoint, quantised when bits is given."""
    mx.random.seed(seed)
    experts = SwitchGLU(H, I, E)
    for p in (experts.gate_proj, experts.up_proj, experts.down_proj):
        p.weight = (0.05 * mx.random.normal(p.weight.shape)).astype(scale_dtype)
    if bits is not None:
        nn.quantize(experts, group_size=group_size, bits=bits)
    return experts


def make_routing(tokens: int, seed: int = 0, dtype=mx.float32) -> tuple[mx.array, mx.array, mx.array]:
    """x [1, T, H], k distinct experts per token from 0..E-2 (several tokens share experts), renormalised weights."""
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((1, tokens, H)).astype(np.float32), dtype)
    scores = rng.standard_normal((1, tokens, E - 1))
    indices = mx.array(np.argsort(-scores, axis=-1)[..., :K].astype(np.uint32))
    w = rng.uniform(0.1, 1.0, (1, tokens, K))
    return x, indices, mx.array((w / w.sum(-1, keepdims=True)).astype(np.float32), dtype)


def gather_qmm_reference(x, indices, weights, experts) -> np.ndarray:
    """docs/architecture.md §6 with one mx.gather_qmm per projection (unsorted), all in fp32."""

    def project(p, a):
        return mx.gather_qmm(
            a, p.weight, p.scales, p.biases, rhs_indices=indices, transpose=True, group_size=p.group_size, bits=p.bits
        )

    f32 = lambda a: a.astype(mx.float32)  # noqa: E731
    xe = mx.expand_dims(f32(x), (-2, -3))
    g, u = project(experts.gate_proj, xe), project(experts.up_proj, xe)
    y = project(experts.down_proj, nn.silu(g) * u).squeeze(-2)  # [1, T, K, H]
    return np.array((y * f32(weights)[..., None]).sum(axis=-2))


def rel_diff(out, ref) -> float:
    return float(np.abs(np.array(out.astype(mx.float32)) - ref).max() / np.abs(ref).max())


# T = 1: decode; T = 3: few tokens, unsorted; T = 40: 80 pairs, sorted by expert.
TOKENS = [1, 3, 40]


@pytest.mark.parametrize("bits", [None, 4, 3])
@pytest.mark.parametrize("tokens", TOKENS)
def test_pure_path_equals_switchglu(bits, tokens):
    experts = make_experts(bits, 32)
    x, indices, weights = make_routing(tokens)
    ref = (experts(x, indices) * weights[..., None]).sum(axis=-2)
    out = routed_experts(x, indices, weights, experts, use_kernel=False)
    assert np.array_equal(np.array(out), np.array(ref))  # same ops in the same order: bit-identical


@pytest.mark.parametrize("tokens", TOKENS)
def test_pure_path_matches_gather_qmm_reference(tokens):
    experts = make_experts(4, 64)
    x, indices, weights = make_routing(tokens)
    assert (
        rel_diff(
            routed_experts(x, indices, weights, experts, use_kernel=False),
            gather_qmm_reference(x, indices, weights, experts),
        )
        <= TOL
    )


@pytest.fixture
def kernels_on():
    """Kernels forced on: the real mx.fast.metal_kernel on a Mac, the CPU emulator elsewhere."""
    set_use_kernels(True, emulate=not ON_METAL)
    yield
    set_use_kernels(None)


@pytest.mark.parametrize("bits, group_size", [(4, 64), (4, 32), (3, 64), (3, 32)])
@pytest.mark.parametrize("tokens", TOKENS)
def test_kernels_match_gather_qmm(bits, group_size, tokens, kernels_on):
    experts = make_experts(bits, group_size, seed=bits + group_size)
    x, indices, weights = make_routing(tokens, seed=tokens)
    assert (indices.size >= SORT_MIN_PAIRS) == (tokens == 40)  # both dispatch orders are covered
    out = routed_experts(x, indices, weights, experts)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_diff(out, gather_qmm_reference(x, indices, weights, experts)) <= TOL


@pytest.mark.parametrize("bits", [2, 5, 6, 8])
def test_kernels_take_every_affine_width(bits, kernels_on):
    experts = make_experts(bits, 64, seed=bits)
    for tokens in (1, 40):
        x, indices, weights = make_routing(tokens, seed=tokens)
        assert (
            rel_diff(routed_experts(x, indices, weights, experts), gather_qmm_reference(x, indices, weights, experts))
            <= TOL
        )


@pytest.mark.parametrize("tokens", [1, 40])
def test_kernels_in_bf16(tokens, kernels_on):
    experts = make_experts(4, 64, scale_dtype=mx.bfloat16)
    x, indices, weights = make_routing(tokens, dtype=mx.bfloat16)
    out = routed_experts(x, indices, weights, experts)
    assert out.dtype == mx.bfloat16
    assert rel_diff(out, gather_qmm_reference(x, indices, weights, experts)) <= BF16_TOL


def test_float_experts_take_the_pure_path(kernels_on):
    experts = make_experts(None, 32)
    x, indices, weights = make_routing(3)
    ref = (experts(x, indices) * weights[..., None]).sum(axis=-2)
    assert np.array_equal(np.array(routed_experts(x, indices, weights, experts)), np.array(ref))


def test_bad_shapes_raise_our_error():
    experts = make_experts(4, 64)
    x, indices, weights = make_routing(3)
    with pytest.raises(Qwen35Error, match="indices .* != weights"):
        routed_experts(x, indices, weights[..., :1], experts)
    with pytest.raises(Qwen35Error, match="features"):
        routed_experts(x[..., :32], indices, weights, experts)
