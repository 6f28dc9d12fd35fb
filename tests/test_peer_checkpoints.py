"""Directories written by mlx-lm and mlx-vlm load with ``mlx_qwen35.load`` as they are, and compute what the peers compute.

Each tiny checkpoint is converted by the peer's own ``convert`` (unquantised, 4-bit affine with the
router-8-bit overrides, mlx-lm's ``mixed_3_6`` recipe, and the mxfp4 / nvfp4 / mxfp8 modes), then
loaded by us and by the peer (``mlx_lm.load`` / ``mlx_vlm.load``). On the peer's own weights:
every peer parameter is ours under our name, bit for bit; logits on a 64-token prompt agree, and
16-token greedy continuations are identical.

Logit bounds, derived as in ``tests/parity.py``: both sides are float32 evaluations of the same
weights, each allowed 8 × transformers' own float32 error (max |hf fp32 − fp64| on the unquantised
source: 1.8e-5 MoE, 2.5e-5 dense), so max |ours − peer| ≤ max(1e-4, 2 × 8 × that): bounds 2.8e-4 and
4.0e-4 against measured 8.4e-6 … 1.7e-5 (≥ 16× headroom). Where the peer wrote the source's float32
weights unquantised, ours is also judged against transformers in float64 directly, as in
``tests/parity.py``: 1.8e-5 (MoE) and 2.3e-5 (dense) from float64, bounds 1.4e-4 and 2.0e-4 (≥ 8×).

Two things in the setup are forced by the peers or by the dtype contract:
* The peers derive layer types from ``full_attention_interval`` and ignore ``layer_types``, so they
  reject the fixtures' explicit pattern (layer 5 is full attention). The sources here are the
  fixtures cut to their first four layers (linear ×3, full), which is the interval-4 pattern.
* A quantised embedding in an fp mode (mxfp4/nvfp4/mxfp8) has uint8 scales, so MLX dequantises its
  lookups to bfloat16. The values are exact in bfloat16 and mlx-lm's norms promote back to
  float32; our model casts the embedding rows to its compute dtype (float32 off Metal), which
  ``test_fp_mode_embedding_does_not_lower_precision`` checks. The parity tests give both models
  float32 lookups: apples to apples.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import mlx_vlm
import numpy as np
import pytest
import torch
from checkpoints import TinyCheckpoint, convert_tiny
from mlx.utils import tree_flatten, tree_map
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_vlm.convert import convert as mlx_vlm_convert
from mlx_vlm.generate.ar import generate_step as mlx_vlm_generate_step
from parity import FP32_ERROR_FACTOR, LOGIT_FLOOR, assert_parity
from safetensors.numpy import load_file, save_file

from mlx_qwen35 import load
from mlx_qwen35.config import load_config
from mlx_qwen35.runtime.generation import stream_generate
from mlx_qwen35.weights.loading import read_weights
from mlx_qwen35.weights.peer_formats import detect_format, peer_key, translate_peer_checkpoint

PROMPT_TOKENS = 64
GREEDY_PROMPT_TOKENS = 24
GREEDY_TOKENS = 16
PEER_COMPATIBLE_LAYERS = 4  # linear, linear, linear, full: the interval-4 pattern the peers assume


@dataclasses.dataclass(frozen=True)
class PeerCase:
    """One peer conversion: which peer, which source, and the arguments of its ``convert``."""

    name: str
    peer: str  # "mlx-lm" or "mlx-vlm"
    source: str  # "moe" (fused experts, what mlx-lm 0.32 converts) or "dense" (tied embeddings)
    kwargs: dict

    @property
    def keeps_source_weights(self) -> bool:
        """The peer wrote the source's float32 tensors as they are: transformers computes the same function."""
        return self.kwargs == {"dtype": "float32"}


CASES = [
    PeerCase("mlx-lm-moe-fp32", "mlx-lm", "moe", dict(dtype="float32")),
    # What mlx-community publishes: bf16 tensors, 4-bit affine, router and shared-expert gate 8-bit.
    PeerCase("mlx-lm-moe-bf16-4bit", "mlx-lm", "moe", dict(dtype="bfloat16", quantize=True, q_bits=4, q_group_size=64)),
    PeerCase(
        "mlx-lm-moe-mixed_3_6",
        "mlx-lm",
        "moe",
        dict(dtype="float32", quantize=True, q_group_size=32, quant_predicate="mixed_3_6"),
    ),
    PeerCase("mlx-lm-moe-mxfp4", "mlx-lm", "moe", dict(dtype="float32", quantize=True, q_mode="mxfp4")),
    PeerCase("mlx-lm-moe-nvfp4", "mlx-lm", "moe", dict(dtype="float32", quantize=True, q_mode="nvfp4")),
    PeerCase("mlx-lm-moe-mxfp8", "mlx-lm", "moe", dict(dtype="float32", quantize=True, q_mode="mxfp8")),
    PeerCase("mlx-lm-dense-fp32", "mlx-lm", "dense", dict(dtype="float32")),
    PeerCase("mlx-lm-dense-4bit", "mlx-lm", "dense", dict(dtype="float32", quantize=True, q_bits=4, q_group_size=32)),
    PeerCase("mlx-vlm-moe-fp32", "mlx-vlm", "moe", dict(dtype="float32")),
    PeerCase("mlx-vlm-moe-4bit", "mlx-vlm", "moe", dict(dtype="float32", quantize=True, q_bits=4, q_group_size=64)),
    PeerCase(
        "mlx-vlm-moe-nvfp4", "mlx-vlm", "moe", dict(dtype="float32", quantize=True, q_mode="nvfp4", q_group_size=16)
    ),
    PeerCase("mlx-vlm-dense-fp32", "mlx-vlm", "dense", dict(dtype="float32")),
    PeerCase(
        "mlx-vlm-dense-mxfp4", "mlx-vlm", "dense", dict(dtype="float32", quantize=True, q_mode="mxfp4", q_group_size=32)
    ),
]


