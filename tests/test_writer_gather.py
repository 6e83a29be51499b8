"""The writer's gathering of a tensor made of many small spans: the same bytes as a copy span by span,
whether a file's region is read whole or span by span, and a source that ends early is named."""

from __future__ import annotations

import os
import random

import pytest

from convspec.io import writer
from convspec.io.safetensors import CheckpointError
from convspec.io.writer import FileCopy, gather


@pytest.fixture
def sources(tmp_path):
    rng = random.Random(7)
    files = {}
    for name in ("a", "b"):
        p = tmp_path / name
        p.write_bytes(rng.randbytes(1 << 20))
        files[str(p)] = p.read_bytes()
    return files


def _spans(files: dict[str, bytes], n: int, size: int, stride: int) -> list[tuple[str, int, int, int]]:
    """`n` spans of `size` bytes taken every `stride` bytes, alternating between the files."""
    names = sorted(files)
    return [(names[i % 2], (i // 2) * stride, i * size, size) for i in range(n)]


@pytest.mark.parametrize(
    "stride", [4096, 4096 * 2, 300_000]
)  # packed, sparse (region), too sparse (span by span)
def test_gather_matches_the_spans(sources, stride):
    spans = _spans(sources, 6, 4096, stride)
    fds = {f: os.open(f, os.O_RDONLY) for f in sources}
    try:
        got = bytes(gather(sorted(spans), fds, 6 * 4096))
    finally:
        for fd in fds.values():
            os.close(fd)
    expected = b"".join(sources[f][o : o + n] for f, o, _, n in sorted(spans, key=lambda s: s[2]))
    assert got == expected


def test_write_item_gathers_small_spans_into_one_write(sources, tmp_path, monkeypatch):
    spans = _spans(sources, 8, 1024, 2048)
    copies = []
    monkeypatch.setattr(writer, "copy_range", lambda *a: copies.append(a))
    out = tmp_path / "out"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    opened: dict[str, int] = {}
    try:
        writer._write_item(fd, 16, ("k", (8 * 1024,), "uint8", 8 * 1024), ("k", FileCopy(spans)), opened)
    finally:
        os.close(fd)
        for src in opened.values():
            os.close(src)
    assert copies == []  # no copy_file_range per span
    expected = b"".join(sources[f][o : o + n] for f, o, _, n in sorted(spans, key=lambda s: s[2]))
    assert out.read_bytes()[16:] == expected


def test_gather_names_a_source_that_ends_early(sources):
    f = sorted(sources)[0]
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(CheckpointError, match="a source file ended 4096 bytes early while copying"):
            gather([(f, (1 << 20) - 4096, 0, 4096), (f, 1 << 20, 4096, 4096)], {f: fd}, 8192)
    finally:
        os.close(fd)
