"""Reading a checkpoint: layout from headers, tensors lazily, one open handle per file."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import DTYPES
from ..ops.base import TensorInfo
from .config import checkpoint_config
from .memory import tensor_memory
from .safetensors import INDEX, CheckpointError, Entry, check_inside, read_layout
from .sidefile import open_regular, os_error, regular_file

if TYPE_CHECKING:
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
READ_PIECE = 8 << 20  # reads are cut into pieces of this size, read by READERS threads at once
READERS = min(4, os.cpu_count() or 1)
SMALL_READ = 1 << 20  # reads of up to this many bytes in all go on the calling thread: a thread hand-off
# per small read cost more than the read (and `get` reads a tensor this small with one preadv)
PARALLEL_PIECE = 64 << 10  # ... and so do reads that average under this size, however many


class Checkpoint:
    """A safetensors checkpoint (a directory, an index, or one file) read lazily."""

    # keys whose bytes are not the tensor's (a GGUF block type: decoded by `get`), so never copied or
    # read by byte range; key -> how they are stored
    decoded: dict[str, int] = {}

    def __init__(self, src: str | Path | list):
        self.files = [Path(f) for f in src] if isinstance(src, list | tuple) else None
        self.src = self.files[0].parent if self.files else Path(src)
        self.entries: dict[str, Entry] = read_layout(self.files or self.src)
        self.side_files = self._side_files()  # checked now: a bad one is refused before any output
        self._fds: dict[str, int] = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def layout(self) -> dict[str, TensorInfo]:
        return {k: e.info for k, e in self.entries.items()}

    @property
    def config_path(self) -> Path | None:
        if self.src.is_dir() and not self.files:
            return next((f for f in self.side_files if f.name == "config.json"), None)
        return checkpoint_config(self.src if self.src.is_dir() else self.src.parent)

    @property
    def config(self) -> dict | Path | None:
        """What `convspec.compile` takes as this checkpoint's config: its config.json's path."""
        return self.config_path

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor into fresh memory with pread (no mmap: memory is bounded by what is alive).
        A small one is read in one call straight into the tensor: at ~45,000 keys the per-key cost of
        the general path (views, pieces, a sort) was more than the read itself."""
        e = self.entries[key]
        n = e.end - e.start
        if n > SMALL_READ:
            return self.assemble(e.shape, e.dtype, [(key, 0, 0, n)])
        import torch

        out = torch.empty(e.shape, dtype=DTYPES[e.dtype])
        if n:
            fd = self._fds.get(e.file)
            if fd is None:
                fd = self._fds[e.file] = open_regular(e.file, CheckpointError, "safetensors file")
            got = os.preadv(fd, [(ctypes.c_ubyte * n).from_address(out.data_ptr())], e.start)
            if got < n:  # rare (a signal, a file shrinking): the general loop finishes or names it
                self.read_into(key, got, tensor_memory(out)[got:])
        return out

    def assemble(self, shape: tuple[int, ...], dtype: str, runs, pin: bool = False) -> torch.Tensor:
        """A tensor made of byte runs (source key, source offset, offset here, size) of this checkpoint,
        each read straight into its place: no intermediate tensor. Reads go in file order."""
        import torch

        out = torch.empty(shape, dtype=DTYPES[dtype], pin_memory=pin)
        view = tensor_memory(out)
        self.read_many([(key, src, view[dst : dst + size]) for key, src, dst, size in runs])
        return out

    def read_many(self, reads: list[tuple[str, int, memoryview]]) -> None:
        """Several reads (key, offset in its data, destination), in file order, cut into pieces that a
        few threads read at once: preads release the GIL, and first touches of fresh memory (the
        page faults that dominate a load from a warm cache) then run on every core."""
        pieces = [
            (key, offset + a, view[a : a + READ_PIECE])
            for key, offset, view in reads
            for a in range(0, len(view), READ_PIECE)
        ]
        pieces.sort(key=lambda r: self.file_offset(r[0], r[1]))
        total = sum(len(p[2]) for p in pieces)
        if len(pieces) < 2 or READERS < 2 or total <= SMALL_READ or total < len(pieces) * PARALLEL_PIECE:
            for piece in pieces:
                self.read_into(*piece)
            return
        for file in {self.entries[key].file for key, _, _ in reads}:  # opened here, not in the threads
            if file not in self._fds:
                self._fds[file] = open_regular(file, CheckpointError, "safetensors file")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="convspec-pread")
        for f in [self._pool.submit(self.read_into, *piece) for piece in pieces]:
            f.result()

    def file_offset(self, key: str, offset: int = 0) -> tuple[str, int]:
        """Where byte `offset` of a tensor's data lies: (file, absolute offset)."""
        e = self.entries[key]
        return e.file, e.start + offset

    def read_into(self, key: str, offset: int, view: memoryview) -> None:
        """Bytes [offset, offset + len(view)) of a tensor's data, read into `view` with pread."""
        e = self.entries[key]
        fd = self._fds.get(e.file)
        if fd is None:
            fd = self._fds[e.file] = open_regular(e.file, CheckpointError, "safetensors file")
        n, done = len(view), 0
        while done < n:
            got = os.preadv(fd, [view[done:]], e.start + offset + done)
            if got == 0:
                raise CheckpointError(
                    f"{e.file}: tensor {key} is truncated (file ended after {offset + done} of "
                    f"{e.end - e.start} bytes)"
                )
            done += got

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _side_files(self) -> list[Path]:
        """Every non-weight file beside the weights (config, tokenizer, ...), each inside the directory:
        one that links out of it is refused, so a conversion never copies a file from elsewhere. One that
        cannot be copied (a pipe, a device, a broken or looping link, an unreadable file) is refused
        by name rather than silently left out; a subdirectory is not copied, so it is skipped (but a
        directory named config.json, where the config is expected, is refused)."""
        if not self.src.is_dir() or self.files:
            return []
        out = []
        for f in sorted(self.src.iterdir()):
            if f.name.endswith(WEIGHT_SUFFIXES) or f.name == INDEX:
                continue
            if f.name == "config.json":
                checkpoint_config(self.src)
            try:
                st = f.stat()
            except OSError as exc:
                raise CheckpointError(os_error(f, exc)) from None
            if stat.S_ISDIR(st.st_mode):  # not copied, so wherever it leads does not matter
                continue
            if f.is_symlink():
                check_inside(self.src, f, f)
            regular_file(f, CheckpointError, "side file")
            if not os.access(f, os.R_OK):
                raise CheckpointError(f"{f}: permission denied", hint="a conversion copies every side file")
            out.append(f)
        return out

    def copy_side_files(self, dst: Path) -> None:
        """Every non-weight file beside the weights (config, tokenizer, ...) copied unchanged."""
        for f in self.side_files:
            shutil.copy2(f, dst / f.name)
