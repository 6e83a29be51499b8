"""A counting reader for the I/O tests of issue 16: it wraps the lowest-level reads convspec makes of a
checkpoint's files (`os.pread` for headers, `os.preadv` for tensor data, io/safetensors.py and
io/checkpoint.py) and logs every byte range it got from a .safetensors file, with the converted
tensor being read at the time. `attribute` maps the ranges back onto the files' headers and tensors."""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ReadLog:
    """Every (tag, file, offset, bytes got) read from a .safetensors file while installed; `tag` is
    what the test set (the converted tensor being read), shared by the reader threads."""

    reads: list[tuple[str | None, str, int, int]] = field(default_factory=list)
    tag: str | None = None
    _saved: tuple = ()
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self) -> ReadLog:
        pread, preadv = os.pread, os.preadv

        def counted_pread(fd, n, offset):
            data = pread(fd, n, offset)
            self._log(fd, offset, len(data))
            return data

        def counted_preadv(fd, buffers, offset, *flags):
            got = preadv(fd, buffers, offset, *flags)
            self._log(fd, offset, got)
            return got

        self._saved = (pread, preadv)
        os.pread, os.preadv = counted_pread, counted_preadv
        return self

    def uninstall(self) -> None:
        if self._saved:
            os.pread, os.preadv = self._saved
            self._saved = ()

    def _log(self, fd: int, offset: int, n: int) -> None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # not Linux: every read counts, whatever the file
            path = f"fd:{fd}.safetensors"
        if path.endswith(".safetensors") and n > 0:
            with self._lock:
                self.reads.append((self.tag, path, offset, n))


def header_of(path: str | Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """A safetensors file's header size (8 + its JSON) and each tensor's absolute byte range."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base = 8 + n
    return base, {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items()}


def _union(spans: list[tuple[int, int]]) -> int:
    covered, end = 0, -1
    for a, b in sorted(spans):
        if b > end:
            covered += b - max(a, end)
            end = b
    return covered


@dataclass
class Attributed:
    """What a set of reads was, byte by byte: header bytes, bytes of each source tensor (`covered`:
    distinct bytes; `data`: bytes read, repeats counted), and bytes that fell in no tensor."""

    header: int = 0
    data: int = 0
    stray: int = 0
    calls: int = 0
    covered: dict[str, int] = field(default_factory=dict)


def attribute(reads, headers: dict[str, tuple[int, dict[str, tuple[int, int]]]]) -> Attributed:
    """Map `reads` ((tag, file, offset, n), any tag) back onto `headers` ({file: header_of(file)})."""
    out = Attributed(calls=len(reads))
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for _, path, offset, n in reads:
        base, tensors = headers[os.path.realpath(path)]
        a, b = offset, offset + n
        out.header += max(0, min(b, base) - a)
        a = max(a, base)
        inside = 0
        for key, (s, e) in tensors.items():
            lo, hi = max(a, s), min(b, e)
            if lo < hi:
                spans[key].append((lo, hi))
                inside += hi - lo
        out.data += inside
        out.stray += max(0, b - a) - inside
    out.covered = {k: _union(v) for k, v in spans.items()}
    return out


def headers_of(src: str | Path) -> dict[str, tuple[int, dict[str, tuple[int, int]]]]:
    """`header_of` every .safetensors file of a checkpoint directory, by real path."""
    return {os.path.realpath(f): header_of(f) for f in sorted(Path(src).glob("*.safetensors"))}
