"""The model's cache, at the public path the README documents (it lives in ``mlx_qwen35.model.cache``)."""

from .model.cache import ModelCache, Snapshot, cache_length, make_cache, restore, snapshot

__all__ = ["ModelCache", "Snapshot", "cache_length", "make_cache", "restore", "snapshot"]
