"""Streamed experts (docs/architecture.md §6.1): the store on disk, the budgeted cache, and generation through them.

Greedy generation with 25% of the experts resident is token-identical to the fully resident model, text and
image, for a store written by ``convert --expert-store`` and one repacked from an mlx-vlm-named directory;
the bytes the cache holds, summed from its arrays after every layer, never exceed the budget.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import convert_tiny
from mlx_lm.models.switch_layers import SwitchGLU
from PIL import Image

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.model import expert_cache
from mlx_qwen35.model.cache import make_cache
from mlx_qwen35.model.expert_cache import ExpertCache, empty_experts
from mlx_qwen35.model.inputs import ModelInputs
from mlx_qwen35.runtime.generation import generate_tokens
from mlx_qwen35.runtime.settings import PREFILL_STEP_SIZE
from mlx_qwen35.weights.expert_repack import repack
from mlx_qwen35.weights.expert_store import (
    ALIGNMENT,
    INDEX_FILE,
    STORE_DIR,
    ExpertStore,
    parse_expert_memory,
    write_store,
)
from mlx_qwen35.weights.layout import INDEX_FILE as SHARD_INDEX
from mlx_qwen35.weights.loading import load, read_weights

PROMPT_TOKENS = 24
GREEDY_TOKENS = 24


def _greedy(model, inputs: ModelInputs, n: int = GREEDY_TOKENS, prefill_step_size: int = 512) -> list[int]:
    sampler = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    steps = generate_tokens(
        model, inputs, make_cache(model), sampler, max_tokens=n, prefill_step_size=prefill_step_size
    )
    return [t for t, _ in steps]


def _as_mlx_vlm(ours: Path, out: Path) -> Path:
    """Our converted dir renamed the way mlx-vlm names it (``language_model.model.*``, ``switch_mlp``, ``vision_tower``)."""

    def theirs(key: str) -> str:
        key = key.replace(".mlp.experts.", ".mlp.switch_mlp.")
        if key.startswith("visual."):
            return "vision_tower." + key[len("visual.") :]
        if key.startswith("language_model.") and not key.startswith("language_model.lm_head"):
            return "language_model.model." + key[len("language_model.") :]
        return key

    out.mkdir()
    weights = {theirs(k): v for k, v in read_weights(ours).items() if not k.startswith("mtp.")}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    for f in ours.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", SHARD_INDEX):
            shutil.copyfile(f, out / f.name)
    config = json.loads((ours / "config.json").read_text())
    config.pop("mlx_qwen35")
    quant = config["quantization"]
    config["quantization"] = {theirs(k) if isinstance(v, (dict, bool)) else k: v for k, v in quant.items()}
    config["text_config"]["mtp_num_hidden_layers"] = 0
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def dirs(tiny_moe_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The resident 4-bit checkpoint, the same with a store from ``convert --expert-store``, and one repacked from mlx-vlm names."""
    from mlx_qwen35.weights.convert import convert

    root = tmp_path_factory.mktemp("expert-store")
    resident = convert_tiny(tiny_moe_checkpoint, root / "resident", recipe="4bit")
    convert(str(tiny_moe_checkpoint.path), root / "converted", recipe="4bit", dtype="float32", expert_store=True)
    peer = _as_mlx_vlm(resident, root / "mlx-vlm")
    repack(peer, root / "repacked")
    return {"resident": resident, "converted": root / "converted", "repacked": root / "repacked", "peer": peer}


def _png(path: Path) -> str:
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


def _measured_resident_bytes(cache: ExpertCache) -> int:
    """What the cache holds, summed from its arrays (and the reads in flight, reserved at their size)."""
    held = sum(a.nbytes for tensors in cache.resident.values() for a in tensors.values())
    return held + sum(int(cache.expert_bytes[cache._row[layer]]) for layer, _ in cache.pending)


