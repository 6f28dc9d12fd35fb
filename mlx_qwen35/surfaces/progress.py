"""Progress of a long prefill in the terminal: tokens done, tokens/s and the time left, as a rich bar.

Prefill runs in chunks of ``prefill_step_size`` tokens and asks its ``should_stop`` before each one
(runtime/generation.py ``prefill``); ``PrefillProgress`` is that callback. It reads how many tokens
the cache holds (exact, whatever the checkpoints split the prompt into), reports them, and answers
whether the user asked to stop (Ctrl-C), so a stop lands at the next chunk boundary.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..model.cache import cache_length

BAR_AFTER_CHUNKS = 2  # a prompt of one or two chunks is over before a bar would tell anything


def prefill_bar(done: int, total: int, seconds: float) -> RenderableType:
    """One line: label, bar, ``done/total tokens · N tok/s · ETA S s``."""
    speed = done / seconds if seconds > 0 else 0.0
    eta = f"{(total - done) / speed:.0f} s" if speed > 0 else "…"
    line = Table.grid(padding=(0, 1))
    line.add_row(
        Text("reading the prompt", style="cyan"),
        ProgressBar(total=max(total, 1), completed=done, width=30),
        Text(f"{done}/{total} tokens · {speed:.0f} tok/s · ETA {eta}", style="cyan"),
    )
    return line


class PrefillProgress:
    """A prefill's ``should_stop``: reports (done, total, seconds) to ``show`` once the prompt spans several chunks."""

    def __init__(
        self,
        cache: list,
        prompt_tokens: int,
        step_size: int,
        show: Callable[[RenderableType], None],
        stop_requested: Callable[[], bool] = lambda: False,
    ):
        self.cache = cache
        self.prompt_tokens = prompt_tokens
        self.step_size = step_size
        self.show = show
        self.stop_requested = stop_requested
        self._base: int | None = None  # tokens the cache held when the prefill began (a reused prefix)
        self._started = 0.0

    def __call__(self) -> bool:
        held = cache_length(self.cache)
        if self._base is None:
            self._base, self._started = held, time.perf_counter()
        total = max(self.prompt_tokens - self._base, 0)
        if total > BAR_AFTER_CHUNKS * self.step_size:
            done = min(held - self._base, total)
            self.show(prefill_bar(done, total, time.perf_counter() - self._started))
        return self.stop_requested()


class StatusLine:
    """A transient line on standard error (the bar while ``generate`` prefills); nothing when it is not a terminal."""

    def __init__(self):
        self._live = None

    def show(self, renderable: RenderableType) -> None:
        """Draw ``renderable`` in place of what the line showed before."""
        from rich.console import Console
        from rich.live import Live

        if self._live is None:
            self._live = Live(console=Console(stderr=True), transient=True, auto_refresh=False)
            self._live.start()
        self._live.update(renderable, refresh=True)

    def close(self) -> None:
        """Clear the line."""
        if self._live is not None:
            self._live.stop()
            self._live = None
