"""The Qwen3.5 language model: embedding → hybrid decoder layers → final norm → lm_head (docs/architecture.md §3)."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from ..config import TextConfig
from ..kernels import emulating
from .attention import GatedAttention
from .deltanet import GatedDeltaNet
from .moe import SparseMoE, feed_forward
from .norms import RMSNorm1p
from .parallel import RankShare, gather_vocabulary, pass_hidden, receive_hidden
from .rope import MRoPE, text_positions


class DecoderLayer(nn.Module):
    """h = x + Mixer(norm(x)); out = h + FFN(norm(h)). Mixer: Gated DeltaNet or gated attention.

    A decode step runs as compiled graphs (``compiles_decode``, docs/architecture.md §3.1) with the layer's
    state as explicit inputs and outputs: one graph for a DeltaNet layer; for an attention layer one before
    and one after the cache update and attention, whose key length grows every step. Same numbers.
    """

    def __init__(self, cfg: TextConfig, layer_type: str, rope: MRoPE):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = GatedAttention(cfg, rope)
        self.input_layernorm = RMSNorm1p(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm1p(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = feed_forward(cfg)
        # The layer is the compiled graphs' implicit input: each call reads its current weights.
        if self.is_linear:
            self._deltanet_step = mx.compile(self._deltanet_step_eager, inputs=[self])
            self._deltanet_verify = mx.compile(self._deltanet_verify_eager, inputs=[self])
        else:
            self._attention_in = mx.compile(self._attention_in_eager, inputs=[self])
            self._attention_out = mx.compile(self._attention_out_eager, inputs=[self])

    def __call__(self, x: mx.array, cos_sin, cache=None) -> mx.array:
        # A DeltaNet layer's first token (no state yet) runs eagerly: it makes the state the graph takes.
        # Streamed experts read the routing on the host between layers, which a compiled graph cannot (§6.1).
        streams = getattr(self.mlp, "streams_experts", False)
        if (
            x.shape[1] == 1
            and cache is not None
            and not streams
            and compiles_decode()
            and (not self.is_linear or cache[1] is not None)
        ):
            return self._decode(x, cos_sin, cache)
        if self.is_linear:
            h = x + self.linear_attn(self.input_layernorm(x), cache)
        else:
            h = x + self.self_attn(self.input_layernorm(x), cos_sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def verify(self, x: mx.array, cos_sin, cache, states: list) -> mx.array:
        """T positions after a decode state with a decode step's numbers (docs/architecture.md §20.2); a DeltaNet
        layer appends its [conv window, state] after each position to ``states``."""
        compiled = compiles_decode()
        if self.is_linear:
            verify = self._deltanet_verify if compiled else self._deltanet_verify_eager
            x, *after = verify(x, cache[0], cache[1])
            T = x.shape[1]
            states.extend([list(pair) for pair in zip(after[:T], after[T:])])
            cache[0], cache[1] = states[-1]
            return x
        attention_in = self._attention_in if compiled else self._attention_in_eager
        attention_out = self._attention_out if compiled else self._attention_out_eager
        q, k, v, gate = attention_in(x, *cos_sin)
        return attention_out(x, self.self_attn.attend_each(q, k, v, cache), gate)

    def _deltanet_verify_eager(self, x: mx.array, conv: mx.array, state: mx.array) -> tuple[mx.array, ...]:
        """(output, the T conv windows, the T states after each position)."""
        states = []
        h = x + self.linear_attn.verify(self.input_layernorm(x), [conv, state], states)
        convs, recurrent = zip(*states)
        return (h + self.mlp(self.post_attention_layernorm(h)), *convs, *recurrent)

    def _decode(self, x: mx.array, cos_sin, cache) -> mx.array:
        if self.is_linear:
            x, cache[0], cache[1] = self._deltanet_step(x, cache[0], cache[1])
            return x
        q, k, v, gate = self._attention_in(x, *cos_sin)
        return self._attention_out(x, self.self_attn.attend(q, k, v, None, cache), gate)

    def _deltanet_step_eager(self, x: mx.array, conv: mx.array, state: mx.array) -> tuple[mx.array, ...]:
        layer_cache = [conv, state]
        h = x + self.linear_attn(self.input_layernorm(x), layer_cache)
        return h + self.mlp(self.post_attention_layernorm(h)), layer_cache[0], layer_cache[1]

    def _attention_in_eager(self, x: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, ...]:
        return self.self_attn.queries_keys_values(self.input_layernorm(x), cos, sin)

    def _attention_out_eager(self, x: mx.array, attended: mx.array, gate: mx.array) -> mx.array:
        h = x + self.self_attn.output(attended, gate)
        return h + self.mlp(self.post_attention_layernorm(h))


def compiles_decode() -> bool:
    """Whether decode steps run compiled: yes unless ``MLX_QWEN35_COMPILE=0``, or kernels run on the CPU emulator
    (which cannot be traced). Compiling fuses each layer's elementwise chains and replays its graph without
    rebuilding it in Python (docs/architecture.md §3.1)."""
    return not emulating() and os.environ.get("MLX_QWEN35_COMPILE") != "0"


class LanguageModel(nn.Module):
    """Token ids (or embeddings) + cache → hidden states after the final norm; ``logits`` applies lm_head.

    On one rank of a multi-Mac run (``share``, docs/architecture.md §21) ``cfg`` describes only the layers it
    holds; a pipeline follower holds no embedding, norm or LM head and returns the hidden states it sent on.
    """

    def __init__(self, cfg: TextConfig, share: RankShare | None = None):
        super().__init__()
        self.config = cfg
        self.share = share
        self._slices_lm_head = share is not None and share.slices_mixers and not cfg.tie_word_embeddings
        self.rope = MRoPE(cfg)
        holds_ends = share is None or share.holds_ends
        if holds_ends:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, kind, self.rope) for kind in cfg.layer_types]
        if share is not None and share.mode != "pipeline":
            for layer in self.layers:
                if isinstance(layer.mlp, SparseMoE) or share.slices_mixers:  # tensor mode: a dense MLP too
                    layer.mlp.share = share
                if share.slices_mixers:
                    (layer.linear_attn if layer.is_linear else layer.self_attn).share = share
        if holds_ends:
            self.norm = RMSNorm1p(cfg.hidden_size, eps=cfg.rms_norm_eps)
        if holds_ends and not cfg.tie_word_embeddings:
            # Tensor mode: 1/n of the vocabulary's rows; ``logits`` gathers the ranks' parts.
            rows = cfg.vocab_size // share.size if self._slices_lm_head else cfg.vocab_size
            self.lm_head = nn.Linear(cfg.hidden_size, rows, bias=False)
        self._first_attention = cfg.layer_types.index("full_attention")
        # The dtype activations run in; set by the loader (float32 off Metal). A quantised embedding in
        # mxfp/nvfp modes returns bfloat16 rows, which would otherwise pull the first layer down to bf16.
        self.compute_dtype: mx.Dtype | None = None

    def __call__(
        self,
        input_ids: mx.array | None = None,
        cache: list | None = None,
        inputs_embeds: mx.array | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        """Hidden states [B, T, H] after the final norm. position_ids [3, B, T]; default: text after the cache's tokens."""
        if self.share is not None and self.share.on_forward is not None:
            self.share.on_forward()
        pipeline = self.share is not None and self.share.mode == "pipeline"
        if pipeline and not self.share.leads:
            B, T = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
            x = receive_hidden(self.share, (B, T, self.config.hidden_size), self.compute_dtype or mx.float32)
        else:
            x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.compute_dtype is not None:
            x = x.astype(self.compute_dtype)
        B, T, _ = x.shape
        if position_ids is None:
            offset = cache[self._first_attention].offset + getattr(cache, "rope_delta", 0) if cache is not None else 0
            position_ids = text_positions(B, T, offset)
        cos_sin = self.rope.cos_sin(position_ids, x.dtype)
        cache = cache if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, cache):
            x = layer(x, cos_sin, layer_cache)
        if pipeline:
            x = pass_hidden(self.share, x, cache if cache[0] is not None else None)
            if not self.share.leads:
                return x
        return self.norm(x)

    def verify(self, input_ids: mx.array, cache: list) -> tuple[mx.array, list]:
        """Speculative verify of ``input_ids`` [B, T] after a cache that has decoded: hidden states [B, T, H] equal to
        T decode steps', and per layer the DeltaNet [conv window, state] after each position (None for attention)."""
        x = self.embed_tokens(input_ids)
        if self.compute_dtype is not None:
            x = x.astype(self.compute_dtype)
        B, T, _ = x.shape
        offset = cache[self._first_attention].offset + getattr(cache, "rope_delta", 0)
        cos_sin = self.rope.cos_sin(text_positions(B, T, offset), x.dtype)
        states = [[] if layer.is_linear else None for layer in self.layers]
        for layer, layer_cache, layer_states in zip(self.layers, cache, states):
            x = layer.verify(x, cos_sin, layer_cache, layer_states)
        return self.norm(x), states

    def logits(self, hidden: mx.array) -> mx.array:
        """lm_head (or the tied embedding matrix) on final-norm hidden states."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.as_linear(hidden)
        if self._slices_lm_head:
            return gather_vocabulary(self.share, self.lm_head(hidden))
        return self.lm_head(hidden)
