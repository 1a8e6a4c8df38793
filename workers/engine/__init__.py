"""The render engine: model registry and cache, pipeline assembly, one render."""