@pytest.fixture
def budget_watch(monkeypatch) -> list[int]:
    """After every streamed MoE layer: the bytes the cache holds, measured from its arrays."""
    seen: list[int] = []
    original = ExpertCache.routed

    def watched(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append(_measured_resident_bytes(self) - self.budget_bytes)
        return out

    monkeypatch.setattr(ExpertCache, "routed", watched)
    return seen


@pytest.mark.parametrize("store", ["converted", "repacked"])
def test_greedy_text_at_25_percent_is_token_identical_to_resident(
    dirs, tiny_moe_checkpoint, store, budget_watch, monkeypatch
):
    monkeypatch.setattr(expert_cache, "PREFETCH_MIN_PRECISION", 0.0)  # every guess prefetched: the path runs
    prompt = ModelInputs(tiny_moe_checkpoint.prompt_ids(PROMPT_TOKENS))
    reference, _ = load(str(dirs["resident"]))
    streamed, _ = load(str(dirs[store]), expert_memory="25%")
    cache = streamed.expert_cache
    assert cache.budget_bytes == cache.store.total_bytes // 4
    assert _greedy(streamed, prompt) == _greedy(reference, prompt)
    stats = cache.as_dict()
    assert stats["misses"] > stats["hits"] > 0 and stats["evictions"] > 0  # it streamed, and reused some
    assert stats["bytes_read"] == cache.store.counters.bytes > cache.budget_bytes
    assert stats["prefetch_used"] > 0  # the next layer's router guessed some of the experts right
    assert budget_watch and max(budget_watch) <= 0  # never above the budget, measured after every layer


@pytest.mark.parametrize("store", ["converted", "repacked"])
def test_greedy_image_at_25_percent_is_token_identical_to_resident(dirs, store, tmp_path, budget_watch):
    reference, processor = load(str(dirs["resident"]))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _png(tmp_path / "a.png")}, {"type": "text", "text": "What?"}],
        }
    ]
    inputs = processor(messages)
    assert inputs.has_vision
    streamed, _ = load(str(dirs[store]), expert_memory="25%")
    assert _greedy(streamed, inputs, 16) == _greedy(reference, inputs, 16)
    assert max(budget_watch) <= 0


def test_prefill_at_the_minimum_budget_runs_experts_in_groups_within_it(dirs, tiny_moe_checkpoint, budget_watch):
    """One chunk of 24 tokens routes to more experts than the minimum budget holds: groups that fit, same tokens."""
    prompt = ModelInputs(tiny_moe_checkpoint.prompt_ids(PROMPT_TOKENS))
    reference, _ = load(str(dirs["resident"]))
    probe, _ = load(str(dirs["converted"]))
    minimum = probe.expert_cache.minimum_bytes
    streamed, _ = load(str(dirs["converted"]), expert_memory=minimum / 1e9)
    groups = []
    original = ExpertCache._routed_in_groups
    streamed.expert_cache._routed_in_groups = lambda *a: groups.append(1) or original(streamed.expert_cache, *a)
    assert _greedy(streamed, prompt, 8) == _greedy(reference, prompt, 8)
    assert groups  # the grouped path ran
    assert max(budget_watch) <= 0


def test_store_is_page_aligned_and_holds_the_checkpoints_experts_bit_for_bit(dirs):
    store = ExpertStore(dirs["converted"])
    weights = read_weights(dirs["resident"])
    for layer, entry in store.layers.items():
        path = store.directory / entry["file"]
        assert entry["stride"] % ALIGNMENT == 0 and path.stat().st_size == entry["num_experts"] * entry["stride"]
        for expert in (0, entry["num_experts"] - 1):
            got = store.tensors(layer, store.read(layer, expert))
            for name, array in got.items():
                want = weights[f"language_model.layers.{layer}.mlp.experts.{name}"][expert]
                assert array.dtype == want.dtype and mx.array_equal(array, want).item(), (layer, expert, name)
    shards = read_weights(dirs["converted"])
    assert not any(".mlp.experts." in k and k.startswith("language_model.") for k in shards)  # resident: the rest


def _break(dirs, tmp_path: Path, edit) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(dirs["converted"], broken)
    edit(broken / STORE_DIR)
    return broken


def test_store_with_a_missing_layer_is_one_error_naming_the_index(dirs, tmp_path):
    def drop_layer(store: Path) -> None:
        index = json.loads((store / INDEX_FILE).read_text())
        del index["layers"]["5"]
        (store / INDEX_FILE).write_text(json.dumps(index))

    broken = _break(dirs, tmp_path, drop_layer)
    with pytest.raises(Qwen35Error, match=r"experts/index.json: stores experts for 5 layers, the model .* has 6"):
        load(str(broken))


def test_truncated_expert_file_is_one_error_naming_the_file(dirs, tmp_path):
    def truncate(store: Path) -> None:
        with open(store / "layer-002.bin", "r+b") as f:
            f.truncate(f.seek(0, 2) - 1)

    broken = _break(dirs, tmp_path, truncate)
    with pytest.raises(Qwen35Error, match=r"experts/layer-002.bin: truncated \(\d+ bytes, the index needs \d+"):
        load(str(broken))


