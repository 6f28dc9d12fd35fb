"""Convert a Hugging Face Qwen3.5 checkpoint (per-expert, fused-expert or block-FP8) to an MLX directory.

Memory stays bounded by a chunk of one tensor, never a shard or the model: tensors are read from the
safetensors files by byte range (rows along the first axis) and written into output files whose
headers are laid out before any data is written. ``mx.load`` would read a whole tensor to take a slice
of it, and a stacked expert tensor of the 397B is 4 GB. The output is staged beside the target and
takes its place only when complete (``output_dir.OutputDir``, which also keeps --overwrite from deleting
anything but an earlier conversion). Every header is checked against the config before anything is written.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..config import ModelConfig, parse_config, read_config_json
from ..errors import Qwen35Error
from .expert_repack import write_store_dir
from .expert_store import STORE_DIR
from .hub import resolve_checkpoint
from .layout import (
    FP8_BLOCK,
    FUSED_EXPERT_KEY,
    INDEX_FILE,
    PER_EXPERT_KEY,
    expected_tensors,
    is_zero_centred_norm,
    pack_shards,
    read_safetensors_header,
    safetensors_header,
    shard_filename,
    write_index,
)
from .memory_plan import StoredTensor
from .output_dir import OutputDir
from .quantize import (
    DTYPE_BYTES,
    RECIPES,
    SAFETENSORS_DTYPE,
    QuantSpec,
    Recipe,
    SizePrediction,
    get_recipe,
    nbytes,
    predict_size,
    quantization_config,
    stored_tensors,
)

FORMAT_VERSION = 1
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
# Elements per processing chunk (512 MB in fp32 would be too much on top of the I/O buffers).
CHUNK_ELEMENTS = 32 * 2**20
GB = 1e9

# Raw storage of each safetensors dtype we read: numpy dtype of the bytes, then the MLX dtype they decode to.
_SOURCE_DTYPES = {
    "F32": (np.float32, None),
    "F16": (np.float16, None),
    "BF16": (np.uint16, mx.bfloat16),
    "F8_E4M3": (np.uint8, None),  # decoded with its block scales by mx.from_fp8
    "I64": (np.int64, None),
    "I32": (np.int32, None),
}
_MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16, "uint32": mx.uint32}
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


# ---------------------------------------------------------------------------------------------- input


@dataclass
class SourceTensor:
    """One tensor of an input safetensors file, read by byte range."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    scale: SourceTensor | None = None  # block-FP8: the weight_scale_inv tensor

    def read_rows(self, start: int, stop: int, axis1: tuple[int, int] | None = None) -> mx.array:
        """Rows [start, stop) along axis 0, optionally only [a, b) along axis 1, decoded (FP8 dequantised to fp32)."""
        raw_dtype, view = _SOURCE_DTYPES[self.dtype]
        itemsize = np.dtype(raw_dtype).itemsize
        row_bytes = itemsize * math.prod(self.shape[1:])
        if axis1 is None:  # one contiguous read
            spans = [(self.offset + start * row_bytes, (stop - start) * row_bytes)]
            shape = (stop - start,) + self.shape[1:]
        else:  # one read per row: only the wanted slab of each
            a, b = axis1
            sub_bytes = itemsize * math.prod(self.shape[2:])
            spans = [(self.offset + r * row_bytes + a * sub_bytes, (b - a) * sub_bytes) for r in range(start, stop)]
            shape = (stop - start, b - a) + self.shape[2:]
        with open(self.file, "rb") as f:
            parts = []
            for offset, size in spans:
                f.seek(offset)
                parts.append(f.read(size))
        buf = b"".join(parts) if len(parts) > 1 else parts[0]
        if len(buf) != sum(size for _, size in spans):
            raise Qwen35Error(f"{self.file}: truncated inside tensor '{self.key}'; re-download this shard")
        x = mx.array(np.frombuffer(buf, dtype=raw_dtype).reshape(shape))
        if view is not None:
            x = x.view(view)
        if self.dtype == "F8_E4M3":
            x = self._dequantize(x, start, stop)
        return x

    def read(self) -> mx.array:
        """The whole tensor, decoded."""
        return self.read_rows(0, self.shape[0])

    def _dequantize(self, x: mx.array, start: int, stop: int) -> mx.array:
        # w = fp8 × scale_inv[i // 128, j // 128]; chunks start on a block row (see _chunk_rows).
        b = FP8_BLOCK
        s = self.scale.read_rows(start // b, math.ceil(stop / b)).astype(mx.float32)
        s = mx.repeat(mx.repeat(s, b, axis=0), b, axis=1)[: stop - start, : x.shape[1]]
        return mx.from_fp8(x, dtype=mx.float32) * s


def _read_header(path: Path) -> dict[str, SourceTensor]:
    """Parse and check a safetensors header: a truncated, corrupt or inconsistent file is caught before any output."""
    header, data_start = read_safetensors_header(path)
    size = path.stat().st_size
    tensors: dict[str, SourceTensor] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, (begin, end) = _header_entry(path, key, info)
        if data_start + end > size:
            raise Qwen35Error(
                f"{path}: truncated ({size} bytes, tensor '{key}' ends at byte {data_start + end}); re-download this shard"
            )
        tensors[key] = SourceTensor(path, key, dtype, shape, data_start + begin)
        spans.append((begin, end, key))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise Qwen35Error(
                f"{path}: tensors '{a}' and '{b}' overlap (data_offsets); the file is corrupt, re-download this shard"
            )
    return tensors


def _is_size(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _header_entry(path: Path, key: str, info: object) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, data_offsets) of one header entry, each checked: a valid JSON header can still describe nonsense."""
    where, fix = f"{path}: tensor '{key}'", "the header is corrupt, re-download this shard"
    if not isinstance(info, dict):
        raise Qwen35Error(
            f"{where}: header entry is a JSON {type(info).__name__}, not {{dtype, shape, data_offsets}}; {fix}"
        )
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise Qwen35Error(f"{where}: dtype {dtype!r} is not a safetensors dtype name; {fix}")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise Qwen35Error(f"{where}: shape {shape!r} is not a list of non-negative integers; {fix}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_size, offsets)) or offsets[0] > offsets[1]:
        raise Qwen35Error(f"{where}: data_offsets {offsets!r} is not [begin, end] in bytes; {fix}")
    if dtype not in _SOURCE_DTYPES:
        raise Qwen35Error(f"{where} has unsupported dtype {dtype}; expected BF16, F16, F32 or F8_E4M3")
    needed = np.dtype(_SOURCE_DTYPES[dtype][0]).itemsize * math.prod(shape)
    if offsets[1] - offsets[0] != needed:
        raise Qwen35Error(
            f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} "
            f"is {needed} bytes; {fix}"
        )
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _collect_sources(src: Path) -> tuple[dict[str, SourceTensor], Path]:
    """Every tensor of the checkpoint by HF name, and the file that lists them (for error messages)."""
    index = src / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise Qwen35Error(f"{index}: not a valid safetensors index (no weight_map); re-download it") from None
        # Shards are files of this directory: a name with a path in it is corrupt (or hostile).
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and Path(f).name == f for f in weight_map.values()
        ):
            raise Qwen35Error(
                f"{index}: weight_map must map tensor names to shard files in this directory; re-download it"
            )
        files = sorted(set(weight_map.values()))
        listing = index
    else:
        files = sorted(p.name for p in src.glob("*.safetensors"))
        listing = src
        if not files:
            raise Qwen35Error(f"{src}: no *.safetensors files; point --hf-path at a Hugging Face checkpoint directory")
    sources: dict[str, SourceTensor] = {}
    for name in files:
        path = src / name
        if not path.is_file():
            raise Qwen35Error(f"{path}: listed in {index.name} but missing; re-download the checkpoint")
        tensors = _read_header(path)
        twice = next((k for k in tensors if k in sources), None)
        if twice is not None:
            raise Qwen35Error(
                f"{path}: tensor '{twice}' is also in {sources[twice].file.name}; the checkpoint mixes two downloads, re-download it"
            )
        sources.update(tensors)
    if index.is_file():
        missing = sorted(set(weight_map) - set(sources))
        if missing:
            raise Qwen35Error(
                f"{src / weight_map[missing[0]]}: tensor '{missing[0]}' listed in {index.name} is not in it; re-download this shard"
            )

    # Attach block-FP8 scales to their weights.
    for key in [k for k in sources if k.endswith(".weight_scale_inv")]:
        scale = sources.pop(key)
        weight = sources.get(key[: -len("_scale_inv")])
        if weight is None:
            raise Qwen35Error(
                f"{scale.file}: '{key}' has no matching weight; the checkpoint is incomplete, re-download it"
            )
        weight.scale = scale
    for t in sources.values():
        if t.dtype == "F8_E4M3" and (t.scale is None or len(t.shape) != 2):
            raise Qwen35Error(
                f"{t.file}: FP8 tensor '{t.key}' needs a 2-D weight with a '{t.key}_scale_inv'; re-download the checkpoint"
            )
        if t.dtype == "F8_E4M3":
            blocks = tuple(math.ceil(d / FP8_BLOCK) for d in t.shape)
            if t.scale.shape != blocks:
                raise Qwen35Error(
                    f"{t.scale.file}: '{t.scale.key}' has shape {list(t.scale.shape)}, but {t.dtype} {list(t.shape)} "
                    f"in {FP8_BLOCK}×{FP8_BLOCK} FP8 blocks needs {list(blocks)}; re-download the checkpoint"
                )
    return sources, listing


def read_source_config(src: Path) -> tuple[dict, ModelConfig]:
    """The raw and parsed ``config.json`` of an HF checkpoint."""
    path = src / "config.json"
    raw = read_config_json(src, "--hf-path")
    if "quantization" in raw or "mlx_qwen35" in raw:
        raise Qwen35Error(f"{path}: this is already an MLX checkpoint; load it directly instead of converting it")
    return raw, parse_config(raw, source=str(path))


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class OutputTensor:
    """One tensor of the converted checkpoint (our name, unquantised shape) and how to read its rows."""

    name: str
    shape: tuple[int, ...]
    read_rows: Callable[[int, int], mx.array]  # rows [start, stop) along axis 0, in output layout
    fp8: bool = False  # chunks must start on an FP8 block row


def our_name(hf_name: str) -> str | None:
    """HF tensor name → ours (docs/architecture.md §2); None for a name outside the four prefixes."""
    if hf_name.startswith("model.language_model."):
        return "language_model." + hf_name[len("model.language_model.") :]
    if hf_name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if hf_name.startswith("model.visual."):
        return "visual." + hf_name[len("model.visual.") :]
    if hf_name.startswith("mtp."):
        return hf_name
    return None


def _conv1d(src: SourceTensor) -> Callable[[int, int], mx.array]:
    # HF [C, 1, K] → MLX depthwise [C, K, 1]
    return lambda a, b: mx.swapaxes(src.read_rows(a, b), 1, 2)


def _fused_half(src: SourceTensor, half: int) -> Callable[[int, int], mx.array]:
    # gate_up_proj [E, 2I, H]: rows 0..I-1 are gate, I..2I-1 up; read only the wanted half of each expert
    inter = src.shape[1] // 2
    return lambda a, b: src.read_rows(a, b, axis1=(half * inter, (half + 1) * inter))


def _stacked(experts: list[SourceTensor]) -> Callable[[int, int], mx.array]:
    return lambda a, b: mx.stack([e.read() for e in experts[a:b]])


def plan_outputs(sources: dict[str, SourceTensor], cfg: ModelConfig, listing: Path) -> tuple[list[OutputTensor], bool]:
    """Map HF tensors to our output tensors, check them against the config; also say whether MTP is present."""
    outputs: dict[str, OutputTensor] = {}
    origin: dict[str, SourceTensor] = {}  # output name → the (first) source tensor it is read from, for messages
    per_expert: dict[str, dict[int, SourceTensor]] = {}
    num_experts = cfg.text.num_experts
    for key, src in sources.items():
        name = our_name(key)
        if name is None:
            if key.startswith("language_model."):
                raise Qwen35Error(
                    f"{listing}: tensor names are already MLX-style ('{key}'); load this checkpoint directly"
                )
            raise Qwen35Error(
                f"{src.file}: unexpected tensor '{key}' (not model.language_model/model.visual/lm_head/mtp); is this a Qwen3.5 checkpoint?"
            )
        if m := PER_EXPERT_KEY.match(name):
            expert = int(m["expert"])
            if expert >= num_experts:
                raise Qwen35Error(
                    f"{src.file}: unexpected tensor '{key}' (expert {expert}, but config.json has num_experts = "
                    f"{num_experts}); the config does not belong to these weights"
                )
            name = f"{m['prefix']}.{m['proj']}_proj.weight"
            per_expert.setdefault(name, {})[expert] = src
        elif m := FUSED_EXPERT_KEY.match(name):
            _check_rank(src, 3)
            if m["proj"] == "down":
                name = f"{m['prefix']}.down_proj.weight"
                outputs[name] = OutputTensor(name, src.shape, src.read_rows)
            else:
                E, two_i, H = src.shape
                for half, proj in enumerate(("gate", "up")):
                    name = f"{m['prefix']}.{proj}_proj.weight"
                    outputs[name] = OutputTensor(name, (E, two_i // 2, H), _fused_half(src, half))
                    origin[name] = src
        elif name.endswith(".conv1d.weight"):
            _check_rank(src, 3)
            C, one, K = src.shape
            outputs[name] = OutputTensor(name, (C, K, one), _conv1d(src))
        else:
            outputs[name] = OutputTensor(name, src.shape, src.read_rows, fp8=src.dtype == "F8_E4M3")
        origin.setdefault(name, src)

    for name, experts in per_expert.items():
        missing = [e for e in range(num_experts) if e not in experts]
        if missing:
            hf = _hf_name(name).replace("experts.", f"experts.{missing[0]}.")
            raise Qwen35Error(
                f"{listing}: tensor '{hf}' (expert {missing[0]} of {num_experts}) is missing; the checkpoint is incomplete, re-download it"
            )
        ordered = [experts[e] for e in range(num_experts)]
        odd = next((t for t in ordered if t.shape != ordered[0].shape), None)
        if odd is not None:
            raise Qwen35Error(
                f"{odd.file}: expert tensor '{odd.key}' has shape {list(odd.shape)}, unlike expert 0 {list(ordered[0].shape)}; re-download it"
            )
        outputs[name] = OutputTensor(name, (num_experts,) + ordered[0].shape, _stacked(ordered))

    has_mtp = any(n.startswith("mtp.") for n in outputs)
    expected = expected_tensors(cfg)
    # The loader refuses any tensor the model does not have; say so now, not after hours of converting.
    # (A vision tower without a vision_config is carried through: the loader ignores it.)
    for name in outputs:
        if name not in expected and not (name.startswith("visual.") and cfg.vision is None):
            src = origin[name]
            raise Qwen35Error(
                f"{src.file}: unexpected tensor '{src.key}' (config.json implies no such parameter); "
                f"the config does not belong to these weights"
            )
    for name, shape in expected.items():
        if name.startswith("mtp.") and not has_mtp:
            continue
        if name not in outputs:
            raise Qwen35Error(
                f"{listing}: tensor '{_hf_name(name)}' is missing; the checkpoint is incomplete, re-download it"
            )
        if outputs[name].shape != shape:
            raise Qwen35Error(
                f"{listing}: tensor '{_hf_name(name)}' has shape {list(outputs[name].shape)} but config.json implies "
                f"{list(shape)}; the config does not belong to these weights"
            )
    if not has_mtp and cfg.text.mtp_num_hidden_layers:
        print(
            f"warning: {listing} has no mtp.* tensors; converting without the MTP block (no speculative decoding)",
            file=sys.stderr,
        )
    return sorted(outputs.values(), key=lambda o: _natural_key(o.name)), has_mtp


def _check_rank(src: SourceTensor, rank: int) -> None:
    if len(src.shape) != rank:
        raise Qwen35Error(
            f"{src.file}: tensor '{src.key}' has shape {list(src.shape)}, not {rank}-D; the checkpoint is corrupt, re-download it"
        )


def _hf_name(name: str) -> str:
    """Our name → the HF name a user would find in the index (for messages)."""
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    if name.startswith(("language_model.", "visual.")):
        return "model." + name
    return name


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def checkpoint_dtype(sources: Mapping[str, SourceTensor | StoredTensor]) -> str:
    """The checkpoint's own floating dtype: that of the embedding table (never FP8 in any release)."""
    embed = sources.get("model.language_model.embed_tokens.weight")
    return _DTYPE_NAMES.get(embed.dtype, "bfloat16") if embed else "bfloat16"


# ---------------------------------------------------------------------------------------------- output


@dataclass
class Shard:
    """One output file: the tensors it holds, with byte offsets fixed before anything is written."""

    filename: str
    units: list[tuple[OutputTensor, QuantSpec | None]]
    entries: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)

    def header(self) -> bytes:
        """The safetensors header, tagged ``format: mlx`` as mlx-lm and mlx-vlm tag theirs."""
        entries = [(name, SAFETENSORS_DTYPE[dtype], shape, nbytes(shape, dtype)) for name, shape, dtype in self.entries]
        return safetensors_header(entries, {"format": "mlx"})

    @property
    def data_bytes(self) -> int:
        return sum(nbytes(s, d) for _, s, d in self.entries)

    @property
    def file_bytes(self) -> int:
        return len(self.header()) + self.data_bytes


