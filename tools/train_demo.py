"""Train the demo model: a tiny Qwen3.5 MoE (with its MTP head) on the standard library's docstrings.

    PYTHONPATH=. .venv/bin/python tools/train_demo.py [--steps N] [--out mlx_qwen35/surfaces/demo_model]
        [--metrics tools/demo_metrics.json]

Not part of the installed package: it needs torch and transformers (the test extras). Seeded and
deterministic on one machine (fixed step count, 2 threads). Writes the released Hugging Face layout
— fused experts, ``mtp.*``, a random vision tower, bf16 — so `mlx-qwen35 demo` runs our converter on it.
The corpus and its licence: tools/CORPUS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from demo_corpus import Doc, first_paragraph, stdlib_docs  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig  # noqa: E402
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (  # noqa: E402
    Qwen3_5MoeDecoderLayer,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeRMSNorm,
)

from mlx_qwen35.surfaces.demo import DEMO_SEED, demo_config  # noqa: E402
from mlx_qwen35.weights.random_checkpoint import (  # noqa: E402
    LM,
    hf_tensor_shapes,
    random_parameter,
    tokenizer_base_size,
    write_release_files,
    write_shards,
)
from mlx_qwen35.weights.tokenizer_builder import write_tokenizer_files  # noqa: E402

SEQ_LEN = 256
BATCH = 16
LEARNING_RATE = 3e-3
MTP_LOSS_WEIGHT = 0.3
CHAT_EVERY = 2  # every 2nd training document is a chat turn (question → docstring summary), the rest raw text


def trained_demo_config() -> dict:
    """demo_config() reshaped to the flagship's proportions in ~16 MB of bf16.

    4 layers (3 DeltaNet : 1 gated attention); DeltaNet QK:V heads 1:4 (2 : 8 of 64); attention head dim 256
    with a quarter rotary (64 dims, M-RoPE sections 11/11/10 as released); 32 experts of 32, top-4, plus the
    shared expert; Qwen's own router balancing weight (0.001), so routing keeps the skew an expert cache meets.
    """
    config = demo_config()
    text = config["text_config"]
    text["layer_types"] = ["linear_attention"] * 3 + ["full_attention"]
    text["num_hidden_layers"] = 4
    text["linear_num_key_heads"] = 2
    text["linear_num_value_heads"] = 8
    text["num_attention_heads"] = 2
    text["num_key_value_heads"] = 1
    text["head_dim"] = 256
    text["rope_parameters"]["mrope_section"] = [11, 11, 10]
    text["num_experts"] = 32
    text["num_experts_per_tok"] = 4
    text["moe_intermediate_size"] = 32
    text["router_aux_loss_coef"] = 0.001
    return config


def chat_text(doc: Doc) -> str:
    """A chat turn in the family's template, with the empty thinking block of a non-thinking answer."""
    return (
        f"<|im_start|>user\n{doc.question}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        f"{first_paragraph(doc.text)}<|im_end|>\n"
    )


def documents(docs: list[Doc]) -> list[str]:
    """Training texts: each docstring as raw text, and every CHAT_EVERY-th one also as a chat turn."""
    texts = [f"{doc.name}\n{doc.text}<|endoftext|>" for doc in docs]
    texts += [chat_text(doc) for i, doc in enumerate(docs) if i % CHAT_EVERY == 0]
    return texts


