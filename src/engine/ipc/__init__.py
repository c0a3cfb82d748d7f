"""Inter-process transport: frame codec, shared-memory channels, control lane."""
