"""What a careless user can type: every bad option is one line, found before the model loads, and a fuzz pass
over every option of generate, chat, convert --dry-run and serve finds no traceback.

In-process through typer's CliRunner: a ``Qwen35Error`` reaches ``result.exception`` (``main`` prints it as
one ``error:`` line and exits 1); click's usage errors exit 2.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import convert_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import mlx_qwen35.surfaces.server.routes as routes
import mlx_qwen35.weights.loading as loading
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.runtime.settings import RANGES
from mlx_qwen35.surfaces.cli import app

MISSING_MODEL = "/nonexistent/mlx-qwen35-model"


@pytest.fixture(scope="module")
def model_dir(tiny_moe_checkpoint, tmp_path_factory) -> Path:
    return convert_tiny(tiny_moe_checkpoint, tmp_path_factory.mktemp("cli-inputs") / "model")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The files a user points options at: good ones, and the wrong kinds."""
    root = tmp_path_factory.mktemp("cli-files")
    Image.new("RGB", (32, 32), "red").save(root / "red.png")
    (root / "notes.png").write_text("not an image")
    (root / "clip.mp4").write_text("not a video")
    (root / "tools.json").write_text(
        json.dumps([{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}])
    )
    (root / "broken-tools.json").write_text("[{")
    (root / "model.safetensors").write_bytes(b"")
    (root / "a-dir").mkdir()
    return {path.name: path for path in root.iterdir()}


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    from test_video_processing import write_moving_square

    return write_moving_square(tmp_path_factory.mktemp("cli-video") / "clip.mp4", seconds=2, fps=4)


@pytest.fixture(scope="module")
def busy_port():
    """A port something already listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def invoke(*args: str, stdin: bytes | None = None):
    """Run the CLI in-process; the result's ``exception`` is None, a ``SystemExit`` or our error."""
    return CliRunner().invoke(app, list(args), input=stdin)


def one_line_error(result) -> str:
    """The message ``main`` would print for ``result``; fails unless it is one of our one-line errors."""
    assert isinstance(result.exception, Qwen35Error), (result.exception, result.output)
    message = str(result.exception)
    assert "\n" not in message and "Traceback" not in result.output, message
    return message


# ---------------------------------------------------------------- found before the model loads


@pytest.mark.parametrize(
    "args, error",
    [
        (["generate", "-p", "hi", "--max-tokens", "0"], "max_tokens 0: give an integer >= 1"),
        (["generate", "-p", "hi", "--max-tokens", "-1"], "max_tokens -1: give an integer >= 1"),
        (["generate", "-p", "hi", "--min-p", "2"], "min_p 2.0: give a finite number >= 0 and <= 1"),
        (["generate", "-p", "hi", "--repetition-penalty", "-1"], "repetition_penalty -1.0: give a finite number > 0"),
        (["generate", "-p", "hi", "--repetition-penalty", "0"], "repetition_penalty 0.0: give a finite number > 0"),
        (["generate", "-p", "hi", "--seed", "-1"], "--seed -1: give an integer >= 0 and <= 9223372036854775807"),
        (["generate", "-p", "hi", "--temp", "-1"], "temp -1.0: give a finite number >= 0"),
        (["generate", "-p", "hi", "--temp", "nan"], "temp nan: give a finite number >= 0"),
        (["generate", "-p", "hi", "--top-p", "2"], "top_p 2.0: give a finite number >= 0 and <= 1"),
        (["generate", "-p", "hi", "--top-k", "-1"], "top_k -1: give an integer >= 0"),
        (["generate", "-p", "hi", "--thinking-budget", "-3"], "thinking_budget -3: give an integer >= 0"),
        (["generate", "-p", "hi", "--min-pixels", "-5"], "--min-pixels -5: give an integer >= 1"),
        (["generate", "-p", "hi", "--fps", "nan"], "--fps nan: give a finite number > 0"),
        (["generate", "-p", "hi", "--video-end", "inf"], "--video-end inf: give a finite number > 0"),
        (["generate", "-p", "hi", "--max-kv-size", "0"], "--max-kv-size 0: give an integer >= 1"),
        (["generate", "-p", "hi", "--kv-bits", "3"], "kv_bits 3: use 8 or 4"),
        (["generate", "-p", "caf\udce9"], "--prompt is not UTF-8 text (byte 0xe9 at position 3)"),
        (["generate", "-p", "hi", "--system", "\udcff"], "--system-prompt is not UTF-8 text (byte 0xff at position 0)"),
        (["generate", "-p", "hi", "--tools", "{missing}"], "{missing}: cannot read the tools file"),
        (["generate", "-p", "hi", "--tools", "{broken_tools}"], "broken-tools.json: not valid JSON"),
        (["generate", "-p", "hi", "--image", "{missing}"], "{missing}: no such image file"),
        (["generate", "-p", "hi", "--image", "https://example.com/cat.png"], "URLs are not fetched"),
        (["generate", "-p", "hi", "--video", "{missing}"], "{missing}: no such video file"),
        (["generate", "-p", "hi", "--prompt-cache-file", "{safetensors}"], "is a file; a saved conversation"),
        (["generate", "-p", "hi", "--raw", "--image", "{red}"], "--raw sends text only"),
        (["chat", "--top-p", "2"], "top_p 2.0: give a finite number >= 0 and <= 1"),
        (["chat", "--kv-bits", "16"], "kv_bits 16: use 8 or 4"),
        (["chat", "--max-tokens", "0"], "max_tokens 0"),
        (["serve", "--port", "99999"], "--port 99999: give an integer >= 1 and <= 65535"),
        (["serve", "--port", "{busy}"], "--port {busy}: already in use on 127.0.0.1"),
        (["serve", "--host", "no such host", "--port", "8080"], "--host no such host: not an address to listen on"),
        (["serve", "--max-tokens", "0"], "--max-tokens 0: give an integer >= 1"),
    ],
)
def test_bad_options_are_one_line_before_the_model_loads(files, busy_port, args, error):
    """The model does not exist: an error naming the option (not --model) shows it was checked first."""
    names = dict(
        red=files["red.png"],
        broken_tools=files["broken-tools.json"],
        safetensors=files["model.safetensors"],
        missing="/nonexistent/file",
        busy=busy_port,
    )
    args = [arg.format(**names) for arg in args]
    result = invoke(args[0], "--model", MISSING_MODEL, *args[1:])
    assert error.format(**names) in one_line_error(result)


