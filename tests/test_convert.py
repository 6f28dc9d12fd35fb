"""The converter: three HF layouts → one MLX layout, value rules, recipes, size prediction, failure modes.

Runs on the session's tiny checkpoints (tests/checkpoints.py), saved in float32, converted with
``--dtype float32`` unless a test is about dtypes, so every "identical" below is bit-exact.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_runner import run_cli
from safetensors.numpy import load_file, save_file

import mlx_qwen35.weights.convert as convert_module
from mlx_qwen35.config import parse_config
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.weights.convert import SourceTensor, convert, plan_outputs, predict_recipes
from mlx_qwen35.weights.hub import HUB_PATTERNS
from mlx_qwen35.weights.layout import expected_tensors, is_zero_centred_norm
from mlx_qwen35.weights.local_models import quantization_label
from mlx_qwen35.weights.quantize import RECIPES, get_recipe, nbytes, stored_tensors
from mlx_qwen35.weights.random_checkpoint import LAYOUTS, hf_tensor_shapes

REPO = Path(__file__).resolve().parents[1]
# Relative error of a dequantised weight against the original (Gaussian weights, group 64 or 32).
DEQUANT_REL_ERROR = {8: 0.01, 6: 0.04, 4: 0.15, 3: 0.3}


def hf_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint dir (float32 layouts only)."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def mlx_tensors(path: Path) -> dict[str, mx.array]:
    """All tensors of a converted dir."""
    out: dict[str, mx.array] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def converted(source: Path, out: Path, recipe: str = "bf16", dtype: str = "float32", **kw) -> dict[str, mx.array]:
    convert(str(source), out, recipe=recipe, dtype=dtype, **kw)
    return mlx_tensors(out)


def assert_identical(a: dict[str, mx.array], b: dict[str, mx.array]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k


@pytest.fixture(scope="module")
def per_expert_fp32(tiny_moe_checkpoint, tmp_path_factory) -> dict[str, mx.array]:
    return converted(tiny_moe_checkpoint.path, tmp_path_factory.mktemp("c") / "per-expert")


# ------------------------------------------------------------------------------------------ layouts


def test_fused_layout_converts_to_the_same_tensors(tiny_moe_fused_checkpoint, per_expert_fp32, tmp_path):
    assert_identical(converted(tiny_moe_fused_checkpoint.path, tmp_path / "fused"), per_expert_fp32)


@pytest.mark.parametrize("recipe", ["bf16", "4bit"])
def test_fp8_layout_converts_like_its_dequantised_weights(tiny_moe_fp8_checkpoint, recipe, tmp_path):
    fp8 = converted(tiny_moe_fp8_checkpoint.path, tmp_path / "fp8", recipe)
    reference = converted(tiny_moe_fp8_checkpoint.reference_path, tmp_path / "ref", recipe)
    assert_identical(fp8, reference)


@pytest.mark.parametrize("layout", ["tiny_moe_fp8_checkpoint", "tiny_moe_fused_checkpoint"])
def test_chunked_streaming_gives_the_same_tensors(layout, request, tmp_path, monkeypatch):
    # Default chunks hold whole tiny tensors; tiny chunks split rows (FP8: at 128-row scale blocks;
    # fused: a few experts at a time, each read as its gate or up half).
    checkpoint = request.getfixturevalue(layout)
    whole = converted(checkpoint.path, tmp_path / "whole", "4bit")
    monkeypatch.setattr(convert_module, "CHUNK_ELEMENTS", 512)
    assert_identical(converted(checkpoint.path, tmp_path / "chunked", "4bit"), whole)


def test_experts_are_stacked_in_order(tiny_moe_checkpoint, per_expert_fp32):
    src = hf_tensors(tiny_moe_checkpoint.path)
    for prefix in ("language_model.layers.2.mlp.experts", "mtp.layers.0.mlp.experts"):
        hf_prefix = prefix.replace("language_model.", "model.language_model.")
        for proj in ("gate", "up", "down"):
            stacked = np.array(per_expert_fp32[f"{prefix}.{proj}_proj.weight"])
            for e in range(stacked.shape[0]):
                np.testing.assert_array_equal(stacked[e], src[f"{hf_prefix}.{e}.{proj}_proj.weight"])


def released_and_tiny_configs(*checkpoints) -> dict[str, dict]:
    """config.json of every released MoE member and of the given tiny checkpoints, by name."""
    from mlx_qwen35.weights.memory_plan import RELEASED_CONFIGS

    return RELEASED_CONFIGS | {f"tiny-{c.layout}-{'moe' if c.is_moe else 'dense'}": c.config for c in checkpoints}


def test_the_release_layout_converts_to_the_module_tree(tiny_moe_checkpoint, tiny_dense_checkpoint):
    # Two independent statements meet: what a release holds (hf_tensor_shapes, checked against what
    # transformers writes in test_fixtures) → through the converter's renaming and stacking → must be
    # exactly the parameters of our module tree, which is what expected_tensors returns.
    for name, raw in released_and_tiny_configs(tiny_moe_checkpoint, tiny_dense_checkpoint).items():
        cfg = parse_config(raw)
        for layout in LAYOUTS:
            sources = {
                k: SourceTensor(Path("model.safetensors"), k, "BF16", shape, 0)
                for k, shape in hf_tensor_shapes(raw, layout).items()
            }
            outputs, has_mtp = plan_outputs(sources, cfg, Path("model.safetensors.index.json"))
            assert has_mtp
            assert {o.name: o.shape for o in outputs} == expected_tensors(cfg), (name, layout)


def test_zero_centred_norms_are_the_models_rmsnorm1p_weights(tiny_moe_checkpoint, tiny_dense_checkpoint):
    # The name pattern the converter (+1 shift, fp32) and the random writer (HF names) use is exactly
    # the set of norms the model applies as (1 + w).
    from mlx_qwen35.model.norms import RMSNorm1p
    from mlx_qwen35.model.qwen35 import Qwen35Model

    for raw in released_and_tiny_configs(tiny_moe_checkpoint, tiny_dense_checkpoint).values():
        cfg = parse_config(raw)
        modules = Qwen35Model(cfg).named_modules()
        norms = {f"{path}.weight" for path, m in modules if isinstance(m, RMSNorm1p)}
        assert {n for n in expected_tensors(cfg) if is_zero_centred_norm(n)} == norms
        hf = {n for n in hf_tensor_shapes(raw) if is_zero_centred_norm(n)}
        assert {convert_module.our_name(n) for n in hf} == norms


# ------------------------------------------------------------------------------------------ value rules


def test_zero_centred_norms_are_shifted_once_in_fp32(tiny_moe_checkpoint, per_expert_fp32):
    src = hf_tensors(tiny_moe_checkpoint.path)
    shifted = [n for n in per_expert_fp32 if is_zero_centred_norm(n)]
    # 6 layers × 2 + final + 2 attention layers × (q, k) + MTP: 2 pre-fc + norm + 2 layer norms + q, k
    assert len(shifted) == 12 + 1 + 4 + 3 + 4
    for name in shifted:
        hf = "model." + name if name.startswith("language_model.") else name
        np.testing.assert_array_equal(np.array(per_expert_fp32[name]), src[hf].astype(np.float32) + np.float32(1))
    for plain in (
        "language_model.layers.0.linear_attn.norm.weight",
        "visual.blocks.0.norm1.weight",
        "visual.merger.norm.weight",
    ):
        np.testing.assert_array_equal(np.array(per_expert_fp32[plain]), src["model." + plain])


def test_dtype_applies_except_to_fp32_tensors(tiny_moe_checkpoint, per_expert_fp32, tmp_path):
    bf16 = converted(tiny_moe_checkpoint.path, tmp_path / "bf16", dtype="bfloat16")
    for name, x in bf16.items():
        if is_zero_centred_norm(name) or name.endswith((".A_log", ".dt_bias")):
            assert x.dtype == mx.float32, name
            assert mx.array_equal(x, per_expert_fp32[name]).item(), name  # shifted from the fp32 source
        else:
            assert x.dtype == mx.bfloat16, name


def test_models_names_an_unquantised_conversion_by_its_dtype(tiny_moe_checkpoint, tmp_path):
    # Its recipe is called "bf16" whatever --dtype wrote; `models` must not call float32 weights bf16.
    convert(str(tiny_moe_checkpoint.path), tmp_path / "fp32", recipe="bf16", dtype="float32")
    assert quantization_label(json.loads((tmp_path / "fp32" / "config.json").read_text())) == "float32"


def test_conv1d_takes_the_mlx_depthwise_layout(tiny_moe_checkpoint, per_expert_fp32):
    src = hf_tensors(tiny_moe_checkpoint.path)["model.language_model.layers.0.linear_attn.conv1d.weight"]  # [C, 1, K]
    out = np.array(per_expert_fp32["language_model.layers.0.linear_attn.conv1d.weight"])  # [C, K, 1]
    assert out.shape == (src.shape[0], src.shape[2], 1)
    np.testing.assert_array_equal(out, np.swapaxes(src, 1, 2))


def test_mtp_and_vision_are_carried_through(tiny_moe_checkpoint, per_expert_fp32):
    src = hf_tensors(tiny_moe_checkpoint.path)
    mtp = {k for k in src if k.startswith("mtp.") and ".experts." not in k}
    assert mtp and mtp <= set(per_expert_fp32)
    assert {"mtp.layers.0.mlp.experts.gate_proj.weight", "mtp.fc.weight"} <= set(per_expert_fp32)
    for name in (k for k in src if k.startswith("model.visual.")):
        np.testing.assert_array_equal(np.array(per_expert_fp32[name[len("model.") :]]), src[name])


def test_output_dir_has_config_index_and_side_files(tiny_moe_fp8_checkpoint, tmp_path):
    out = tmp_path / "out"
    tensors = converted(tiny_moe_fp8_checkpoint.path, out, "4bit")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # we dequantised the FP8 source
    source = str(tiny_moe_fp8_checkpoint.path)
    assert config["mlx_qwen35"] == {"format_version": 1, "recipe": "4bit", "source": source, "dtype": "float32"}
    assert config["text_config"]["layer_types"] == tiny_moe_fp8_checkpoint.config["text_config"]["layer_types"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in tensors.values())
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "preprocessor_config.json",
    ):
        assert (out / name).read_bytes() == (tiny_moe_fp8_checkpoint.path / name).read_bytes()
    assert not list(tmp_path.glob(".*"))  # no staging dir left behind


# ------------------------------------------------------------------------------------------ recipes


def test_recipe_predicates():
    r4, mixed = get_recipe("4bit"), get_recipe("mixed-3-6")
    assert r4.spec_for("language_model.layers.0.mlp.gate.weight", (8, 64)).bits == 8
    assert r4.spec_for("mtp.layers.0.mlp.shared_expert_gate.weight", (1, 64)).bits == 8
    assert mixed.spec_for("language_model.layers.0.mlp.experts.up_proj.weight", (8, 32, 64)).bits == 3
    assert mixed.spec_for("language_model.layers.3.self_attn.o_proj.weight", (64, 64)).bits == 6
    assert mixed.spec_for("language_model.embed_tokens.weight", (512, 64)).bits == 6
    assert r4.spec_for("language_model.layers.0.mlp.experts.down_proj.weight", (8, 64, 32)).group_size == 32
    assert r4.spec_for("language_model.layers.0.mlp.experts.down_proj.weight", (8, 64, 48)) is None  # no group fits
    for never in (
        ("language_model.layers.0.linear_attn.conv1d.weight", (128, 4, 1)),
        ("language_model.layers.0.linear_attn.A_log", (4,)),
        ("language_model.layers.0.input_layernorm.weight", (64,)),
        ("visual.blocks.0.mlp.linear_fc1.weight", (64, 64)),
    ):
        assert r4.spec_for(*never) is None
    assert get_recipe("bf16").spec_for("language_model.embed_tokens.weight", (512, 64)) is None
    with pytest.raises(Qwen35Error, match="--recipe"):
        get_recipe("2bit")


@pytest.fixture(scope="module")
def predictions(tiny_moe_checkpoint) -> dict[str, int]:
    return predict_recipes(str(tiny_moe_checkpoint.path), dtype="float32", shard_size_gb=0.0005)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_matches_its_prediction_and_map(tiny_moe_checkpoint, per_expert_fp32, predictions, recipe, tmp_path):
    out = tmp_path / recipe
    tensors = converted(tiny_moe_checkpoint.path, out, recipe, shard_size_gb=0.0005)
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert abs(written - predictions[recipe]) <= 0.01 * predictions[recipe]
    # From config.json alone (the README's numbers) the tensor data is predicted exactly.
    cfg = parse_config(tiny_moe_checkpoint.config)
    expected = sum(
        nbytes(s, d)
        for n, shape in expected_tensors(cfg).items()
        for _, s, d in stored_tensors(n, shape, RECIPES[recipe].spec_for(n, shape), "float32")
    )
    assert expected == sum(x.nbytes for x in tensors.values())

    quant = json.loads((out / "config.json").read_text()).get("quantization")
    if recipe == "bf16":
        assert quant is None and all(x.dtype == mx.float32 for x in tensors.values())
        return
    for path, spec in ((k, v) for k, v in quant.items() if isinstance(v, (dict, bool))):
        if spec is False:
            assert f"{path}.scales" not in tensors and tensors[f"{path}.weight"].dtype == mx.float32
            continue
        w, s, b = (tensors[f"{path}.{p}"] for p in ("weight", "scales", "biases"))
        original = per_expert_fp32[f"{path}.weight"]
        deq = mx.dequantize(w, s, b, group_size=spec["group_size"], bits=spec["bits"], mode=spec["mode"])
        rel = (mx.linalg.norm((deq - original).flatten()) / mx.linalg.norm(original.flatten())).item()
        assert rel < DEQUANT_REL_ERROR[spec["bits"]], (path, spec, rel)
    quantised = {k[: -len(".scales")] for k in tensors if k.endswith(".scales")}
    assert quantised == {k for k, v in quant.items() if isinstance(v, dict)}
    assert quant["language_model.layers.0.mlp.gate"]["bits"] == 8


def test_dense_member_converts(tiny_dense_checkpoint, tmp_path):
    tensors = converted(tiny_dense_checkpoint.path, tmp_path / "dense", "mixed-4-6")
    assert "language_model.lm_head.weight" not in tensors  # tied embeddings
    quant = json.loads((tmp_path / "dense" / "config.json").read_text())["quantization"]
    assert quant["language_model.layers.0.mlp.down_proj"]["bits"] == 4
    assert quant["language_model.layers.0.linear_attn.out_proj"]["bits"] == 6
    assert quant["mtp.layers.0.mlp.up_proj"]["bits"] == 4


def test_shards_are_bounded_and_indexed(tiny_moe_checkpoint, tmp_path):
    out = tmp_path / "sharded"
    limit_gb = 0.0003
    converted(tiny_moe_checkpoint.path, out, "4bit", shard_size_gb=limit_gb)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) >= 3
    assert [f.name for f in files] == [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for f in files:
        names = list(mx.load(str(f)))
        assert all(weight_map[n] == f.name for n in names)
        data = sum(x.nbytes for x in mx.load(str(f)).values())
        assert data <= limit_gb * 1e9 or len(names) <= 3  # only a single oversized weight may exceed it


def test_size_table_for_the_released_flagship():
    from mlx_qwen35.weights.memory_plan import RELEASED_MOE_CONFIGS, size_table

    cfg = parse_config(RELEASED_MOE_CONFIGS["Qwen3.5-397B-A17B"])
    params = expected_tensors(cfg)
    lm = sum(int(np.prod(s)) for n, s in params.items() if n.startswith("language_model."))
    vision = sum(int(np.prod(s)) for n, s in params.items() if n.startswith("visual."))
    mtp = sum(int(np.prod(s)) for n, s in params.items() if n.startswith("mtp."))
    # docs/architecture.md §1.2, measured on transformers' meta-device model
    assert (round(lm / 1e9, 2), round(vision / 1e9, 3), round(mtp / 1e9, 2)) == (396.35, 0.456, 6.60)
    table = size_table()
    assert "Qwen3.5-397B-A17B" in table and "mixed-3-6" in table


# ------------------------------------------------------------------------------------------ failures


def test_interrupted_convert_leaves_nothing(tiny_moe_checkpoint, tmp_path, monkeypatch):
    real_write = convert_module.write_shard
    calls = []

    def write_then_interrupt(*args, **kwargs):
        real_write(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_shard", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny_moe_checkpoint.path), tmp_path / "out", recipe="4bit", shard_size_gb=0.0003)
    assert list(tmp_path.iterdir()) == []


def test_killed_convert_never_leaves_a_finished_looking_dir(tiny_moe_checkpoint, tmp_path):
    # SIGKILL after the second shard: no cleanup runs, and still nothing sits at the target path.
    script = f"""
