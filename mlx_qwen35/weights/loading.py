"""Load a Qwen3.5 MLX checkpoint (ours, or mlx-lm's / mlx-vlm's) from a directory or the Hub.

Weights are memory-mapped lazily by ``mx.load``: a 200 GB model is never copied. Quantised layers
are built from the ``quantization`` map in config.json before the weights are assigned.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Container
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.switch_layers import SwitchGLU

from ..config import ModelConfig, load_config
from ..errors import Qwen35Error
from ..kernels.self_check import check_kernels
from ..model.parallel import RankShare
from ..model.qwen35 import Qwen35Model
from ..processing.processor import Processor
from .expert_store import (
    EXPERT_TENSOR,
    ExpertStore,
    attach_expert_store,
    check_store_matches,
    has_expert_store,
    parse_expert_memory,
)
from .hub import resolve_checkpoint
from .memory_plan import plan
from .peer_formats import detect_format, translate_peer_checkpoint

log = logging.getLogger(__name__)


def read_weights(model_dir: Path) -> dict[str, mx.array]:
    """All tensors of the checkpoint's safetensors shards, lazily (memory-mapped on evaluation)."""
    files = sorted(glob.glob(str(model_dir / "*.safetensors")))
    if not files:
        raise Qwen35Error(f"{model_dir}: no *.safetensors files; is this a complete checkpoint download?")
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            weights.update(mx.load(file))
        except Exception as e:  # mlx raises RuntimeError/ValueError for truncated or corrupt files
            raise Qwen35Error(f"{file}: unreadable safetensors shard ({e}); re-download or re-convert it") from None
    return weights


def _quantize_from_map(model: nn.Module, quantization: dict, weights: Container[str]) -> None:
    """Swap in quantised modules where the config map (or the presence of ``.scales``) says so."""

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quantization.get("group_size", 64),
        bits=quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _compute_on_cpu_in_fp32(model: nn.Module) -> None:
    """Off Metal, run in float32: MLX's CPU gather_mm takes fp32 only and quantised matmuls are ~8× faster in fp32."""
    model.update(
        tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters())
    )


def _activation_dtype(model: Qwen35Model) -> mx.Dtype:
    """The dtype of the first layer's projection weights (or their scales): what the checkpoint computes in."""
    for name, array in tree_flatten(model.language_model.layers[0].parameters()):
        if mx.issubdtype(array.dtype, mx.floating) and name.endswith(("proj.weight", "proj.scales")):
            return array.dtype
    return mx.bfloat16


def _set_wired_limit(model: Qwen35Model) -> None:
    """On Metal, wire the model's memory so macOS does not page it out between tokens; warn if it cannot fit.

    The need is ``plan``'s (weights, a 128k-token cache, the prefill workspace): what ``mlx-qwen35 plan`` prints.
    """
    limit = mx.device_info().get("max_recommended_working_set_size")
    if not limit:
        return
    need = plan(model.config, {k: a.nbytes for k, a in tree_flatten(model.parameters())}, memory_bytes=limit)
    if need.total > 0.9 * limit:
        log.warning(
            "the model (%.1f GB, %.1f GB with a %d-token cache) is close to or above the GPU wired-memory limit "
            "(%.1f GB); raise it with 'sudo sysctl iogpu.wired_limit_mb=%d' or use a smaller quantisation",
            need.weights / 1e9,
            need.total / 1e9,
            need.context,
            limit / 1e9,
            need.wired_limit_mb,
        )
    mx.set_wired_limit(limit)