def test_store_of_another_quantisation_is_one_error(dirs, tmp_path):
    def other_shape(store: Path) -> None:
        index = json.loads((store / INDEX_FILE).read_text())
        index["layers"]["0"]["tensors"][0]["shape"][-1] *= 2
        (store / INDEX_FILE).write_text(json.dumps(index))

    broken = _break(dirs, tmp_path, other_shape)
    with pytest.raises(Qwen35Error, match=r"index.json: layer 0 stores expert tensors .* the model expects"):
        load(str(broken))


def test_budget_below_one_layers_top_k_is_an_error_with_the_minimum(dirs):
    probe, _ = load(str(dirs["converted"]))
    minimum = probe.expert_cache.minimum_bytes
    top_k = probe.config.text.num_experts_per_tok
    assert minimum == top_k * max(probe.expert_cache.expert_bytes)
    with pytest.raises(
        Qwen35Error, match=rf"below one layer's top-{top_k} experts; give at least .* \({minimum} bytes\)"
    ):
        load(str(dirs["converted"]), expert_memory=(minimum - 1) / 1e9)


def test_expert_memory_without_a_store_says_how_to_make_one(dirs):
    with pytest.raises(Qwen35Error, match="has no expert store; make one with mlx-qwen35 expert-store"):
        load(str(dirs["resident"]), expert_memory="25%")


def test_repack_refuses_a_store_and_a_dense_model(dirs, tiny_dense_checkpoint, tmp_path):
    with pytest.raises(Qwen35Error, match="already holds an expert store"):
        repack(dirs["converted"], tmp_path / "again")
    dense = convert_tiny(tiny_dense_checkpoint, tmp_path / "dense")
    with pytest.raises(Qwen35Error, match="dense model has no routed experts"):
        repack(dense, tmp_path / "dense-store")
    assert not (tmp_path / "dense-store").exists()


@pytest.mark.parametrize(
    ("spec", "total", "budget"), [("25%", 1000, 250), ("100%", 1000, 1000), ("0.5", 10, 500_000_000)]
)
def test_expert_memory_is_gb_or_a_share(spec, total, budget):
    assert parse_expert_memory(spec)(total) == budget


@pytest.mark.parametrize("spec", ["0", "-1", "0%", "101%", "abc", "inf", "nan"])
def test_bad_expert_memory_is_one_error(spec):
    with pytest.raises(Qwen35Error, match="--expert-memory-gb"):
        parse_expert_memory(spec)


# ---------------------------------------------------------------------------------------------- eviction


H, I, E = 8, 4, 4


@pytest.fixture
def one_layer_store(tmp_path) -> tuple[ExpertStore, dict]:
    rng = np.random.default_rng(0)
    tensors = {
        f"{p}.weight": mx.array(rng.standard_normal(shape).astype(np.float32))
        for p, shape in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I)))
    }
    write_store(tmp_path, {0: tensors})
    return ExpertStore(tmp_path), tensors


def _shell() -> SwitchGLU:
    shell = SwitchGLU(H, I, E)
    empty_experts(shell, {f"{p}.weight": mx.float32 for p in ("gate_proj", "up_proj", "down_proj")})
    return shell


def _run(cache: ExpertCache, shell, experts: list[int], tensors: dict) -> None:
    x = mx.array(np.random.default_rng(1).standard_normal((1, 1, H)).astype(np.float32))
    full = SwitchGLU(H, I, E)
    full.update({p: {"weight": tensors[f"{p}.weight"]} for p in ("gate_proj", "up_proj", "down_proj")})
    for e in experts:
        idx, w = mx.array([[[e]]]), mx.ones((1, 1, 1))
        got = cache.routed(0, x, idx, w, shell)
        assert mx.allclose(got, full(x, idx)[..., 0, :], atol=0, rtol=0).item()  # the same numbers


def test_a_frequently_used_expert_outlives_a_recent_one_where_lru_would_drop_it(one_layer_store):
    """Two experts' room, a hot expert 0 used thrice, then 1 and 2 once: LRU evicts 0 for 2; we evict 1."""
    store, tensors = one_layer_store
    cache = ExpertCache(store, 2 * store.expert_bytes(0), top_k=1, prefetch=False)
    _run(cache, _shell(), [0, 0, 0, 1, 2, 0], tensors)
    assert cache.stats.hits == 3  # the 2nd, 3rd and the last use of expert 0
    assert set(cache.resident) == {(0, 0), (0, 2)}


