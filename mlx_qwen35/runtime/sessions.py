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
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache, load_prompt_cache, save_prompt_cache

from ..errors import Qwen35Error
from ..model.cache import ModelCache, rebuilt_snapshot, restore
from .conversation import Checkpoint, Conversation, ConversationSettings

FORMAT = "mlx-qwen35-conversation"
FORMAT_VERSION = 1
CONVERSATION_FILE = "conversation.json"
CACHE_FILE = "cache.safetensors"


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
    return path


def read_saved_conversation(path: str | Path) -> dict:
    """The saved record (``messages``, ``settings``, …) without a model: the text is recoverable on its own."""
    file = Path(path) / CONVERSATION_FILE
    try:
        record = json.loads(file.read_text())
    except FileNotFoundError:
        raise Qwen35Error(f"{file}: not found; {path} is not a saved conversation") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Qwen35Error(f"{file}: corrupted ({e}); the conversation cannot be read") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise Qwen35Error(f"{file}: not a saved mlx-qwen35 conversation")
    if record.get("version") != FORMAT_VERSION:
        raise Qwen35Error(
            f"{file}: format version {record.get('version')} is not supported (this mlx-qwen35 reads version {FORMAT_VERSION})"
        )
    return record


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

    settings = ConversationSettings(**record["settings"])
    conversation = Conversation(model, processor, settings)
    cache = ModelCache(layers[: saved["layers"]])
    cache.rope_delta = saved["rope_delta"]
    recurrent_layers = [i for i, layer in enumerate(cache) if isinstance(layer, ArraysCache)]
    states = iter(layers[saved["layers"] :])
    tokens = saved["tokens"]
    checkpoints = []
    for entry in saved["checkpoints"]:
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


def open_conversation(path: str | Path, model, processor, settings: ConversationSettings) -> Conversation:
    """The conversation saved at ``path`` with ``settings`` applied (its cache kept), or a new one if nothing is saved there."""
    if not (Path(path) / CONVERSATION_FILE).exists():
        return Conversation(model, processor, settings)
    conversation = load_conversation(path, model, processor)
    saved_kv = (conversation.settings.kv_bits, conversation.settings.kv_group_size)
    if (settings.kv_bits, settings.kv_group_size) != saved_kv:
        raise Qwen35Error(f"{path}: the saved cache has kv_bits {saved_kv[0]}; pass the same --kv-bits to continue it")
    conversation.settings = settings
    return conversation
