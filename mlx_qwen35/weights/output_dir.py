"""An output directory written atomically and replaced safely: where converted checkpoints (and the demo) land.

The new directory is built in ``.NAME.partial-PID`` beside the target (the same filesystem, so the final
rename is atomic) and takes the target's place only once it is complete: the old one is renamed to
``.NAME.old-PID``, the new one into place, then the old one is deleted. Nothing a user keeps there can be
lost: an existing target is replaced only if a converter wrote it (ours, mlx-lm's or mlx-vlm's) and it is
not, does not hold and does not lie inside the source checkpoint. A symlinked target is followed: the
output replaces what the link points at, beside it, and the link stays.

An interrupted run leaves nothing: an exception or Ctrl-C removes the staging dir, and so does SIGTERM
(after which the signal is delivered again, so the process still ends the way SIGTERM ends it). What a
SIGKILL leaves is found by the next run beside the same target (its PID no longer runs) and removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from ..errors import Qwen35Error
from .layout import read_safetensors_header

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")


class _Terminated(BaseException):
    """Raised by our SIGTERM handler so that the staging dir is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def is_model_output_dir(path: Path) -> bool:
    """True for a directory a converter wrote: ours (config.json has ``mlx_qwen35``), or mlx-lm's / mlx-vlm's (every shard tagged ``format: mlx``)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    if "mlx_qwen35" in config:
        return True
    shards = sorted(path.glob("*.safetensors"))
    return bool(shards) and all(_written_by_mlx(s) for s in shards)


def _written_by_mlx(shard: Path) -> bool:
    try:
        header, _ = read_safetensors_header(shard)
    except (OSError, Qwen35Error):
        return False
    metadata = header.get("__metadata__")
    return isinstance(metadata, dict) and metadata.get("format") == "mlx"


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier call in this process: nothing of it is still being written
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class OutputDir:
    """``with OutputDir(target, ...) as staging:`` write into ``staging``; on success it becomes ``target``.

    The constructor (which also clears what killed runs left) and ``protect`` do every check that can
    refuse, so a caller runs them before any slow work. ``argument`` and ``overwrite_flag`` name, in
    messages, what the user set to choose the target and to allow replacing it.
    """

    def __init__(
        self,
        target: str | Path,
        *,
        overwrite: bool = False,
        sources: tuple[Path, ...] = (),
        argument: str = "--mlx-path",
        overwrite_flag: str = "--overwrite",
        source_argument: str = "--hf-path",
        replaceable: Callable[[Path], bool] = is_model_output_dir,
    ):
        self.target = Path(target).expanduser()  # as the user wrote it, for messages
        self.path = self.target.resolve()  # where the files go: a symlinked target is followed
        self.argument, self.overwrite_flag, self.source_argument = argument, overwrite_flag, source_argument
        self.overwrite = overwrite
        self._replaceable = replaceable
        self._staging: Path | None = None
        self._previous_handler = None
        if self.path.parent.is_dir():
            try:
                self._remove_leftovers()
            except OSError as e:
                raise self._unwritable(e) from None
        if self.path.is_file():
            raise Qwen35Error(f"{self._name}: is a file, not a directory; choose another {argument}")
        if self.path.exists() and not overwrite:
            raise Qwen35Error(
                f"{self._name}: already exists; pass {overwrite_flag} to replace it or choose another path"
            )
        for source in sources:
            self.protect(source)
        self._check_replaceable()

    @property
    def where(self) -> str:
        """The target as the user named it, and where it really is when a symlink leads elsewhere."""
        if self.path != Path(os.path.abspath(self.target)):
            return f"{self.target} (→ {self.path})"
        return str(self.target)

    @property
    def _name(self) -> str:
        return f"{self.argument} {self.where}"

    def protect(self, source: Path) -> None:
        """Refuse a target that is, holds or (when replacing it) lies inside ``source`` or the files its links point at."""
        source = Path(source).expanduser()
        protected = {source.resolve()}
        if source.is_dir():
            protected |= {f.resolve().parent for f in source.iterdir() if f.is_symlink()}  # the Hub cache's blobs
        fix = f"choose another {self.argument}"
        for p in sorted(protected):
            if p == self.path:
                raise Qwen35Error(f"{self._name}: is the {self.source_argument} checkpoint itself; {fix}")
            if p.is_relative_to(self.path):
                raise Qwen35Error(f"{self._name}: holds the {self.source_argument} checkpoint ({p}); {fix}")
            if self.path.exists() and self.path.is_relative_to(p):
                raise Qwen35Error(
                    f"{self._name}: lies inside the {self.source_argument} checkpoint ({p}); {self.overwrite_flag} "
                    f"will not replace anything there, {fix}"
                )

    def _check_replaceable(self) -> None:
        if not self.path.exists() or not any(self.path.iterdir()) or self._replaceable(self.path):
            return
        raise Qwen35Error(
            f"{self._name}: not a converted checkpoint (no config.json written by mlx-qwen35, mlx-lm or mlx-vlm), "
            f"so {self.overwrite_flag} will not delete it; remove it yourself or choose another {self.argument}"
        )

    # ------------------------------------------------------------------------------------------ writing

    def __enter__(self) -> Path:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._staging = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
            self._staging.mkdir()
        except OSError as e:
            raise self._unwritable(e) from None
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # never override someone else's handler
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self._staging

    def _unwritable(self, e: OSError) -> Qwen35Error:
        return Qwen35Error(
            f"{self.argument} {self.target}: cannot write in {self.path.parent} ({e.strerror or e}); "
            f"choose a writable {self.argument}"
        )

    def _on_sigterm(self, signum: int, frame) -> None:
        raise _Terminated(signum)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        ours = self._previous_handler is not None  # an enclosing OutputDir may hold SIGTERM instead
        if ours:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        staging, self._staging = self._staging, None
        if exc_type is None:
            try:
                self._move_into_place(staging)
                return
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, _Terminated) and ours:
            signal.raise_signal(exc.signum)  # the default action again: the process ends as SIGTERM ends it

    def _move_into_place(self, staging: Path) -> None:
        # Again: the target may have appeared or changed while we wrote.
        if self.path.exists() and not self.overwrite:
            raise Qwen35Error(f"{self._name}: appeared while writing; pass {self.overwrite_flag} to replace it")
        self._check_replaceable()
        old = None
        try:
            if self.path.exists():
                old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
                self.path.rename(old)
            try:
                staging.rename(self.path)
            except OSError:
                if old is not None:
                    old.rename(self.path)
                raise
        except OSError as e:
            raise Qwen35Error(
                f"{self._name}: could not move the new output into place ({e.strerror or e}); "
                f"check the permissions of {self.path.parent}"
            ) from None
        if old is not None:
            try:
                shutil.rmtree(old)
            except OSError as e:
                print(
                    f"warning: could not delete the previous output {old} ({e.strerror or e}); delete it yourself",
                    file=sys.stderr,
                )

    def _remove_leftovers(self) -> None:
        """Remove what interrupted runs with this target left beside it (their PID no longer runs)."""
        removed, restored = [], None
        for p in sorted(self.path.parent.iterdir()):
            m = _LEFTOVER.match(p.name)
            if m is None or m["name"] != self.path.name or _is_running(int(m["pid"])):
                continue
            if m["kind"] == "old" and not self.path.exists():
                p.rename(self.path)  # killed between the two renames: the old output is the only one
                restored = p.name
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p.name)
        if removed or restored:
            what = [f"removed {', '.join(removed)}"] if removed else []
            what += [f"restored {self.path.name} from {restored}"] if restored else []
            print(
                f"note: {'; '.join(what)} in {self.path.parent}, left by an interrupted run (its process is gone)",
                file=sys.stderr,
            )
