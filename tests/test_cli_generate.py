"""``mlx-qwen35 generate``'s output: reasoning shown as reasoning, the answer after it, nothing that drives the terminal."""

from __future__ import annotations

import mlx.core as mx
import pytest
from checkpoints import convert_tiny
from mlx_lm.generate import GenerationResponse
from typer.testing import CliRunner

import mlx_qwen35.runtime.generation as generation
from mlx_qwen35.surfaces.cli import app


@pytest.fixture(scope="module")
def model_dir(tiny_moe_checkpoint, tmp_path_factory):
    return convert_tiny(tiny_moe_checkpoint, tmp_path_factory.mktemp("cli-generate") / "model")


def script(monkeypatch, text: str, finish: str = "stop") -> None:
    """``stream_text`` replaced by ``text`` in pieces of 5 characters, ending with ``finish``."""

    def scripted_reply(*args, **kwargs):
        pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
        for n, piece in enumerate(pieces, start=1):
            yield GenerationResponse(
                piece, 0, mx.zeros(1), False, 5, 1.0, n, 1.0, 0.0, finish if n == len(pieces) else None
            )

    monkeypatch.setattr(generation, "stream_text", scripted_reply)


def generate(model_dir, *args: str):
    result = CliRunner().invoke(app, ["generate", str(model_dir), "-p", "?", *args])
    assert result.exit_code == 0, result.output
    return result


def test_reasoning_is_labelled_and_the_tags_and_control_characters_do_not_show(model_dir, monkeypatch):
    script(monkeypatch, "Let me \x1b[2Jthink.\n</think>\n\nThe answer\x07 is 4.")
    result = generate(model_dir)
    assert result.stdout.splitlines() == ["Thinking:", "Let me [2Jthink.", "", "The answer is 4."]
    assert "the reply ended while reasoning" not in result.stderr


def test_hide_thinking_prints_the_answer_alone(model_dir, monkeypatch):
    script(monkeypatch, "Hmm.\n</think>\n\nFour.")
    assert generate(model_dir, "--hide-thinking").stdout == "Four.\n"


def test_a_reply_cut_off_while_reasoning_says_max_tokens_ended_it(model_dir, monkeypatch):
    script(monkeypatch, "Still thinking about it", finish="length")
    result = generate(model_dir, "-m", "5")
    assert result.stdout.splitlines() == ["Thinking:", "Still thinking about it"]
    assert "the reply ended while reasoning: --max-tokens 5 ended it before the answer" in result.stderr


def test_verbose_false_prints_no_statistics(model_dir, monkeypatch):
    script(monkeypatch, "Hmm.\n</think>\n\nFour.")
    assert "prompt tokens at" in generate(model_dir).stderr
    assert generate(model_dir, "--no-verbose").stderr == ""


def test_a_long_prompt_shows_a_prefill_bar_on_a_terminal(model_dir):
    """In a pseudo-terminal, stderr shows the bar while the prompt is read (one token per chunk: many updates)."""
    import os
    import re
    import sys

    import pexpect

    prompt = "Tell me about " + "the sea and " * 60 + "the sky."
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_qwen35", "generate", str(model_dir), "-p", prompt, "-m", "2", "--prefill-step-size", "1"],
        env=os.environ | {"TERM": "xterm-256color"},
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 120),
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)
    done = [int(n) for n in re.findall(r"reading the prompt \S* ?(\d+)/\d+ tokens · \d+ tok/s · ETA", screen)]
    assert len(done) > 10 and done == sorted(done), screen  # the bar moved forward, chunk by chunk
