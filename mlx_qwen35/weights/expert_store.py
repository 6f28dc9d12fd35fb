"""The expert store: a model's routed experts on disk one expert at a time, read back with ``pread`` (docs/architecture.md §6.1).

A store is the folder ``experts/`` inside an MLX checkpoint dir whose safetensors shards hold every other
tensor. Per MoE layer one file, ``layer-NNN.bin``: expert e's tensors (gate/up/down weight, scales, biases in
the checkpoint's own quantised form) lie back to back in one blob at ``e × stride``, the stride a multiple of
``ALIGNMENT`` (16 KiB, Apple silicon's page), so reading an expert is one ``pread`` of whole pages.
``experts/index.json`` names each layer's file, stride, and the tensors' dtype, per-expert shape and offset.
``experts/priors.json`` (optional) holds each expert's share of the routing over a calibration run.

Written by ``convert --expert-store`` and by ``expert_repack.repack`` (an MLX dir of ours, mlx-lm's or mlx-vlm's).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import Qwen35Error

STORE_DIR = "experts"
INDEX_FILE = "index.json"
PRIORS_FILE = "priors.json"
FORMAT = "mlx-qwen35-expert-store"
VERSION = 1
ALIGNMENT = 16384  # Apple silicon's page size (Linux x86 uses 4 KiB, which divides it)
TENSOR_ALIGNMENT = 64  # each tensor of an expert's blob starts at a multiple of this
READ_THREADS = 8  # concurrent preads: an NVMe SSD needs several requests in flight to reach its bandwidth
# Our names of the routed experts' tensors; mtp.* stays resident (one small layer, read every draft step).
EXPERT_TENSOR = re.compile(
    r"^language_model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<tensor>(?:gate|up|down)_proj\.(?:weight|scales|biases))$"
)
_DTYPES = {
    "uint8": mx.uint8,
    "uint32": mx.uint32,
    "int32": mx.int32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "float32": mx.float32,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def has_expert_store(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds an expert store (``experts/index.json``)."""
    return (Path(model_dir) / STORE_DIR / INDEX_FILE).is_file()


# ---------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of every expert of a layer: its name (``gate_proj.weight``), dtype, per-expert shape and place in the blob."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _layout(tensors: dict[str, mx.array]) -> tuple[list[StoredTensor], int, int]:
    """The blob layout of one layer's stacked tensors [E, ...]: (tensors, expert bytes, stride)."""
    entries, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.nbytes // t.shape[0]
        entries.append(StoredTensor(name, _DTYPE_NAMES[t.dtype], tuple(t.shape[1:]), offset, nbytes))
        offset = _round_up(offset + nbytes, TENSOR_ALIGNMENT)
    expert_bytes = entries[-1].offset + entries[-1].nbytes
    return entries, expert_bytes, _round_up(expert_bytes, ALIGNMENT)


def write_layer(path: Path, tensors: dict[str, mx.array], chunk_experts: int = 32) -> dict:
    """Write one layer's stacked expert tensors {name: [E, ...]} as per-expert page-aligned blobs; its index entry."""
    entries, expert_bytes, stride = _layout(tensors)
    num_experts = next(iter(tensors.values())).shape[0]
    with open(path, "wb") as f:
        f.truncate(num_experts * stride)
        fd = f.fileno()
        for entry in entries:
            stacked = tensors[entry.name]
            for start in range(0, num_experts, chunk_experts):  # bounded memory: a few experts of one tensor
                block = np.array(stacked[start : start + chunk_experts].reshape(-1).view(mx.uint8))
                block = block.reshape(-1, entry.nbytes)
                for i, row in enumerate(block):
                    os.pwrite(fd, row.tobytes(), (start + i) * stride + entry.offset)
    return {
        "file": path.name,
        "num_experts": num_experts,
        "expert_bytes": expert_bytes,
        "stride": stride,
        "tensors": [e.__dict__ | {"shape": list(e.shape)} for e in entries],
    }


def split_expert_tensors(weights: dict[str, mx.array]) -> tuple[dict[str, mx.array], dict[int, dict[str, mx.array]]]:
    """Our-named weights → (resident tensors, {layer: {``gate_proj.weight`` …: stacked [E, ...]}})."""
    resident, layers = {}, {}
    for name, value in weights.items():
        m = EXPERT_TENSOR.match(name)
        if m:
            layers.setdefault(int(m["layer"]), {})[m["tensor"]] = value
        else:
            resident[name] = value
    return resident, layers


