"""Our converted model against transformers (the oracle): logits, caches, greedy generation.

Each tiny checkpoint (per-expert MoE, fused-expert MoE, block-FP8 MoE, dense with tied embeddings)
is converted with our converter unquantised in float32 and loaded with ``mlx_qwen35.load``.
Logits are judged against transformers in float64 (``tests/parity.py``): max |ours − fp64| ≤
max(1e-4, 8 × max |hf fp32 − fp64|). Measured on the 64-token prompt, full forward and chunked
through the cache: ours 2.4e-5 … 4.5e-5 from float64, transformers' float32 2.1e-5 … 3.5e-5, bounds
1.7e-4 … 2.8e-4 (≥ 6.0× headroom); the text fixtures are conditioned (unit-scale logits), no position
stands out. The greedy path to match is float64 transformers'.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import convert_tiny, hf_greedy
from parity import assert_parity

from mlx_qwen35 import load
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.model.cache import cache_length, restore, snapshot
from mlx_qwen35.runtime.generation import stream_generate

LAYOUTS = ["tiny_moe_checkpoint", "tiny_moe_fused_checkpoint", "tiny_moe_fp8_checkpoint", "tiny_dense_checkpoint"]


@pytest.fixture(scope="module", params=LAYOUTS)
def pair(request, references, tmp_path_factory):
    """(checkpoint, our loaded model, processor, transformers reference in float32 and float64) for each layout."""
    ckpt = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp(f"mlx-{ckpt.layout}") / "model"
    convert_tiny(ckpt, out)
    model, processor = load(str(out))
    return ckpt, model, processor, references(ckpt)


def test_logits_match_transformers(pair, request):
    ckpt, model, _, reference = pair
    ids = ckpt.prompt_ids(64)
    ours = np.array(model(mx.array([ids]))[0])
    assert_parity(request.node.name, ours, *reference.logits(input_ids=torch.tensor([ids])))


def test_chunked_prefill_then_decode_matches_full_forward(pair, request):
    """Chunks of 16 then 16 single-token steps through the cache = one full forward, at every position."""
    ckpt, model, _, reference = pair
    ids = ckpt.prompt_ids(64)
    cache = model.make_cache()
    pieces = [model(mx.array([ids[s : s + 16]]), cache)[0] for s in range(0, 48, 16)]
    pieces += [model(mx.array([[t]]), cache)[0] for t in ids[48:]]
    stepped = np.array(mx.concatenate(pieces, axis=0))
    assert cache_length(cache) == 64
    assert_parity(request.node.name, stepped, *reference.logits(input_ids=torch.tensor([ids])))


def test_greedy_continuation_equals_transformers(pair):
    ckpt, model, processor, reference = pair
    prompt = ckpt.prompt_ids(24)
    expected, margin = hf_greedy(reference.fp64, prompt, max_new_tokens=32)
    assert margin > 1e-3, "the checkpoint's greedy path is too close to a tie to compare"
    ours = [r.token for r in stream_generate(model, processor, prompt, max_tokens=32, temp=0.0)]
    # The checkpoints damp the special tokens' output rows, so neither side stops early at an EOS.
    assert ours == expected


def test_snapshot_restore_reproduces_decode(pair):
    ckpt, model, _, _ = pair
    ids = ckpt.prompt_ids(40)
    cache = model.make_cache()
    model(mx.array([ids[:32]]), cache)
    snap = snapshot(cache)

    def decode() -> np.ndarray:
        return np.array(mx.concatenate([model(mx.array([[t]]), cache)[0] for t in ids[32:]], axis=0))

    first = decode()
    restore(cache, snap)
    assert cache_length(cache) == 32
    assert np.array_equal(decode(), first)


def test_stale_snapshot_is_refused(pair):
    _, model, _, _ = pair
    cache = model.make_cache()
    model(mx.array([[1, 2, 3, 4]]), cache)
    early = snapshot(cache)
    model(mx.array([[5, 6]]), cache)
    late = snapshot(cache)
    restore(cache, early)
    model(mx.array([[7, 8, 9]]), cache)  # overwrites positions 4..6 that `late` relied on
    with pytest.raises(Qwen35Error, match="stale"):
        restore(cache, late)
    with pytest.raises(Qwen35Error, match="another cache"):
        restore(model.make_cache(), early)
