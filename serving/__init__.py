"""The sampler: engine, KV caches, continuous batching, OpenAI-compatible routes (issue 6)."""