def first_layers(ckpt: TinyCheckpoint, path: Path, n: int) -> TinyCheckpoint:
    """The checkpoint cut to its first ``n`` decoder layers (embedding, head, MTP and vision kept)."""
    path.mkdir(parents=True)
    for f in ckpt.path.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (path / f.name).write_bytes(f.read_bytes())
    config = json.loads(json.dumps(ckpt.config))
    config["text_config"]["num_hidden_layers"] = n
    config["text_config"]["layer_types"] = config["text_config"]["layer_types"][:n]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    layer = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
    tensors = {}
    for shard in sorted(ckpt.path.glob("*.safetensors")):
        tensors |= {k: v for k, v in load_file(shard).items() if not ((m := layer.match(k)) and int(m[1]) >= n)}
    save_file(tensors, path / "model.safetensors")
    return dataclasses.replace(ckpt, path=path, config=config, reference_path=path)


@pytest.fixture(scope="module")
def peer_sources(tiny_moe_fused_checkpoint, tiny_dense_checkpoint, tmp_path_factory) -> dict[str, TinyCheckpoint]:
    """The HF sources the peers convert, cut to the layer pattern they can represent."""
    root = tmp_path_factory.mktemp("peer-sources")
    return {
        "moe": first_layers(tiny_moe_fused_checkpoint, root / "moe", PEER_COMPATIBLE_LAYERS),
        "dense": first_layers(tiny_dense_checkpoint, root / "dense", PEER_COMPATIBLE_LAYERS),
    }


@pytest.fixture(scope="module")
def peer_dir(peer_sources, tmp_path_factory):
    """case → the directory the peer's ``convert`` wrote for it (each case converted once)."""
    written: dict[str, Path] = {}

    def get(case: PeerCase) -> Path:
        if case.name not in written:
            out = tmp_path_factory.mktemp("peer") / case.name
            peer_convert = mlx_lm_convert if case.peer == "mlx-lm" else mlx_vlm_convert
            peer_convert(str(peer_sources[case.source].path), str(out), **case.kwargs)
            written[case.name] = out
        return written[case.name]

    return get


def load_peer(case: PeerCase, path: Path) -> nn.Module:
    """The peer's own model of ``path``, its floating parameters cast to float32 like ours off Metal."""
    model, _ = (mlx_lm.load if case.peer == "mlx-lm" else mlx_vlm.load)(str(path))
    model.update(
        tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters())
    )
    return model


