"""A per-tensor hash manifest: written beside a conversion's output, checked later against the source
and the output, so a user can prove that neither changed since the conversion."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConvspecError
from .io.safetensors import Entry, read_layout

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
    """A converted directory's manifest; a missing or malformed one is an error naming the file."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise ConvspecError(
            f"{path}: no manifest", hint="convert with --manifest to write one beside the output"
        )
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvspecError(f"{path}: not valid JSON ({exc})") from None
    ok = (
        isinstance(d, dict)
        and d.get("convspec_manifest") == FORMAT
        and isinstance(d.get("source"), dict)
        and isinstance(d.get("output"), dict)
        and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in d["output"].values())
    )
    if not ok:
        raise ConvspecError(f"{path}: not a convspec manifest (format {FORMAT})")
    return d


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
