"""Weights on disk: the Hub, loading, conversion and quantisation, peer formats, synthetic checkpoints."""
