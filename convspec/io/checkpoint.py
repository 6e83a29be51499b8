"""Reading a checkpoint: layout from headers, tensors lazily, one open handle per file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..dtypes import DTYPES
from ..ops.base import TensorInfo
from .safetensors import CheckpointError, Entry, read_layout

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class Checkpoint:
    """A safetensors checkpoint (a directory, an index, or one file) read lazily."""

    def __init__(self, src: str | Path | list):
        self.files = [Path(f) for f in src] if isinstance(src, list | tuple) else None
        self.src = self.files[0].parent if self.files else Path(src)
        self.entries: dict[str, Entry] = read_layout(self.files or self.src)
        self._fds: dict[str, int] = {}

    @property
    def layout(self) -> dict[str, TensorInfo]:
        return {k: e.info for k, e in self.entries.items()}

    @property
    def config_path(self) -> Path | None:
        p = (self.src if self.src.is_dir() else self.src.parent) / "config.json"
        return p if p.is_file() else None

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor into fresh memory with pread (no mmap: memory is bounded by what is alive)."""
        e = self.entries[key]
        fd = self._fds.get(e.file)
        if fd is None:
            fd = self._fds[e.file] = os.open(e.file, os.O_RDONLY)
        n = e.end - e.start
        out = torch.empty(n, dtype=torch.uint8)
        view, done = memoryview(out.numpy()), 0
        while done < n:
            got = os.preadv(fd, [view[done:]], e.start + done)
            if got == 0:
                raise CheckpointError(
                    f"{e.file}: tensor {key} is truncated (file ended after {done} of {n} bytes)"
                )
            done += got
        return out.view(DTYPES[e.dtype]).reshape(e.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def copy_side_files(self, dst: Path) -> None:
        """Every non-weight file beside the weights (config, tokenizer, ...) copied unchanged."""
        if not self.src.is_dir() or self.files:
            return
        for f in sorted(self.src.iterdir()):
            if (
                f.is_file()
                and not f.name.endswith(WEIGHT_SUFFIXES)
                and f.name != "model.safetensors.index.json"
            ):
                shutil.copy2(f, dst / f.name)
