"""The processor returned by ``load``: tokenizer, chat template and stop tokens of a checkpoint.

Tokenisation and streaming detokenisation come from mlx-lm's ``TokenizerWrapper``; the chat
template is the checkpoint's own (``chat_template.jinja`` or a ``chat_template`` key).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from ..errors import Qwen35Error

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


class Processor:
    """Turns chat messages into token ids and token ids back into text."""

    def __init__(self, tokenizer, config: ModelConfig):
        self.tokenizer = tokenizer  # mlx_lm TokenizerWrapper
        self.config = config

    @classmethod
    def from_dir(cls, model_dir: Path, config: ModelConfig) -> "Processor":
        """Load the tokenizer files of a checkpoint directory."""
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        if not (model_dir / "tokenizer.json").is_file():
            raise Qwen35Error(f"{model_dir / 'tokenizer.json'}: not found; copy the tokenizer files of the original checkpoint")
        tokenizer = load_tokenizer(model_dir)
        for token_id in _stop_token_ids(model_dir, config, tokenizer):
            tokenizer.add_eos_token(token_id)
        return cls(tokenizer, config)

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
            raise Qwen35Error("the checkpoint has no chat template (chat_template.jinja); pass --raw to send the prompt as is")
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens in it are recognised, nothing is added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
