"""Safetensors headers: a checkpoint's layout (keys, shapes, dtypes, offsets) without reading data."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import ITEMSIZE
from ..errors import ConvspecError

MAX_HEADER = 100 * 1024 * 1024

DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class CheckpointError(ConvspecError):
    """A checkpoint file or directory is missing, unreadable or malformed; names the file."""


@dataclass(frozen=True)
class Entry:
    """One tensor as a header describes it: where it lives and what it is."""

    key: str
    file: str
    shape: tuple[int, ...]
    dtype: str
    start: int  # absolute byte offset of the data in the file
    end: int


def read_header(path: str | Path) -> list[Entry]:
    """Parse one .safetensors header; every inconsistency is a CheckpointError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} is larger than the file ({size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a safetensors file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    base = 8 + n
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            a, b = (int(x) for x in info["data_offsets"])
        except KeyError as exc:
            if isinstance(info, dict) and "dtype" in info and info["dtype"] not in DTYPES:
                raise CheckpointError(f"{path}: tensor {key}: unknown dtype {info['dtype']!r}") from None
            raise CheckpointError(f"{path}: tensor {key}: header entry lacks {exc}") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key}: malformed header entry") from None
        numel = 1
        for s in shape:
            if s < 0:
                raise CheckpointError(f"{path}: tensor {key}: negative dim in shape {list(shape)}")
            numel *= s
        if not 0 <= a <= b or base + b > size:
            raise CheckpointError(f"{path}: tensor {key}: data offsets [{a}, {b}] are outside the file")
        if b - a != numel * ITEMSIZE[dtype]:
            raise CheckpointError(
                f"{path}: tensor {key}: {b - a} bytes of data for shape {list(shape)} {dtype}"
            )
        entries.append(Entry(key, str(path), shape, dtype, base + a, base + b))
    ordered = sorted(entries, key=lambda e: e.start)
    for x, y in zip(ordered, ordered[1:], strict=False):
        if y.start < x.end:
            raise CheckpointError(f"{path}: tensors {x.key} and {y.key} overlap in the file")
    return entries


def checkpoint_files(src: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: a directory (index.json or model.safetensors) or one file."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid index ({exc})") from None
        files = []
        root = src.resolve()
        for name in dict.fromkeys(weight_map.values()):
            p = (src / name).resolve()
            if os.path.isabs(name) or root not in p.parents:
                raise CheckpointError(f"{index}: shard {name!r} is outside the checkpoint directory")
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {name} is listed but missing")
            files.append(src / name)
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src}: no .safetensors files (and no model.safetensors.index.json)")
    return files


def read_layout(src: str | Path | list) -> dict[str, Entry]:
    """Every tensor of a checkpoint (a directory, one file, or a list of files) by key, from headers only;
    duplicate keys across files are an error."""
    out: dict[str, Entry] = {}
    files = (
        [f for part in src for f in checkpoint_files(part)]
        if isinstance(src, list | tuple)
        else checkpoint_files(src)
    )
    for f in files:
        for e in read_header(f):
            if e.key in out:
                raise CheckpointError(f"tensor {e.key} appears in both {out[e.key].file} and {e.file}")
            out[e.key] = e
    return out
