"""The OpenAI-compatible server: protocol (request models → prompts), worker (the model's thread), routes."""
