"""``mlx-qwen35 plan``: what a model needs in memory on this Mac (or a named one), and its decode ceiling."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import parse_config, read_config_json
from ..errors import Qwen35Error
from ..weights.local_models import total_memory_bytes
from ..weights.memory_plan import (
    CHIP_BANDWIDTH_GBS,
    FIT_CONTEXT_TOKENS,
    GIB,
    RELEASED_CONFIGS,
    SSD_READ_GBS,
    SSD_READ_SOURCE,
    MemoryPlan,
    expert_stream_plan,
    plan,
    predicted_tensor_bytes,
    stored_tensors_on_disk,
)
from ..weights.quantize import RECIPES, get_recipe
from .text_columns import print_columns


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Qwen35Error(
            f"--config {path}: not a readable JSON file ({e.__class__.__name__}); give a config.json"
        ) from None
    if not isinstance(raw, dict):
        raise Qwen35Error(f"--config {path}: a JSON {type(raw).__name__}, not a config.json object")
    return raw


def _candidates(model: str | None, config_file: str | None, recipe: str | None) -> list[tuple[str, dict, dict]]:
    """(name, config.json, tensor bytes by name) for each row of the plan."""
    recipes = [get_recipe(recipe)] if recipe else list(RECIPES.values())
    if config_file:
        path = Path(config_file).expanduser()
        raw = _read_json(path) if path.is_file() else read_config_json(path, "--config")
        sources = [(str(path), raw, raw.get("dtype", "bfloat16"))]
    elif model:
        from ..weights.convert import checkpoint_dtype
        from ..weights.hub import resolve_checkpoint
        from ..weights.peer_formats import detect_format

        directory = resolve_checkpoint(model, patterns=["config.json"], argument="--model")
        on_disk = stored_tensors_on_disk(directory)
        raw = read_config_json(directory, "--model")
        if on_disk and detect_format(on_disk) != "hf":  # converted (ours or a peer's): as it is
            cfg = parse_config(raw, f"{model} config.json")
            return [(model, cfg, "as converted", {k: t.nbytes for k, t in on_disk.items()})]
        # A source checkpoint: what each recipe makes of it, in the dtype the converter keeps by default (only
        # config.json fetched from the Hub: the dtype it names).
        sources = [(model, raw, checkpoint_dtype(on_disk) if on_disk else raw.get("dtype", "bfloat16"))]
    else:
        sources = [(name, raw, "bfloat16") for name, raw in RELEASED_CONFIGS.items()]
    rows = []
    for name, raw, dtype in sources:
        cfg = parse_config(raw, f"{name} config.json")
        rows.extend((name, cfg, r.name, predicted_tensor_bytes(cfg, r, dtype)) for r in recipes)
    return rows


def _size(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def _as_json(name: str, p: MemoryPlan) -> dict:
    return {
        "model": name,
        "recipe": p.recipe,
        "context": p.context,
        "memory_bytes": p.memory,
        "weights_bytes": p.weights,
        "kv_cache_bytes": p.kv_cache,
        "recurrent_state_bytes": p.recurrent_state,
        "prefill_workspace_bytes": p.prefill_workspace,
        "total_bytes": p.total,
        "spare_bytes": p.spare,
        "fits": p.fits,
        "wired_limit_mb": p.wired_limit_mb,
        "decode_read_bytes": p.decode_read,
        "roofline_tokens_per_s": {
            chip: round(p.roofline_tokens_per_s(bw), 1) for chip, bw in CHIP_BANDWIDTH_GBS.items()
        },
    }


def run_plan(
    model: str | None,
    config_file: str | None,
    memory_gb: float | None,
    context: int | None,
    recipe: str | None,
    kv_bits: int | None,
    as_json: bool,
    expert_store: bool = False,
    hit_rate: float | None = None,
) -> None:
    """Print the memory plan of each requested model and recipe (with ``expert_store``: streamed experts' projection)."""
    if hit_rate is not None and not 0 <= hit_rate <= 1:
        raise Qwen35Error(f"--hit-rate {hit_rate}: give the expert cache's hit rate, from 0 to 1 (generate --json)")
    if memory_gb is not None and memory_gb <= 0:
        raise Qwen35Error(f"--memory-gb {memory_gb}: give the Mac's unified memory in GB, e.g. 192")
    if context is not None and context < 1:
        raise Qwen35Error(f"--context {context}: give the conversation length in tokens, e.g. 131072")
    memory = int(memory_gb * GIB) if memory_gb is not None else total_memory_bytes()
    plans = []
    for name, cfg, recipe_name, tensors in _candidates(model, config_file, recipe):
        longest = cfg.text.max_position_embeddings
        if context is not None and context > longest:
            raise Qwen35Error(f"--context {context}: {name} supports at most {longest} tokens; give less")
        tokens = context or min(FIT_CONTEXT_TOKENS, longest)
        p = plan(cfg, tensors, memory, context=tokens, kv_bits=kv_bits, recipe=recipe_name)
        plans.append((name, p, expert_stream_plan(p, cfg, tensors, hit_rate) if expert_store and cfg.is_moe else None))
    if as_json:
        print(json.dumps([_as_json(n, p) | _stream_json(s) for n, p, s in plans], indent=2))
        return
    chips = list(CHIP_BANDWIDTH_GBS)
    print(
        f"memory {memory / GIB:.0f} GiB ({'--memory-gb' if memory_gb else 'this machine'}), context "
        f"{', '.join(sorted({f'{p.context:,}' for _, p, _ in plans}))} tokens"
        f"{f', KV cache at {kv_bits} bits' if kv_bits else ''}; decode ceilings in tokens/s"
    )
    head = ["model", "recipe", "weights", "KV", "state", "prefill", "total", "fits", "wired_limit_mb", *chips]
    table = [head]
    for name, p, _ in plans:
        fits = f"yes, {p.spare / GIB:.0f} GiB spare" if p.fits else f"no, {-p.spare / GIB:.0f} GiB short"
        sizes = [_size(b) for b in (p.weights, p.kv_cache, p.recurrent_state, p.prefill_workspace, p.total)]
        speeds = [f"{p.roofline_tokens_per_s(bw):.0f}" for bw in CHIP_BANDWIDTH_GBS.values()]
        table.append([name, p.recipe, *sizes, fits, str(p.wired_limit_mb), *speeds])
    print_columns(table)
    print(
        "weights: what the converter writes; KV + state: one conversation's cache; prefill: an estimate of one "
        "prefill step's workspace; wired_limit_mb: 'sudo sysctl iogpu.wired_limit_mb=N' wires the total with 5% "
        f"to spare; decode ceilings: bandwidth / bytes read per token ({', '.join(f'{c} {b} GB/s' for c, b in CHIP_BANDWIDTH_GBS.items())})"
    )
    print_stream_plans(plans)


def _stream_json(s) -> dict:
    if s is None:
        return {}
    return {
        "expert_store": {
            "resident_expert_bytes": s.budget,
            "resident_share": round(s.share, 4),
            "hit_rate": round(s.hit_rate, 4),
            "hit_rate_source": s.hit_rate_source,
            "ssd_read_bytes_per_token": s.ssd_read,
            "memory_read_bytes_per_token": s.memory_read,
            "ssd_read_gbs": SSD_READ_GBS,
            "ssd_read_source": SSD_READ_SOURCE,
            "projected_tokens_per_s": {
                chip: round(s.tokens_per_s(CHIP_BANDWIDTH_GBS[chip], ssd), 1) for chip, ssd in SSD_READ_GBS.items()
            },
        }
    }


def print_stream_plans(plans: list) -> None:
    """The expert-store projection of each plan that has one (``mlx-qwen35 plan --expert-store``)."""
    table = [["model", "recipe", "experts resident", "share", "hit rate", "SSD/token", *SSD_READ_GBS]]
    for name, p, s in plans:
        if s is None:
            continue
        speeds = [f"{s.tokens_per_s(CHIP_BANDWIDTH_GBS[c], ssd):.1f}" for c, ssd in SSD_READ_GBS.items()]
        table.append(
            [name, p.recipe, _size(s.budget), f"{s.share:.0%}", f"{s.hit_rate:.2f}", _size(s.ssd_read), *speeds]
        )
    if len(table) == 1:
        return
    print("\nwith an expert store (--expert-memory-gb: the experts that fit beside the rest stay resident):")
    print_columns(table)
    print(
        f"projected decode tokens/s: memory reads at the chip's bandwidth, then the missed experts from the SSD "
        f"({', '.join(f'{c} {b} GB/s' for c, b in SSD_READ_GBS.items())}: {SSD_READ_SOURCE}), not overlapped; "
        "hit rate: --hit-rate, else the one measured on the trained demo model at that share"
    )
