"""The multi-token-prediction head: one extra decoder layer that drafts token t+2 (docs/architecture.md §9)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from ..config import TextConfig
from .language import DecoderLayer
from .norms import RMSNorm1p
from .rope import MRoPE, text_positions


class MTP(nn.Module):
    """d = norm(Layer(fc([norm_e(embed(x_{t+1})), norm_h(h_t)]))); logits_{t+2} = lm_head(d).

    Shares the main model's embedding and lm_head; has its own full-attention KV cache.
    """

    def __init__(self, cfg: TextConfig, rope: MRoPE):
        super().__init__()
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.pre_fc_norm_embedding = RMSNorm1p(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm1p(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.layers = [DecoderLayer(cfg, "full_attention", rope) for _ in range(cfg.mtp_num_hidden_layers)]
        self.norm = RMSNorm1p(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, hidden: mx.array, next_embeds: mx.array, cos_sin, cache: list | None = None) -> mx.array:
        """hidden: main model's final-norm states at t [B, T, H]; next_embeds: embeddings of x_{t+1}."""
        z = self.fc(mx.concatenate([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], axis=-1))
        cache = cache if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, cache):
            z = layer(z, cos_sin, layer_cache)
        return self.norm(z)

    def draft(self, hidden: mx.array, next_embeds: mx.array, cache: list) -> mx.array:
        """The head at the positions after what its own ``cache`` holds (RoPE counts there: only relative positions matter)."""
        B, T, _ = hidden.shape
        rope = self.layers[0].self_attn.rope
        cos_sin = rope.cos_sin(text_positions(B, T, cache[0].offset), hidden.dtype)
        return self(hidden, next_embeds, cos_sin, cache)


def make_mtp_cache(mtp: MTP) -> list:
    """The head's own K/V cache, one per layer (float K/V: the head is one layer, its cache small)."""
    return [KVCache() for _ in mtp.layers]
