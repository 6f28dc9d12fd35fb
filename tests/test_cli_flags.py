"""The command line speaks mlx-lm and mlx-vlm: every flag they share with us means what it means there.

The peers' own ``--help`` is the reference (both are installed): a flag of theirs that ``generate``
also has must set the option of the same meaning here (``-m`` is ``--max-tokens``, not ``--model``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache

import pytest
import typer
from checkpoints import convert_tiny
from cli_runner import run_cli

from mlx_qwen35.surfaces.cli import app
from mlx_qwen35.surfaces.options import peer_argv

# The issue's list (issue 14): each must exist here, under the peers' spelling. (mlx-vlm takes max_pixels only
# inside --processor-kwargs; ours is --max-pixels, checked by the help test below.)
REQUIRED = {
    "mlx_lm": [
        "-m", "--max-tokens", "-p", "--prompt", "--system-prompt", "--verbose", "--ignore-chat-template",
        "--chat-template-config", "--prefill-step-size", "--max-kv-size", "--kv-bits", "--kv-group-size",
        "--quantized-kv-start", "--extra-eos-token", "--seed", "--temp", "--top-p", "--top-k", "--min-p",
        "--image", "--model", "--prompt-cache-file",
    ],
    "mlx_vlm": [
        "--image", "--video", "--fps", "--resize-shape", "--temperature", "--enable-thinking",
        "--system", "--max-tokens", "--thinking-budget", "--verbose", "--no-verbose",
    ],
}  # fmt: skip
# Peers' destinations that have another name here (argparse's dest → our parameter); the rest are equal.
OUR_NAME = {
    "model": "model_option",
    "system_prompt": "system",
    "temperature": "temp",
    "ignore_chat_template": "raw",
    "enable_thinking": "think",
}
# mlx-vlm options that exist here with a different meaning would be listed here; there is none.
FLAG_LINE = re.compile(r"^  (-[^ ].*?)(?:\s{2,}|$)")


@cache
def peer_flags(package: str) -> dict[str, str]:
    """Each flag of ``python -m PACKAGE generate --help`` → its argparse destination."""
    result = subprocess.run(
        [sys.executable, "-m", package, "generate", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    flags: dict[str, str] = {}
    for line in result.stdout.splitlines():
        match = FLAG_LINE.match(line)
        if not match:
            continue
        names = re.findall(r"(?:^|, )(-{1,2}[A-Za-z][\w-]*)", match.group(1))
        longs = [n for n in names if n.startswith("--") and not n.startswith("--no-")]
        dest = (longs or names)[0].lstrip("-").replace("-", "_")
        flags |= {name: dest for name in names}
    return flags


def our_flags(command: str) -> dict[str, str]:
    """Each flag of ``mlx-qwen35 COMMAND`` → the parameter it sets."""
    params = typer.main.get_command(app).commands[command].params
    return {flag: p.name for p in params for flag in [*p.opts, *p.secondary_opts] if flag.startswith("-")}


@pytest.mark.parametrize("package", ["mlx_lm", "mlx_vlm"])
def test_every_flag_we_share_with_the_peer_means_what_it_means_there(package):
    theirs, ours = peer_flags(package), our_flags("generate")
    assert "-m" in theirs or package == "mlx_vlm"  # the parse found the peer's flags
    assert [flag for flag in REQUIRED[package] if flag not in ours] == []
    assert [flag for flag in REQUIRED[package] if flag not in theirs] == []  # the peer still has them
    shared = sorted(set(theirs) & set(ours) - {"--help", "-h"})
    assert len(shared) >= len(REQUIRED[package])
    differing = {
        flag: (theirs[flag], ours[flag]) for flag in shared if OUR_NAME.get(theirs[flag], theirs[flag]) != ours[flag]
    }
    assert differing == {}


def test_chat_shares_generate_s_names_for_the_options_both_have():
    generate, chat = our_flags("generate"), our_flags("chat")
    assert chat["-m"] == "max_tokens" and chat["--temperature"] == "temp" and chat["--system-prompt"] == "system"
    assert {flag: chat[flag] for flag in chat if flag in generate} == {
        flag: generate[flag] for flag in chat if flag in generate
    }


def test_peer_syntax_is_rewritten_into_typer_s():
    argv = ["generate", "M", "--image", "a.png", "b.png", "--video", "x.mp4", "y.mp4", "-p", "hi"]
    argv += ["--resize-shape", "448", "336", "--verbose", "False", "--extra-eos-token", "<a>", "<b>", "-m", "20"]
    assert peer_argv(argv) == [
        "generate", "M", "--image", "a.png", "--image", "b.png", "--video", "x.mp4", "--video", "y.mp4", "-p", "hi",
        "--resize-shape", "448", "--resize-shape", "336", "--no-verbose", "--extra-eos-token", "<a>",
        "--extra-eos-token", "<b>", "-m", "20",
    ]  # fmt: skip


def test_a_directory_after_images_is_the_model_not_an_image(tmp_path):
    assert peer_argv(["generate", "--image", "a.png", str(tmp_path), "-p", "x"]) == [
        "generate", "--image", "a.png", str(tmp_path), "-p", "x",
    ]  # fmt: skip


def parsed(*args: str) -> dict:
    """The parameters ``mlx-qwen35 ARGS`` gives its command (parsed as ``main`` parses, nothing run)."""
    group = typer.main.get_command(app)
    argv = peer_argv(list(args))
    command = group.commands[argv[0]]
    return command.make_context(argv[0], argv[1:]).params


def test_mlx_lm_command_line_parses_as_there():
    params = parsed("generate", "--model", "M", "-p", "hi", "-m", "20", "--temp", "0.5", "--system-prompt", "S")
    assert (params["model_option"], params["prompt"], params["max_tokens"], params["temp"]) == ("M", "hi", 20, 0.5)
    assert params["system"] == "S" and params["verbose"] is True


def test_two_videos_are_both_kept_and_the_model_may_be_positional():
    params = parsed("generate", "M", "-p", "hi", "--video", "a.mp4", "b.mp4", "--image", "c.png", "--image", "d.png")
    assert params["model"] == "M" and params["video"] == ["a.mp4", "b.mp4"] and params["image"] == ["c.png", "d.png"]
    assert parsed("chat", "M", "--temperature", "0", "--disable-thinking")["think"] is False
    assert parsed("serve", "M")["model"] == "M" and parsed("serve", "--model", "M")["model_option"] == "M"


def test_version_and_quiet_help(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "--version")
    assert code == 0 and re.fullmatch(r"mlx-qwen35 \d+\.\d+\.\d+\S*\n", out)
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(monkeypatch, capsys, "generate", "--help")
    assert code == 0 and "<bool>" not in out and "<str>" not in out and "<int>" not in out
    for row in [line for line in out.splitlines() if re.match(r"│ [ *]  --", line)]:
        assert re.search(r"\s{2}\S.*\S", row.split("--", 1)[1]), row  # every option has a help text
    assert "model card preset: 1.0 thinking, 0.7 not" in out and "[default: 32768]" in out and "--max-pixels" in out


@pytest.mark.parametrize(
    "args, error",
    [
        (["generate", "-p", "hi"], "no model given; run 'mlx-qwen35 generate MODEL'"),
        (["chat", "A", "--model", "B"], "two models given (A and --model B)"),
        (["generate", "M", "-p", "hi", "--quantized-kv-start", "5000"], "--quantized-kv-start 5000: the cache here"),
        (["generate", "M", "-p", "hi", "--chat-template-config", "{"], "--chat-template-config: not valid JSON"),
        (["generate", "M", "-p", "hi", "--chat-template-config", '{"x": 1}'], "reads only enable_thinking, not 'x'"),
        (["generate", "M", "-p", "hi", "--resize-shape", "1", "2", "3"], "--resize-shape 1 2 3: give one size"),
    ],
)
def test_wrong_peer_style_options_are_one_line(monkeypatch, capsys, args, error):
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and out == "" and err.startswith("error: ") and error in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def model_dir(tiny_moe_checkpoint, tmp_path_factory):
    return convert_tiny(tiny_moe_checkpoint, tmp_path_factory.mktemp("cli-flags") / "tiny-moe")


def test_generate_json_splits_the_reply_as_the_server_does(model_dir, monkeypatch, capsys):
    """The same greedy thinking request through ``generate --json`` and ``/v1/chat/completions``: the same parts."""
    import httpx
    from test_server import RunningServer

    from mlx_qwen35 import load
    from mlx_qwen35.surfaces.server.routes import ServerSettings
    from mlx_qwen35.surfaces.server.worker import GenerationWorker

    options = ["--temp", "0", "--presence-penalty", "0", "--thinking-budget", "3", "-m", "12"]
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(model_dir), "-p", "Hello", "--json", *options)
    assert code == 0, err
    cli = json.loads(out)
    # Loaded on the worker's thread, as the server does: MLX streams belong to the thread that made them.
    server = RunningServer(GenerationWorker(lambda: load(str(model_dir))), ServerSettings(model_id="tiny"))
    try:
        body = dict(
            messages=[{"role": "user", "content": "Hello"}],
            temperature=0,
            presence_penalty=0,
            thinking_budget=3,
            max_tokens=12,
        )
        message = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
    finally:
        server.close()
    assert cli["reasoning"] and cli["content"]  # a thinking reply with an answer: both parts to compare
    assert (cli["reasoning"], cli["content"]) == (message["reasoning_content"], message["content"])
    assert cli["tool_calls"] == [] and "tool_calls" not in message
    assert "</think>" in cli["text"] and "</think>" not in cli["reasoning"] + cli["content"]
