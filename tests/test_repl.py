"""``mlx-qwen35 chat``: the real REPL driven through a pseudo-terminal, and its parts (commands, view, status)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pexpect
import pytest
from checkpoints import convert_tiny
from rich.console import Console

from mlx_qwen35 import load
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.runtime.conversation import TurnStats
from mlx_qwen35.surfaces.repl import (
    Command,
    ReplyView,
    command_completions,
    media_item,
    message_text,
    parse_command,
    session_path,
    status_line,
)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds per expectation: generous, the machine may be shared and busy
# prompt_toolkit switches bracketed paste on each time it starts reading a line: the prompt is ready.
PROMPT_READY = "\x1b[?2004h"
DIM = "\x1b[2m"  # reasoning streams as dim text
STATUS = re.compile(r"(\d+) tokens, [\d.]+ tok/s · prompt (\d+) new \+ (\d+) cached · context (\d+)/(\d+)")


@pytest.fixture(scope="module")
def chat_model(tiny_moe_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repl") / "model"
    convert_tiny(tiny_moe_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def endless_model(chat_model, tmp_path_factory) -> Path:
    """The chat model with zero LM-head rows for the stop tokens: their logit 0 never makes the top-k, so replies run until stopped."""
    out = tmp_path_factory.mktemp("repl-endless") / "model"
    shutil.copytree(chat_model, out)
    _, processor = load(str(out))
    name = "language_model.lm_head.weight"
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors, metadata = mx.load(str(shard), return_metadata=True)
    rows = mx.arange(tensors[name].shape[0])[:, None]
    is_stop = mx.any(rows == mx.array(sorted(processor.eos_token_ids))[None], axis=1, keepdims=True)
    tensors[name] = mx.where(is_stop, 0.0, tensors[name]).astype(tensors[name].dtype)
    mx.save_safetensors(str(shard), tensors, metadata=metadata)
    return out


def spawn_chat(model: Path, home: Path, *args: str) -> pexpect.spawn:
    """``mlx-qwen35 chat`` in a 40×100 pseudo-terminal, its history and sessions under ``home``, at its first prompt."""
    env = os.environ | {
        "HOME": str(home),
        "XDG_STATE_HOME": str(home / "state"),  # the input history file goes there
        "MLX_QWEN35_SESSIONS_DIR": str(home / "sessions"),
        "TERM": "xterm-256color",
        "PROMPT_TOOLKIT_NO_CPR": "1",  # pexpect does not answer cursor-position requests
    }
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_qwen35", "chat", "--model", str(model), *args],
        cwd=REPO,
        env=env,
        encoding="utf-8",
        codec_errors="replace",  # ^C flushes tty output, maybe mid-character
        timeout=TIMEOUT,
        dimensions=(40, 100),
    )
    child.expect_exact(PROMPT_READY)
    return child


def plain(screen: str) -> str:
    """Terminal output as words: escape sequences dropped, line wraps and runs of spaces as one space."""
    return " ".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|[\x08\r]", "", screen).split())


def ask(child: pexpect.spawn, line: str) -> str:
    """Type ``line``, press Enter and return everything printed until the next prompt."""
    child.send(line + "\r")
    child.expect_exact(PROMPT_READY)
    return child.before


def test_chat_session_in_a_terminal(chat_model, tmp_path):
    child = spawn_chat(chat_model, tmp_path, "--no-think", "--max-tokens", "40", "--seed", "0")
    try:
        first = STATUS.search(ask(child, "What is the capital of France?"))
        assert first, child.before
        generated, prefilled, cached, context, context_max = map(int, first.groups())
        assert generated == 40 and cached == 0 and context_max == 4096
        assert context == prefilled + generated - 1  # the last token enters the cache with the next prompt

        retried = STATUS.search(ask(child, "/retry"))
        new, cached = int(retried.group(2)), int(retried.group(3))
        assert new + cached == prefilled and cached > new  # the same prompt, restored up to the reply start

        assert "saved to" in ask(child, "/save first-chat")
        assert (tmp_path / "sessions" / "first-chat").exists()
        assert "new conversation" in ask(child, "/reset")
        assert "loaded first-chat: 2 messages" in ask(child, "/load first-chat")
        stats = ask(child, "/stats")
        assert re.search(r"messages\s+2", stats) and "context" in stats and "peak memory" in stats

        assert "error: no saved conversation 'nothing-here'" in ask(child, "/load nothing-here")
        assert "error: missing.png: no such file" in ask(child, "/image missing.png")
        assert "error: unknown command /bogus" in ask(child, "/bogus")
        assert STATUS.search(ask(child, "And of Italy?"))  # the loaded conversation goes on

        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "state" / "mlx-qwen35" / "chat_history").read_text()
    assert "+What is the capital of France?" in history and not (tmp_path / ".cache").exists()


def test_banner_prefill_bar_system_set_sessions_tab_and_stats_after_reset(chat_model, tmp_path):
    """The chat's first line, a long prompt's progress bar, and the /commands a user reaches for next."""
    child = spawn_chat(chat_model, tmp_path, "--no-think", "-m", "4", "--prefill-step-size", "1", "--no-history")
    try:
        opening = plain(child.before)
        assert f"{chat_model} · float32 · context 4,096 tokens · thinking off" in opening
        assert opening.index("thinking off") < opening.index("/help for commands")

        shown = plain(ask(child, "Tell me about " + "the sea and " * 60 + "the sky."))
        bar = re.search(r"reading the prompt \S* ?(\d+)/(\d+) tokens · \d+ tok/s · ETA", shown)
        assert bar and int(bar.group(2)) > 100, shown  # the ~190-token prompt, one token per chunk
        assert STATUS.search(shown) and re.search(r"first token [\d.]+ s, prompt \d+ tok/s", shown)

        assert "system prompt set; it applies from the next message" in plain(ask(child, "/system Be brief."))
        assert "temp 0.0" in plain(ask(child, "/set temp 0"))
        settings = plain(ask(child, "/set"))
        assert "temp 0.0" in settings and "max_tokens 4" in settings
        assert "error: /set temp -1.0: give" not in plain(ask(child, "/set top_k 5"))
        assert "error: temp -1.0: give a finite number >= 0" in plain(ask(child, "/set temp -1"))
        stats = plain(ask(child, "/stats"))
        assert "system Be brief." in stats and "temp 0.0" in stats and "top_k 5" in stats

        assert "no saved conversation in" in plain(ask(child, "/sessions"))
        ask(child, "/save beach")
        child.send("/sess\t")  # Tab completes the command
        assert "beach" in plain(ask(child, ""))

        ask(child, "/reset")
        stats = plain(ask(child, "/stats"))
        assert "messages 0" in stats and "context 0/4096 tokens" in stats and "last prompt none yet" in stats
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert not (tmp_path / "state" / "mlx-qwen35" / "chat_history").exists()  # --no-history


def test_a_full_context_is_refused_with_the_policy_to_use_or_the_oldest_turns_dropped(endless_model, tmp_path):
    command = [sys.executable, "-m", "mlx_qwen35", "chat", str(endless_model), "--no-think", "-m", "30"]
    lines = "".join(f"Message number {n}?\n" for n in range(5)) + "/stats\n"
    run = dict(
        input=lines, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, env=os.environ | {"HOME": str(tmp_path)}
    )
    refused = subprocess.run(command + ["--max-kv-size", "120"], **run)
    assert refused.returncode == 0, refused.stderr
    assert "or chat with --context-policy drop-oldest" in plain(refused.stdout)

    dropping = subprocess.run(command + ["--max-kv-size", "120", "--context-policy", "drop-oldest"], **run)
    assert dropping.returncode == 0, dropping.stderr
    out = plain(dropping.stdout)
    assert "error" not in out and len(STATUS.findall(dropping.stdout)) == 5  # every message answered
    dropped = [int(n) for n in re.findall(r"dropped the (\d+) oldest messages to fit the context \(120 tokens\)", out)]
    assert dropped and all(n % 2 == 0 for n in dropped)  # whole turns: a message and its reply
    kept = int(re.search(r"messages (\d+)", out).group(1))
    assert kept == 2 * 5 - sum(dropped)


def test_a_failed_message_or_load_leaves_the_conversation_as_it_was(chat_model, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    (tmp_path / "notes.png").write_text("not an image")
    hand_edited = tmp_path / "sessions" / "edited"
    child = spawn_chat(chat_model, tmp_path, "--no-think", "--max-tokens", "4", "--seed", "0")
    try:
        assert STATUS.search(ask(child, "Hello"))
        assert "saved to" in ask(child, "/save edited")
        record = json.loads((hand_edited / "conversation.json").read_text())
        del record["model_fingerprint"]
        (hand_edited / "conversation.json").write_text(json.dumps(record))

        ask(child, f"/image {tmp_path / 'notes.png'}")
        shown = ask(child, "What is in it?")
        assert "error: " + str(tmp_path / "notes.png") + ": not an image pillow can read" in plain(shown)
        child.expect_exact("What is in it?")  # the unsent message is back at the prompt, to edit
        child.sendintr()  # clears it
        child.expect_exact(PROMPT_READY)
        assert re.search(r"messages\s+2", ask(child, "/stats"))  # the failed message was not kept
        retried = STATUS.search(ask(child, "/retry"))  # and /retry answers "Hello" again
        assert retried and int(retried.group(3)) > 0, child.before

        assert "missing field model_fingerprint" in plain(ask(child, "/load edited"))
        assert re.search(r"messages\s+2", ask(child, "/stats"))  # the unsaved conversation is still there
        ask(child, f"/image {tmp_path / 'red.png'}")
        assert STATUS.search(ask(child, "And this?"))
        assert re.search(r"messages\s+4", ask(child, "/stats"))

        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(endless_model, tmp_path):
    child = spawn_chat(endless_model, tmp_path, "--think", "--max-tokens", "100000")
    try:
        for question in ("Tell me a long story.", "Another one, please."):
            child.send(question + "\r")
            child.expect_exact(DIM)  # reasoning is streaming
            child.sendintr()
            child.expect_exact("[stopped]")
            child.expect(STATUS)
            child.expect_exact(PROMPT_READY)
        # The partial replies are kept: two questions, two (stopped) answers.
        assert re.search(r"messages\s+4", ask(child, "/stats"))

        child.send("half a line")
        child.sendintr()  # at the prompt, Ctrl-C drops the line and keeps the session
        child.expect_exact(PROMPT_READY)
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_piped_chat_keeps_within_max_kv_size(endless_model, tmp_path):
    command = [sys.executable, "-m", "mlx_qwen35", "chat", "--model", str(endless_model), "--no-think"]
    result = subprocess.run(
        command + ["--max-tokens", "40", "--max-kv-size", "25"],
        input="Hello\nAnd then?\n/stats\n/retry\n",
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=os.environ | {"HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    first, retried = STATUS.finditer(result.stdout)
    generated, prefilled, _, _, context_max = map(int, first.groups())
    assert context_max == 25 and prefilled + generated == 25  # the reply was capped to the room left
    assert "error: the conversation" in result.stdout and "fills the context (25)" in result.stdout
    # The refused message is not kept: the conversation is as before it, and /retry answers "Hello" again.
    assert re.search(r"messages\s+2", result.stdout)
    assert int(retried.group(3)) > 0 and int(retried.group(2)) + int(retried.group(3)) == prefilled


def test_piped_chat_survives_bad_bytes_and_an_unwritable_sessions_dir(chat_model, tmp_path):
    command = [sys.executable, "-m", "mlx_qwen35", "chat", "--model", str(chat_model), "--no-think"]
    result = subprocess.run(
        command + ["--max-tokens", "3"],
        input=b"Caf\xe9?\n/save first\nHello\n/stats\n",  # Latin-1, not UTF-8
        cwd=REPO,
        capture_output=True,
        timeout=TIMEOUT,
        env=os.environ | {"HOME": str(tmp_path), "MLX_QWEN35_SESSIONS_DIR": "/proc/mlx-qwen35-test/sessions"},
    )
    out = result.stdout.decode()
    assert result.returncode == 0 and "Traceback" not in result.stderr.decode(), result.stderr.decode()
    assert "error: the line is not UTF-8 text (byte 0xe9 at position 3)" in plain(out)
    assert "error: /proc/mlx-qwen35-test/sessions/first: cannot save the conversation there" in plain(out)
    assert len(STATUS.findall(out)) == 1 and re.search(r"messages\s+2", out)  # only "Hello" was sent


def test_piped_chat_with_an_image_reuses_it_in_the_next_turn(chat_model, tmp_path):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    command = [
        sys.executable,
        "-m",
        "mlx_qwen35",
        "chat",
        "--model",
        str(chat_model),
        "--no-think",
        "--max-tokens",
        "3",
    ]
    result = subprocess.run(
        command,
        input=f"/image {image}\nWhat colour is it?\nAre you sure?\n",
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=os.environ | {"HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stdout, result.stdout
    first, second = (tuple(map(int, m.groups())) for m in STATUS.finditer(result.stdout))
    assert first[2] == 0 and second[2] > first[1] // 2  # turn 2 took the image turn from the cache


@pytest.mark.parametrize(
    "line, expected",
    [
        ("hello", None),
        ("  /retry  ", Command("retry", "")),
        ("/RESET", Command("reset", "")),
        ("/think off", Command("think", "off")),
        ("/image  ~/a b.png ", Command("image", "~/a b.png")),
        ("/edit", Command("edit", "")),
        ("/edit a better question", Command("edit", "a better question")),
        ("//etc/hosts is a file", None),
        ("/set temperature 0", Command("set", "temperature 0")),
        ("/system", Command("system", "")),
    ],
)
def test_parse_command(line, expected):
    assert parse_command(line) == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ("/frobnicate", "unknown command /frobnicate"),
        ("/save", "/save NAME: missing argument"),
        ("/think maybe", "/think takes on or off"),
        ("/retry now", "/retry takes no argument"),
        ("/set warmth 3", "/set warmth: not a setting; use one of temp, top_p"),
        ("/set top_k 0.5", "/set top_k 0.5: give an integer (or 'default')"),
        ("/set temp", "/set temp: give a value"),
    ],
)
def test_parse_command_errors(line, message):
    with pytest.raises(Qwen35Error, match=re.escape(message)):
        parse_command(line)


def test_tab_completes_commands_only():
    assert command_completions("/se") == ["/set", "/sessions"]
    assert command_completions("/sy") == ["/system"]
    assert command_completions("/RE") == ["/reset", "/retry"]
    assert command_completions("hello") == command_completions("//s") == command_completions("/set t") == []


def test_message_text_unescapes_a_leading_slash():
    assert message_text("//etc/hosts is a file") == "/etc/hosts is a file"
    assert message_text("  plain  ") == "plain"


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", "", "two words"])
def test_session_names_stay_inside_the_sessions_dir(name, tmp_path):
    with pytest.raises(Qwen35Error, match="not a session name"):
        session_path(tmp_path, name)


def test_media_items_point_at_existing_files(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(b"")
    assert media_item("image", str(image)) == {"type": "image", "image": str(image)}
    with pytest.raises(Qwen35Error, match="no such file"):
        media_item("video", str(tmp_path / "missing.mp4"))


def test_status_line():
    stats = TurnStats(
        prompt_tokens=120,
        reused_tokens=100,
        prefilled_tokens=20,
        generated_tokens=64,
        generation_tps=31.25,
        peak_memory_gb=12.346,
        context_tokens=184,
        time_to_first_token=0.25,
    )
    assert status_line(stats, 262144) == (
        "64 tokens, 31.2 tok/s · prompt 20 new + 100 cached · context 184/262144 · peak 12.35 GB · "
        "first token 0.25 s, prompt 80 tok/s"
    )


def render_reply(pieces: list[tuple[str, str]], show_reasoning: bool, stopped: bool = False) -> str:
    """What a ReplyView prints for ``pieces`` to a plain (non-terminal) console."""
    out = io.StringIO()
    view = ReplyView(Console(file=out, width=60, force_terminal=False), show_reasoning)
    for kind, text in pieces:
        view.add(kind, text)
    view.close(stopped)
    return out.getvalue()


def test_reply_view_separates_reasoning_from_the_markdown_answer():
    pieces = [
        ("reasoning", "Paris is "),
        ("reasoning", "well known."),
        ("content", "It is **Paris**"),
        ("content", "."),
    ]
    shown = render_reply(pieces, show_reasoning=True)
    assert shown.index("Paris is well known.") < shown.index("It is Paris.")  # markdown rendered: no **
    hidden = render_reply(pieces, show_reasoning=False)
    assert "well known" not in hidden and "It is Paris." in hidden


def test_reply_view_drops_control_characters_and_marks_a_stop():
    shown = render_reply([("content", "a\x1b[2Jb\x08c")], show_reasoning=True, stopped=True)
    assert "\x1b" not in shown and "\x08" not in shown and "a[2Jbc" in shown and "[stopped]" in shown


def test_reply_view_says_when_a_hidden_reasoning_ran_out_of_tokens():
    shown = render_reply([("reasoning", "Let me think")], show_reasoning=False)
    assert "Let me think" not in shown and "ended while reasoning" in shown
