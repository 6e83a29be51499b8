"""A per-tensor hash manifest: written beside a conversion's output, checked later against the source
and the output. It is a checksum list, not a signature: it shows that both still hash to what it
records, and proves nothing about who wrote it or what it was converted from (docs/safety.md, 5)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .dtypes import ITEMSIZE
from .errors import ConvspecError
from .io.safetensors import Entry, read_layout
from .io.sidefile import MAX_MANIFEST_BYTES, load_json

MANIFEST = "convspec-manifest.json"
FORMAT = 1
_PIECE = 8 << 20


def tensor_digest(fd: int, start: int, end: int) -> str:
    """The sha256 of one tensor's bytes in an open file, read in pieces (bounded memory)."""
    h = hashlib.sha256()
    pos = start
    while pos < end:
        data = os.pread(fd, min(_PIECE, end - pos), pos)
        if not data:
            raise ConvspecError(f"the file ends at byte {pos}, inside a tensor that runs to byte {end}")
        h.update(data)
        pos += len(data)
    return h.hexdigest()


def digests(entries: dict[str, Entry]) -> dict[str, str]:
    """sha256 of every tensor of a checkpoint layout, key -> hex digest, each file opened once."""
    out: dict[str, str] = {}
    by_file: dict[str, list[Entry]] = {}
    for e in entries.values():
        by_file.setdefault(e.file, []).append(e)
    for file, es in by_file.items():
        fd = os.open(file, os.O_RDONLY)
        try:
            for e in sorted(es, key=lambda e: e.start):
                out[e.key] = tensor_digest(fd, e.start, e.end)
        finally:
            os.close(fd)
    return dict(sorted(out.items()))


def build(spec: str, reverse: bool, dtype: str | None, src: str | Path, out_dir: str | Path) -> dict:
    """The manifest of a finished conversion: the source's and the output's tensor digests, with
    each output tensor's dtype, shape and shard. Deterministic: no times, no absolute paths."""
    source = read_layout(src)
    output = read_layout(out_dir)
    out_digests = digests(output)
    return {
        "convspec_manifest": FORMAT,
        "spec": spec,
        "reverse": reverse,
        "dtype": dtype,
        "source": digests(source),
        "output": {
            k: {
                "sha256": out_digests[k],
                "dtype": e.dtype,
                "shape": list(e.shape),
                "file": Path(e.file).name,
            }
            for k, e in sorted(output.items())
        },
    }


def write(manifest: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def load(out_dir: str | Path) -> dict:
    """A converted directory's manifest; a missing or malformed one is an error naming the file. It is
    read with a size cap and checked whole (every field's type and size) before anything uses it."""
    path = Path(out_dir) / MANIFEST
    if not os.path.lexists(path):
        raise ConvspecError(
            f"{path}: no manifest", hint="convert with --manifest to write one beside the output"
        )
    d = load_json(path, MAX_MANIFEST_BYTES, ConvspecError, "manifest")
    if (
        not isinstance(d, dict)
        or d.get("convspec_manifest") != FORMAT
        or type(d["convspec_manifest"]) is not int
    ):
        raise ConvspecError(f"{path}: not a convspec manifest (format {FORMAT})")
    _check_schema(path, d)
    return d


MAX_NAME_CHARS = 4096  # a spec name, tensor key or shard name longer than a path can be is no real one
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"convspec_manifest", "spec", "reverse", "dtype", "source", "output"}
_OUTPUT_FIELDS = {"sha256", "dtype", "shape", "file"}


def _check_schema(path: Path, d: dict) -> None:
    """Every field of a manifest of format 1, of its type and size: what `write` writes, nothing else."""

    def bad(where: str, what: str) -> ConvspecError:
        return ConvspecError(
            f"{path}: {where}: {what}",
            hint="a manifest is written by convert --manifest; convert again to write a fresh one",
        )

    def name(where: str, v) -> None:
        if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME_CHARS:
            raise bad(where, f"not a name of 1 to {MAX_NAME_CHARS} characters")

    def digest(where: str, v) -> None:
        if not isinstance(v, str) or not _SHA256.fullmatch(v):
            raise bad(where, "not a sha256 digest (64 lowercase hex digits)")

    for key in d:
        if key not in _FIELDS:
            raise bad(repr(key)[:80], "not a field of a convspec manifest")
    missing = sorted(_FIELDS - d.keys())
    if missing:
        raise bad(missing[0], "missing")
    name("spec", d["spec"])
    if type(d["reverse"]) is not bool:
        raise bad("reverse", "not true or false")
    if d["dtype"] is not None and not (isinstance(d["dtype"], str) and d["dtype"] in ITEMSIZE):
        raise bad("dtype", f"not null or one of {', '.join(ITEMSIZE)}")
    for side in ("source", "output"):
        if not isinstance(d[side], dict):
            raise bad(side, "not an object (tensor key -> ...)")
    for key, v in d["source"].items():
        name(f"source[{key[:80]!r}]", key)
        digest(f"source[{key[:80]!r}]", v)
    for key, v in d["output"].items():
        where = f"output[{key[:80]!r}]"
        name(where, key)
        if not isinstance(v, dict) or v.keys() != _OUTPUT_FIELDS:
            raise bad(where, f"not an object of {', '.join(sorted(_OUTPUT_FIELDS))}")
        digest(f"{where}.sha256", v["sha256"])
        if not isinstance(v["dtype"], str) or v["dtype"] not in ITEMSIZE:
            raise bad(f"{where}.dtype", f"not one of {', '.join(ITEMSIZE)}")
        shape = v["shape"]
        if not isinstance(shape, list) or any(type(s) is not int or not 0 <= s < 1 << 63 for s in shape):
            raise bad(f"{where}.shape", "not a list of integers from 0 to 2**63 - 1")
        name(f"{where}.file", v["file"])
        if "/" in v["file"] or v["file"] in (".", ".."):
            raise bad(f"{where}.file", "not a file name")


@dataclass
class ManifestCheck:
    """What differs from the manifest: per tensor, source side and output side."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(src: str | Path, out_dir: str | Path) -> ManifestCheck:
    """Hash the source and the converted directory again and compare with the manifest written at
    conversion time: any tensor changed, missing or added on either side is a problem."""
    m = load(out_dir)
    result = ManifestCheck()
    for side, layout, recorded in (
        ("source", read_layout(src), m["source"]),
        ("output", read_layout(out_dir), {k: v["sha256"] for k, v in m["output"].items()}),
    ):
        now = digests(layout)
        for key in sorted(set(recorded) | set(now)):
            result.checked += 1
            if key not in now:
                result.problems.append(f"{side} tensor {key} is in the manifest but gone")
            elif key not in recorded:
                result.problems.append(f"{side} tensor {key} is not in the manifest (added since)")
            elif now[key] != recorded[key]:
                result.problems.append(f"{side} tensor {key} changed since the conversion (sha256 differs)")
    return result
