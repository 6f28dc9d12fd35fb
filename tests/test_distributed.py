"""Several processes as one model on mx.distributed's ring backend over 127.0.0.1 (docs/architecture.md §21).

Each launch starts 2 or 3 ranks of ``tests/rank_generate.py`` directly (the environment mlx.launch would set:
MLX_RANK, MLX_HOSTFILE), each bounded by a subprocess timeout so a hang fails the test instead of CI. The model
is a 12-layer random MoE with a vision tower (3 attention layers, so 3 pipeline stages each hold one).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rank_generate
from PIL import Image

from mlx_qwen35.model.parallel import RankShare
from mlx_qwen35.weights.sharding import held_bytes, stored_bytes

RANK_SCRIPT = Path(__file__).with_name("rank_generate.py")
RANK_TIMEOUT_S = 120  # a rank takes ~5-10 s here; a hang fails the test well before CI's budget
# Active memory after loading, beyond the bytes of the loaded arrays: measured 72 bytes on every rank.
ACTIVE_MARGIN_BYTES = 4096


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The 12-layer model benchmarks/bench_distributed.py measures (its build_model), in a temporary dir."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from bench_distributed import build_model

    return build_model(tmp_path_factory.mktemp("ranks"))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("image") / "noise.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return str(path)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(n: int, mode: str, model_dir: Path, out: Path, *args: str, ranks=None, **env: str) -> list:
    """Start ranks ``ranks`` (default all) of an ``n``-rank ring; wait for each (bounded); return them."""
    out.mkdir(parents=True, exist_ok=True)
    hostfile = out / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
    base = os.environ | {"MLX_HOSTFILE": str(hostfile), "PYTHONPATH": os.pathsep.join(sys.path)} | env
    command = [sys.executable, str(RANK_SCRIPT), str(model_dir), mode, str(out), *args]
    procs = [
        subprocess.Popen(
            command, env=base | {"MLX_RANK": str(r)}, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        for r in (range(n) if ranks is None else ranks)
    ]
    try:
        procs[0].stderr_text = procs[0].communicate(timeout=RANK_TIMEOUT_S)[1]
        for p in procs[1:]:
            # Once rank 0 is done the others end too (or, stopped by a fault test, are ended here).
            p.stderr_text = p.communicate(timeout=30 if env.get("RANK_TEST_STALL") is None else 1)[1]
    except subprocess.TimeoutExpired:
        if env.get("RANK_TEST_STALL") is None:
            raise
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the rank and its watchdog process
                p.wait()
    return procs


def results(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def single(model_dir, image, tmp_path_factory) -> dict:
    """The one-process replies (text prompt and image prompt) every layout must reproduce token for token."""
    replies = {}
    for name, extra in (("text", ()), ("image", (image,))):
        out = tmp_path_factory.mktemp(f"single-{name}")
        rank_generate.main(str(model_dir), "single", str(out), *extra)
        replies[name] = results(out, 1)[0]["turns"]
    assert replies["text"] != replies["image"]  # the image changes the reply: the tower's features reach the layers
    return replies


def expected_share(model_dir: Path, mode: str, rank: int, size: int, layers: list[int]) -> int:
    return held_bytes(stored_bytes(model_dir), RankShare(mode, rank, size, range(*layers)))


def test_pipeline_two_ranks_text_is_token_identical_and_each_rank_holds_its_layers(model_dir, single, tmp_path):
    procs = launch(2, "pipeline", model_dir, tmp_path)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr_text[-2000:] for p in procs]
    ranks = results(tmp_path, 2)
    assert [r["turns"] for r in ranks] == [single["text"]] * 2  # both turns, through the kept cache
    assert ranks[0]["layers"][0] == 0 and ranks[0]["layers"][1] == ranks[1]["layers"][0] and ranks[1]["layers"][1] == 12
    stored = sum(stored_bytes(model_dir).values())
    for rank, r in enumerate(ranks):
        share = expected_share(model_dir, "pipeline", rank, 2, r["layers"])
        assert r["held_bytes"] == share  # float32 on disk and in memory: the same bytes
        assert 0 <= r["active_bytes"] - r["held_bytes"] <= ACTIVE_MARGIN_BYTES
        assert share < 0.6 * stored  # a half, not the whole model


def test_pipeline_three_ranks_image_is_token_identical(model_dir, single, image, tmp_path):
    procs = launch(3, "pipeline", model_dir, tmp_path, image, RANK_TEST_SPLIT="4,4,4")
    assert [p.returncode for p in procs] == [0, 0, 0], [p.stderr_text[-2000:] for p in procs]
    ranks = results(tmp_path, 3)
    assert [r["turns"] for r in ranks] == [single["image"]] * 3
    assert [r["layers"] for r in ranks] == [[0, 4], [4, 8], [8, 12]]
    for rank, r in enumerate(ranks):
        assert r["held_bytes"] == expected_share(model_dir, "pipeline", rank, 3, r["layers"])
        assert 0 <= r["active_bytes"] - r["held_bytes"] <= ACTIVE_MARGIN_BYTES


def test_expert_parallel_two_ranks_image_is_token_identical_with_half_of_each_expert(
    model_dir, single, image, tmp_path
):
    procs = launch(2, "expert", model_dir, tmp_path, image)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr_text[-2000:] for p in procs]
    ranks = results(tmp_path, 2)
    assert [r["turns"] for r in ranks] == [single["image"]] * 2
    for rank, r in enumerate(ranks):
        assert r["held_bytes"] == expected_share(model_dir, "expert", rank, 2, [0, 12])
        assert 0 <= r["active_bytes"] - r["held_bytes"] <= ACTIVE_MARGIN_BYTES


def test_a_rank_dying_mid_generation_ends_rank_0_with_an_error_naming_it(model_dir, tmp_path):
    procs = launch(2, "pipeline", model_dir, tmp_path, RANK_TEST_DIE="1")
    assert procs[1].returncode == 9  # it died as told, after the first turn
    assert procs[0].returncode != 0
    last = procs[0].stderr_text.strip().splitlines()[-1]
    assert "rank 0 (127.0.0.1:" in last and "lost the connection to rank 1 (127.0.0.1:" in last, last


def test_a_stuck_rank_ends_rank_0_after_the_progress_timeout(model_dir, tmp_path):
    """A peer host that freezes without closing its sockets: rank 0's watchdog process ends it with one line."""
    procs = launch(2, "pipeline", model_dir, tmp_path, ranks=None, RANK_TEST_STALL="1", MLX_QWEN35_RANK_TIMEOUT="3")
    assert procs[0].returncode == -9  # killed by its watchdog: it was blocked inside a receive
    last = procs[0].stderr_text.strip().splitlines()[-1]
    assert last == "error: rank 0: no forward pass finished for 3 s; a peer (rank 1 at " + last.split(" at ", 1)[1]
    assert last.endswith(") stopped responding"), last