def test_a_decode_miss_scoring_well_below_the_victim_is_computed_and_dropped(one_layer_store):
    """Two experts' room, 0 and 1 used thrice each, then 2 once: admitting 2 evicted 0 (scores ≈3 vs 1) and the next
    0 missed; 2 is computed from its read copy and dropped, so 0 and 1 stay and hit; the same numbers throughout."""
    store, tensors = one_layer_store
    cache = ExpertCache(store, 2 * store.expert_bytes(0), top_k=1, prefetch=False)
    _run(cache, _shell(), [0, 0, 0, 1, 1, 1, 2], tensors)
    assert set(cache.resident) == {(0, 0), (0, 1)} and cache.stats.not_admitted == 1
    assert cache.resident_bytes == cache.stats.peak_resident_bytes == 2 * store.expert_bytes(0)
    _run(cache, _shell(), [0, 1], tensors)
    assert (cache.stats.hits, cache.stats.misses) == (6, 3)


def test_calibration_priors_keep_a_hot_expert_through_its_first_gap(one_layer_store):
    """One expert's room beyond the top-1: without priors 0 (older) goes for 2; with 0 hot in the priors, 1 goes."""
    store, tensors = one_layer_store
    plain = ExpertCache(store, 2 * store.expert_bytes(0), top_k=1, prefetch=False)
    _run(plain, _shell(), [0, 1, 2, 0], tensors)
    primed = ExpertCache(store, 2 * store.expert_bytes(0), top_k=1, priors={0: [0.7, 0.1, 0.1, 0.1]}, prefetch=False)
    _run(primed, _shell(), [0, 1, 2, 0], tensors)
    assert (plain.stats.hits, primed.stats.hits) == (0, 1)


# ---------------------------------------------------------------------------------------------- calibration, surfaces


def test_calibration_saves_each_experts_share_of_the_tokens_routed_to_it(
    dirs, tiny_moe_checkpoint, tmp_path, monkeypatch
):
    from mlx_qwen35.model.moe import SparseMoE
    from mlx_qwen35.surfaces.expert_store import calibrate

    store_dir = tmp_path / "calibrated"
    shutil.copytree(dirs["converted"], store_dir)
    reference, processor = load(str(dirs["resident"]))
    text = processor.decode(tiny_moe_checkpoint.prompt_ids(PREFILL_STEP_SIZE + 32))  # two prefill chunks
    tokens = processor.encode(text)
    routed: dict[int, np.ndarray] = {}
    original = SparseMoE.route

    def counting(self, x):
        indices, weights = original(self, x)
        layer = next(i for i, lay in enumerate(reference.language_model.layers) if lay.mlp is self)
        routed[layer] = routed.get(layer, 0) + np.bincount(np.array(indices).reshape(-1), minlength=8)
        return indices, weights

    monkeypatch.setattr(SparseMoE, "route", counting)
    reference(mx.array(tokens)[None])
    monkeypatch.setattr(SparseMoE, "route", original)
    assert calibrate(store_dir, text) == len(tokens)
    shares = json.loads((store_dir / STORE_DIR / "priors.json").read_text())["shares"]
    for layer, counts in routed.items():
        np.testing.assert_allclose(shares[str(layer)], counts / counts.sum(), rtol=1e-12)
        assert counts.max() > counts.min()  # not uniform: a count per call would be
    cache = load(str(store_dir))[0].expert_cache
    assert cache.score.max() > cache.score.min() > 0  # the priors seed the scores


def test_cli_expert_store_then_generate_json_reports_the_experts(dirs, monkeypatch, capsys, tmp_path):
    from cli_runner import run_cli

    out = tmp_path / "cli-store"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "expert-store", str(dirs["resident"]), "--out", str(out))
    assert code == 0, stderr
    assert (out / STORE_DIR / INDEX_FILE).is_file()
    args = ["generate", str(out), "-p", "Hello", "-m", "6", "--temp", "0", "--json", "--expert-memory-gb", "25%"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    experts = json.loads(stdout.splitlines()[0])["experts"]
    assert experts["budget_bytes"] == ExpertStore(out).total_bytes // 4
    assert experts["decode_tokens"] == 5 and experts["bytes_read_per_token"] > 0
    assert experts["peak_resident_bytes"] <= experts["budget_bytes"]
    assert {"decode_hit_rate", "read_wait_ms_per_token", "compute_ms_per_token"} <= experts.keys()


@pytest.mark.parametrize("spec", ["12x", "0%"])
def test_cli_bad_expert_memory_is_one_line_before_loading(monkeypatch, capsys, tmp_path, spec):
    from cli_runner import run_cli

    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "generate", str(tmp_path / "nowhere"), "-p", "x", "--expert-memory-gb", spec
    )
    assert code != 0 and stderr.count("\n") == 1 and "--expert-memory-gb" in stderr


