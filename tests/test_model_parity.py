"""Our converted model against transformers (the oracle): logits, caches, greedy generation.

Each tiny checkpoint (per-expert MoE, fused-expert MoE, block-FP8 MoE, dense with tied embeddings)
is converted with our converter unquantised in float32 and loaded with ``mlx_qwen35.load``.
Tolerance: max |Δ logits| ≤ 1e-4, float32 end to end (observed ~1e-6).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import convert_tiny, hf_greedy

from mlx_qwen35 import load
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.model.cache import cache_length, restore, snapshot
from mlx_qwen35.runtime.generation import stream_generate

LOGIT_TOL = 1e-4
LAYOUTS = ["tiny_moe_checkpoint", "tiny_moe_fused_checkpoint", "tiny_moe_fp8_checkpoint", "tiny_dense_checkpoint"]


@pytest.fixture(scope="module", params=LAYOUTS)
def pair(request, tmp_path_factory):
    """(checkpoint, our loaded model, processor, transformers reference) for each layout."""
    ckpt = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp(f"mlx-{ckpt.layout}") / "model"
    convert_tiny(ckpt, out)
    model, processor = load(str(out))
    return ckpt, model, processor, ckpt.load_reference()


def reference_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_logits_match_transformers(pair):
    ckpt, model, _, hf = pair
    ids = ckpt.prompt_ids(64)
    ours = np.array(model(mx.array([ids]))[0])
    ref = reference_logits(hf, ids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= LOGIT_TOL


def test_chunked_prefill_then_decode_matches_full_forward(pair):
    """Chunks of 16 then 16 single-token steps through the cache = one full forward, at every position."""
    ckpt, model, _, hf = pair
    ids = ckpt.prompt_ids(64)
    cache = model.make_cache()
    pieces = [model(mx.array([ids[s : s + 16]]), cache)[0] for s in range(0, 48, 16)]
    pieces += [model(mx.array([[t]]), cache)[0] for t in ids[48:]]
    stepped = np.array(mx.concatenate(pieces, axis=0))
    assert cache_length(cache) == 64
    assert np.abs(stepped - reference_logits(hf, ids)).max() <= LOGIT_TOL


def test_greedy_continuation_equals_transformers(pair):
    ckpt, model, processor, hf = pair
    prompt = ckpt.prompt_ids(24)
    expected, margin = hf_greedy(hf, prompt, max_new_tokens=32)
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