def test_an_unreachable_peer_ends_the_rank_within_the_connect_timeout(model_dir, tmp_path):
    (proc,) = launch(2, "pipeline", model_dir, tmp_path, ranks=[0], MLX_QWEN35_CONNECT_TIMEOUT="2")
    assert proc.returncode != 0
    last = proc.stderr_text.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: could not connect to the other ranks (127.0.0.1:"), last
    assert "within 2 s" in last


def test_generate_on_two_ranks_prints_the_one_process_reply_once_and_only_rank_0_reads_the_image(
    model_dir, image, tmp_path
):
    """``mlx-qwen35 generate --parallel pipeline`` as mlx.launch starts it on each rank (the serve test below goes
    through mlx.launch itself). Rank 1 is given an image path that does not exist: rank 0 reads the input and
    shares the prompt it makes, and only rank 0 prints."""
    from mlx_qwen35.runtime.generation import stream_text
    from mlx_qwen35.runtime.settings import GenerationSettings, recommended_sampling
    from mlx_qwen35.weights.loading import load

    settings = GenerationSettings(
        sampling=recommended_sampling(False, {"temp": 0.0}), max_tokens=6, enable_thinking=False
    )
    model, processor = load(str(model_dir))
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Hello there"}]
    prompt = processor([{"role": "user", "content": content}], enable_thinking=False)
    one = "".join(r.text for r in stream_text(model, processor, prompt, settings))

    env = _ring_env(tmp_path, 2)
    argv = ["generate", "--model", str(model_dir), "-p", "Hello there", "-m", "6", "--temp", "0", "--no-think"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mlx_qwen35", *argv, "--json", "--parallel", "pipeline", "--image", path],
            env=env | {"MLX_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank, path in enumerate([image, str(tmp_path / "only-on-rank-0.png")])
    ]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=RANK_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[1][0] == ""  # rank 1 printed nothing
    printed = json.loads(outputs[0][0])
    assert printed["text"] == one and printed["generation_tokens"] == 6
    assert printed["vision_tokens"] > 0


def _ring_env(out: Path, n: int) -> dict:
    """The environment mlx.launch gives each rank of an ``n``-rank ring on 127.0.0.1 (but MLX_RANK)."""
    hostfile = out / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
    return os.environ | {"MLX_HOSTFILE": str(hostfile), "PYTHONPATH": os.pathsep.join(sys.path)}


CHAT_ARGS = ("--temp", "0", "--no-think", "-m", "6", "--no-history")
STATUS = re.compile(r"(?s)(.*?)\n(\d+) tokens, [\d.]+ tok/s · prompt (\d+) new \+ (\d+) cached[^\n]*\n")


def _replies(out: str) -> list[tuple[str, int, int, int]]:
    """Each reply in a piped chat's output after its help line: (what came before its status line, tokens, new, cached)."""
    body = out.split("send a leading /.\n", 1)[1]
    return [(text, int(n), int(new), int(cached)) for text, n, new, cached in STATUS.findall(body)]


def test_chat_on_two_ranks_gives_the_one_process_replies_and_stops_a_reply_on_every_rank(model_dir, tmp_path):
    """``mlx-qwen35 chat --parallel expert`` in mlx.launch's environment, rank 0 reading piped lines: two turns (the
    second from the prompt cache) as one process gives them, /save refused, a long reply stopped by Ctrl-C on
    every rank, and the next reply still right; only rank 0 prints or reads, and /exit ends both ranks. Expert mode:
    the other tests cover text prompts in pipeline mode and image prompts in every mode."""
    from typer.testing import CliRunner

    from mlx_qwen35.surfaces.cli import app

    command = ["chat", "--model", str(model_dir), *CHAT_ARGS]
    one = CliRunner().invoke(app, command, input="Hello there\nAnd then?\n")
    assert one.exit_code == 0, one.output
    single = _replies(one.output)
    assert len(single) == 2 and single[1][3] > 0  # the second turn reuses the first's cache

    env = _ring_env(tmp_path, 2)
    argv = [sys.executable, "-m", "mlx_qwen35", *command, "--parallel", "expert"]
    procs = [
        subprocess.Popen(
            argv, env=env | {"MLX_RANK": str(rank)}, stdin=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        for rank in range(2)
    ]  # fmt: skip
    lines: queue.Queue = queue.Queue()
    printed: list[str] = []

    def read_rank_0() -> None:
        for line in procs[0].stdout:
            printed.append(line)
            lines.put(line)
        lines.put("")  # its output ended

    reader = threading.Thread(target=read_rank_0, daemon=True)
    reader.start()
    try:
        procs[0].stdin.write("Hello there\nAnd then?\n/save x\n/set max_tokens 30000\n")
        procs[0].stdin.flush()
        while "max_tokens 30000" not in (line := lines.get(timeout=RANK_TIMEOUT_S)):
            assert line, procs[0].stderr.read()[-2000:]  # rank 0 ended before /set answered
        procs[0].stdin.write("Tell me a story\n")  # ~15 min to its 30000th token: only a stop ends it in time
        procs[0].stdin.flush()
        time.sleep(3)  # the reply is under way: its prompt is rendered in milliseconds and read in ~1 s
        procs[0].send_signal(signal.SIGINT)
        procs[0].stdin.write("/set max_tokens 6\n/reset\nHello there\n/exit\n")
        procs[0].stdin.close()
        procs[0].wait(timeout=RANK_TIMEOUT_S)  # its output goes to the reader
        follower_out, follower_err = procs[1].communicate(timeout=30)
        reader.join(timeout=10)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [procs[0].stderr.read()[-2000:], follower_err[-2000:]]
    assert follower_out == ""  # rank 1 printed nothing
    out = "".join(printed)
    replies = _replies(out)
    assert len(replies) == 4, out[-3000:]
    assert replies[:2] == single  # text, tokens, prompt tokens prefilled and reused: as one process
    stopped, again = (" ".join(r[0].split()) for r in replies[2:])
    assert stopped.startswith("error: /save keeps one process's prompt cache"), stopped  # and the chat goes on
    assert stopped.endswith("[stopped]") and replies[2][1] < 30000, stopped[-500:]
    assert again == "max_tokens 6 new conversation " + " ".join(single[0][0].split()) and replies[3][3] > 0


def test_parallel_without_mlx_launch_says_how_to_launch(model_dir):
    from mlx_qwen35.errors import Qwen35Error
    from mlx_qwen35.runtime.distributed import join_launched

    with pytest.raises(Qwen35Error, match="mlx.launch --hostfile hosts.json -- mlx-qwen35"):
        join_launched("pipeline", None, str(model_dir))
    assert join_launched(None, None, str(model_dir)) is None  # one process, as before


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_mtp_under_mlx_launch_is_refused_before_any_rank_joins(command, model_dir, monkeypatch, capsys):
    """The ranks hold no MTP head: --mtp on several ranks is one line, not ranks decoding different steps."""
    from cli_runner import run_cli

    monkeypatch.setenv("MLX_RANK", "0")  # what mlx.launch sets; no hostfile: it must stop before joining
    args = ["-p", "hi"] if command == "generate" else []
    code, _, err = run_cli(monkeypatch, capsys, command, str(model_dir), *args, "--mtp")
    assert (
        code == 1
        and err.strip() == "error: --mtp runs in one process, not under mlx.launch; use --no-mtp on several ranks"
    )


def _chat(port: int, text: str, history: tuple = ()) -> dict:
    messages = [*history, {"role": "user", "content": text}]
    body = json.dumps({"messages": messages, "max_tokens": 6, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(request, timeout=60).read())


def _leave_after_the_first_token(port: int, text: str, max_tokens: int) -> None:
    """Stream a chat request and hang up once the first token has come."""
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = []  # the role chunk, then one per token
        while len(data) < 2:
            line = response.readline().decode()
            assert line, "the stream ended before its first token"
            data += [line] if line.startswith("data:") else []
    finally:
        connection.close()


def test_serve_under_mlx_launch_answers_concurrent_requests_one_after_another(model_dir, tmp_path):
    """Rank 0 serves; two requests at once run one after the other on both ranks (interleaved, the ranks'
    messages would mismatch and hang or garble them), and a next turn comes from every rank's prompt cache.
    A streamed request whose client leaves ends on every rank at once: the next is answered, as before."""
    port, ring = _free_ports(2)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    launcher = Path(sys.executable).with_name("mlx.launch")
    server = subprocess.Popen(
        [str(launcher), "-n", "2", "--backend", "ring", "--starting-port", str(ring), "--env",
         f"PYTHONPATH={env['PYTHONPATH']}", "--", sys.executable, "-m", "mlx_qwen35", "serve", "--model",
         str(model_dir), "--port", str(port), "--max-tokens", "30000"],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("w"), start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        replies = {}
        threads = [
            threading.Thread(target=lambda t=text: replies.__setitem__(t, _chat(port, t)))
            for text in ("Hello there", "Tell me a story")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=RANK_TIMEOUT_S)
        assert len(replies) == 2, (tmp_path / "server.log").read_text()[-2000:]
        messages = [r["choices"][0]["message"] for r in replies.values()]
        assert messages[0] != messages[1] and all(r["usage"]["completion_tokens"] == 6 for r in replies.values())
        # ~15 min to its 30000th token on both ranks: only a stop that reaches rank 1 frees them for the next.
        _leave_after_the_first_token(port, "Tell me a story", 30000)
        again = _chat(port, "Hello there")  # alone now: the same reply as beside the other request
        assert again["choices"][0]["message"] == replies["Hello there"]["choices"][0]["message"]
        # The next turn of that chat (the cache's latest): every rank restores the same prefix from its own cache.
        history = ({"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"})
        follow_up = _chat(port, "And then?", history)
        assert follow_up["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert follow_up["usage"]["completion_tokens"] == 6
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_tensor_parallel_two_ranks_image_is_token_identical_with_half_of_each_head_and_cache(
    model_dir, single, image, tmp_path
):
    """Tensor mode: each rank holds half of every expert and of every attention and DeltaNet layer's heads (the
    test model's one K/V head replicated: both ranks' query heads read it), so its DeltaNet states are halves."""
    from mlx_qwen35.config import load_config

    # No kernel self-check on the ranks: its first run for a probe (here the halved heads') leaves ~7 KB of MLX
    # state (measured 6.8-8.4 KB), which is not weights; the one-process run's paths are the pure ones all the same.
    procs = launch(2, "tensor", model_dir, tmp_path, image, MLX_QWEN35_PURE="1")
    assert [p.returncode for p in procs] == [0, 0], [p.stderr_text[-2000:] for p in procs]
    ranks = results(tmp_path, 2)
    assert [r["turns"] for r in ranks] == [single["image"]] * 2
    text, stored = load_config(model_dir).text, stored_bytes(model_dir)
    expert = held_bytes(stored, RankShare("expert", 0, 2, range(12)))
    for rank, r in enumerate(ranks):
        assert r["held_bytes"] == held_bytes(stored, RankShare("tensor", rank, 2, range(12)), text) < expert
        assert 0 <= r["active_bytes"] - r["held_bytes"] <= ACTIVE_MARGIN_BYTES
        conv, state = r["cache_shapes"][0]  # a DeltaNet layer: [B, K−1, C/2], [B, Hv/2, Dv, Dk]
        assert conv[2] == text.linear_conv_dim // 2 and state[1] == text.linear_num_value_heads // 2
        keys, _ = r["cache_shapes"][3]  # an attention layer: [B, 1, T, D], the one K/V head
        assert text.num_key_value_heads == 1 and keys[1] == 1
