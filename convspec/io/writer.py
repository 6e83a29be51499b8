"""The sharded safetensors writer: headers computed before a byte is written, atomic directories."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ..dtypes import ITEMSIZE
from .safetensors import DTYPES, CheckpointError

if TYPE_CHECKING:
    import torch

SAFETENSORS_DTYPE = {name: code for code, name in DTYPES.items()}  # float32 -> F32
TMP_MARK = ".convspec-tmp-"


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal, as Hugging Face), '512MiB' -> binary; ints pass through."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.I)
    if not m:
        raise CheckpointError(
            f"cannot read the size {text!r}", hint="use e.g. 5GB, 500MB, 2GiB or a byte count"
        )
    num, unit = float(m.group(1)), m.group(2).upper().rstrip("B")
    scale = {
        "": 1,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "KI": 2**10,
        "MI": 2**20,
        "GI": 2**30,
        "TI": 2**40,
    }[unit]
    return int(num * scale)


def plan_shards(entries: list[tuple[str, tuple[int, ...], str]], max_shard_size: int) -> list[list[int]]:
    """Greedy, in order: a new shard when the next tensor would pass the limit (a big tensor stands alone)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(entries):
        n = ITEMSIZE[dtype]
        for s in shape:
            n *= s
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def shard_header(entries, metadata: dict) -> bytes:
    """A shard's header (length prefix included) for (key, shape, dtype) entries laid out in order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, shape, dtype in entries:
        n = ITEMSIZE[dtype]
        for s in shape:
            n *= s
        header[key] = {
            "dtype": SAFETENSORS_DTYPE[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    import torch

    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def remove_stale_temporaries(dst: Path) -> list[Path]:
    """Temporary directories a killed run left beside `dst` (their process is gone): removed, and returned."""
    removed = []
    for tmp in dst.parent.glob(f".{dst.name}{TMP_MARK}*"):
        pid_text = tmp.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _alive(int(pid_text)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicDir:
    """A temporary directory beside `dst`, renamed into place only by `commit()`; removed on failure."""

    def __init__(self, dst: str | Path, overwrite: bool = False):
        self.dst = Path(dst)
        if self.dst.exists() and not overwrite:
            raise CheckpointError(f"{self.dst} already exists", hint="pass --overwrite to replace it")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.stale = remove_stale_temporaries(self.dst)
        self.tmp = self.dst.parent / f".{self.dst.name}{TMP_MARK}{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()

    def commit(self) -> None:
        for f in self.tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if self.dst.exists():
            old = self.dst.parent / f".{self.dst.name}{TMP_MARK}old-{os.getpid()}"
            os.rename(self.dst, old)
        os.rename(self.tmp, self.dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class FileCopy(NamedTuple):
    """A tensor to write as byte ranges of existing files, copied file to file by the kernel:
    spans of (file, absolute offset, offset within the tensor, size)."""

    spans: list[tuple[str, int, int, int]]


def write_sharded(
    out_dir: Path,
    entries: list[tuple[str, tuple[int, ...], str]],
    tensors: Iterable[tuple[str, torch.Tensor | FileCopy]],
    max_shard_size: int,
    metadata: dict | None = None,
    flush_behind: bool = False,
) -> list[str]:
    """Write tensors (arriving in `entries` order) as HF-named shards plus an index when there are several.
    Every header is computed before a byte is written; each tensor then goes straight to its offset.
    With `flush_behind`, a background thread pushes written data to disk while the rest is written,
    so that the fsync before the directory is committed finds little left to do."""
    metadata = {"format": "pt", **(metadata or {})}
    shards = plan_shards(entries, max_shard_size)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    it: Iterator[tuple[str, torch.Tensor | FileCopy]] = iter(tensors)
    weight_map = {}
    sources: dict[str, int] = {}
    behind = _FlushBehind() if flush_behind else None
    try:
        for name, idx in zip(names, shards, strict=True):
            part = [entries[i] for i in idx]
            with open(out_dir / name, "wb") as f:
                head = shard_header(part, metadata)
                f.write(head)
                f.flush()
                fd, pos = f.fileno(), len(head)
                try:
                    for key, shape, dtype in part:
                        size = ITEMSIZE[dtype] * _numel(shape)
                        _write_item(fd, pos, (key, shape, dtype, size), next(it), sources)
                        pos += size
                        weight_map[key] = name
                        if behind is not None:
                            behind.written(fd, size)
                except BaseException:
                    if behind is not None:
                        behind.settle()  # no flush may outlive the file it flushes
                    raise
                if behind is not None:
                    behind.wait()
    finally:
        if behind is not None:
            behind.close()
        for src in sources.values():
            os.close(src)
    if len(names) > 1:
        total = sum(ITEMSIZE[d] * _numel(s) for _, s, d in entries)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


class _FlushBehind:
    """fdatasync in a background thread after every FLUSH_EVERY bytes written, one at a time: the disk
    writes while the writer copies on."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="convspec-flush")
        self.pending = None
        self.since = 0

    def written(self, fd: int, n: int) -> None:
        self.since += n
        if self.since >= FLUSH_EVERY and (self.pending is None or self.pending.done()):
            self.since = 0
            self.pending = self.pool.submit(os.fdatasync, fd)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None
        self.since = 0

    def settle(self) -> None:
        """Wait for a flush in flight, ignoring its outcome (the write already failed)."""
        if self.pending is not None:
            self.pending.exception()
            self.pending = None

    def close(self) -> None:
        self.pool.shutdown()


FLUSH_EVERY = 256 << 20


def _write_item(fd: int, pos: int, expected: tuple, got: tuple, sources: dict[str, int]) -> None:
    """One tensor at its offset: copied file to file, or its bytes written; checked against its entry."""
    key, shape, dtype, size = expected
    got_key, item = got
    if isinstance(item, FileCopy):
        got_size = sum(span[3] for span in item.spans)
        if got_key != key or got_size != size:
            raise RuntimeError(f"writer expected {key} ({size} bytes), got {got_key} ({got_size})")
        for file, offset, dst, n in sorted(item.spans):
            src = sources.get(file)
            if src is None:
                src = sources[file] = os.open(file, os.O_RDONLY)
            copy_range(src, offset, fd, pos + dst, n)
        return
    seen = (got_key, tuple(item.shape), str(item.dtype).removeprefix("torch."))
    if seen != (key, tuple(shape), dtype):
        raise RuntimeError(f"writer expected {key} {list(shape)} {dtype}, got {seen}")
    pwrite_all(fd, tensor_bytes(item), pos)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


_COPY_CHUNK = 16 << 20


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, size: int) -> None:
    """`size` bytes from one file to another at given offsets: in the kernel with copy_file_range
    where the filesystems allow it, else through one reused buffer."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < size:
                n = os.copy_file_range(src, dst, size - done, src_offset + done, dst_offset + done)
                if n == 0:
                    raise CheckpointError(f"a source file ended {size - done} bytes early while copying")
                done += n
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
    buf = bytearray(min(_COPY_CHUNK, size - done))
    view = memoryview(buf)
    while done < size:
        n = os.preadv(src, [view[: min(len(buf), size - done)]], src_offset + done)
        if n == 0:
            raise CheckpointError(f"a source file ended {size - done} bytes early while copying")
        pwrite_all(dst, view[:n], dst_offset + done)
        done += n


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