def test_prompt_on_stdin_that_is_not_utf8_is_one_line():
    result = invoke("generate", "--model", MISSING_MODEL, "-p", "-", stdin=b"caf\xe9 au lait")
    assert "standard input is not UTF-8 text (byte 0xe9 at position 3)" in one_line_error(result)


def test_convert_refuses_an_infinite_shard_size(tiny_moe_checkpoint, tmp_path):
    for dry_run in ([], ["--dry-run"]):
        args = ["--hf-path", str(tiny_moe_checkpoint.path), "--mlx-path", str(tmp_path / "out"), *dry_run]
        result = invoke("convert", *args, "--shard-size-gb", "inf")
        assert "--shard-size-gb inf: give a finite number > 0" in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_corrupt_tokenizer_is_one_line(model_dir, tmp_path):
    broken = shutil.copytree(model_dir, tmp_path / "model")
    text = (broken / "tokenizer.json").read_text()
    (broken / "tokenizer.json").write_text(text[: len(text) // 2])
    result = invoke("generate", "--model", str(broken), "-p", "hi")
    assert "the tokenizer files cannot be read (Failed to parse tokenizer.json" in one_line_error(result)


def test_kv_bits_on_heads_narrower_than_the_quantisation_group_is_one_line(model_dir):
    result = invoke("generate", "--model", str(model_dir), "-p", "hi", "--kv-bits", "8")  # tiny head_dim 32 < 64
    assert "this model's attention heads (32 wide) are not a multiple of the quantisation group (64)" in one_line_error(
        result
    )


def test_serve_on_a_busy_port_exits_with_one_line(model_dir, busy_port):
    """A real process: the error names --port before the model loads, and the process exits cleanly."""
    command = [sys.executable, "-m", "mlx_qwen35", "serve", "--model", str(model_dir), "--port", str(busy_port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert (
        result.stderr
        == f"error: --port {busy_port}: already in use on 127.0.0.1; stop what listens there or pick another --port\n"
    )


# ---------------------------------------------------------------- fuzz: generated values for every option

FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
texts = st.one_of(st.text(max_size=20), st.sampled_from(["", "\udcff", "caf\udce9", "<|im_end|>", "<|image_pad|>"]))
# Values that make real work (tokens generated, pixels encoded) are drawn small inside their range; bounds on
# them are another issue's (8). --max-tokens is always given: the defaults generate hundreds of tokens.
INSIDE_LIMITS = {"max_tokens": 4, "min_pixels": 2**16, "max_pixels": 2**16, "max_kv_size": 600, "thinking_budget": 8}


def number(name: str) -> st.SearchStrategy:
    """Values for the option ``name``: inside its rule (``RANGES``) or any number at all (nan, inf, huge)."""
    rule = RANGES[name]
    low = rule.ge if rule.ge is not None else rule.gt if rule.gt is not None else -1e6
    high = INSIDE_LIMITS.get(name, rule.le)
    if rule.integer:
        inside = st.integers(int(low), high)
        return st.one_of(inside, st.integers(max_value=high if name in INSIDE_LIMITS else None), st.integers(-3, 3))
    inside = st.floats(low, high if high is not None else 1e6, exclude_min=rule.gt is not None)
    return st.one_of(inside, st.floats(), st.sampled_from([0.0, -1.0, 1e-300, 1e300]))


# Most examples should get past --max-tokens to reach the rest (st.one_of picks its branches evenly).
mostly_valid_max_tokens = st.one_of(st.integers(1, 4), st.integers(1, 4), number("max_tokens"))


def some_options(specs: dict[str, st.SearchStrategy], most: int = 4) -> st.SearchStrategy:
    """A few of the options in ``specs`` (so that many examples get past the checks), each with a drawn value."""

    def drawn(chosen: list[str]) -> st.SearchStrategy:
        parts = [specs[flag].map(lambda value, flag=flag: [flag, str(value)]) for flag in chosen]
        return st.tuples(*parts).map(lambda pairs: [arg for pair in pairs for arg in pair])

    return st.lists(st.sampled_from(sorted(specs)), max_size=most, unique=True).flatmap(drawn)


SAMPLING_OPTIONS = {
    flag: number(flag[2:].replace("-", "_"))
    for flag in ("--temp", "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--presence-penalty", "--seed")
} | {
    "--thinking-budget": number("thinking_budget"),
    "--max-kv-size": number("max_kv_size"),
    "--system": texts,
    "--kv-bits": st.sampled_from([4, 8, 0, 3, -1]),
}


def assert_no_traceback(result) -> None:
    """Success, a click usage error (2) or one of our one-line errors; nothing else."""
    assert "Traceback" not in result.output, result.output
    if result.exception is None or isinstance(result.exception, SystemExit):
        assert result.exit_code in (0, 1, 2), (result.exit_code, result.output)
    else:
        one_line_error(result)


@pytest.fixture(scope="module")
def preloaded(model_dir):
    """``load`` of the tiny model returns one pair loaded once, so each example costs a few tokens, not a load."""
    pair = loading.load(str(model_dir))
    real = loading.load
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            loading,
            "load",
            lambda path, revision=None, expert_memory=None, share=None: pair if path == str(model_dir) else real(path),
        )
        yield


@pytest.fixture(scope="module")
def media(files, video) -> st.SearchStrategy:
    """Up to two --image values and maybe a --video: good files, wrong kinds, missing, URLs, data: URLs."""
    with io.BytesIO() as png:
        Image.new("RGB", (16, 16), "blue").save(png, format="PNG")
        data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    images = [str(files["red.png"]), str(files["notes.png"]), str(files["a-dir"]), "/nonexistent.png", data_url]
    images += ["data:image/png;base64,!!", "http://example.com/x.png", "~no-such-user-mlx/x.png"]
    videos = [str(video), str(files["clip.mp4"]), "/nonexistent.mp4"]
    chosen = st.tuples(st.lists(st.sampled_from(images), max_size=2), st.one_of(st.none(), st.sampled_from(videos)))
    return st.one_of(st.just(([], None)), st.just(([str(files["red.png"])], None)), st.just(([], str(video))), chosen)


def test_fuzz_generate(preloaded, model_dir, files, media, tmp_path):
    cache_files = [str(files["model.safetensors"]), str(files["a-dir"]), "/proc/mlx-qwen35-fuzz/chat"]
    tools = [str(files["tools.json"]), str(files["broken-tools.json"]), str(files["a-dir"]), "/nonexistent.json"]
    specs = SAMPLING_OPTIONS | {
        flag: number(flag[2:].replace("-", "_"))
        for flag in ("--max-pixels", "--min-pixels", "--fps", "--max-frames", "--video-start", "--video-end")
    }
    specs |= {
        "--tools": st.sampled_from(tools),
        "--prompt-cache-file": st.one_of(st.sampled_from(cache_files), st.just(str(tmp_path / "chat"))),
    }
    outcomes = []

    @FUZZ
    @given(
        prompt=st.one_of(st.text(max_size=20), st.text(max_size=20), texts, st.just("-")),
        stdin=st.binary(max_size=12),
        max_tokens=mostly_valid_max_tokens,
        options=some_options(specs),
        switches=st.lists(st.sampled_from(["--think", "--no-think", "--raw", "--json"]), max_size=2),
        chosen_media=media,
    )
    def run(prompt, stdin, max_tokens, options, switches, chosen_media):
        images, video = chosen_media
        media_args = [arg for path in images for arg in ("--image", path)] + (["--video", video] if video else [])
        args = ["generate", "--model", str(model_dir), "-p", prompt, "--max-tokens", str(max_tokens)]
        result = invoke(*args, *options, *switches, *media_args, stdin=stdin)
        assert_no_traceback(result)
        outcomes.append(result.exit_code)

    run()
    assert outcomes.count(0) >= 8, outcomes  # enough examples got past the checks to generate (17 measured)


def test_fuzz_chat(preloaded, model_dir, files, tmp_path):
    lines = ["hello", "/retry", "/edit shorter", "/edit", "/stats", "/think off", "/reset", "/bogus", "//x", "/help"]
    lines += [f"/image {files['red.png']}", f"/image {files['notes.png']}", "/save s1", "/load s1", "/load none"]
    lines += ["caf\udce9", "/video /nonexistent.mp4", "/save ../up"]
    answered = []

    @FUZZ
    @given(
        typed=st.lists(st.one_of(st.just("hello"), st.sampled_from(lines)), min_size=1, max_size=5),
        max_tokens=mostly_valid_max_tokens,
        options=some_options(SAMPLING_OPTIONS),
        switches=st.lists(st.sampled_from(["--think", "--no-think", "--hide-thinking"]), max_size=2),
    )
    def run(typed, max_tokens, options, switches):
        stdin = "\n".join(typed).encode("utf-8", errors="surrogateescape") + b"\n"
        args = ["chat", "--model", str(model_dir), "--sessions-dir", str(tmp_path), "--max-tokens", str(max_tokens)]
        result = invoke(*args, *options, *switches, stdin=stdin)
        assert_no_traceback(result)
        assert "error: unexpected" not in result.output, result.output  # the REPL's catch-all for bugs
        answered.append(" tok/s · prompt " in result.output)

    run()
    assert answered.count(True) >= 8, answered  # 23 measured


def test_fuzz_convert_dry_run(tiny_moe_checkpoint, files, tmp_path):
    sources = [str(tiny_moe_checkpoint.path), str(files["a-dir"]), str(files["red.png"]), "/nonexistent/checkpoint"]
    specs = {
        "--recipe": st.one_of(st.sampled_from(["4bit", "8bit", "bf16", "mixed_3_6"]), texts),
        "--dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8"]),
        "--shard-size-gb": number("shard_size_gb"),
    }

    @FUZZ
    @given(source=st.sampled_from(sources), options=some_options(specs))
    def run(source, options):
        args = ["convert", "--hf-path", source, "--mlx-path", str(tmp_path / "out"), "--dry-run", *options]
        assert_no_traceback(invoke(*args))

    run()
    assert not (tmp_path / "out").exists()


def test_fuzz_serve_options(busy_port, monkeypatch):
    """Every value that passes the checks reaches the server with a valid port; the rest are one line."""
    served = []
    monkeypatch.setattr(routes, "serve", lambda model, **options: served.append(options))
    specs = {
        "--host": st.sampled_from(["127.0.0.1", "localhost", "::1", "", "no such host", "\x00", "x" * 300]),
        "--port": st.one_of(number("port"), st.just(busy_port)),
        "--max-tokens": number("max_tokens"),
        "--api-key": texts,
    }

    @FUZZ
    @given(options=some_options(specs))
    def run(options):
        served.clear()
        assert_no_traceback(invoke("serve", "--model", "m", *options))
        if served:  # the busy port is taken on 127.0.0.1 (so on localhost too), free on ::1
            assert 1 <= served[0]["port"] <= 65535 and served[0]["max_tokens"] >= 1
            assert served[0]["port"] != busy_port or served[0]["host"] == "::1"

    run()
