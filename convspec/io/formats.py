"""Which reader a checkpoint needs: a .gguf file is GGUF (io/gguf_checkpoint.py), anything else
safetensors (io/checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import Checkpoint
from .gguf_checkpoint import GgufCheckpoint, is_gguf


def open_checkpoint(src: str | Path | list) -> Checkpoint:
    """The checkpoint at `src`, read lazily by the reader its format needs."""
    if not isinstance(src, list | tuple) and is_gguf(src):
        return GgufCheckpoint(src)
    return Checkpoint(src)
