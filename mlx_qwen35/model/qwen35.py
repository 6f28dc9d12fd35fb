"""The whole Qwen3.5 model: language model + MTP head + vision tower (when the config has one)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ModelConfig
from ..errors import Qwen35Error
from .cache import cache_length
from .inputs import ModelInputs
from .language import LanguageModel
from .mrope_positions import mrope_positions
from .mtp import MTP
from .parallel import RankShare, stage_text_config
from .vision import VisionModel


class Qwen35Model(nn.Module):
    """``model(input_ids, cache)`` → logits [B, T, V]; the interface mlx-lm's generation helpers expect."""

    def __init__(self, config: ModelConfig, share: RankShare | None = None):
        super().__init__()
        self.config = config  # the whole model's, on every rank of a multi-Mac run too
        self.share = share
        self.expert_cache = None  # an ExpertCache when the routed experts stream from a store (§6.1)
        text = config.text if share is None else stage_text_config(config.text, share)
        self.language_model = LanguageModel(text, share)
        if config.text.mtp_num_hidden_layers and share is None:
            self.mtp = MTP(config.text, self.language_model.rope)
        if config.vision is not None and (share is None or share.holds_ends):
            self.visual = VisionModel(config.vision)

    def __call__(
        self,
        input_ids: mx.array | None = None,
        cache: list | None = None,
        *,
        inputs_embeds: mx.array | None = None,
        position_ids: mx.array | None = None,
        pixel_values: mx.array | None = None,
        image_grid_thw: mx.array | None = None,
        pixel_values_videos: mx.array | None = None,
        video_grid_thw: mx.array | None = None,
    ) -> mx.array:
        """Logits [B, T, V]. With vision inputs (one prompt, B = 1) the placeholders take the tower's features."""
        if pixel_values is not None or pixel_values_videos is not None:
            if input_ids is None or input_ids.size != input_ids.shape[-1]:
                raise Qwen35Error("vision inputs need the prompt's input_ids, one prompt (batch 1) at a time")
            inputs = ModelInputs(
                input_ids.reshape(-1).tolist(), pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
            inputs_embeds, mm_positions, rope_delta = self.prompt_embeddings(inputs, cache)
            position_ids = mm_positions if position_ids is None else position_ids
            if cache is not None:
                cache.rope_delta = rope_delta
        hidden = self.language_model(input_ids, cache, inputs_embeds=inputs_embeds, position_ids=position_ids)
        if self.share is not None and not self.share.holds_ends:
            # A pipeline follower has no LM head: rank 0 samples and shares the token (runtime/distributed.py).
            return mx.depends(mx.zeros((*hidden.shape[:2], self.config.text.vocab_size)), hidden)
        return self.language_model.logits(hidden)

    def prompt_embeddings(self, inputs: ModelInputs, cache: list | None = None) -> tuple[mx.array, mx.array, int]:
        """A prompt with images/videos → (inputs_embeds [1, T, H], position_ids [3, 1, T], the cache's rope_delta after it).

        Positions continue after what ``cache`` already holds, so a multimodal turn can follow earlier ones.
        """
        ids = np.asarray(inputs.input_ids).reshape(-1)
        follower = self.share is not None and not self.share.holds_ends
        if inputs.has_vision and "visual" not in self and not follower:
            raise Qwen35Error("this checkpoint has no vision tower (config.json has no vision_config); send text only")
        positions, delta = mrope_positions(ids, self.config, inputs.image_grid_thw, inputs.video_grid_thw)
        prior_delta = getattr(cache, "rope_delta", 0)
        offset = cache_length(cache) + prior_delta if cache is not None else 0
        position_ids = mx.array(positions + offset)[:, None]  # [3, 1, T]
        if follower:  # rank 0 embeds the prompt and its images; this rank receives the hidden states
            return mx.zeros((1, len(ids), self.config.text.hidden_size)), position_ids, prior_delta + delta
        embeds = self.language_model.embed_tokens(mx.array(ids))  # [T, H]
        for token_id, pixels, grid in (
            (self.config.image_token_id, inputs.pixel_values, inputs.image_grid_thw),
            (self.config.video_token_id, inputs.pixel_values_videos, inputs.video_grid_thw),
        ):
            if pixels is not None:
                # Features come out in prompt order (items in sequence, merge-block order within each).
                embeds[mx.array(np.flatnonzero(ids == token_id))] = self.visual(pixels, grid).astype(embeds.dtype)
        return embeds[None], position_ids, prior_delta + delta

    @property
    def layers(self) -> list:
        return self.language_model.layers

    def make_cache(self) -> list:
        """One cache object per decoder layer (see ``mlx_qwen35.model.cache``)."""
        from .cache import make_cache

        return make_cache(self)
