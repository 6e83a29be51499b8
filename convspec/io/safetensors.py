"""Safetensors headers: a checkpoint's layout (keys, shapes, dtypes, offsets) without reading data."""

from __future__ import annotations

import json
import os
import struct
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

from ..dtypes import ITEMSIZE
from ..errors import ConvspecError
from ..ops.base import TensorInfo

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


class Entry(NamedTuple):
    """One tensor as a header describes it: where it lives and what it is. Equal tensors share one
    TensorInfo, so binding compares them by identity."""

    key: str
    file: str
    info: TensorInfo
    start: int  # absolute byte offset of the data in the file
    end: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype


def read_header(path: str | Path, seen: dict | None = None) -> list[Entry]:
    """Parse one .safetensors header; every inconsistency is a CheckpointError naming the file.
    `seen` shares TensorInfos between the files of one checkpoint."""
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
    file = str(path)
    seen = {} if seen is None else seen  # (dtype, *shape) -> its TensorInfo and byte size
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            sig = (info["dtype"], *info["shape"])
            a, b = info["data_offsets"]
            known = seen.get(sig)
            if known is None:
                known = seen[sig] = _tensor_info(path, key, info)
        except KeyError as exc:
            raise CheckpointError(f"{path}: tensor {key}: header entry lacks {exc}") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key}: malformed header entry") from None
        if type(a) is not int or type(b) is not int or not 0 <= a <= b or base + b > size:
            raise CheckpointError(f"{path}: tensor {key}: data offsets [{a}, {b}] are outside the file")
        if b - a != known[1]:
            shape = list(known[0].shape)
            raise CheckpointError(
                f"{path}: tensor {key}: {b - a} bytes of data for shape {shape} {known[0].dtype}"
            )
        entries.append(Entry(key, file, known[0], base + a, base + b))
    ordered = sorted(entries, key=itemgetter(3))
    for x, y in zip(ordered, ordered[1:], strict=False):
        if y.start < x.end:
            raise CheckpointError(f"{path}: tensors {x.key} and {y.key} overlap in the file")
    return entries


def _tensor_info(path: Path, key: str, info: dict) -> tuple[TensorInfo, int]:
    """A header entry's dtype and shape, checked, and its size in bytes (once per distinct pair)."""
    if info["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: tensor {key}: unknown dtype {info['dtype']!r}")
    dtype = DTYPES[info["dtype"]]
    shape = tuple(int(s) for s in info["shape"])
    numel = 1
    for s in shape:
        if s < 0:
            raise CheckpointError(f"{path}: tensor {key}: negative dim in shape {list(shape)}")
        numel *= s
    return TensorInfo(shape, dtype), numel * ITEMSIZE[dtype]


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
    seen: dict[tuple, tuple[TensorInfo, int]] = {}
    for f in files:
        for e in read_header(f, seen):
            if e.key in out:
                raise CheckpointError(f"tensor {e.key} appears in both {out[e.key].file} and {e.file}")
            out[e.key] = e
    return out