class Float32Lookups(nn.Module):
    """An embedding whose lookups come out in float32 (fp-mode quantised lookups dequantise to bfloat16)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def __call__(self, ids: mx.array) -> mx.array:
        return self.embedding(ids).astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.embedding.as_linear(x)


@contextmanager
def float32_lookups(ours: nn.Module, theirs: nn.Module) -> Iterator[None]:
    """Both models with float32 embedding lookups for the duration (the shared fixture is restored after)."""
    embed_ours, embed_theirs = ours.language_model.embed_tokens, theirs.language_model.model.embed_tokens
    ours.language_model.embed_tokens = Float32Lookups(embed_ours)
    theirs.language_model.model.embed_tokens = Float32Lookups(embed_theirs)
    try:
        yield
    finally:
        ours.language_model.embed_tokens, theirs.language_model.model.embed_tokens = embed_ours, embed_theirs


def peer_logits(model: nn.Module, ids: mx.array) -> mx.array:
    out = model(ids)
    return getattr(out, "logits", out)  # mlx-vlm returns an output object


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def pair(request, peer_sources, peer_dir):
    """(case, source checkpoint, peer dir, our model, our processor, the peer's model)."""
    case = request.param
    path = peer_dir(case)
    ours, processor = load(str(path))
    return case, peer_sources[case.source], path, ours, processor, load_peer(case, path)


def test_peer_directory_is_recognised(pair):
    case, _, path, *_ = pair
    fmt = detect_format(read_weights(path))
    assert fmt == case.peer


def test_every_peer_parameter_is_ours(pair):
    """Same tensors under our names, bit for bit, and the same quantisation (mode, bits, group) per module."""
    _, _, _, ours, _, theirs = pair
    our_params = dict(tree_flatten(ours.parameters()))
    their_params = dict(tree_flatten(theirs.parameters()))
    assert {peer_key(k) for k in their_params} == set(our_params)
    for key, value in their_params.items():
        if key == "vision_tower.patch_embed.proj.weight":  # mlx-vlm keeps the Conv3d kernel channels-last
            value = value.transpose(0, 4, 1, 2, 3)
        assert mx.array_equal(our_params[peer_key(key)], value), key
    our_modules = dict(ours.named_modules())
    for path, module in theirs.named_modules():
        if hasattr(module, "bits"):
            mine = our_modules[peer_key(path)]
            assert (mine.mode, mine.bits, mine.group_size) == (module.mode, module.bits, module.group_size), path


def test_logits_match_peer(pair, references, record_property):
    case, source, _, ours, _, theirs = pair
    prompt = source.prompt_ids(PROMPT_TOKENS)
    ids = mx.array([prompt])
    assert mx.array_equal(ours.language_model.embed_tokens(ids), theirs.language_model.model.embed_tokens(ids))
    with float32_lookups(ours, theirs):
        a, b = np.array(ours(ids)[0]), np.array(peer_logits(theirs, ids)[0])
    fp32, fp64 = references(source).logits(input_ids=torch.tensor([prompt]))
    if case.keeps_source_weights:
        assert_parity(f"{case.name} vs float64", a, fp32, fp64)
    delta = float(np.abs(a - b).max())
    bound = max(LOGIT_FLOOR, 2 * FP32_ERROR_FACTOR * float(np.abs(fp32 - fp64).max()))
    record_property("max_abs_delta", delta)
    print(f"{case.name}: max |ours − peer| = {delta:.2e}, bound {bound:.2e} ({bound / delta:.0f}× headroom)")
    assert a.shape == b.shape
    assert delta <= bound


def argmax(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def test_greedy_continuation_matches_peer(pair):
    """16 greedy tokens through each side's own cache and decode loop (ours: ``stream_generate``)."""
    case, source, _, ours, processor, theirs = pair
    prompt = source.prompt_ids(GREEDY_PROMPT_TOKENS)
    with float32_lookups(ours, theirs):
        mine = [r.token for r in stream_generate(ours, processor, prompt, max_tokens=GREEDY_TOKENS, temp=0.0)]
        if case.peer == "mlx-lm":
            steps = mlx_lm_generate_step(mx.array(prompt), theirs, max_tokens=GREEDY_TOKENS, sampler=argmax)
        else:
            steps = mlx_vlm_generate_step(
                mx.array([prompt]), theirs, None, None, max_tokens=GREEDY_TOKENS, sampler=argmax
            )
        peer = [int(token) for token, _ in steps]
    assert len(mine) == GREEDY_TOKENS, "stopped on EOS early; pick a prompt with a longer continuation"
    assert mine == peer[:GREEDY_TOKENS]


def test_fp_mode_embedding_does_not_lower_precision(peer_sources, peer_dir):
    """Off Metal we compute in float32: token ids must give the logits their float32 embeddings give."""
    case = next(c for c in CASES if c.name == "mlx-lm-moe-mxfp4")
    ours, _ = load(str(peer_dir(case)))
    ids = mx.array([peer_sources["moe"].prompt_ids(PROMPT_TOKENS)])
    from_ids = ours(ids)
    from_float32 = ours(inputs_embeds=ours.language_model.embed_tokens(ids).astype(mx.float32))
    assert float(mx.abs(from_ids - from_float32).max()) == 0.0  # the same float32 rows either way


def test_vision_tower_tensors_are_what_our_converter_writes(peer_sources, peer_dir, tmp_path_factory):
    """mlx-vlm's ``vision_tower.*`` (patch kernel channels-last) become our ``visual.*``, equal to our own conversion."""
    case = next(c for c in CASES if c.name == "mlx-vlm-moe-fp32")
    path = peer_dir(case)
    ours_dir = tmp_path_factory.mktemp("ours-vision") / "model"
    convert_tiny(peer_sources["moe"], ours_dir)
    translated, _ = translate_peer_checkpoint(read_weights(path), load_config(path), "mlx-vlm")
    theirs = {k: v for k, v in translated.items() if k.startswith("visual.")}
    mine = {k: v for k, v in read_weights(ours_dir).items() if k.startswith("visual.")}
    assert set(theirs) == set(mine)
    for key, value in mine.items():
        assert theirs[key].shape == value.shape, key
        assert mx.array_equal(theirs[key], value), key