import os, signal, mlx_qwen35.weights.convert as c
real, n = c.write_shard, []
def write(*a, **k):
    real(*a, **k); n.append(1)
    if len(n) == 2: os.kill(os.getpid(), signal.SIGKILL)
c.write_shard = write
c.convert({str(tiny_moe_checkpoint.path)!r}, {str(tmp_path / "out")!r}, recipe="4bit", shard_size_gb=0.0003)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == -9
    assert not (tmp_path / "out").exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".out.partial-") and not (p / "config.json").exists() for p in leftovers)


def test_existing_target_needs_overwrite(tiny_moe_checkpoint, tmp_path):
    out = tmp_path / "out"
    convert(str(tiny_moe_checkpoint.path), out, recipe="4bit")  # an earlier conversion: --overwrite may replace it
    with pytest.raises(Qwen35Error, match="--overwrite"):
        convert(str(tiny_moe_checkpoint.path), out, recipe="bf16")
    convert(str(tiny_moe_checkpoint.path), out, recipe="bf16", overwrite=True)
    assert json.loads((out / "config.json").read_text())["mlx_qwen35"]["recipe"] == "bf16"
    assert not any(k.endswith(".scales") for k in mlx_tensors(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _broken_copy(source: Path, dest: Path, break_it) -> Path:
    shutil.copytree(source, dest)
    break_it(dest)
    return dest


def _drop_tensors(path: Path, doomed: set[str]) -> None:
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in {index["weight_map"][n] for n in doomed}:
        tensors = load_file(path / shard)
        save_file({k: v for k, v in tensors.items() if k not in doomed}, path / shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in doomed}
    index_path.write_text(json.dumps(index))


def _set_model_type(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))


def _truncate_a_shard(path: Path) -> None:
    shard = path / "model-00002-of-00006.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


BAD_INPUTS = {
    # case: (how to break a copy of the checkpoint, extra CLI args, text the one-line error must contain)
    "missing config.json": (lambda p: (p / "config.json").unlink(), [], "config.json: not found"),
    "unknown model_type": (_set_model_type, [], "config.json: model_type 'llama'"),
    "truncated shard": (_truncate_a_shard, [], "model-00002-of-00006.safetensors: truncated"),
    "missing tensor": (
        lambda p: _drop_tensors(p, {"model.language_model.layers.0.linear_attn.in_proj_qkv.weight"}),
        [],
        "model.safetensors.index.json: tensor 'model.language_model.layers.0.linear_attn.in_proj_qkv.weight' is missing",
    ),
    "missing expert": (
        lambda p: _drop_tensors(p, {"model.language_model.layers.4.mlp.experts.5.up_proj.weight"}),
        [],
        "'model.language_model.layers.4.mlp.experts.5.up_proj.weight' (expert 5 of 8) is missing",
    ),
    "unknown recipe": (lambda p: None, ["--recipe", "2bit"], "--recipe '2bit' is unknown"),
    "unknown dtype": (lambda p: None, ["--dtype", "int8"], "--dtype 'int8' is unknown"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file(tiny_moe_checkpoint, tmp_path, case):
    break_it, args, message = BAD_INPUTS[case]
    source = _broken_copy(tiny_moe_checkpoint.path, tmp_path / "src", break_it)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    command = [
        sys.executable,
        "-m",
        "mlx_qwen35",
        "convert",
        "--hf-path",
        str(source),
        "--mlx-path",
        str(outputs / "mlx"),
    ]
    result = subprocess.run(command + args, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert list(outputs.iterdir()) == []


def test_unwritable_output_via_the_script(tiny_moe_checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    command = [
        sys.executable,
        "convert.py",
        "--hf-path",
        str(tiny_moe_checkpoint.path),
        "--mlx-path",
        str(blocker / "mlx"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert (
        result.stderr.count("\n") == 1 and f"--mlx-path {blocker / 'mlx'}: cannot write in {blocker}" in result.stderr
    )


def test_dry_run_predicts_every_recipe_and_writes_nothing(tiny_moe_checkpoint, tmp_path):
    command = [
        sys.executable,
        "convert.py",
        "--hf-path",
        str(tiny_moe_checkpoint.path),
        "--mlx-path",
        str(tmp_path / "x"),
        "--dry-run",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for recipe in RECIPES:
        assert f"  {recipe} " in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_converting_an_mlx_dir_is_refused(tiny_moe_checkpoint, tmp_path):
    converted(tiny_moe_checkpoint.path, tmp_path / "once")
    with pytest.raises(Qwen35Error, match="already an MLX checkpoint"):
        convert(str(tmp_path / "once"), tmp_path / "twice")


def test_checkpoint_without_mtp_converts_and_says_so(tiny_moe_checkpoint, tmp_path, capfd):
    def drop_mtp(p: Path) -> None:
        index = json.loads((p / "model.safetensors.index.json").read_text())
        _drop_tensors(p, {k for k in index["weight_map"] if k.startswith("mtp.")})

    source = _broken_copy(tiny_moe_checkpoint.path, tmp_path / "src", drop_mtp)
    tensors = converted(source, tmp_path / "out")
    assert not any(k.startswith("mtp.") for k in tensors)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["mtp_num_hidden_layers"] == 0
    assert "no mtp.* tensors" in capfd.readouterr().err


def test_hub_ids_use_the_local_cache_first_and_dry_run_fetches_only_the_config(tiny_moe_checkpoint, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, tuple(allow_patterns), local_files_only))
        return str(tiny_moe_checkpoint.path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sizes = predict_recipes("Qwen/Qwen3.5-Tiny")
    assert calls == [("Qwen/Qwen3.5-Tiny", ("config.json",), True)]
    assert set(sizes) == set(RECIPES)
    assert convert_module.resolve_checkpoint("Qwen/Qwen3.5-Tiny") == tiny_moe_checkpoint.path
    assert calls[-1] == ("Qwen/Qwen3.5-Tiny", tuple(HUB_PATTERNS), True)
    with pytest.raises(Qwen35Error, match="no such directory"):
        convert_module.resolve_checkpoint("./not/a/dir")


# ------------------------------------------------------------------------------------------ --overwrite (issue 10.1)


def files_under(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` (links listed, not followed) with its bytes: what a user could lose."""
    return {
        str(p.relative_to(path)): (b"-> " + str(p.readlink()).encode() if p.is_symlink() else p.read_bytes())
        for p in sorted(path.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


def _user_folder(tmp: Path, hf: Path) -> Path:
    (tmp / "docs").mkdir()
    (tmp / "docs" / "thesis.txt").write_text("four years of work")
    return tmp / "docs"


def _a_conversion_inside_the_source(tmp: Path, hf: Path) -> Path:
    convert(str(hf), hf / "mlx", recipe="bf16")  # writing a new dir there is harmless; replacing one is not
    return hf / "mlx"


def _a_symlink_to(what: Callable[[Path, Path], Path]) -> Callable[[Path, Path], Path]:
    def make(tmp: Path, hf: Path) -> Path:
        (tmp / "link").symlink_to(what(tmp, hf), target_is_directory=True)
        return tmp / "link"

    return make


REFUSED_TARGETS = {
    # case: (make the --mlx-path given the work dir and the --hf-path, text the one-line error must contain)
    "a folder of the user's files": (_user_folder, "not a converted checkpoint"),
    "the source itself": (lambda tmp, hf: hf, "is the --hf-path checkpoint itself"),
    "a parent holding the source": (lambda tmp, hf: hf.parent, "holds the --hf-path checkpoint"),
    "a conversion inside the source": (_a_conversion_inside_the_source, "lies inside the --hf-path checkpoint"),
    "a symlink to the source": (_a_symlink_to(lambda tmp, hf: hf), "is the --hf-path checkpoint itself"),
    "a symlink to the user's folder": (_a_symlink_to(_user_folder), "not a converted checkpoint"),
    "a file": (lambda tmp, hf: Path(shutil.copy(hf / "config.json", tmp / "notes.json")), "is a file, not a directory"),
    "another HF checkpoint": (lambda tmp, hf: Path(shutil.copytree(hf, tmp / "other")), "not a converted checkpoint"),
}


@pytest.mark.parametrize("case", list(REFUSED_TARGETS))
def test_overwrite_never_deletes_what_a_converter_did_not_write(
    tiny_moe_checkpoint, tmp_path, case, monkeypatch, capsys
):
    make_target, message = REFUSED_TARGETS[case]
    hf = Path(shutil.copytree(tiny_moe_checkpoint.path, tmp_path / "models" / "hf"))
    target = make_target(tmp_path, hf)
    before = files_under(tmp_path)
    capsys.readouterr()
    args = ("convert", "--hf-path", str(hf), "--mlx-path", str(target), "--recipe", "bf16", "--overwrite")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"error: --mlx-path {target}") and message in err, err
    assert "choose another --mlx-path" in err or "remove it yourself" in err
    assert files_under(tmp_path) == before  # nothing deleted, nothing left behind


def test_overwrite_replaces_an_mlx_lm_output(tiny_moe_checkpoint, tmp_path):
    peer = tmp_path / "mlx-lm-4bit"  # what mlx_lm.convert writes: its config.json and shards tagged format=mlx
    peer.mkdir()
    (peer / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe", "quantization": {"bits": 4}}))
    mx.save_safetensors(str(peer / "model.safetensors"), {"w": mx.zeros(4)}, metadata={"format": "mlx"})
    convert(str(tiny_moe_checkpoint.path), peer, recipe="bf16", overwrite=True)
    assert json.loads((peer / "config.json").read_text())["mlx_qwen35"]["recipe"] == "bf16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx-lm-4bit"]


def test_overwrite_through_a_symlink_replaces_what_it_points_at(tiny_moe_checkpoint, tmp_path, capsys):
    real = tmp_path / "external-disk" / "qwen-4bit"
    convert(str(tiny_moe_checkpoint.path), real, recipe="4bit")
    (tmp_path / "models").mkdir()
    link = tmp_path / "models" / "qwen"
    link.symlink_to(real, target_is_directory=True)
    capsys.readouterr()
    assert convert(str(tiny_moe_checkpoint.path), link, recipe="bf16", overwrite=True) == link
    assert f"→ {link} (→ {real})" in capsys.readouterr().out
    assert link.is_symlink() and link.readlink() == real  # the link is kept, the data lands where it points
    assert json.loads((real / "config.json").read_text())["mlx_qwen35"]["recipe"] == "bf16"
    assert [p.name for p in real.parent.iterdir()] == ["qwen-4bit"]  # no .qwen-4bit.old-PID, no staging dir
    assert [p.name for p in link.parent.iterdir()] == ["qwen"]


# ------------------------------------------------------------------------------------------ interrupted runs (10.2)

# A convert through the CLI that stops after its first shard and waits to be signalled.
PAUSED_CONVERT = """
import signal, sys, time
import mlx_qwen35.weights.convert as c
from mlx_qwen35.surfaces.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if our parent ignores SIGINT
real = c.write_shard
def write(*args, **kwargs):
    real(*args, **kwargs)
    print("one shard written", flush=True)
    time.sleep(600)
c.write_shard = write
sys.argv = ["mlx-qwen35", "convert", "--hf-path", sys.argv[1], "--mlx-path", sys.argv[2], "--shard-size-gb", "0.0003"]
main()
"""


def signal_a_convert_midway(source: Path, target: Path, signum: int) -> tuple[int, subprocess.CompletedProcess]:
    """Start a real convert, wait until one shard is on disk, send it ``signum``, wait for it to end → (its PID, result)."""
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSED_CONVERT, str(source), str(target)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in child.stdout:
        if line == "one shard written\n":
            assert list(target.parent.glob(f".{target.name}.partial-{child.pid}/*.safetensors"))
            child.send_signal(signum)
            break
    stdout, stderr = child.communicate(timeout=120)
    return child.pid, subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


@pytest.mark.parametrize("signum, returncode", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_remove_the_staging_dir(tiny_moe_checkpoint, tmp_path, signum, returncode):
    _, result = signal_a_convert_midway(tiny_moe_checkpoint.path, tmp_path / "out", signum)
    assert result.returncode == returncode, result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_next_run_removes_what_a_killed_convert_left(tiny_moe_checkpoint, tmp_path, capfd):
    out = tmp_path / "out"
    pid, killed = signal_a_convert_midway(tiny_moe_checkpoint.path, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in tmp_path.iterdir()] == [f".out.partial-{pid}"]
    alive = subprocess.Popen(["sleep", "60"])  # a convert still running beside the same target: left alone
    try:
        kept = [f".out.partial-{alive.pid}", f".other.partial-{pid}"]  # …and another target's leftovers too
        for name in kept:
            (tmp_path / name).mkdir()
        capfd.readouterr()
        convert(str(tiny_moe_checkpoint.path), out, recipe="bf16")
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and f"removed .out.partial-{pid} in {tmp_path}" in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *kept])
    finally:
        alive.kill()
        alive.wait()


def test_an_output_killed_between_its_two_renames_is_restored(tiny_moe_checkpoint, tmp_path, capfd):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f".out.old-{int(gone.stdout)}"  # the previous output, renamed aside; then the process died
    convert(str(tiny_moe_checkpoint.path), tmp_path / "converted", recipe="bf16")
    (tmp_path / "converted").rename(old)
    capfd.readouterr()
    with pytest.raises(Qwen35Error, match="already exists; pass --overwrite"):  # it is back, so not overwritten
        convert(str(tiny_moe_checkpoint.path), tmp_path / "out", recipe="4bit")
    assert f"restored out from {old.name}" in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mlx_qwen35"]["recipe"] == "bf16"


# ------------------------------------------------------------------------------------------ malformed headers (10.10)


def _first_shard(path: Path) -> Path:
    return sorted(path.glob("model-*.safetensors"))[0]


def _edit_header(shard: Path, edit: Callable[[dict], object]) -> None:
    """Rewrite a shard's JSON header with ``edit(header)``, keeping its data bytes."""
    blob = shard.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    text = json.dumps(edit(json.loads(blob[8 : 8 + n]))).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + n :])


def _at(offset: int) -> Callable[[dict], str]:
    """The name of the tensor whose data starts at ``offset`` (0 = the first in the file)."""
    return lambda h: next(k for k, v in h.items() if k != "__metadata__" and v["data_offsets"][0] == offset)


def _edit_first(change: Callable[[dict], None]) -> Callable[[dict], dict]:
    def edit(h: dict) -> dict:
        change(h[_at(0)(h)])
        return h

    return edit


def _overlap(h: dict) -> dict:
    first = h[_at(0)(h)]
    second = h[_at(first["data_offsets"][1])(h)]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [0, size]  # starts inside the first tensor
    return h


def _conv1d_as_2d(path: Path) -> None:
    name = "model.language_model.layers.0.linear_attn.conv1d.weight"
    shard = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]

    def edit(h: dict) -> dict:
        c, _, k = h[name]["shape"]
        h[name]["shape"] = [c, k]  # same bytes, wrong rank
        return h

    _edit_header(shard, edit)


def _duplicate_a_tensor(path: Path) -> None:
    shards = sorted(path.glob("model-*.safetensors"))
    a, b = load_file(shards[0]), load_file(shards[1])
    name = sorted(a)[0]
    save_file(b | {name: a[name]}, shards[1])


def _index_points_outside(path: Path) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = "../" + index["weight_map"][name]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


MALFORMED = {
    # case: (how to break a copy of the checkpoint, text the one-line error must contain)
    "no data_offsets": (_edit_first(lambda t: t.pop("data_offsets")), "data_offsets None is not [begin, end]"),
    "header is a list": (lambda h: list(h.items()), "a JSON list, not an object of tensors"),
    "entry is a list": (lambda h: h | {_at(0)(h): list(h[_at(0)(h)].values())}, "header entry is a JSON list"),
    "string shape": (_edit_first(lambda t: t.update(shape=[str(d) for d in t["shape"]])), "is not a list of non"),
    "string offsets": (_edit_first(lambda t: t.update(data_offsets=list(map(str, t["data_offsets"])))), "in bytes"),
    "offsets and shape disagree": (
        _edit_first(lambda t: t.update(shape=[t["shape"][0] // 2, *t["shape"][1:]])),
        "span",
    ),
    "overlapping tensors": (_overlap, "overlap (data_offsets)"),
    "offsets past the end": (
        _edit_first(lambda t: t.update(data_offsets=[x + 10**9 for x in t["data_offsets"]])),
        "truncated",
    ),
}
BROKEN_LISTINGS = {
    "conv1d of the wrong rank": (_conv1d_as_2d, "not 3-D"),
    "a tensor in two shards": (_duplicate_a_tensor, "is also in model-00001-of-00006.safetensors"),
    "index names a file elsewhere": (_index_points_outside, "shard files in this directory"),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["convert", "dry-run"])
@pytest.mark.parametrize("case", list(MALFORMED) + list(BROKEN_LISTINGS))
def test_malformed_shards_are_one_line_naming_file_and_tensor(
    tiny_moe_checkpoint, tmp_path, case, dry_run, monkeypatch, capsys
):
    source = Path(shutil.copytree(tiny_moe_checkpoint.path, tmp_path / "src"))
    shard = _first_shard(source)
    if case in MALFORMED:
        edit, message = MALFORMED[case]
        tensor = _at(0)(json.loads(shard.read_bytes()[8 : 8 + int.from_bytes(shard.read_bytes()[:8], "little")]))
        _edit_header(shard, edit)
    else:
        breaker, message = BROKEN_LISTINGS[case]
        breaker(source)
        tensor = ""
    args = ["convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "out")] + ["--dry-run"] * dry_run
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    if case in MALFORMED:
        assert f"{shard}:" in err
        if case != "header is a list":  # no tensor to name in a header that is not an object of tensors
            assert f"'{tensor}'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_fp8_scales_must_cover_their_weight_in_128_blocks(tiny_moe_fp8_checkpoint, tmp_path):
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    source = Path(shutil.copytree(tiny_moe_fp8_checkpoint.path, tmp_path / "src"))
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    scale = next(k for k in sorted(weight_map) if k.endswith(".weight_scale_inv"))
    shard = source / weight_map[scale]
    tensors = load_torch(shard)
    tensors[scale] = tensors[scale][:, :-1].contiguous()  # one column of blocks short
    save_torch(tensors, shard)
    with pytest.raises(Qwen35Error) as error:
        convert(str(source), tmp_path / "out", recipe="bf16")
    assert str(error.value).startswith(f"{shard}: '{scale}' has shape") and "128×128 FP8 blocks" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _add_tensor(path: Path, name: str, shape: tuple[int, ...]) -> Path:
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = _first_shard(path)
    save_file(load_file(shard) | {name: np.zeros(shape, np.float32)}, shard)
    index["weight_map"][name] = shard.name
    index_path.write_text(json.dumps(index))
    return shard


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.language_model.layers.0.linear_attn.extra_proj.weight", (64, 64)),
        ("model.language_model.layers.6.input_layernorm.weight", (64,)),  # a seventh layer of six
        ("model.language_model.layers.0.mlp.experts.8.up_proj.weight", (32, 64)),  # a ninth expert of eight
        ("mtp.layers.1.input_layernorm.weight", (64,)),  # a second MTP layer of one
    ],
)
def test_an_unknown_tensor_is_refused_at_convert_time(tiny_moe_checkpoint, tmp_path, name, shape):
    source = Path(shutil.copytree(tiny_moe_checkpoint.path, tmp_path / "src"))
    shard = _add_tensor(source, name, shape)
    with pytest.raises(Qwen35Error) as error:
        convert(str(source), tmp_path / "out", recipe="bf16")
    assert str(error.value).startswith(f"{shard}: unexpected tensor '{name}'"), error.value
    assert "config" in str(error.value) and "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