def test_server_stats_reports_the_experts(dirs):
    import httpx
    from test_server import RunningServer, chat

    from mlx_qwen35.surfaces.server.routes import ServerSettings
    from mlx_qwen35.surfaces.server.worker import GenerationWorker

    worker = GenerationWorker(lambda: load(str(dirs["converted"]), expert_memory="25%"))
    running = RunningServer(worker, ServerSettings(model_id="store"))
    try:
        assert chat(running.url, max_tokens=4, temperature=0).status_code == 200
        experts = httpx.get(f"{running.url}/stats", timeout=10).json()["experts"]
    finally:
        running.close()
    assert experts["misses"] > 0 and experts["bytes_read"] > 0
    assert experts["peak_resident_bytes"] <= experts["budget_bytes"] == ExpertStore(dirs["converted"]).total_bytes // 4


def test_plan_projects_the_flagship_on_a_128_gb_mac_with_an_expert_store(monkeypatch, capsys):
    from cli_runner import run_cli

    from mlx_qwen35.config import parse_config
    from mlx_qwen35.weights.memory_plan import CHIP_BANDWIDTH_GBS, GIB, RELEASED_CONFIGS, predicted_tensor_bytes
    from mlx_qwen35.weights.quantize import get_recipe

    args = ["plan", "--memory-gb", "128", "--recipe", "4bit", "--expert-store", "--hit-rate", "0.6", "--json"]
    code, text, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    rows = {row["model"]: row for row in json.loads(text)}
    flagship = rows["Qwen3.5-397B-A17B"]
    stream = flagship["expert_store"]
    cfg = parse_config(RELEASED_CONFIGS["Qwen3.5-397B-A17B"], "397B")
    tensors = predicted_tensor_bytes(cfg, get_recipe("4bit"))
    experts = sum(n for k, n in tensors.items() if k.startswith("language_model.") and ".mlp.experts." in k)
    others = flagship["total_bytes"] - experts
    assert stream["resident_expert_bytes"] == 120 * GIB - others  # all the memory left beside the rest and macOS
    assert 0.3 < stream["resident_share"] < 0.7 and not flagship["fits"]
    per_token = experts * cfg.text.num_experts_per_tok // cfg.text.num_experts
    assert stream["ssd_read_bytes_per_token"] == int(0.4 * per_token)
    for chip, ssd in stream["ssd_read_gbs"].items():
        seconds = flagship["decode_read_bytes"] / (CHIP_BANDWIDTH_GBS[chip] * 1e9) + 0.4 * per_token / (ssd * 1e9)
        assert stream["projected_tokens_per_s"][chip] == pytest.approx(1 / seconds, abs=0.05)
    assert rows["Qwen3.5-35B-A3B"]["expert_store"]["resident_share"] == 1.0  # it fits: nothing streamed
    code, _, err = run_cli(monkeypatch, capsys, "plan", "--expert-store", "--hit-rate", "2")
    assert code != 0 and err.count("\n") == 1 and "--hit-rate" in err


def test_the_experts_of_the_layer_about_to_run_are_kept_where_lru_evicts_them(tmp_path):
    """Two layers, room for three experts, top-1. Step 2's layer 1 must evict: LRU drops layer 0's expert 0, which
    step 3's layer 0 needs first; we drop layer 1's expert 0, whose layer runs last (score ÷ calls until it runs)."""
    rng = np.random.default_rng(0)
    tensors = {
        f"{p}.weight": mx.array(rng.standard_normal(shape).astype(np.float32))
        for p, shape in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I)))
    }
    write_store(tmp_path, {0: tensors, 1: tensors})
    store = ExpertStore(tmp_path)
    cache = ExpertCache(store, 3 * store.expert_bytes(0), top_k=1, prefetch=False)
    shells = {0: _shell(), 1: _shell()}
    x = mx.zeros((1, 1, H))
    for layer, expert in [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0)]:
        cache.routed(layer, x, mx.array([[[expert]]]), mx.ones((1, 1, 1)), shells[layer])
    assert cache.stats.hits == 1 and (0, 0) in cache.resident and (1, 0) not in cache.resident


