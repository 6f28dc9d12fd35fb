"""The processor returned by ``load``: tokenizer, chat template, stop tokens and vision inputs of a checkpoint.

Tokenisation comes from mlx-lm's ``TokenizerWrapper`` (streaming detokenisation: runtime/text_stream.py); the chat
template is the checkpoint's own (``chat_template.jinja`` or a ``chat_template`` key). Calling the
processor on messages with images / videos renders the template, expands each placeholder to the
number of tokens its vision features fill (docs/architecture.md §11.1) and returns ``ModelInputs``.
"""

from __future__ import annotations

import json
import re
import sys
from functools import cached_property
from pathlib import Path

import jinja2
import mlx.core as mx
import numpy as np

from ..config import ModelConfig
from ..errors import Qwen35Error
from ..model.inputs import ModelInputs
from ..model.vision import max_patches
from .image import ImagePatches, ImageProcessorConfig, VisionBudget, preprocess_image
from .video import VideoPatches, VideoProcessorConfig, format_timestamp, preprocess_video

IM_END = "<|im_end|>"


def _stop_token_ids(model_dir: Path, config: ModelConfig, tokenizer) -> list[int]:
    """generation_config's eos ids + config's + <|im_end|> (the chat stop, which some files omit)."""
    ids = list(config.text.eos_token_id)
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    return sorted(set(ids))


def _media_items(messages: list[dict]) -> list[tuple[str, object]]:
    """("image" | "video", source) for each vision item, in the order the chat template renders them."""
    items = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for item in content:
            # The template's own test: a key named image / image_url / video, or the type.
            if "image" in item or "image_url" in item or item.get("type") == "image":
                source = item.get("image") or item.get("image_url") or item.get("path") or item.get("url")
                items.append(("image", source.get("url") if isinstance(source, dict) else source))
            elif "video" in item or item.get("type") == "video":
                items.append(("video", item.get("video") or item.get("path") or item.get("url")))
    return items


