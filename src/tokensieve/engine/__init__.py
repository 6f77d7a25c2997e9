"""The inference engine: sequences, KV blocks, scheduling, model runner, sampling."""
