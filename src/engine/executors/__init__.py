"""Executors: how a node of a session runs (in the engine loop or in a process)."""