class Processor:
    """Turns chat messages (text, images, videos) into model inputs and token ids back into text."""

    def __init__(self, tokenizer, config: ModelConfig, model_dir: Path | None = None):
        self.tokenizer = tokenizer  # mlx_lm TokenizerWrapper
        self.config = config
        self.model_dir = model_dir  # where preprocessor_config.json / video_preprocessor_config.json are

    @classmethod
    def from_dir(cls, model_dir: Path, config: ModelConfig) -> Processor:
        """Load the tokenizer files of a checkpoint directory."""
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        if not (model_dir / "tokenizer.json").is_file():
            raise Qwen35Error(
                f"{model_dir / 'tokenizer.json'}: not found; copy the tokenizer files of the original checkpoint"
            )
        try:
            tokenizer = load_tokenizer(model_dir)
        except Exception as e:  # json, tokenizers and transformers each raise their own types for a broken file
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise Qwen35Error(
                f"{model_dir}: the tokenizer files cannot be read ({reason}); copy them again from the original checkpoint"
            ) from None
        for token_id in _stop_token_ids(model_dir, config, tokenizer):
            tokenizer.add_eos_token(token_id)
        return cls(tokenizer, config, model_dir)

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        enable_thinking: bool = True,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render messages with the checkpoint's template; thinking on by default, as the model card says."""
        if not self.tokenizer.has_chat_template:
            raise Qwen35Error(
                "the checkpoint has no chat template (chat_template.jinja); pass --raw to send the prompt as is"
            )
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
            )
        except jinja2.TemplateError as e:
            raise Qwen35Error(f"the chat template refused the messages: {e}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens in it are recognised, nothing is added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @cached_property
    def image_config(self) -> ImageProcessorConfig:
        """The checkpoint's ``preprocessor_config.json``, read on first use."""
        return ImageProcessorConfig.load(self._processor_dir())

    @cached_property
    def video_config(self) -> VideoProcessorConfig:
        """The checkpoint's ``video_preprocessor_config.json``, read on first use."""
        return VideoProcessorConfig.load(self._processor_dir())

    def _processor_dir(self) -> Path:
        if self.model_dir is None:
            raise Qwen35Error(
                "this processor was made without a checkpoint directory; load it with mlx_qwen35.load(path)"
            )
        return self.model_dir

    def _token(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token_id)

    def __call__(
        self,
        messages: list[dict],
        *,
        enable_thinking: bool = True,
        tools: list[dict] | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        video_start: float | None = None,
        video_end: float | None = None,
    ) -> ModelInputs:
        """Messages whose content may list text, image and video items → token ids plus the vision inputs.

        ``max_pixels`` bounds each image and video frame (default: the model card's 1344×1344); a request whose
        vision tokens would not fit the context, or whose patches the vision tower's memory, is refused.
        """
        text = self.apply_chat_template(messages, enable_thinking=enable_thinking, tools=tools)
        media = _media_items(messages)
        if not media:
            return ModelInputs(input_ids=self.encode(text))
        start, end = self._token(self.config.vision_start_token_id), self._token(self.config.vision_end_token_id)
        image_pad, video_pad = self._token(self.config.image_token_id), self._token(self.config.video_token_id)
        placeholders = {start + image_pad + end: "image", start + video_pad + end: "video"}
        pieces = re.split("(" + "|".join(map(re.escape, placeholders)) + ")", text)
        rendered_kinds = [placeholders[piece] for piece in pieces[1::2]]
        if rendered_kinds != [kind for kind, _ in media]:
            raise Qwen35Error(
                f"the prompt text contains vision placeholder tokens ({image_pad}, {video_pad}); "
                "give images and videos as content items, not as tokens in the text"
            )

        images: list[ImagePatches] = []
        videos: list[VideoPatches] = []
        budget = self.vision_budget()
        for position, (kind, source) in zip(range(1, len(pieces), 2), media):
            if kind == "image":
                patches = preprocess_image(
                    source, self.image_config, min_pixels=min_pixels, max_pixels=max_pixels, budget=budget
                )
                pieces[position] = start + image_pad * self._merged_tokens(patches.grid_thw, self.image_config) + end
                images.append(patches)
            else:
                clip = preprocess_video(
                    source,
                    self.video_config,
                    fps=fps,
                    max_frames=max_frames,
                    video_start=video_start,
                    video_end=video_end,
                    max_pixels=max_pixels,
                    budget=budget,
                )
                # The reference Qwen3-VL layout: time as text, then each temporal group in its own start/end pair.
                per_group = start + video_pad * self._merged_tokens((1, *clip.grid_thw[1:]), self.video_config) + end
                pieces[position] = "".join(format_timestamp(t) + per_group for t in clip.timestamps)
                videos.append(clip)
        return ModelInputs(
            input_ids=self.encode("".join(pieces)),
            pixel_values=_stacked_pixels(images),
            image_grid_thw=_stacked_grids(images),
            pixel_values_videos=_stacked_pixels(videos),
            video_grid_thw=_stacked_grids(videos),
        )

    def vision_budget(self) -> VisionBudget:
        """What one request's images and videos may take: the model's context, and the tower's patches in the memory left."""
        context = self.config.text.max_position_embeddings
        memory = mx.get_memory_limit() - mx.get_active_memory()
        # Without a vision tower the model itself refuses images, naming the cause.
        patches = max_patches(self.config.vision, memory) if self.config.vision else sys.maxsize
        return VisionBudget(tokens=context, patches=patches, context=context)

    @staticmethod
    def _merged_tokens(grid_thw: tuple[int, int, int], config: ImageProcessorConfig) -> int:
        """Placeholder tokens for a grid: one per merged block of merge_size² patches."""
        return grid_thw[0] * grid_thw[1] * grid_thw[2] // config.merge_size**2

    def vision_token_count(self, inputs: ModelInputs) -> int:
        """How many prompt tokens are image or video placeholders (filled by the vision tower)."""
        vision_ids = {self.config.image_token_id, self.config.video_token_id}
        return sum(1 for token in inputs.input_ids if token in vision_ids)


def _stacked_pixels(items: list[ImagePatches] | list[VideoPatches]) -> mx.array | None:
    return mx.array(np.concatenate([item.pixel_values for item in items]), dtype=mx.float32) if items else None


def _stacked_grids(items: list[ImagePatches] | list[VideoPatches]) -> mx.array | None:
    return mx.array([item.grid_thw for item in items], dtype=mx.int32) if items else None