def write_store(directory: Path, layers: dict[int, dict[str, mx.array]]) -> dict:
    """Write ``directory/experts/`` from {layer: stacked expert tensors}: a file per layer and the index."""
    store = Path(directory) / STORE_DIR
    store.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "version": VERSION, "alignment": ALIGNMENT, "layers": {}}
    for layer in sorted(layers):
        index["layers"][str(layer)] = write_layer(store / f"layer-{layer:03d}.bin", layers[layer])
    (store / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return index


def write_priors(model_dir: Path, counts: dict[int, list[float]]) -> None:
    """Save each expert's share of the routing over a calibration run (``experts/priors.json``)."""
    shares = {str(layer): [c / max(sum(row), 1) for c in row] for layer, row in counts.items()}
    (Path(model_dir) / STORE_DIR / PRIORS_FILE).write_text(json.dumps({"shares": shares}) + "\n")


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class ReadCounters:
    """What the store read: bytes (as requested from ``pread``), reads, and seconds spent inside ``pread``."""

    bytes: int = 0
    reads: int = 0
    seconds: float = 0.0


class ExpertStore:
    """An opened store: its index checked against the files, experts read with ``pread`` from a thread pool."""

    def __init__(self, model_dir: Path, read_threads: int = READ_THREADS):
        self.directory = Path(model_dir) / STORE_DIR
        index_path = self.directory / INDEX_FILE
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise Qwen35Error(
                f"{index_path}: unreadable expert-store index ({e}); re-run mlx-qwen35 expert-store"
            ) from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
            raise Qwen35Error(f"{index_path}: not a version-{VERSION} {FORMAT} index; re-run mlx-qwen35 expert-store")
        self.layers: dict[int, dict] = {int(k): v for k, v in index["layers"].items()}
        self._fds: dict[int, int] = {}
        for layer, entry in sorted(self.layers.items()):
            path = self.directory / entry["file"]
            need = entry["num_experts"] * entry["stride"]  # the writer pads the last expert too
            try:
                size = path.stat().st_size
            except OSError:
                raise Qwen35Error(
                    f"{path}: missing (the index lists it for layer {layer}); re-run mlx-qwen35 expert-store"
                ) from None
            if size < need:
                raise Qwen35Error(
                    f"{path}: truncated ({size} bytes, the index needs {need} for {entry['num_experts']} experts); "
                    "re-run mlx-qwen35 expert-store"
                )
            self._fds[layer] = os.open(path, os.O_RDONLY)
            entry["tensors"] = [StoredTensor(**{**t, "shape": tuple(t["shape"])}) for t in entry["tensors"]]
        self.counters = ReadCounters()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="expert-read")

    def expert_bytes(self, layer: int) -> int:
        """The bytes one expert of ``layer`` holds in memory (its tensors, without the page padding)."""
        return sum(t.nbytes for t in self.layers[layer]["tensors"])

    @property
    def total_bytes(self) -> int:
        """The bytes of every expert of every layer: what a 100% budget holds."""
        return sum(self.expert_bytes(layer) * e["num_experts"] for layer, e in self.layers.items())

    def tensor_shapes(self, layer: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{``gate_proj.weight`` …: (dtype, per-expert shape)} of ``layer``, for checking against the model."""
        return {t.name: (t.dtype, t.shape) for t in self.layers[layer]["tensors"]}

    def tensor_names(self) -> set[str]:
        """Our names of the stacked tensors the store holds (``language_model.layers.0.mlp.experts.gate_proj.weight`` …)."""
        return {
            f"language_model.layers.{layer}.mlp.experts.{t.name}"
            for layer, entry in self.layers.items()
            for t in entry["tensors"]
        }

    def read(self, layer: int, expert: int) -> bytes:
        """Expert ``expert`` of ``layer``: one ``pread`` of its blob (any thread; ``tensors`` makes the arrays)."""
        entry = self.layers[layer]
        start = time.perf_counter()
        blob = os.pread(self._fds[layer], entry["expert_bytes"], expert * entry["stride"])
        elapsed = time.perf_counter() - start
        if len(blob) != entry["expert_bytes"]:
            raise Qwen35Error(
                f"{self.directory / entry['file']}: truncated at expert {expert}; re-run mlx-qwen35 expert-store"
            )
        with self._lock:
            self.counters.bytes += len(blob)
            self.counters.reads += 1
            self.counters.seconds += elapsed
        return blob

    def tensors(self, layer: int, blob: bytes) -> dict[str, mx.array]:
        """An expert's blob → {``gate_proj.weight`` …: array}; on the thread that runs the model (MLX streams are per thread)."""
        raw = np.frombuffer(blob, dtype=np.uint8)
        return {
            t.name: mx.array(raw[t.offset : t.offset + t.nbytes]).view(_DTYPES[t.dtype]).reshape(t.shape)
            for t in self.layers[layer]["tensors"]
        }

    def submit(self, layer: int, expert: int) -> Future:
        """Read an expert on the pool; the future's result is ``read``'s blob."""
        return self._pool.submit(self.read, layer, expert)

    def load_priors(self) -> dict[int, list[float]] | None:
        """Each expert's routing share from the calibration run (``priors.json``), or None without one."""
        path = self.directory / PRIORS_FILE
        if not path.is_file():
            return None
        try:
            shares = json.loads(path.read_text())["shares"]
            return {int(k): [float(x) for x in v] for k, v in shares.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Qwen35Error(f"{path}: unreadable ({e}); delete it or re-run the calibration") from None

    def drop_page_cache(self) -> None:
        """Ask the OS to forget the store's cached pages (``POSIX_FADV_DONTNEED``), so the next reads hit the disk."""
        for fd in self._fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Stop the read pool and close the files."""
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# ---------------------------------------------------------------------------------------------- budgets


def parse_expert_memory(text: str | float | None) -> Callable[[int], int] | None:
    """``--expert-memory-gb``: GB (``12``) or a share of the experts' total (``25%``) → total bytes → budget bytes."""
    if text is None:
        return None
    spec = str(text).strip()
    try:
        if spec.endswith("%"):
            share = float(spec[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError
            return lambda total: int(share * total)
        gb = float(spec)
        if not gb > 0 or gb != gb or gb == float("inf"):
            raise ValueError
    except ValueError:
        raise Qwen35Error(
            f"--expert-memory-gb {text!r}: give a positive number of GB (12) or a share of the experts (25%)"
        ) from None
    return lambda total: int(gb * 1e9)


# ---------------------------------------------------------------------------------------------- the model


def check_store_matches(store: ExpertStore, model, config) -> None:
    """A store made for another model (layers, expert count, tensor shapes) is one clear error naming its index."""
    index = store.directory / INDEX_FILE
    fix = "the store does not belong to this model; re-run mlx-qwen35 expert-store"
    layers = model.language_model.layers
    moe_layers = {i for i, layer in enumerate(layers) if hasattr(layer.mlp, "streams_experts")}
    if set(store.layers) != moe_layers:
        raise Qwen35Error(
            f"{index}: stores experts for {len(store.layers)} layers, the model (config.json) has "
            f"{len(moe_layers)} MoE layers; {fix}"
        )
    for i in sorted(moe_layers):
        stored = store.layers[i]
        if stored["num_experts"] != config.text.num_experts:
            raise Qwen35Error(
                f"{index}: layer {i} has {stored['num_experts']} experts, config.json says "
                f"{config.text.num_experts}; {fix}"
            )
        experts = layers[i].mlp.experts
        expected = {
            f"{p}.{n}": tuple(getattr(experts, p)[n].shape[1:])
            for p in ("gate_proj", "up_proj", "down_proj")
            for n in ("weight", "scales", "biases")
            if getattr(experts, p).get(n) is not None
        }
        got = {name: shape for name, (_, shape) in store.tensor_shapes(i).items()}
        if got != expected:
            raise Qwen35Error(
                f"{index}: layer {i} stores expert tensors {got}, the model expects {expected} "
                f"(quantisation or sizes differ); {fix}"
            )


def attach_expert_store(model, store: ExpertStore, budget_bytes: int, *, compute_fp32: bool, prefetch: bool = True):
    """Stream ``model``'s routed experts from ``store`` through an ``ExpertCache`` of ``budget_bytes``; returns the cache."""
    from ..model.expert_cache import ExpertCache, empty_experts

    config = model.config
    cache = ExpertCache(store, budget_bytes, config.text.num_experts_per_tok, store.load_priors(), prefetch=prefetch)
    layers = model.language_model.layers
    for i in store.layers:
        moe = layers[i].mlp
        dtypes = {}
        for name, (dtype, _) in store.tensor_shapes(i).items():
            stored = _DTYPES[dtype]
            dtypes[name] = mx.float32 if compute_fp32 and mx.issubdtype(stored, mx.floating) else stored
        empty_experts(moe.experts, dtypes)
        moe.expert_cache, moe.layer_index = cache, i
        cache.moes[i] = moe
        if i + 1 in store.layers:
            following = layers[i + 1].mlp
            cache.next_router[i] = lambda x, moe=following: mx.softmax(moe.gate(x).astype(mx.float32), axis=-1)
    return cache