def plan_shards(outputs: list[OutputTensor], recipe: Recipe, dtype: str, shard_bytes: int) -> list[Shard]:
    """Pack the output tensors (a quantised weight with its scales and biases) into shards of at most shard_bytes."""
    units = []
    for out in outputs:
        spec = recipe.spec_for(out.name, out.shape)
        stored = stored_tensors(out.name, out.shape, spec, dtype)
        units.append(((out, spec, stored), sum(nbytes(s, d) for _, s, d in stored)))
    groups = pack_shards(units, shard_bytes)
    return [
        Shard(
            shard_filename(i, len(groups)), [(o, s) for o, s, _ in group], [e for *_, stored in group for e in stored]
        )
        for i, group in enumerate(groups)
    ]


def _chunk_rows(out: OutputTensor) -> int:
    rows = max(1, CHUNK_ELEMENTS // max(1, math.prod(out.shape[1:])))
    if out.fp8:
        rows = max(FP8_BLOCK, rows // FP8_BLOCK * FP8_BLOCK)
    return rows


def _to_bytes(x: mx.array) -> memoryview:
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.asarray(x))).cast("B")


def write_shard(path: Path, shard: Shard, dtype: str) -> None:
    """Write one shard chunk by chunk: each chunk is converted, quantised and written at its final offset."""
    header = shard.header()
    offsets, pos = {}, len(header)
    for name, shape, dt in shard.entries:
        offsets[name] = pos
        pos += nbytes(shape, dt)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(pos)
        for out, spec in shard.units:
            rows = _chunk_rows(out)
            for start in range(0, out.shape[0], rows):
                stop = min(start + rows, out.shape[0])
                for name, x in _convert_chunk(out, spec, dtype, out.read_rows(start, stop)):
                    mx.eval(x)
                    row_bytes = x.nbytes // x.shape[0]
                    f.seek(offsets[name] + start * row_bytes)
                    f.write(_to_bytes(x))


