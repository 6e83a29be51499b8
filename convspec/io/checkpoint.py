"""Reading a checkpoint: layout from headers, tensors lazily, one open handle per file."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from .safetensors import Entry, read_layout

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class Checkpoint:
    """A safetensors checkpoint (a directory, an index, or one file) read lazily."""

    def __init__(self, src: str | Path):
        self.src = Path(src)
        self.entries: dict[str, Entry] = read_layout(self.src)
        self._handles: dict[str, object] = {}

    @property
    def layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {k: (e.shape, e.dtype) for k, e in self.entries.items()}

    @property
    def config_path(self) -> Path | None:
        p = (self.src if self.src.is_dir() else self.src.parent) / "config.json"
        return p if p.is_file() else None

    def get(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        h = self._handles.get(e.file)
        if h is None:
            h = self._handles[e.file] = safe_open(e.file, framework="pt", device="cpu")
        return h.get_tensor(key)

    def copy_side_files(self, dst: Path) -> None:
        """Every non-weight file beside the weights (config, tokenizer, ...) copied unchanged."""
        if not self.src.is_dir():
            return
        for f in sorted(self.src.iterdir()):
            if (
                f.is_file()
                and not f.name.endswith(WEIGHT_SUFFIXES)
                and f.name != "model.safetensors.index.json"
            ):
                shutil.copy2(f, dst / f.name)
