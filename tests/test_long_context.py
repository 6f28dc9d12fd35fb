"""Long context: chunked prefill keeps its workspace bounded, the KV cache quantises, YaRN matches transformers.

YaRN logits are judged against transformers in float64 (``tests/parity.py``): max |ours − fp64| ≤
max(1e-4, 8 × max |hf fp32 − fp64|): measured ours 3.3e-5 from float64 over 320 tokens, transformers'
float32 2.8e-5, bound 2.2e-4 (6.6× headroom).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from parity import LOGIT_FLOOR, assert_parity

from mlx_qwen35 import load
from mlx_qwen35.model.cache import make_cache
from mlx_qwen35.runtime.prefill import prefill
from mlx_qwen35.weights.convert import convert

STEP = 256
SHORT, LONG = 1024, 4096  # observed: +9.5 MB peak (bound 28 MB; an unchunked 4k prefill: +177 MB)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
YARN_PROMPT = 320  # past original_max_position_embeddings, where YaRN is what makes the positions usable


def converted(checkpoint_path, tmp_path_factory, name: str):
    out = tmp_path_factory.mktemp(name) / "model"
    convert(
        hf_path=str(checkpoint_path),
        mlx_path=out,
        recipe="bf16",
        dtype="float32",
        shard_size_gb=0.001,
        revision=None,
        overwrite=False,
        dry_run=False,
    )
    return load(str(out))


@pytest.fixture(scope="module")
def loaded(tiny_moe_checkpoint, tmp_path_factory):
    return converted(tiny_moe_checkpoint.path, tmp_path_factory, "long-context")


@pytest.fixture(scope="module")
def yarn_checkpoint(tiny_moe_checkpoint, tmp_path_factory):
    """The tiny MoE checkpoint with YaRN rope scaling in its config (same weights)."""
    path = tmp_path_factory.mktemp("tiny-moe-yarn") / "hf"
    shutil.copytree(tiny_moe_checkpoint.path, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["rope_parameters"] |= YARN
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return dataclasses.replace(tiny_moe_checkpoint, path=path, config=config, reference_path=path)


def token_ids(checkpoint, n: int) -> list[int]:
    """``n`` ids of ordinary text: the fixture's corpus, repeated."""
    corpus = checkpoint.prompt_ids(64)
    return (corpus * (n // len(corpus) + 1))[:n]


def prefill_peak_bytes(model, ids: list[int], step: int) -> int:
    """MLX peak memory of a prefill of ``ids`` in chunks of ``step`` into a fresh cache."""
    mx.eval(model.parameters())
    cache = make_cache(model)
    mx.clear_cache()
    mx.reset_peak_memory()
    prefill(model, mx.array(ids), cache, step)
    return mx.get_peak_memory()


def test_chunked_prefill_memory_grows_with_the_kv_cache_not_with_length_squared(loaded, tiny_moe_checkpoint):
    model, _ = loaded
    text = model.config.text
    short = prefill_peak_bytes(model, token_ids(tiny_moe_checkpoint, SHORT), STEP)
    long = prefill_peak_bytes(model, token_ids(tiny_moe_checkpoint, LONG), STEP)
    attention_layers = sum(not layer.is_linear for layer in model.layers)
    kv_per_token = attention_layers * 2 * text.num_key_value_heads * text.head_dim * 4
    # What may grow with length: the K/V (×2: the cache grows by copying into a larger buffer) and each
    # chunk's score rows [heads, STEP, T] (×4: scores, mask, softmax, a copy) — linear in T.
    scores_per_key = text.num_attention_heads * STEP * 4
    bound = (LONG - SHORT) * (2 * kv_per_token + 4 * scores_per_key)
    # An unchunked prefill would hold [heads, T, T] scores: at 4k that alone is 4× more than the bound.
    full_scores = text.num_attention_heads * LONG * LONG * 4
    assert bound < full_scores / 4
    assert long - short <= bound, (
        f"peak grew {(long - short) / 1e6:.1f} MB from {SHORT} to {LONG} tokens, bound {bound / 1e6:.1f} MB"
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_kv_cache_shrinks_the_cache_and_keeps_the_logits_close(loaded, tiny_moe_checkpoint, bits):
    model, _ = loaded
    ids = mx.array(token_ids(tiny_moe_checkpoint, 512))
    caches = {b: make_cache(model, kv_bits=b, kv_group_size=32) for b in (None, bits)}  # head_dim 32
    logits = {}
    for b, cache in caches.items():
        prefill(model, ids[:-1], cache, STEP)
        logits[b] = model(ids[None, -1:], cache)[0, -1]
    kv_bytes = {b: sum(c.nbytes for c in cache if not hasattr(c, "cache")) for b, cache in caches.items()}
    # group 32 adds a float scale and bias per 32 values: bits/32 + 2·32/32/32 of the float32 size
    assert kv_bytes[bits] <= kv_bytes[None] * (bits / 32 + 2 / 32) * 1.01
    reference = np.array(logits[None])
    drift = np.abs(np.array(logits[bits]) - reference).max() / np.abs(reference).max()
    assert drift < {8: 0.05, 4: 0.5}[bits]  # a sanity bound: quantisation error, not a parity claim


def test_yarn_logits_match_transformers_past_the_original_context(
    loaded, yarn_checkpoint, tiny_moe_checkpoint, references, tmp_path_factory, request
):
    model, _ = converted(yarn_checkpoint.path, tmp_path_factory, "yarn")
    assert model.config.text.rope.rope_type == "yarn"
    ids = token_ids(tiny_moe_checkpoint, YARN_PROMPT)
    ours = np.array(model(mx.array([ids]))[0])
    assert_parity(request.node.name, ours, *references(yarn_checkpoint).logits(input_ids=torch.tensor([ids])))
    # YaRN is really on: the same weights without it give other logits.
    plain, _ = loaded
    assert np.abs(np.array(plain(mx.array([ids]))[0]) - ours).max() > 100 * LOGIT_FLOOR
