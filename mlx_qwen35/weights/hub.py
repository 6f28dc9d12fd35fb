"""Find a checkpoint: a local directory as is, or a Hugging Face Hub repo id (local cache first, offline when there)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import Qwen35Error

# What a checkpoint needs from the Hub: weights, configs, tokenizer and chat template files.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_checkpoint(
    path_or_repo: str, revision: str | None = None, patterns: list[str] | None = None, argument: str = "--hf-path"
) -> Path:
    """The checkpoint directory for ``path_or_repo``; errors name the ``argument`` it came from."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise Qwen35Error(
                f"{argument} {path_or_repo}: not a directory; give the checkpoint directory or a Hub repo id"
            )
        return path
    if path_or_repo.startswith((".", "/", "~")) or not _REPO_ID.match(path_or_repo):  # a path, not an id
        raise Qwen35Error(
            f"{argument} {path_or_repo}: no such directory; give a local checkpoint directory or a Hub repo id like Qwen/Qwen3.5-35B-A3B"
        )
    from huggingface_hub import snapshot_download

    patterns = patterns or HUB_PATTERNS
    try:
        local = Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=patterns, local_files_only=True))
        if patterns != HUB_PATTERNS or any(local.glob("*.safetensors")):
            return local
    except Exception:  # not (fully) cached: download below
        pass
    try:
        return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise Qwen35Error(
            f"{argument} {path_or_repo}: could not fetch it from the Hugging Face Hub ({type(e).__name__}); check the "
            f"repo id and your network, or log in with `hf auth login` for a gated repo"
        ) from None
