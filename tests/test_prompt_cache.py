"""Saved conversations: a round trip continues exactly as the unsaved conversation would; another model,
a corrupted or foreign file → one clear error, with the conversation text still readable."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from checkpoints import convert_tiny
from typer.testing import CliRunner

from mlx_qwen35 import load
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.runtime.conversation import Conversation, ConversationSettings
from mlx_qwen35.runtime.sessions import (
    CACHE_FILE,
    CONVERSATION_FILE,
    check_session_target,
    load_conversation,
    model_fingerprint,
    read_saved_conversation,
    save_conversation,
)
from mlx_qwen35.surfaces.cli import app

SETTINGS = dict(system="Be brief.", max_tokens=8, thinking_budget=2, sampling={"temp": 0.0, "presence_penalty": 0.0})


def converted(checkpoint, tmp_path_factory, name: str):
    out = tmp_path_factory.mktemp(name) / "model"
    convert_tiny(checkpoint, out)
    return out


@pytest.fixture(scope="module")
def moe_dir(tiny_moe_checkpoint, tmp_path_factory):
    return converted(tiny_moe_checkpoint, tmp_path_factory, "prompt-cache-moe")


@pytest.fixture(scope="module")
def loaded(moe_dir):
    return load(str(moe_dir))


@pytest.fixture(scope="module")
def other_model(tiny_dense_checkpoint, tmp_path_factory):
    return load(str(converted(tiny_dense_checkpoint, tmp_path_factory, "prompt-cache-dense")))


@pytest.fixture()
def saved(loaded, tmp_path):
    """A two-turn conversation saved to disk, and the live one it was saved from."""
    model, processor = loaded
    conversation = Conversation(model, processor, ConversationSettings(**SETTINGS))
    for text in ("What is MLX?", "And Metal?"):
        list(conversation.send(text))
    return save_conversation(conversation, tmp_path / "chat"), conversation


@pytest.mark.parametrize("kv_bits", [None, 8], ids=["kv-float", "kv-8bit"])
def test_round_trip_continues_exactly_like_the_unsaved_conversation(loaded, tmp_path, kv_bits):
    model, processor = loaded
    original = Conversation(model, processor, ConversationSettings(**SETTINGS, kv_bits=kv_bits, kv_group_size=32))
    for text in ("What is MLX?", "And Metal?"):
        list(original.send(text))
    restored = load_conversation(save_conversation(original, tmp_path / "chat"), model, processor)
    assert restored.messages == original.messages and restored.settings == original.settings
    assert restored.context_tokens == original.context_tokens
    ours, theirs = list(restored.send("Why?")), list(original.send("Why?"))
    assert restored.last_stats.reused_tokens == original.last_stats.reused_tokens > 0
    assert [e.response.token for e in ours] == [e.response.token for e in theirs]
    a, b = np.array(ours[0].response.logprobs), np.array(theirs[0].response.logprobs)
    assert np.array_equal(a, b)  # the same arrays, bit for bit
    # The saved reply-start checkpoint survived: retry after loading reuses up to it.
    restored = load_conversation(tmp_path / "chat", model, processor)
    list(restored.retry())
    assert restored.last_stats.prefilled_tokens == 2  # "<think>\n"


def test_another_model_is_refused_and_the_text_stays_readable(saved, other_model, loaded):
    path, conversation = saved
    assert model_fingerprint(other_model[0]) != model_fingerprint(loaded[0])
    with pytest.raises(Qwen35Error, match="another model.*conversation.json"):
        load_conversation(path, *other_model)
    assert read_saved_conversation(path)["messages"] == conversation.messages


def test_corrupted_arrays_are_refused_and_the_text_stays_readable(saved, loaded):
    path, conversation = saved
    data = bytearray((path / CACHE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / CACHE_FILE).write_bytes(bytes(data))
    with pytest.raises(Qwen35Error, match="corrupted"):
        load_conversation(path, *loaded)
    (path / CACHE_FILE).write_bytes(bytes(data[:100]))
    with pytest.raises(Qwen35Error, match="corrupted"):
        load_conversation(path, *loaded)
    assert read_saved_conversation(path)["messages"] == conversation.messages


@pytest.mark.parametrize(
    "text, error",
    [
        ('{"format": "mlx-qwen35-conversation", "vers', "corrupted"),
        ('{"hello": 1}', "not a saved mlx-qwen35 conversation"),
        ('{"format": "mlx-qwen35-conversation", "version": 99}', "version 99 is not supported"),
    ],
)
def test_broken_or_foreign_records_are_refused(saved, loaded, text, error):
    path, _ = saved
    (path / CONVERSATION_FILE).write_text(text)
    with pytest.raises(Qwen35Error, match=error):
        load_conversation(path, *loaded)


def test_missing_directory_is_refused(loaded, tmp_path):
    with pytest.raises(Qwen35Error, match="not a saved conversation"):
        load_conversation(tmp_path / "nothing", *loaded)


def test_record_is_plain_json_with_version_and_fingerprint(saved, loaded):
    path, _ = saved
    record = json.loads((path / CONVERSATION_FILE).read_text())
    assert record["version"] == 1 and record["model_fingerprint"] == model_fingerprint(loaded[0])
    assert [c["tokens"] for c in record["cache"]["checkpoints"]] == sorted(
        c["tokens"] for c in record["cache"]["checkpoints"]
    )


def test_cli_prompt_cache_file_continues_and_updates_the_saved_conversation(moe_dir, tmp_path):
    saved = tmp_path / "cli-chat"
    results = []
    for prompt in ("What is MLX?", "And Metal?"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlx_qwen35",
                "generate",
                "--model",
                str(moe_dir),
                "-p",
                prompt,
                "--max-tokens",
                "8",
                "--thinking-budget",
                "2",
                "--temp",
                "0",
                "--prompt-cache-file",
                str(saved),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout))
    assert results[0]["reused_tokens"] == 0 and results[1]["reused_tokens"] > 0
    assert results[1]["prefilled_tokens"] == results[1]["prompt_tokens"] - results[1]["reused_tokens"]
    assert [m["role"] for m in read_saved_conversation(saved)["messages"]] == ["user", "assistant"] * 2


def edited(record: dict, change) -> dict:
    record = json.loads(json.dumps(record))
    change(record)
    return record


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda r: r.pop("model_fingerprint"), "missing field model_fingerprint"),
        (lambda r: r.update(comment="mine"), "unknown field comment"),
        (lambda r: r.update(messages={"role": "user"}), "messages must be list, not dict"),
        (lambda r: r["messages"].append("hello"), r"messages\[4\] must be an object"),
        (lambda r: r["messages"][0].update(content=5), r"messages\[0\].content must be text"),
        (lambda r: r["settings"].update(top_p=0.9), "unknown field settings.top_p"),
        (lambda r: r["settings"].pop("enable_thinking"), "missing field settings.enable_thinking"),
        (lambda r: r["settings"].update(enable_thinking="yes"), "settings.enable_thinking must be bool, not str"),
        (lambda r: r["settings"]["sampling"].update(temp=-1), "settings: temp -1: give a finite number >= 0"),
        (lambda r: r["settings"]["sampling"].update(stop=["x"]), "settings: unknown sampling option 'stop'"),
        (lambda r: r["settings"].update(max_tokens=0), "settings: max_tokens 0: give an integer >= 1"),
        (lambda r: r["settings"].update(kv_bits=3), "settings: kv_bits 3: use 8 or 4"),
        (lambda r: r["cache"].update(tokens="1 2 3"), "cache.tokens must be list, not str"),
        (lambda r: r["cache"]["tokens"].append("7"), "cache.tokens must be a list of integers"),
        (lambda r: r["cache"]["checkpoints"][0].pop("rope_delta"), r"missing field cache.checkpoints\[0\].rope_delta"),
        (lambda r: r["cache"].update(layers=2), "cache section does not describe"),
        (lambda r: r["cache"]["tokens"].pop(), "cache section does not describe"),
        (lambda r: r["cache"]["checkpoints"][-1].update(tokens=10**6), "cache section does not describe"),
    ],
)
def test_hand_edited_or_newer_records_are_one_error_naming_the_field(saved, loaded, change, error):
    path, _ = saved
    record = json.loads((path / CONVERSATION_FILE).read_text())
    (path / CONVERSATION_FILE).write_text(json.dumps(edited(record, change)))
    with pytest.raises(Qwen35Error, match=error):
        load_conversation(path, *loaded)


def test_saving_where_nothing_can_be_written_is_one_error(saved, tmp_path):
    _, conversation = saved
    with pytest.raises(Qwen35Error, match="/proc/mlx-qwen35-test/chat: cannot save the conversation there"):
        save_conversation(conversation, "/proc/mlx-qwen35-test/chat")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(Qwen35Error, match="cannot save the conversation there"):
        save_conversation(conversation, tmp_path / "a-file")


def test_session_target_is_checked_without_a_model(saved, tmp_path):
    path, _ = saved
    check_session_target(tmp_path / "new" / "chat", kv_bits=None)  # created when saved
    check_session_target(path, kv_bits=None)
    assert not list((tmp_path / "new").parent.glob(".mlx-qwen35-write-test-*"))  # the probe file is gone
    with pytest.raises(Qwen35Error, match="the saved cache has kv_bits None; pass the same --kv-bits"):
        check_session_target(path, kv_bits=8)
    (tmp_path / "prompt.safetensors").write_bytes(b"")
    with pytest.raises(Qwen35Error, match="is a file; a saved conversation is a directory"):
        check_session_target(tmp_path / "prompt.safetensors", kv_bits=None)
    with pytest.raises(Qwen35Error, match="prompt.safetensors is a file, so nothing can be saved below it"):
        check_session_target(tmp_path / "prompt.safetensors" / "chat", kv_bits=None)
    with pytest.raises(Qwen35Error, match="--prompt-cache-file /proc/mlx-qwen35-test/chat: cannot write in /proc"):
        check_session_target("/proc/mlx-qwen35-test/chat", kv_bits=None)


@pytest.mark.parametrize(
    "target, error",
    [
        ("model.safetensors", "is a file; a saved conversation is a directory"),
        ("/proc/mlx-qwen35-test/chat", "cannot write in /proc"),
    ],
)
def test_cli_prompt_cache_file_is_checked_before_the_model_loads(moe_dir, tmp_path, target, error):
    (tmp_path / "model.safetensors").write_bytes(b"")  # what an mlx-lm user would pass
    for model in (str(moe_dir), str(tmp_path / "no-such-model")):  # the second shows: before loading
        args = ["generate", "--model", model, "-p", "hi", "--prompt-cache-file", str(tmp_path / target)]
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, Qwen35Error) and result.output == "", result.output
        assert error in str(result.exception) and "\n" not in str(result.exception)
