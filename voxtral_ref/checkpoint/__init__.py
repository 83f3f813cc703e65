"""Checkpoint files: the safetensors reader and writer, the name maps of both on-disk formats, the hub."""