def _convert_chunk(out: OutputTensor, spec: QuantSpec | None, dtype: str, x: mx.array) -> list[tuple[str, mx.array]]:
    """The stored tensors of a chunk of rows: +1 on zero-centred norms (in fp32), cast, quantise."""
    if is_zero_centred_norm(out.name):
        x = x.astype(mx.float32) + 1.0
    if spec is None:
        ((name, _, stored),) = stored_tensors(out.name, out.shape, None, dtype)
        return [(name, x.astype(_MX_DTYPES[stored]))]
    w, scales, biases = mx.quantize(
        x.astype(_MX_DTYPES[dtype]), group_size=spec.group_size, bits=spec.bits, mode=spec.mode
    )
    prefix = out.name[: -len(".weight")]
    return [(f"{prefix}.weight", w), (f"{prefix}.scales", scales), (f"{prefix}.biases", biases)]


def _output_config(
    raw: dict, recipe: Recipe, outputs: list[OutputTensor], has_mtp: bool, source: str, dtype: str
) -> dict:
    config = json.loads(json.dumps(raw))
    config.pop("quantization_config", None)  # FP8 sources: we dequantised
    config.get("text_config", {}).pop("quantization_config", None)
    if not has_mtp:
        config.setdefault("text_config", {})["mtp_num_hidden_layers"] = 0
    quant = quantization_config(recipe, {o.name: o.shape for o in outputs})
    if quant:
        config["quantization"] = quant
    # dtype: what the unquantised tensors were written in (the source's own dtype field says what it was).
    config["mlx_qwen35"] = {"format_version": FORMAT_VERSION, "recipe": recipe.name, "source": source, "dtype": dtype}
    return config


