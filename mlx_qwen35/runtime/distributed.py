"""Several Macs as one model: joining the ranks, rank 0 leading and the others following (docs/architecture.md §21).

Every rank runs the same program (``mlx.launch … -- mlx-qwen35 generate …``) and the same generation loop;
rank 0 samples and ``shared_sampler`` gives its token to all, so every rank takes the same steps, stops at the
same token and undoes the same look-ahead step. Only rank 0 reads input (``broadcast_text``) and prints;
a serving or chatting rank 0 hands each request to the others (``rank_jobs``). Rank 0 ends a reply early (Ctrl-C,
a client gone) with ``stop_reply``: its next shared token is an end-of-text token, so every rank stops at the same
step as at the model's own end, at no extra collective.

Faults end the run within a bound instead of hanging: ``RankWatchdog`` kills a rank that cannot reach its
peers at start ($MLX_QWEN35_CONNECT_TIMEOUT s), or that sees no forward pass for $MLX_QWEN35_RANK_TIMEOUT s
while generating; a peer that dies closes its sockets, the backend raises at once, and ``rank_errors``
turns that into our one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..config import load_config
from ..errors import Qwen35Error
from ..model.parallel import MODES, RankShare, check_expert_split, check_tensor_split

CONNECT_TIMEOUT_S = 60.0  # a ring's ranks start within seconds of each other under mlx.launch
PROGRESS_TIMEOUT_S = 300.0  # the longest a forward pass may take (a 2048-token prefill chunk of the 397B: ~10 s)
EXIT_PEER_LOST = 3
_watchdog: RankWatchdog | None = None  # one rank per process
_stopping = False  # rank 0 asked every rank to end the reply in progress (``stop_reply``); one reply at a time
_BACKEND_TAGS = ("[ring]", "[jaccl]", "[mpi]")  # how MLX's backends begin their errors


def _environment_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise Qwen35Error(f"{name}={os.environ[name]}: give a number of seconds") from None


def _hostfile_entries() -> list[str]:
    """Each rank's addresses in the ring hostfile mlx.launch writes ($MLX_HOSTFILE), if there is one."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    try:
        entries = json.loads(Path(hostfile).read_text()) if hostfile else []
    except (OSError, ValueError):
        return []
    return [",".join(e) if isinstance(e, list) else str(e) for e in entries]


def rank_hosts(size: int) -> list[str]:
    """Each rank's address as the hostfile names it (``rank N`` when there is none)."""
    hosts = _hostfile_entries()
    return hosts if len(hosts) == size else [f"rank {r}" for r in range(size)]


class RankWatchdog:
    """Kills this rank with a one-line error when a deadline passes: connecting, or the next forward pass.

    The watching runs in a small process of its own (``rank_watchdog``): a rank blocked in a collective
    holds the GIL inside MLX, so a thread of its own could not act.
    """

    def __init__(self, rank: int):
        command = [sys.executable, "-m", "mlx_qwen35.runtime.rank_watchdog", str(os.getpid()), str(rank)]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE)

    def arm(self, seconds: float, message: str) -> None:
        """Kill this rank with ``message`` unless ``arm``/``disarm`` is called again within ``seconds``."""
        self._send(f"arm {seconds} {' '.join(message.split())}")

    def disarm(self) -> None:
        self._send("disarm")

    def _send(self, line: str) -> None:
        self._process.stdin.write(line.encode() + b"\n")
        self._process.stdin.flush()


def free_memory_bytes() -> int:
    """Memory this host can give the model: Metal's recommended working set on a Mac, else MemAvailable."""
    limit = mx.device_info().get("max_recommended_working_set_size") if mx.metal.is_available() else None
    if limit:
        return int(limit)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def join(mode: str, model_dir: Path, split: str | None = None, free_bytes: int | None = None) -> RankShare:
    """Connect to the other ranks (mlx.launch's environment) and decide what this rank holds.

    Pipeline: ``split`` ("40,20", layers per rank) or each rank's ``free_bytes`` (default: measured) shares
    out the layers; a rank whose share does not fit stops every rank with an error naming it and the numbers.
    """
    from ..weights.sharding import (
        check_fits,
        check_stages,
        layer_and_end_bytes,
        parse_split,
        proportional_split,
        stages,
        stored_bytes,
    )

    if mode not in MODES:
        raise Qwen35Error(f"--parallel {mode}: unknown; choose {' or '.join(MODES)}")
    config = load_config(model_dir)
    rank = int(os.environ.get("MLX_RANK", "0"))
    global _watchdog
    watchdog = _watchdog = _watchdog or RankWatchdog(rank)
    connect = _environment_seconds("MLX_QWEN35_CONNECT_TIMEOUT", CONNECT_TIMEOUT_S)
    peers = ", ".join(h for r, h in enumerate(_hostfile_entries()) if r != rank) or "none in MLX_HOSTFILE"
    watchdog.arm(connect, f"could not connect to the other ranks ({peers}) within {connect:.0f} s; check that "
                 "every host in the hostfile is reachable and runs the same command")  # fmt: skip
    try:
        group = mx.distributed.init(strict=True)
    except (RuntimeError, ValueError) as e:  # no backend configured: MLX_HOSTFILE missing or unreadable
        raise Qwen35Error(f"rank {rank}: cannot start mx.distributed ({e}); start the ranks with mlx.launch") from None
    finally:
        watchdog.disarm()
    size, hosts = group.size(), rank_hosts(group.size())
    free = free_bytes if free_bytes is not None else free_memory_bytes()
    frees = [int(f) for f in mx.distributed.all_gather(mx.array([float(free)]), group=group).tolist()]
    num_layers, stored = config.text.num_hidden_layers, stored_bytes(model_dir)
    if mode != "pipeline":
        check = check_expert_split if mode == "expert" else check_tensor_split
        check(config.text, size, (config.quantization or {}).get("group_size"))
        shares = [RankShare(mode, r, size, range(num_layers), group) for r in range(size)]
    else:
        layer_bytes, end_bytes = layer_and_end_bytes(stored, num_layers)
        counts = parse_split(split, num_layers, size) if split else proportional_split(layer_bytes, end_bytes, frees)
        runs = stages(counts)
        check_stages(config, runs, hosts)
        shares = [RankShare("pipeline", r, size, runs[r], group) for r in range(size)]
    check_fits(shares, stored, frees, hosts, config.text)
    progress = _environment_seconds("MLX_QWEN35_RANK_TIMEOUT", PROGRESS_TIMEOUT_S)
    neighbours = sorted({(rank - 1) % size, (rank + 1) % size} - {rank})
    stalled = (
        f"no forward pass finished for {progress:.0f} s; a peer ("
        + ", ".join(f"rank {r} at {hosts[r]}" for r in neighbours)
        + ") stopped responding"
    )
    return dataclasses.replace(shares[rank], on_forward=lambda: watchdog.arm(progress, stalled))


