"""The memory plan: its sizes are the converter's, its caches the model's, and `plan` says so in one line on bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx
import pytest
from cli_runner import run_cli
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache

from mlx_qwen35.config import parse_config
from mlx_qwen35.weights.convert import convert
from mlx_qwen35.weights.memory_plan import (
    GIB,
    RELEASED_CONFIGS,
    decode_read_bytes,
    kv_cache_bytes,
    plan,
    predicted_tensor_bytes,
    recurrent_state_bytes,
    size_table,
    stored_tensors_on_disk,
    wired_limit_mb,
)
from mlx_qwen35.weights.quantize import get_recipe

README = Path(__file__).parents[1] / "README.md"


@pytest.mark.parametrize("recipe", ["4bit", "mixed-3-6"])
@pytest.mark.parametrize("which", ["tiny_moe_checkpoint", "tiny_dense_checkpoint"])
def test_plan_predicts_every_tensor_the_converter_writes(request, tmp_path, monkeypatch, capsys, which, recipe):
    source = request.getfixturevalue(which)
    out = tmp_path / "out"
    convert(str(source.path), out, recipe=recipe)  # the checkpoint's own dtype, as users convert
    on_disk = {k: size for k, (_, size) in stored_tensors_on_disk(out).items()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    capsys.readouterr()

    code, text, _ = run_cli(monkeypatch, capsys, "plan", "--model", str(source.path), "--recipe", recipe, "--json")
    assert code in (0, None)
    [predicted] = json.loads(text)
    code, text, _ = run_cli(monkeypatch, capsys, "plan", "--model", str(out), "--json")
    [as_converted] = json.loads(text)

    cfg = parse_config(source.config)
    [embed_dtype] = [
        d for k, (d, _) in stored_tensors_on_disk(source.path).items() if k.endswith("embed_tokens.weight")
    ]
    dtype = {"F32": "float32", "BF16": "bfloat16"}[embed_dtype]
    assert predicted_tensor_bytes(cfg, get_recipe(recipe), dtype) == on_disk  # name by name, byte for byte
    assert predicted["weights_bytes"] == as_converted["weights_bytes"] == index["metadata"]["total_size"]
    assert predicted["decode_read_bytes"] == as_converted["decode_read_bytes"]
    assert as_converted["recipe"] == "as converted"


@pytest.fixture(scope="module")
def tiny_model(tiny_moe_checkpoint, tmp_path_factory):
    from checkpoints import convert_tiny

    from mlx_qwen35 import load

    model, _ = load(str(convert_tiny(tiny_moe_checkpoint, tmp_path_factory.mktemp("plan") / "mlx")))
    return model


def test_cache_sizes_are_what_the_model_allocates(tiny_model, tiny_moe_checkpoint):
    model = tiny_model
    cache = model.make_cache()
    tokens = 40
    model(mx.array([tiny_moe_checkpoint.prompt_ids(tokens)]), cache)
    kv = state = 0
    for layer in cache:
        if isinstance(layer, ArraysCache):
            conv, recurrent = layer.cache
            state += conv.nbytes + recurrent.nbytes
        else:
            kv += sum(a[..., : layer.offset, :].nbytes for a in (layer.keys, layer.values))
    cfg = model.config
    # Off Metal activations (K/V and the conv window) are float32, twice the plan's bf16 bytes.
    assert kv == 2 * kv_cache_bytes(cfg, tokens)
    t = cfg.text
    conv_bytes = t.layer_types.count("linear_attention") * (t.linear_conv_kernel_dim - 1) * t.linear_conv_dim * 2
    assert state == recurrent_state_bytes(cfg) + conv_bytes


def test_decode_reads_active_experts_one_embedding_row_and_no_vision():
    cfg = parse_config(RELEASED_CONFIGS["Qwen3.5-35B-A3B"])
    base = decode_read_bytes(cfg, {}, context=0)
    assert base == 2 * recurrent_state_bytes(cfg)
    vocab, experts, top_k = cfg.text.vocab_size, cfg.text.num_experts, cfg.text.num_experts_per_tok
    read = {
        "language_model.layers.0.mlp.experts.gate_proj.weight": experts * 1000,
        "language_model.model.layers.0.mlp.switch_mlp.up_proj.scales": experts * 10,  # mlx-lm's name
        "language_model.embed_tokens.weight": vocab * 7,
        "language_model.lm_head.weight": 5,
        "visual.blocks.0.attn.qkv.weight": 10**9,
        "vision_tower.blocks.0.attn.qkv.weight": 10**9,
        "mtp.fc.weight": 10**9,
    }
    assert decode_read_bytes(cfg, read, context=0) - base == top_k * 1010 + 7 + 5


def test_the_flagship_fits_a_256_gb_mac_in_4bit_and_a_192_gb_one_in_3bit():
    cfg = parse_config(RELEASED_CONFIGS["Qwen3.5-397B-A17B"])
    four = plan(cfg, predicted_tensor_bytes(cfg, get_recipe("4bit")), 256 * GIB)
    assert four.fits and not plan(cfg, predicted_tensor_bytes(cfg, get_recipe("4bit")), 192 * GIB).fits
    assert plan(cfg, predicted_tensor_bytes(cfg, get_recipe("3bit")), 192 * GIB).fits
    # docs/architecture.md §1.2: 30,720 B of KV per token; 45 DeltaNet layers of 4 MiB state + conv windows.
    assert kv_cache_bytes(cfg, 1) == 30_720
    assert recurrent_state_bytes(cfg) == 45 * (4 * 2**20 + 3 * 12288 * 2)
    assert four.wired_limit_mb * 2**20 >= 1.05 * four.total and four.wired_limit_mb % 1024 == 0


def test_readme_fit_table_is_the_plans():
    assert size_table() in README.read_text()


def test_load_warns_with_the_plans_wired_limit(tiny_model, monkeypatch, caplog):
    from mlx_qwen35.weights import loading

    model = tiny_model
    wired = []
    monkeypatch.setattr(loading.mx, "device_info", lambda: {"max_recommended_working_set_size": 1000})
    monkeypatch.setattr(loading.mx, "set_wired_limit", wired.append)
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        loading._set_wired_limit(model)
    need = plan(model.config, {k: a.nbytes for k, a in tree_flatten(model.parameters())}, 1000)
    assert f"iogpu.wired_limit_mb={wired_limit_mb(need.total)}" in caplog.text
    assert wired == [1000]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/dir"], "--model /no/such/dir: no such directory"),
        (["--context", "0"], "--context 0: give the conversation length"),
        (["--memory-gb", "-1"], "--memory-gb -1.0: give the Mac's unified memory"),
        (["--recipe", "5bit"], "--recipe '5bit' is unknown"),
        (["--context", "300000"], "supports at most 262144 tokens"),
    ],
)
def test_plan_bad_input_is_one_line(monkeypatch, capsys, args, message):
    code, out, err = run_cli(monkeypatch, capsys, "plan", *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_plan_bad_config_file_is_one_line(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    code, _, err = run_cli(monkeypatch, capsys, "plan", "--config", str(bad))
    assert code == 1 and "not a readable JSON file" in err and len(err.strip().splitlines()) == 1