def _call(cache: ExpertCache, shells: dict, layer: int, experts: list[int], x: mx.array | None = None) -> None:
    """One MoE call of ``layer`` routing its tokens to ``experts`` (one token: decode; more: a prefill chunk)."""
    x = mx.zeros((1, len(experts), H)) if x is None else x
    idx = mx.array(experts).reshape(1, len(experts), 1)
    cache.routed(layer, x, idx, mx.ones((1, len(experts), 1)), shells[layer])


def test_a_prompts_routing_does_not_displace_what_decode_reuses(one_layer_store):
    """Decode alternates 0 and 1 around a 16-token prompt routed to 2 and 3: counting the prompt's tokens made 2 and 3
    outscore 0 and 1, so every decode call after it missed; the scores count decode only, and 0 and 1 hit again."""
    store, _ = one_layer_store
    cache = ExpertCache(store, 2 * store.expert_bytes(0), top_k=1, prefetch=False)
    shells = {0: _shell()}
    for e in [0, 1, 0, 1]:
        _call(cache, shells, 0, [e])
    _call(cache, shells, 0, [2] * 8 + [3] * 8)
    hits = cache.stats.hits
    for e in [0, 1, 0, 1]:
        _call(cache, shells, 0, [e])
    assert cache.stats.hits - hits == 2


def _two_layer_cache(tmp_path: Path, budget_experts: int, prefetch: bool = True) -> ExpertCache:
    rng = np.random.default_rng(0)
    tensors = {
        f"{p}.weight": mx.array(rng.standard_normal(shape).astype(np.float32))
        for p, shape in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I)))
    }
    if not (tmp_path / STORE_DIR).exists():
        write_store(tmp_path, {0: tensors, 1: tensors})
    store = ExpertStore(tmp_path)
    return ExpertCache(store, budget_experts * store.expert_bytes(0), top_k=1, prefetch=prefetch)


@pytest.mark.parametrize("right", [True, False])
def test_prefetch_runs_only_where_its_guesses_have_been_right(tmp_path, right):
    """Layer 1 cycles through its experts; the next-layer guess is always right or always wrong (and confident).
    Wrong guesses are never read (prefetch-on reads what prefetch-off reads); right ones are, once they prove right."""
    steps, shells = 60, {0: _shell(), 1: _shell()}
    read = {}
    for prefetch in (True, False):
        cache = _two_layer_cache(tmp_path, 3, prefetch)
        cache.next_router[0] = lambda x: mx.softmax(20 * x[..., :E], axis=-1)  # the expert x's first E dims point at
        for t in range(steps):
            upcoming = t % E
            x = mx.zeros((1, 1, H)).at[..., upcoming if right else (upcoming + 1) % E].add(1.0)
            _call(cache, shells, 0, [0], x)
            _call(cache, shells, 1, [upcoming], x)
        read[prefetch] = cache.stats
    on, off = read[True], read[False]
    if right:
        assert on.prefetched == on.prefetch_used > steps // 2  # on once 18 right guesses gave 0.9 precision
    else:
        assert on.prefetched == 0 and on.bytes_read == off.bytes_read


def test_a_budget_that_holds_every_expert_reads_nothing_and_syncs_no_layer_after_warm_up(dirs, tiny_moe_checkpoint):
    """At 100% each layer, once all its experts are in, runs from one stack without reading its routing back; once
    every layer's are, the layers hold them and run as the resident model (compiled decode): token-identical,
    no bytes read and no host sync in a second request."""
    prompt = ModelInputs(tiny_moe_checkpoint.prompt_ids(PROMPT_TOKENS))
    reference, _ = load(str(dirs["resident"]))
    streamed, _ = load(str(dirs["converted"]), expert_memory="100%")
    cache = streamed.expert_cache
    expected = _greedy(reference, prompt)
    assert _greedy(streamed, prompt) == expected  # warm-up: the prompt's prefill routes to every expert
    before = cache.as_dict()
    assert _greedy(streamed, prompt) == expected
    after = cache.as_dict()
    assert after["bytes_read"] == before["bytes_read"] and after["misses"] == before["misses"]
    assert after["sync_seconds"] == before["sync_seconds"]  # not one layer waited for its routing
    assert cache.handed_over and not any(layer.mlp.streams_experts for layer in streamed.language_model.layers)
    assert cache.resident_bytes == cache.store.total_bytes == _measured_resident_bytes(cache)