def load_model(
    model_dir: Path,
    config: ModelConfig | None = None,
    expert_memory: str | float | None = None,
    share: RankShare | None = None,
) -> Qwen35Model:
    """Build the model for ``model_dir`` and assign its weights (lazily).

    With an expert store (``experts/``) the routed experts stream from it through a cache of ``expert_memory``
    (GB, or a share of the experts such as ``"25%"``; default all of them), docs/architecture.md §6.1.
    ``share``: only one rank's part of a multi-Mac run (§21).
    """
    config = config or load_config(model_dir)
    budget = parse_expert_memory(expert_memory)
    store = ExpertStore(model_dir) if has_expert_store(model_dir) else None
    if budget is not None and store is None:
        raise Qwen35Error(
            f"--expert-memory-gb: {model_dir} has no expert store; make one with "
            f"mlx-qwen35 expert-store --model {model_dir} --out <dir>, then load that"
        )
    if store is not None and share is not None:
        raise Qwen35Error(
            f"{model_dir} keeps its experts in an expert store, which several Macs cannot share yet; "
            "give the ranks a conversion without --expert-store"
        )
    weights = read_weights(model_dir)
    fmt = detect_format(weights)
    if fmt == "hf":
        raise Qwen35Error(
            f"{model_dir}: this is a Hugging Face checkpoint, not an MLX one; convert it first: "
            f"mlx-qwen35 convert --hf-path {model_dir} --mlx-path <out>"
        )
    if fmt != "ours":
        weights, config = translate_peer_checkpoint(weights, config, fmt)

    quantization = config.quantization
    if share is not None:
        from .sharding import rank_quantization, rank_weights

        weights, quantization = rank_weights(weights, share, config.text), rank_quantization(quantization, share)
    model = Qwen35Model(config, share)
    if quantization:
        stored = store.tensor_names() if store is not None else set()
        _quantize_from_map(model, quantization, weights.keys() | stored)
    expected = dict(tree_flatten(model.parameters()))
    streamed = (lambda k: EXPERT_TENSOR.match(k) is not None) if store is not None else (lambda k: False)
    missing = sorted(k for k in expected if k not in weights and not k.startswith("mtp.") and not streamed(k))
    if missing:
        raise Qwen35Error(
            f"{model_dir}: checkpoint is missing {len(missing)} tensors (first: {missing[0]}); re-convert it"
        )
    if "mtp.fc.weight" not in weights and hasattr(model, "mtp"):
        del model.mtp  # peer conversions drop the MTP head; generation works without it
    extra = sorted(k for k in weights if k not in expected and not (k.startswith("visual.") and "visual" not in model))
    if extra:
        raise Qwen35Error(f"{model_dir}: unexpected tensor {extra[0]} (and {len(extra) - 1} more); wrong model_type?")
    for key, array in weights.items():
        if key in expected and array.shape != expected[key].shape:
            raise Qwen35Error(
                f"{model_dir}: tensor {key} has shape {tuple(array.shape)}, the config implies "
                f"{tuple(expected[key].shape)}; config.json and the weights disagree"
            )
    model.load_weights([(k, v) for k, v in weights.items() if k in expected], strict=False)
    if store is not None:
        check_store_matches(store, model, config)
        model.expert_cache = attach_expert_store(
            model, store, (budget or (lambda total: total))(store.total_bytes), compute_fp32=not mx.metal.is_available()
        )
    if not mx.metal.is_available():
        _compute_on_cpu_in_fp32(model)
        model.language_model.compute_dtype = mx.float32
    else:
        model.language_model.compute_dtype = _activation_dtype(model)
        _set_wired_limit(model)
    model.eval()
    experts = next((m for _, m in model.named_modules() if isinstance(m, SwitchGLU)), None)
    check_kernels(
        model.language_model.config, model.language_model.compute_dtype, experts
    )  # docs/architecture.md §17.1
    return model


def load(
    path_or_repo: str,
    revision: str | None = None,
    expert_memory: str | float | None = None,
    share: RankShare | None = None,
) -> tuple[Qwen35Model, Processor]:
    """Load a Qwen3.5 MLX checkpoint from a directory or a Hub repo id → (model, processor).

    ``expert_memory``: the budget of a checkpoint with an expert store (GB or ``"25%"``; ``load_model``);
    ``share``: one rank's part of a multi-Mac run.
    """
    model_dir = resolve_checkpoint(str(path_or_repo), revision, argument="--model")
    config = load_config(model_dir)
    processor = Processor.from_dir(model_dir, config)  # first: a broken tokenizer is found before the weights load
    return load_model(model_dir, config, expert_memory, share), processor
