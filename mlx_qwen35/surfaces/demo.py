"""`mlx-qwen35 demo`: prove an install works end to end, with no download.

Converts (once, into the user cache) the tiny Qwen3.5 MoE shipped in ``demo_model/`` — trained by
tools/train_demo.py on the Python standard library's docstrings, in the released Hugging Face layout
(fused experts, ``mtp.*``, a random vision tower, bf16) — to 4-bit with our converter, loads it and
streams its answer to a fixed question; ``demo --chat`` then opens the REPL on it, and ``serve`` without
a model serves it (the chat page's zero-config default). ``demo_config`` (the random-weight shape) also sizes the
``bench`` presets and the image-memory benchmark.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..weights.layout import padded_vocab_size
from ..weights.tokenizer_builder import QWEN_ADDED_TOKENS

DEMO_VERSION = 3  # bump when the demo checkpoint changes, so stale caches are rebuilt
DEMO_SEED = 0
DEMO_BASE_VOCAB = 1000
DEMO_PROMPT = "What does shutil.rmtree do?"  # a chat-shaped training question (tools/demo_corpus.py)
DEMO_SERVED_NAME = "mlx-qwen35-demo"  # the model id /v1/models reports for it
DEMO_CHAT_MAX_TOKENS = 256  # a reply of the corpus's kind is one docstring paragraph
DEMO_WEIGHTS_DIR = Path(__file__).with_name("demo_model")  # HF layout, written by tools/train_demo.py


def demo_cache_dir() -> Path:
    """Where the demo checkpoint lives: ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/mlx-qwen35/demo/``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mlx-qwen35" / "demo"


def demo_model_dir() -> Path:
    """The demo's converted (4-bit MLX) checkpoint: the model path that ``chat``, ``serve`` and ``generate`` accept."""
    return demo_cache_dir() / f"v{DEMO_VERSION}" / "mlx-4bit"


def demo_config() -> dict:
    """config.json of the demo model: the real MoE architecture (qwen3_5_moe) at a laptop-instant size."""
    special = {token: DEMO_BASE_VOCAB + i for i, (token, _) in enumerate(QWEN_ADDED_TOKENS)}
    tokenizer_size = DEMO_BASE_VOCAB + len(QWEN_ADDED_TOKENS)
    layer_types = (["linear_attention"] * 3 + ["full_attention"]) * 2
    text = {
        "model_type": "qwen3_5_moe_text",
        "vocab_size": padded_vocab_size(tokenizer_size),  # rows past the tokenizer are padding, as released
        "hidden_size": 256,
        "num_hidden_layers": len(layer_types),
        "layer_types": layer_types,
        "full_attention_interval": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "linear_conv_kernel_dim": 4,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        # rotary dim 64 · 0.25 = 16 → 8 frequencies, split T/H/W = 3/3/2 (interleaved)
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [3, 3, 2],
            "mrope_interleaved": True,
        },
        "partial_rotary_factor": 0.25,
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "mamba_ssm_dtype": "float32",
        "tie_word_embeddings": False,
        "eos_token_id": special["<|endoftext|>"],
        "dtype": "bfloat16",
    }
    vision = {
        "model_type": "qwen3_5_moe",  # the legacy name the releases carry
        "depth": 2,
        "hidden_size": 64,
        "num_heads": 2,
        "intermediate_size": 128,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 64,
        "out_hidden_size": 256,
        "deepstack_visual_indexes": [],
    }
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": special["<|image_pad|>"],
        "video_token_id": special["<|video_pad|>"],
        "vision_start_token_id": special["<|vision_start|>"],
        "vision_end_token_id": special["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def build_demo(target: Path) -> None:
    """Write the shipped checkpoint's 4-bit conversion under ``target`` (atomically: staged, then renamed)."""
    from ..weights.convert import convert
    from ..weights.output_dir import OutputDir, is_model_output_dir

    # Replaces only an earlier demo build (--rebuild), never something else that sits at the cache path.
    output = OutputDir(
        target,
        overwrite=True,
        argument="XDG_CACHE_HOME",
        overwrite_flag="--rebuild",
        replaceable=lambda p: is_model_output_dir(p / "mlx-4bit"),
    )
    with output as staging:
        print(f"building the demo checkpoint in {target} (once, from the weights in the package; no download)…")
        convert(
            hf_path=str(DEMO_WEIGHTS_DIR),
            mlx_path=staging / "mlx-4bit",
            recipe="4bit",
            shard_size_gb=0.01,
        )


def ensure_demo_model(rebuild: bool = False) -> Path:
    """The demo's converted checkpoint, built first from the package's weights if missing (or ``rebuild``)."""
    model_dir = demo_model_dir()
    if rebuild or not model_dir.parent.exists():
        build_demo(model_dir.parent)
    return model_dir


def serve_default_model() -> str:
    """What ``serve`` runs when given no model: the demo checkpoint, said plainly on stderr."""
    model_dir = ensure_demo_model()
    print(
        "no model given: serving the demo model (tiny, trained here on the Python docs; not Qwen's weights). "
        "Give MODEL to serve a real one.",
        file=sys.stderr,
    )
    return str(model_dir)


def run_demo(max_tokens: int = 48, rebuild: bool = False, chat: bool = False) -> None:
    """Build the demo checkpoint if needed, stream a generation from it through the whole stack; then the REPL if ``chat``."""
    from ..runtime.generation import stream_generate
    from ..weights.loading import load

    model_dir = ensure_demo_model(rebuild)
    model, processor = load(str(model_dir))
    print(
        "\nThis is NOT Qwen's model: it is a tiny (a few million parameters) Qwen3.5-architecture model — hybrid Gated"
    )
    print("DeltaNet + attention, sparse MoE, 4-bit — trained here on the Python standard library's docstrings.")
    print("It answers in their style, not always correctly.\n")
    messages = [{"role": "user", "content": DEMO_PROMPT}]
    print(f"user: {DEMO_PROMPT}\nassistant: ", end="", flush=True)
    response = None
    for response in stream_generate(model, processor, messages, max_tokens=max_tokens, enable_thinking=False):
        sys.stdout.write(response.text)
        sys.stdout.flush()
    print()
    if response is not None:
        print(
            f"\nprompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s | "
            f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s | "
            f"peak memory {response.peak_memory:.2f} GB"
        )
    if not chat:
        print(next_steps(model_dir))
        return
    from .repl import run_chat

    print("\nNow ask it about the standard library (e.g. 'What does os.getcwd do?'); /help lists the commands.\n")
    # Trained on answers with an empty thinking block: thinking off is the form it knows.
    run_chat(
        model=str(model_dir),
        system=None,
        enable_thinking=False,
        thinking_budget=None,
        hide_thinking=False,
        max_tokens=DEMO_CHAT_MAX_TOKENS,
        sampling_overrides={},
        seed=None,
        max_kv_size=None,
        kv_bits=None,
        sessions_dir=None,
    )


def next_steps(model_dir: Path) -> str:
    """Where the demo model lives and three commands to try on it."""
    import shlex

    path = shlex.quote(str(model_dir))
    return (
        f"\nThe demo model is at {model_dir}\nTry it:\n"
        f"  mlx-qwen35 chat {path}\n"
        f"  mlx-qwen35 serve {path}     # then open http://127.0.0.1:8080\n"
        f"  mlx-qwen35 generate {path} --image PHOTO.png -p 'What is in this picture?'\n"
        "Then a real model: mlx-qwen35 chat mlx-community/Qwen3.5-0.8B-4bit (a download)."
    )
