"""The whole Qwen3.5 model: language model + MTP head (+ the vision tower, added by the vision work)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .language import LanguageModel
from .mtp import MTP


class Qwen35Model(nn.Module):
    """``model(input_ids, cache)`` → logits [B, T, V]; the interface mlx-lm's generation helpers expect."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config.text)
        if config.text.mtp_num_hidden_layers:
            self.mtp = MTP(config.text, self.language_model.rope)

    def __call__(
        self,
        input_ids: mx.array | None = None,
        cache: list | None = None,
        inputs_embeds: mx.array | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        hidden = self.language_model(input_ids, cache, inputs_embeds=inputs_embeds, position_ids=position_ids)
        return self.language_model.logits(hidden)

    @property
    def layers(self) -> list:
        return self.language_model.layers

    def make_cache(self) -> list:
        """One cache object per decoder layer (see ``mlx_qwen35.cache``)."""
        from ..cache import make_cache

        return make_cache(self)
