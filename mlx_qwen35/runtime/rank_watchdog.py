"""A rank's watchdog, in a process of its own: ``python -m mlx_qwen35.runtime.rank_watchdog PID RANK``.

A rank stuck in a collective is inside MLX's C++ holding the GIL, so no thread of its own can act; this
small process reads ``arm SECONDS MESSAGE`` / ``disarm`` lines on its standard input and, when an armed
deadline passes, prints the message as the rank's one-line error and kills the rank. It exits when the
rank closes the pipe (the rank ended). Imports nothing but the standard library.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time


def watch(pid: int, rank: str) -> None:
    """Kill ``pid`` with a message when its armed deadline passes; return when its pipe closes."""
    deadline, message, pending = None, "", b""
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([sys.stdin.buffer], [], [], timeout)
        if not ready:
            sys.stderr.write(f"error: rank {rank}: {message}\n")
            sys.stderr.flush()
            os.kill(pid, signal.SIGKILL)
            return
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:
            return
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            command, _, rest = line.decode().partition(" ")
            if command == "arm":
                seconds, _, message = rest.partition(" ")
                deadline = time.monotonic() + float(seconds)
            else:
                deadline = None


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
