"""Save a conversation and its cache to a directory, and load it back into a ``Conversation``.

A saved conversation is a directory of two files:

* ``conversation.json`` — format name and version, the model's fingerprint, the settings, the
  messages, the token ids the cache holds, the checkpoint lengths and the SHA-256 of the arrays file.
  Plain JSON, so the text of a conversation stays readable whatever happens to the arrays or the model.
* ``cache.safetensors`` — mlx-lm's prompt-cache file: the live cache's layers, then, per checkpoint,
  the recurrent state of each DeltaNet layer (K/V of a checkpoint is a prefix of the live K/V).

Images and videos: no pixels are saved. The cache holds their effect, and a message keeps its item as
given (``{"type": "image", "image": PATH}``), so the file must still be there when the conversation goes
on: the next prompt re-reads it to render the placeholders. The cache's keys carry a digest of each
item's pixels, so an unchanged file reuses the cache past it and a changed one is encoded afresh.

Loading checks the fingerprint (config.json + every tensor's name, shape and dtype + the values of the
small 1-D tensors, which tell fine-tunes apart) and the arrays' hash before trusting a single number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import types
import typing
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache, load_prompt_cache, save_prompt_cache

from ..errors import Qwen35Error
from ..model.cache import ModelCache, cache_length, rebuilt_snapshot, restore
from .conversation import Checkpoint, Conversation, ConversationSettings

FORMAT = "mlx-qwen35-conversation"
FORMAT_VERSION = 1
CONVERSATION_FILE = "conversation.json"
CACHE_FILE = "cache.safetensors"
# The fields of conversation.json (version 1) and their JSON types; the settings' come from ConversationSettings.
RECORD_FIELDS = {
    "format": str,
    "version": int,
    "model_fingerprint": str,
    "settings": dict,
    "messages": list,
    "cache": dict,
}
CACHE_FIELDS = {"sha256": str, "layers": int, "rope_delta": int, "tokens": list, "checkpoints": list}
CHECKPOINT_FIELDS = {"tokens": int, "rope_delta": int}
MESSAGE_ROLES = ("user", "assistant", "tool")


def model_fingerprint(model) -> str:
    """SHA-256 over config.json, every tensor's name/shape/dtype and the values of the 1-D tensors (norms, gates)."""
    digest = hashlib.sha256(json.dumps(model.config.raw, sort_keys=True).encode())
    for name, array in sorted(tree_flatten(model.parameters()), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(array.shape)}:{array.dtype}".encode())
        if array.ndim == 1:
            digest.update(np.array(array.astype(mx.float32)).tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def save_conversation(conversation: Conversation, path: str | Path) -> Path:
    """Write ``conversation`` (messages, settings, cache, checkpoints) into the directory ``path``."""
    path = Path(path)
    try:
        _write_conversation(conversation, path)
    except (OSError, RuntimeError) as e:  # mlx reports a file it cannot open as RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise Qwen35Error(f"{path}: cannot save the conversation there ({reason}); give a writable directory") from None
    return path


def _write_conversation(conversation: Conversation, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    cached = conversation.cache
    if cached.tokens is None:  # interrupted inside a forward pass: fall back to a known state
        longest = max(cached.checkpoints, key=lambda c: len(c.tokens))
        restore(cached.model_cache, longest.snapshot)
        cached.tokens = list(longest.tokens)
    checkpoints = [c for c in cached.checkpoints if not c.snapshot.stale]
    recurrent_layers = [i for i, layer in enumerate(cached.model_cache) if isinstance(layer, ArraysCache)]
    saved_states = []
    for checkpoint in checkpoints:
        for i in recurrent_layers:
            state = ArraysCache(size=2)
            state.cache = list(checkpoint.snapshot.recurrent[i])
            saved_states.append(state)
    # Arrays first, then the JSON that names their hash: a crash in between reads as "corrupted", text intact.
    arrays_tmp = path / f".{CACHE_FILE}.tmp.safetensors"
    save_prompt_cache(str(arrays_tmp), list(cached.model_cache) + saved_states)
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_fingerprint": model_fingerprint(conversation.model),
        "settings": dataclasses.asdict(conversation.settings),
        "messages": conversation.messages,
        "cache": {
            "sha256": _file_sha256(arrays_tmp),
            "layers": len(cached.model_cache),
            "rope_delta": cached.model_cache.rope_delta,
            "tokens": cached.tokens,  # cache keys: token ids, each image's placeholders as a negative pixel key
            "checkpoints": [{"tokens": len(c.tokens), "rope_delta": c.snapshot.rope_delta} for c in checkpoints],
        },
    }
    os.replace(arrays_tmp, path / CACHE_FILE)
    json_tmp = path / f".{CONVERSATION_FILE}.tmp"
    json_tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    os.replace(json_tmp, path / CONVERSATION_FILE)


def read_saved_conversation(path: str | Path) -> dict:
    """The saved record (``messages``, ``settings``, …) without a model: the text is recoverable on its own.

    Every field is checked here, so a hand-edited or newer file is one error naming the field, never a crash later.
    """
    file = Path(path) / CONVERSATION_FILE
    try:
        record = json.loads(file.read_text())
    except FileNotFoundError:
        raise Qwen35Error(f"{file}: not found; {path} is not a saved conversation") from None
    except OSError as e:
        raise Qwen35Error(f"{file}: cannot be read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Qwen35Error(f"{file}: corrupted ({e}); the conversation cannot be read") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise Qwen35Error(f"{file}: not a saved mlx-qwen35 conversation")
    if record.get("version") != FORMAT_VERSION:
        raise Qwen35Error(
            f"{file}: format version {record.get('version')} is not supported (this mlx-qwen35 reads version {FORMAT_VERSION})"
        )
    _check_fields(file, "", record, RECORD_FIELDS)
    _check_fields(file, "cache.", record["cache"], CACHE_FIELDS)
    for i, entry in enumerate(record["cache"]["checkpoints"]):
        _check_fields(file, f"cache.checkpoints[{i}].", entry, CHECKPOINT_FIELDS)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in record["cache"]["tokens"]):
        raise Qwen35Error(f"{file}: cache.tokens must be a list of integers")
    for i, message in enumerate(record["messages"]):
        if not isinstance(message, dict) or message.get("role") not in MESSAGE_ROLES:
            raise Qwen35Error(
                f"{file}: messages[{i}] must be an object whose role is one of {', '.join(MESSAGE_ROLES)}"
            )
        if not isinstance(message.get("content"), str | list | None):
            raise Qwen35Error(f"{file}: messages[{i}].content must be text, a list of items or null")
    _check_settings(file, record["settings"])
    return record


def _json_types(hint) -> tuple[type, ...]:
    """The JSON value types a type hint admits: ``list[dict] | None`` → (list, NoneType)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(option) or option for option in options)


def _check_fields(file: Path, prefix: str, value: object, fields: dict[str, tuple | type]) -> None:
    """``value`` is an object with exactly ``fields``, each of its type; else one error naming the field."""
    if not isinstance(value, dict):
        raise Qwen35Error(f"{file}: {prefix.rstrip('.')} must be an object")
    for name in value:
        if name not in fields:
            raise Qwen35Error(
                f"{file}: unknown field {prefix}{name} (written by a newer mlx-qwen35?); "
                "remove it or upgrade mlx-qwen35"
            )
    for name, kind in fields.items():
        if name not in value:
            raise Qwen35Error(f"{file}: missing field {prefix}{name}; the file is incomplete or was edited")
        item, kinds = value[name], kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(item, kinds) or (isinstance(item, bool) and bool not in kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise Qwen35Error(f"{file}: {prefix}{name} must be {names}, not {type(item).__name__}")


def _check_settings(file: Path, settings: dict) -> None:
    """The saved settings are ``ConversationSettings`` fields of the right JSON types, and valid settings."""
    hints = typing.get_type_hints(ConversationSettings)
    fields = {f.name: _json_types(hints[f.name]) for f in dataclasses.fields(ConversationSettings)}
    _check_fields(file, "settings.", settings, fields)
    if settings["tools"] is not None and not all(isinstance(tool, dict) for tool in settings["tools"]):
        raise Qwen35Error(f"{file}: settings.tools must be a list of tool objects")
    try:
        ConversationSettings(**settings)  # checks every value by its rule, as when a surface builds it
    except Qwen35Error as e:
        raise Qwen35Error(f"{file}: settings: {e}") from None


def load_conversation(path: str | Path, model, processor) -> Conversation:
    """A ``Conversation`` continuing where the saved one stopped, its cache and checkpoints restored."""
    path = Path(path)
    record = read_saved_conversation(path)
    if record["model_fingerprint"] != model_fingerprint(model):
        raise Qwen35Error(
            f"{path}: the saved cache belongs to another model (fingerprint differs); load it with the model it was "
            f"saved with — its messages are readable in {path / CONVERSATION_FILE}"
        )
    arrays = path / CACHE_FILE
    saved = record["cache"]
    if not arrays.is_file() or _file_sha256(arrays) != saved["sha256"]:
        raise Qwen35Error(
            f"{arrays}: missing or corrupted (hash mismatch); its messages are readable in {path / CONVERSATION_FILE}"
        )
    try:
        layers = load_prompt_cache(str(arrays))
    except Exception as e:  # mlx and mlx-lm raise several types for unreadable files
        raise Qwen35Error(
            f"{arrays}: unreadable ({e}); its messages are readable in {path / CONVERSATION_FILE}"
        ) from None

    conversation = Conversation(model, processor, ConversationSettings(**record["settings"]))
    cache = ModelCache(layers[: saved["layers"]])
    recurrent_layers = [i for i, layer in enumerate(cache) if isinstance(layer, ArraysCache)]
    tokens, entries = saved["tokens"], saved["checkpoints"]
    # The hash covers the arrays, not these numbers: a hand-edited cache section must still describe the arrays.
    shape = [type(layer) for layer in conversation.cache.model_cache]
    if (
        [type(layer) for layer in cache] != shape
        or len(layers) != len(cache) + len(entries) * len(recurrent_layers)
        or cache_length(cache) != len(tokens)
        or not all(0 <= entry["tokens"] <= len(tokens) for entry in entries)
    ):
        raise Qwen35Error(
            f"{path / CONVERSATION_FILE}: its cache section does not describe {arrays} (edited by hand?); "
            "/reset and start again, or restore the file"
        )
    cache.rope_delta = saved["rope_delta"]
    states = iter(layers[saved["layers"] :])
    checkpoints = []
    for entry in entries:
        recurrent = [None] * len(cache)
        for i in recurrent_layers:
            recurrent[i] = next(states).cache
        snap = rebuilt_snapshot(cache, entry["tokens"], recurrent, entry["rope_delta"])
        checkpoints.append(Checkpoint(tuple(tokens[: entry["tokens"]]), snap))
    conversation.cache.model_cache = cache
    conversation.cache.tokens = tokens
    conversation.cache.checkpoints = checkpoints
    conversation.messages = record["messages"]
    return conversation


def check_session_target(path: str | Path, kv_bits: int | None) -> None:
    """Before a model loads: ``path`` holds a conversation it can continue with ``kv_bits``, or one can be saved there."""
    path = Path(path)
    flag = f"--prompt-cache-file {path}"
    if path.exists() and not path.is_dir():
        raise Qwen35Error(
            f"{flag}: is a file; a saved conversation is a directory (conversation.json + cache.safetensors), "
            "so give a directory path — mlx-lm's .safetensors prompt caches are not read"
        )
    if (path / CONVERSATION_FILE).exists():
        _check_same_kv_bits(path, read_saved_conversation(path)["settings"]["kv_bits"], kv_bits)
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise Qwen35Error(f"{flag}: {existing} is a file, so nothing can be saved below it; give another path")
    try:  # only writing tells: root passes os.access everywhere, read-only filesystems refuse anyway
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".mlx-qwen35-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise Qwen35Error(f"{flag}: cannot write in {existing} ({e.strerror}); give a writable place") from None


def _check_same_kv_bits(path: Path, saved: int | None, given: int | None) -> None:
    if saved != given:
        raise Qwen35Error(f"{path}: the saved cache has kv_bits {saved}; pass the same --kv-bits to continue it")


def open_conversation(path: str | Path, model, processor, settings: ConversationSettings) -> Conversation:
    """The conversation saved at ``path`` with ``settings`` applied (its cache kept), or a new one if nothing is saved there."""
    if not (Path(path) / CONVERSATION_FILE).exists():
        return Conversation(model, processor, settings)
    conversation = load_conversation(path, model, processor)
    _check_same_kv_bits(path, conversation.settings.kv_bits, settings.kv_bits)
    if settings.kv_group_size != conversation.settings.kv_group_size:
        raise Qwen35Error(
            f"{path}: the saved cache has kv_group_size {conversation.settings.kv_group_size}; continue it with that"
        )
    conversation.settings = settings
    return conversation
