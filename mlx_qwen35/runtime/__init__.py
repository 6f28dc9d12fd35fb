"""The runtime: token- and text-level generation, conversations and their prefix cache, saved sessions."""