def launched() -> bool:
    """Whether this process is one rank of several started by mlx.launch (or mpirun)."""
    return "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def join_launched(parallel: str | None, split: str | None, model: str) -> RankShare | None:
    """The surfaces' entry: this rank's share under mlx.launch (pipeline by default), None in a one-process run."""
    if not launched():
        if parallel is not None or split is not None:
            raise Qwen35Error(
                "--parallel / --split need several ranks: mlx.launch --hostfile hosts.json -- mlx-qwen35 "
                "generate ... --parallel pipeline (README, 'Several Macs')"
            )
        return None
    from ..weights.hub import resolve_checkpoint

    share = join(parallel or "pipeline", resolve_checkpoint(model, None, argument="--model"), split)
    if not share.leads:  # only rank 0 prints; the others' errors still reach their standard error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return share


def shared_sampler(
    sampler: Callable[[mx.array], mx.array], share: RankShare, end_token: int
) -> Callable[[mx.array], mx.array]:
    """Rank 0's sampled token on every rank (one all_sum of a token per step), so all ranks decode the same text.

    A pipeline follower's logits are placeholders; its own draw only keeps its messages in the graph. Once rank 0
    has called ``stop_reply``, the token it gives is ``end_token`` (an end-of-text id): every rank ends the reply there.
    """
    global _stopping
    _stopping = False  # a new reply

    def sample(logprobs: mx.array) -> mx.array:
        token = sampler(logprobs)
        mine = (token * 0 + end_token if _stopping else token) if share.leads else token * 0
        return mx.distributed.all_sum(mine, group=share.group)

    return sample


def stop_reply() -> None:
    """Rank 0: end the reply in progress on every rank; keep reading it, it ends within two tokens.

    The step after the one being computed is the first whose token can still change (each step is dispatched one
    ahead), so every rank reads one more token, then the end-of-text one, and undoes the step run ahead on it as at
    the model's own end: all caches hold the same tokens for the next prompt.
    """
    global _stopping
    _stopping = True


def broadcast_bytes(data: bytes | None, share: RankShare) -> bytes:
    """Rank 0's ``data`` on every rank (the others pass None): two all_sums, its length then its bytes."""
    length = int(mx.distributed.all_sum(mx.array([len(data) if share.leads else 0]), group=share.group).item())
    if length == 0:
        return b""
    mine = np.frombuffer(data, dtype=np.uint8) if share.leads else np.zeros(length, dtype=np.uint8)
    return bytes(np.array(mx.distributed.all_sum(mx.array(mine), group=share.group)))


def broadcast_text(text: str | None, share: RankShare) -> str:
    """Rank 0's text (read from its standard input, say) on every rank."""
    data = text.encode("utf-8", errors="surrogateescape") if share.leads else None
    return broadcast_bytes(data, share).decode("utf-8", errors="surrogateescape")


def peer_lost(share: RankShare, error: BaseException) -> Qwen35Error | None:
    """The ring backend's lost-peer RuntimeError as our one-line error naming this rank and its neighbours."""
    if not isinstance(error, RuntimeError) or not str(error).startswith(_BACKEND_TAGS):
        return None
    hosts = rank_hosts(share.size)
    neighbours = sorted({(share.rank - 1) % share.size, (share.rank + 1) % share.size} - {share.rank})
    return Qwen35Error(
        f"rank {share.rank} ({hosts[share.rank]}) lost the connection to "
        + " / ".join(f"rank {r} ({hosts[r]})" for r in neighbours)
        + f" mid-generation ({error}); that rank died or its host left the network: check its log, restart every rank"
    )


def exit_on_lost_peer(share: RankShare, error: BaseException) -> None:
    """A serving rank whose peer is gone cannot serve again: print the one-line error and end the process."""
    if (lost := peer_lost(share, error)) is not None:
        sys.stderr.write(f"error: {lost}\n")
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)


@contextmanager
def rank_errors(share: RankShare | None) -> Iterator[None]:
    """A lost peer as our one-line error (``peer_lost``); other errors pass through unchanged."""
    try:
        yield
    except RuntimeError as e:
        lost = peer_lost(share, e) if share is not None else None
        if lost is None:
            raise
        raise lost from None
    finally:
        idle()


def idle() -> None:
    """Between generations a rank may wait for input as long as it likes: the progress deadline is off."""
    if _watchdog is not None:
        _watchdog.disarm()
