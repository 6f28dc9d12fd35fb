"""Conversations with a prefix cache, at the public path the README documents (``mlx_qwen35.runtime.conversation``)."""

from .runtime.conversation import ChatEvent, Conversation, ConversationCache, ConversationSettings, TurnStats

__all__ = ["ChatEvent", "Conversation", "ConversationCache", "ConversationSettings", "TurnStats"]