# ---------------------------------------------------------------------------------------------- entry


def _check_arguments(recipe: str, dtype: str | None, shard_size_gb: float) -> Recipe:
    if dtype is not None and dtype not in DTYPE_BYTES:
        raise Qwen35Error(f"--dtype '{dtype}' is unknown; choose one of {', '.join(DTYPE_BYTES)}")
    if not shard_size_gb > 0:
        raise Qwen35Error(f"--shard-size-gb {shard_size_gb}: must be a positive number of GB")
    return get_recipe(recipe)


def _human(n: int) -> str:
    return f"{n / GB:,.2f} GB" if n >= GB / 10 else f"{n / 1e6:,.2f} MB"


def _describe(p: SizePrediction, file_bytes: int) -> str:
    return f"{_human(file_bytes)}, {p.bits_per_weight:.2f} bits/weight"


def predict_recipes(
    hf_path: str, dtype: str | None = None, shard_size_gb: float = 5.0, revision: str | None = None
) -> dict[str, int]:
    """Print and return the predicted bytes on disk of every recipe, reading only the shard headers.

    For a Hub repo only config.json is fetched and the prediction counts tensor data (headers excluded).
    """
    local = Path(hf_path).expanduser().exists()
    src = resolve_checkpoint(hf_path, revision, None if local else ["config.json"])
    raw, cfg = read_source_config(src)
    if local:
        sources, listing = _collect_sources(src)
        outputs, _ = plan_outputs(sources, cfg, listing)
        dtype = dtype or checkpoint_dtype(sources)
        tensors = {o.name: o.shape for o in outputs}
    else:
        outputs, dtype = [], dtype or "bfloat16"
        tensors = expected_tensors(cfg)
    print(
        f"{hf_path}: {sum(math.prod(s) for s in tensors.values()) / 1e9:,.3f} B parameters; unquantised tensors in {dtype}"
    )
    sizes = {}
    for recipe in RECIPES.values():
        p = predict_size(tensors, recipe, dtype)
        shards = plan_shards(outputs, recipe, dtype, int(shard_size_gb * GB)) if local else []
        sizes[recipe.name] = sum(s.file_bytes for s in shards) if local else p.bytes
        print(f"  {recipe.name:<10} {_describe(p, sizes[recipe.name]):>34}   {recipe.description}")
    return sizes


