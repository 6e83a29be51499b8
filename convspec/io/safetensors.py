"""Safetensors headers: a checkpoint's layout (keys, shapes, dtypes, offsets) without reading data."""

from __future__ import annotations

import json
import os
import stat
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
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"{path}: is a directory, not a safetensors file")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} is larger than the file ({size} bytes): "
                    "truncated, or not a safetensors file"
                )
            if n > MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n} is over the limit of {MAX_HEADER} bytes")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and ints past 4300 digits
        raise CheckpointError(f"{path}: header is not valid JSON ({str(exc)[:200]})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    if raw.count(b'"data_offsets"') > len(header) - ("__metadata__" in header):  # a key twice? look closer
        try:
            json.loads(raw, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise CheckpointError(f"{path}: header has the key {exc.args[0]!r} twice") from None
    base = 8 + n
    file = str(path)
    seen = {} if seen is None else seen  # (dtype, *shape) -> its TensorInfo and byte size
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:  # the common case fast; anything odd is looked at closely by _entry_fields
            shape = info["shape"]
            a, b = info["data_offsets"]
            sig = (info["dtype"], *shape)
            known = seen.get(sig)
        except (KeyError, TypeError, ValueError):
            known = None
        if known is None or type(a) is not int or type(b) is not int or type(shape) is not list:
            a, b, sig = _entry_fields(path, key, info)  # every type checked (a new dtype and shape)
            known = seen.get(sig)
            if known is None:
                known = seen[sig] = _tensor_info(path, key, sig)
        if not 0 <= a <= b or base + b > size:
            raise CheckpointError(
                f"{path}: tensor {key}: data offsets [{a}, {b}] are outside the file "
                f"({size - base} bytes of data)"
            )
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


class _DuplicateKey(Exception):
    """A JSON object gives one key twice (json.loads would silently keep the last)."""


def _unique_keys(pairs: list) -> dict:
    """A JSON object as a dict; a repeated key is refused, so a header cannot hide a tensor."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _entry_fields(path: Path, key: str, info) -> tuple[int, int, tuple]:
    """A header entry's data offsets and its (dtype, *shape) signature, each of the right JSON type."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {key}: malformed header entry (not a JSON object)")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise CheckpointError(f"{path}: tensor {key}: header entry lacks {field!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise CheckpointError(f"{path}: tensor {key}: dtype {dtype!r} is not a string")
    if not isinstance(shape, list) or any(type(s) is not int for s in shape):
        raise CheckpointError(f"{path}: tensor {key}: shape {shape!r} is not a list of integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or any(type(o) is not int for o in offsets):
        raise CheckpointError(f"{path}: tensor {key}: data_offsets {offsets!r} are not two integers")
    return offsets[0], offsets[1], (dtype, *shape)


def _tensor_info(path: Path, key: str, sig: tuple) -> tuple[TensorInfo, int]:
    """A header entry's dtype and shape, checked, and its size in bytes (once per distinct pair)."""
    code, *shape = sig
    if code not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {key}: unknown dtype {code!r}", hint=f"dtypes: {', '.join(DTYPES)}"
        )
    dtype = DTYPES[code]
    numel = 1
    for s in shape:
        if s < 0:
            raise CheckpointError(f"{path}: tensor {key}: negative dim in shape {shape}")
        numel *= s
    return TensorInfo(tuple(shape), dtype), numel * ITEMSIZE[dtype]


INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # as io/pickled.py reads them, only when asked


def checkpoint_files(src: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: a directory (index.json or model.safetensors) or one file.
    Files of a directory must lie in it (a symlink out of it is refused, but for a hub cache's blobs)."""
    src = Path(src)
    try:
        if src.is_file():
            if src.name.endswith(PICKLE_SUFFIXES):
                raise _pickle_refused(src)
            return [src]
        if not src.exists():
            raise CheckpointError(f"{src}: no such file or directory")
        if not src.is_dir():
            raise CheckpointError(f"{src}: not a regular file or directory")
        index = src / INDEX
        if index.is_file() or index.is_symlink():
            return index_files(src, index)
        files = sorted(src.glob("*.safetensors"))
        if not files:
            pickles = sorted(p for p in src.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise _pickle_refused(pickles[0])
            raise CheckpointError(f"{src}: no .safetensors files (and no {INDEX})")
        for f in files:
            check_inside(src, f, f)
        return files
    except OSError as exc:
        raise CheckpointError(f"{src}: cannot read it ({exc.strerror or exc})") from None


def _pickle_refused(path: Path) -> CheckpointError:
    """Unpickling runs whatever code the file names, so a pickle is never read unless asked for."""
    return CheckpointError(
        f"{path}: a pickle checkpoint: pickle files are not read, as loading one can run code",
        hint="pass --allow-pickle to read only its tensors (torch.load with weights_only=True), "
        "or convert it to safetensors",
    )


def index_files(src: Path, index: Path) -> list[Path]:
    """The shards an index names, each a file inside the checkpoint directory."""
    check_inside(src, index, index)
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{index}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except ValueError as exc:  # an int past 4300 digits
        raise CheckpointError(f"{index}: invalid JSON ({str(exc)[:200]})") from None
    except RecursionError:
        raise CheckpointError(f"{index}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{index}: an index must be a JSON object, not {type(data).__name__}")
    if not isinstance(data.get("weight_map"), dict):
        raise CheckpointError(
            f"{index}: an index needs a weight_map object (key -> shard file)",
            hint='an index is {"weight_map": {"KEY": "SHARD.safetensors", ...}}',
        )
    files = []
    for key, name in data["weight_map"].items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index}: key {key}: shard {name!r} is not a file name")
    for name in dict.fromkeys(data["weight_map"].values()):
        if os.path.isabs(name) or "\0" in name:
            raise CheckpointError(f"{index}: shard {name!r} is outside the checkpoint directory")
        p = src / name
        check_inside(src, p, index, f"shard {name!r}")
        if not p.is_file():
            raise CheckpointError(f"{index}: shard {name} is listed but missing")
        files.append(p)
    return files


def check_inside(src: Path, path: Path, where: Path, what: str | None = None) -> None:
    """Refuse a file of checkpoint directory `src` that is, or links to, something outside it. A Hugging
    Face cache snapshot's files link into the repo's blobs folder, which is allowed."""
    root = src.resolve()
    try:
        real = Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:  # a missing file or a dangling link: where it would be
        real = Path(os.path.realpath(path))
    except OSError as exc:  # a symlink loop, mostly
        named = f"{what}: " if what else ""
        raise CheckpointError(f"{where}: {named}cannot follow it ({exc.strerror or exc})") from None
    roots = [root] + [  # models--org--name/snapshots/REV/... links into models--org--name/blobs
        a.parent.parent / "blobs"
        for a in (root, *root.parents)
        if a.parent.name == "snapshots" and "--" in a.parent.parent.name
    ]
    if any(r in real.parents for r in roots):
        return
    prefix = f"{where}: {what} is" if what else f"{where}:"
    lexical = Path(os.path.normpath(path.absolute()))
    if Path(os.path.normpath(src.absolute())) in lexical.parents:  # inside by name: a link leads out
        raise CheckpointError(
            f"{prefix} a symlink to {real}, outside the checkpoint directory",
            hint="copy the file into the directory"
            + (", or pass the file itself" if real.name.endswith(".safetensors") else ""),
        )
    raise CheckpointError(f"{prefix} outside the checkpoint directory")


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
