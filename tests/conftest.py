"""Session-wide fixtures: the tiny checkpoints every parity test runs on, built once per session.

Each fixture returns a ``tests.checkpoints.TinyCheckpoint``: ``.path`` (the checkpoint dir), ``.layout``,
``.config`` (config.json as a dict), ``.tokens`` (tokenizer size and special ids), ``.reference_path``
and ``.load_reference(dtype)`` (transformers model, eval) and ``.prompt_ids(n)``. ``references(ckpt)``
gives its transformers models in float32 and float64, loaded once per session (``tests/parity.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from checkpoints import (
    TinyCheckpoint,
    build_per_expert_checkpoint,
    rewrite_fp8,
    rewrite_fused,
)
from parity import References

# Seeds are chosen for a clear greedy top-1 margin: the smallest top-1 − top-2 logit gap along
# transformers' 32-token greedy path from 24- and 64-token prompts is ≥ 0.0138 (over other seeds it
# ranges 1e-4 … 0.08, since logits have unit scale, see random_checkpoint.LM_HEAD_STD).
# The FP8 checkpoint is wider than the others so its 128×128 scale blocks come in full and partial
# sizes on both axes (hidden 144 = 128 + 16, expert intermediate 160 = 128 + 32).
FP8_HIDDEN_SIZE = 144
FP8_MOE_INTERMEDIATE_SIZE = 160


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every cache and state file the package writes (kernel self-checks, benchmark checkpoints, chat history)
    goes to the session's temp dir, never the user's ~/.cache or ~/.local/state; a test's own XDG_* still wins."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))  # chat history, saved sessions
        yield


@pytest.fixture(scope="session")
def references() -> References:
    """``references(ckpt)``: the checkpoint's transformers models in float32 and float64, each loaded once."""
    return References()


@pytest.fixture(scope="session")
def tiny_moe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """MoE (``qwen3_5_moe``), per-expert keys as transformers' save_pretrained writes them, plus ``mtp.*``."""
    return build_per_expert_checkpoint(tmp_path_factory.mktemp("tiny-moe"), moe=True, seed=11)


@pytest.fixture(scope="session")
def tiny_dense_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """Dense (``qwen3_5``) with tied embeddings like the 0.8B, plus ``mtp.*`` (dense MLP)."""
    return build_per_expert_checkpoint(tmp_path_factory.mktemp("tiny-dense"), moe=False, seed=8)


@pytest.fixture(scope="session")
def tiny_moe_fused_checkpoint(
    tiny_moe_checkpoint: TinyCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> TinyCheckpoint:
    """The MoE checkpoint rewritten into the fused-expert layout of the BF16 release (same weights)."""
    return rewrite_fused(tiny_moe_checkpoint, tmp_path_factory.mktemp("tiny-moe-fused"))


@pytest.fixture(scope="session")
def tiny_moe_fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """A (wider) MoE checkpoint in the block-FP8 layout; ``reference_path`` holds its exact dequantised fp32 twin."""
    source = build_per_expert_checkpoint(
        tmp_path_factory.mktemp("tiny-moe-fp8-source"),
        moe=True,
        seed=4,
        hidden_size=FP8_HIDDEN_SIZE,
        moe_intermediate_size=FP8_MOE_INTERMEDIATE_SIZE,
    )
    return rewrite_fp8(
        source, tmp_path_factory.mktemp("tiny-moe-fp8"), tmp_path_factory.mktemp("tiny-moe-fp8-dequantized")
    )