def convert(
    hf_path: str,
    mlx_path: str | Path,
    recipe: str = "4bit",
    dtype: str | None = None,
    shard_size_gb: float = 5.0,
    revision: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    expert_store: bool = False,
) -> Path | None:
    """Convert an HF Qwen3.5 checkpoint (dir or Hub id) to an MLX dir with ``recipe``; returns the dir (None on dry run).

    ``expert_store``: the routed experts go to a per-expert store (``experts/``, docs/architecture.md §6.1).
    """
    the_recipe = _check_arguments(recipe, dtype, shard_size_gb)
    if dry_run:
        predict_recipes(hf_path, dtype, shard_size_gb, revision)
        return None
    target = Path(mlx_path).expanduser()
    local = Path(hf_path).expanduser()
    # Before anything slow (a download, hours of converting): may this target be written, or replaced?
    output = OutputDir(target, overwrite=overwrite, sources=(local,) if local.exists() else ())

    src = resolve_checkpoint(hf_path, revision)
    output.protect(src)
    raw, cfg = read_source_config(src)
    sources, listing = _collect_sources(src)
    outputs, has_mtp = plan_outputs(sources, cfg, listing)
    dtype = dtype or checkpoint_dtype(sources)
    shards = plan_shards(outputs, the_recipe, dtype, int(shard_size_gb * GB))
    predicted = predict_size({o.name: o.shape for o in outputs}, the_recipe, dtype)
    predicted_bytes = sum(s.file_bytes for s in shards)
    print(
        f"{hf_path} → {output.where}: recipe {recipe}, unquantised tensors in {dtype}; predicted {_describe(predicted, predicted_bytes)} in {len(shards)} shard(s)"
    )

    if expert_store and not cfg.is_moe:
        raise Qwen35Error(f"--expert-store: {hf_path} is a dense model, it has no routed experts to store")
    with output as converted:
        # With a store, the whole conversion lands in a scratch dir inside the staging dir first, then is
        # split (resident shards + experts/): twice the experts' size on disk for a while, never in memory.
        staging = converted / ".full" if expert_store else converted
        staging.mkdir(exist_ok=True)
        try:
            weight_map = {}
            for i, shard in enumerate(shards):
                write_shard(staging / shard.filename, shard, dtype)
                weight_map.update({name: shard.filename for name, _, _ in shard.entries})
                print(f"  [{i + 1}/{len(shards)}] {shard.filename} ({_human(shard.file_bytes)})")
            write_index(staging, weight_map, sum(s.data_bytes for s in shards))
            for name in COPIED_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, staging / name)
            # config.json last: a directory without it is never mistaken for a finished checkpoint.
            config = _output_config(raw, the_recipe, outputs, has_mtp, hf_path, dtype)
            (staging / "config.json").write_text(json.dumps(config, indent=2))
            if expert_store:
                write_store_dir(staging, converted, shard_size_gb, source=hf_path)
                shutil.rmtree(staging)
        except OSError as e:
            if e.filename and not str(e.filename).startswith(str(staging)):
                raise Qwen35Error(
                    f"{e.filename}: cannot read it ({e.strerror or e}); check the checkpoint download"
                ) from None
            raise Qwen35Error(
                f"--mlx-path {target}: writing failed ({e.strerror or e}); free disk space or choose another --mlx-path"
            ) from None
    written = sum(p.stat().st_size for p in output.path.glob("*.safetensors"))
    written += sum(p.stat().st_size for p in output.path.glob(f"{STORE_DIR}/*.bin"))
    print(f"wrote {target}: {_human(written)} ({written / predicted_bytes - 1:+.2%} vs predicted)")
    return target