def token_stream(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """All texts tokenized and concatenated (documents end in <|endoftext|> or <|im_end|>)."""
    return np.concatenate([np.array(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(texts)])


class MTPHead(nn.Module):
    """Our model/mtp.py in torch: d = norm(Layer(fc([norm_e(embed(x_{t+1})), norm_h(h_t)]))), predicts x_{t+2}."""

    def __init__(self, config: Qwen3_5MoeTextConfig):
        super().__init__()
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = Qwen3_5MoeRMSNorm(hidden, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = Qwen3_5MoeRMSNorm(hidden, eps=config.rms_norm_eps)
        attention_layer = config.layer_types.index("full_attention")
        self.layers = nn.ModuleList([Qwen3_5MoeDecoderLayer(config, attention_layer)])
        self.norm = Qwen3_5MoeRMSNorm(hidden, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, position_embeddings) -> torch.Tensor:
        z = self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        for layer in self.layers:
            z = layer(z, position_embeddings=position_embeddings, attention_mask=None)
        return self.norm(z)


def losses(
    model: Qwen3_5MoeForCausalLM, mtp: MTPHead, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(next-token loss, MTP t+2 loss, router load-balancing loss) on a batch [B, T]."""
    out = model.model(input_ids=ids, output_router_logits=True)
    hidden = out.last_hidden_state  # final-norm states, what the MTP head reads
    logits = model.lm_head(hidden)
    main = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    # MTP at position t+1: the embedding of x_{t+1} with the trunk's state at t, scored against x_{t+2}.
    positions = torch.arange(1, ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, ids.shape[0], -1)
    cos_sin = model.model.rotary_emb(hidden, positions)
    drafted = mtp(hidden[:, :-1], model.model.embed_tokens(ids[:, 1:]), cos_sin)
    mtp_logits = model.lm_head(drafted[:, :-1])
    mtp_loss = nn.functional.cross_entropy(mtp_logits.flatten(0, 1), ids[:, 2:].flatten())
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

    balance = load_balancing_loss_func(out.router_logits, model.config.num_experts, model.config.num_experts_per_tok)
    return main, mtp_loss, balance


def batches(stream: np.ndarray, rng: np.random.Generator, steps: int):
    """`steps` batches of BATCH random windows of SEQ_LEN tokens."""
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - SEQ_LEN, BATCH)
        yield torch.from_numpy(np.stack([stream[s : s + SEQ_LEN] for s in starts]))


@torch.no_grad()
def evaluate(model: Qwen3_5MoeForCausalLM, mtp: MTPHead, stream: np.ndarray) -> dict[str, float]:
    """Held-out next-token loss, MTP loss and MTP top-1 accuracy over consecutive windows."""
    windows = torch.from_numpy(stream[: len(stream) // SEQ_LEN * SEQ_LEN].reshape(-1, SEQ_LEN))
    main, mtp_loss = [], []
    for chunk in windows.split(BATCH):
        m, t, _ = losses(model, mtp, chunk)
        main.append(m.item() * len(chunk))
        mtp_loss.append(t.item() * len(chunk))
    return {"loss": sum(main) / len(windows), "mtp_loss": sum(mtp_loss) / len(windows), "windows": len(windows)}


def hf_state(model: Qwen3_5MoeForCausalLM, mtp: MTPHead) -> dict[str, torch.Tensor]:
    """The trained tensors under their released names (model.language_model.*, lm_head, mtp.*)."""
    state = {}
    for name, value in model.state_dict().items():
        state[name if name == "lm_head.weight" else LM + name.removeprefix("model.")] = value
    state |= {f"mtp.{name}": value for name, value in mtp.state_dict().items()}
    return state


def write_checkpoint(out: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """The released layout: trained LM + MTP tensors, seeded random vision tower, all bf16, plus every config file."""
    from safetensors.torch import save_file

    write_release_files(out, config)
    rng = np.random.default_rng(DEMO_SEED)
    tensors = {}
    for name, shape in hf_tensor_shapes(config, "fused").items():
        value = state[name] if name in state else torch.from_numpy(random_parameter(name, shape, rng))
        assert tuple(value.shape) == shape, (name, tuple(value.shape), shape)
        tensors[name] = value.detach().to(torch.bfloat16).contiguous()
    missing = set(state) - set(tensors)
    assert not missing, f"trained tensors the layout does not name: {sorted(missing)[:5]}"
    write_shards(tensors, out, 64 * 1024**2, save_file)


def main() -> None:
    """Train, evaluate on the held-out split, write the checkpoint and metrics.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--out", type=Path, default=Path("mlx_qwen35/surfaces/demo_model"))
    parser.add_argument("--metrics", type=Path, default=Path(__file__).with_name("demo_metrics.json"))
    args = parser.parse_args()
    torch.manual_seed(DEMO_SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    config = trained_demo_config()
    args.out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(args.out, base_vocab_size=tokenizer_base_size(config))
    tokenizer = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    docs = stdlib_docs()
    train = token_stream(tokenizer, documents([d for d in docs if not d.held_out]))
    held_out = token_stream(tokenizer, [f"{d.name}\n{d.text}<|endoftext|>" for d in docs if d.held_out])
    print(f"{len(docs)} docs; train {len(train)} tokens, held out {len(held_out)} tokens", flush=True)

    text_config = Qwen3_5MoeTextConfig(**config["text_config"])
    text_config._experts_implementation = "grouped_mm"  # sorted by expert: no per-token weight gather
    model = Qwen3_5MoeForCausalLM(text_config).float()
    mtp = MTPHead(text_config).float()
    mtp.apply(model._init_weights)
    params = [*model.parameters(), *mtp.parameters()]
    print(f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters", flush=True)
    random_metrics = evaluate(model, mtp, held_out[: SEQ_LEN * BATCH])
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )
    rng = np.random.default_rng(DEMO_SEED)
    start = time.time()
    for step, ids in enumerate(batches(train, rng, args.steps)):
        main_loss, mtp_loss, balance = losses(model, mtp, ids)
        loss = main_loss + MTP_LOSS_WEIGHT * mtp_loss + text_config.router_aux_loss_coef * balance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(
                f"step {step} loss {main_loss.item():.3f} mtp {mtp_loss.item():.3f} "
                f"balance {balance.item():.3f} {time.time() - start:.0f}s",
                flush=True,
            )
    model.eval()
    trained_metrics = evaluate(model, mtp, held_out)
    metrics = {
        "steps": args.steps,
        "train_tokens": int(len(train)),
        "held_out_tokens": int(len(held_out)),
        "parameters": sum(p.numel() for p in params),
        "random": random_metrics,
        "trained": trained_metrics,
        "train_seconds": round(time.time() - start),
        "python": sys.version.split()[0],
    }
    print(json.dumps(metrics, indent=2), flush=True)
    write_checkpoint(args.out, config, hf_state(model, mtp))
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
