"""GGUF files: the header (metadata, tensor infos) parsed without reading tensor data, and written.

GGML lists a tensor's dims fastest first (`ne[0]` is the row length); torch lists them slowest
first. This module is the one place that reverses them: every shape it returns or takes is torch's.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..dtypes import ITEMSIZE
from ..ops.base import TensorInfo, short
from ..ops.ggml import GGML_TYPES, block_size, row_bytes
from .safetensors import CheckpointError, Entry
from .sidefile import open_regular

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 counted with 32-bit integers and is gone from llama.cpp since 2023
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 1 << 26  # 64 MiB: a chat template or a merged vocabulary is far less
MAX_HEADER = 1 << 31  # 2 GiB of metadata and tensor infos: far more than any real file (~20 MB)
MAX_NESTING = 2  # an array of arrays (gguf-py writes them for some tokenizers), no deeper

# value type id -> (name, struct format); 8 is a string, 9 an array
SCALARS = {
    0: ("u8", "<B"),
    1: ("i8", "<b"),
    2: ("u16", "<H"),
    3: ("i16", "<h"),
    4: ("u32", "<I"),
    5: ("i32", "<i"),
    6: ("f32", "<f"),
    7: ("bool", "<?"),
    10: ("u64", "<Q"),
    11: ("i64", "<q"),
    12: ("f64", "<d"),
}
STRING, ARRAY = 8, 9
TYPE_IDS = {name: code for code, (name, _) in SCALARS.items()} | {"str": STRING}

# GGML types whose bytes are a torch dtype's, element for element: read and copied as they are
PLAIN_TYPES = {
    "f32": "float32",
    "f16": "float16",
    "bf16": "bfloat16",
    "f64": "float64",
    "i8": "int8",
    "i16": "int16",
    "i32": "int32",
    "i64": "int64",
}
GGML_OF_DTYPE = {dtype: name for name, dtype in PLAIN_TYPES.items()}


@dataclass(frozen=True)
class GgufTensor:
    """One tensor info: torch-order shape, GGML type id, and its bytes' absolute range in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    start: int
    end: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type]

    @property
    def dtype(self) -> str | None:
        """The torch dtype whose bytes these are, or None for a block type (dequantized on read)."""
        return PLAIN_TYPES.get(self.type_name)

    @property
    def stored(self) -> TensorInfo:
        """The bytes as a tensor: the plain dtype, or uint8 rows of packed blocks."""
        if self.dtype is not None:
            return TensorInfo(self.shape, self.dtype)
        return TensorInfo((*self.shape[:-1], row_bytes(self.ggml_type, self.shape[-1])), "uint8")


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file says before its tensor data: metadata (key -> (type, value)) and tensors."""

    path: Path
    version: int
    metadata: dict[str, tuple[str, Any]]
    tensors: dict[str, GgufTensor]
    alignment: int
    data_start: int

    def value(self, key: str, default: Any = None) -> Any:
        got = self.metadata.get(key)
        return default if got is None else got[1]


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    """The bytes of a tensor of this (torch) shape stored in this GGML type: rows of whole blocks."""
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows * row_bytes(ggml_type, shape[-1] if shape else 1)


class _Cursor:
    """Reads a header front to back with pread, never past the file's end nor MAX_HEADER: every
    error names the file and the byte where it went wrong."""

    CHUNK = 1 << 20

    def __init__(self, path: Path, fd: int, size: int):
        self.path, self.fd, self.size = path, fd, size
        self.pos = 0
        self._buf, self._at = b"", 0

    def fail(self, what: str, hint: str | None = None) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}", hint=hint or "the file is not a valid GGUF file")

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} at byte {self.pos} needs {n} bytes, but the file ends at byte {self.size}",
                hint="the file is truncated or not a valid GGUF file",
            )
        if self.pos + n > MAX_HEADER:
            raise self.fail(f"the header runs past {MAX_HEADER} bytes ({what} at byte {self.pos})")
        lo = self.pos - self._at
        if lo + n > len(self._buf):
            want = max(n, self.CHUNK)
            self._buf, self._at, lo = os.pread(self.fd, want, self.pos), self.pos, 0
            if len(self._buf) < n:
                raise self.fail(f"the file shrank while reading {what} at byte {self.pos}")
        self.pos += n
        return self._buf[lo : lo + n]

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        at = self.pos
        n = self.unpack("<Q", what)
        if n > MAX_STRING:
            raise self.fail(f"{what} at byte {at} claims {n} bytes (at most {MAX_STRING} are read)")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {at} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> tuple[str, Any]:
        if vtype in SCALARS:
            name, fmt = SCALARS[vtype]
            return name, self.unpack(fmt, what)
        if vtype == STRING:
            return "str", self.string(what)
        if vtype == ARRAY:
            if depth >= MAX_NESTING:
                raise self.fail(f"{what} at byte {self.pos} nests arrays more than {MAX_NESTING} deep")
            elem = self.unpack("<I", what)
            at = self.pos
            count = self.unpack("<Q", what)
            least = (
                struct.calcsize(SCALARS[elem][1]) if elem in SCALARS else 8 if elem in (STRING, ARRAY) else 0
            )
            if not least:
                raise self.fail(f"{what}: unknown array element type {elem} at byte {at - 4}")
            if count * least > self.size - self.pos:
                raise self.fail(
                    f"{what}: an array of {count} elements at byte {at} does not fit in the file "
                    f"({self.size} bytes)",
                    hint="the file is truncated or not a valid GGUF file",
                )
            if elem in SCALARS:
                fmt = SCALARS[elem][1]
                raw = self.take(count * least, what)
                items = list(struct.unpack(f"<{count}{fmt[1]}", raw))
                return f"arr:{SCALARS[elem][0]}", items
            items = [self.value(elem, what, depth + 1) for _ in range(count)]
            inner = items[0][0] if items else ("str" if elem == STRING else "arr")
            return f"arr:{inner}", [v for _, v in items]
        raise self.fail(f"{what}: unknown value type {vtype} at byte {self.pos - 4}")


def read_header(path: str | Path) -> GgufHeader:
    """Parse a GGUF file's header; every inconsistency is a CheckpointError naming the file and byte."""
    path = Path(path)
    fd = open_regular(path, CheckpointError, "GGUF file")
    try:
        size = os.fstat(fd).st_size
        cur = _Cursor(path, fd, size)
        magic = cur.take(4, "the magic number") if size >= 4 else b""
        if magic != MAGIC:
            raise cur.fail(
                f"not a GGUF file: it starts with {magic!r}, not {MAGIC!r}",
                hint="give a .gguf file written by llama.cpp, gguf-py or convspec",
            )
        version = cur.unpack("<I", "the version")
        if version not in VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            why = "a big-endian file" if swapped in VERSIONS else f"version {version}"
            raise cur.fail(
                f"{why} is not supported (versions {', '.join(map(str, VERSIONS))}, little-endian)"
            )
        n_tensors = cur.unpack("<Q", "the tensor count")
        n_kv = cur.unpack("<Q", "the metadata count")
        # every metadata entry takes at least 12 bytes (an empty key, a type, a u8), every tensor info 28
        for count, least, what in ((n_kv, 13, "metadata entries"), (n_tensors, 28, "tensors")):
            if count * least > size:
                raise cur.fail(f"the header claims {count} {what}, more than a file of {size} bytes can hold")
        metadata = _metadata(cur, n_kv)
        alignment = _alignment(cur, metadata)
        infos = [_tensor_info(cur, k) for k in range(n_tensors)]
        data_start = -(-cur.pos // alignment) * alignment
        tensors = _placed(cur, infos, alignment, data_start)
        return GgufHeader(path, version, metadata, tensors, alignment, data_start)
    finally:
        os.close(fd)


def _metadata(cur: _Cursor, count: int) -> dict[str, tuple[str, Any]]:
    out: dict[str, tuple[str, Any]] = {}
    for k in range(count):
        at = cur.pos
        key = cur.string(f"metadata key {k}")
        vtype = cur.unpack("<I", f"the type of {key!r}")
        if key in out:
            raise cur.fail(f"metadata key {key!r} appears twice (the second at byte {at})")
        out[key] = cur.value(vtype, f"metadata {key!r}")
    return out


def _alignment(cur: _Cursor, metadata: dict) -> int:
    vtype, value = metadata.get("general.alignment", ("u32", DEFAULT_ALIGNMENT))
    if vtype != "u32" or not 0 < value <= 1 << 20 or value & (value - 1):
        raise cur.fail(f"general.alignment is {value!r} ({vtype}): it must be a u32 power of two")
    return value


def _tensor_info(cur: _Cursor, k: int) -> tuple[str, tuple[int, ...], int, int, int]:
    at = cur.pos
    name = cur.string(f"the name of tensor {k}")
    n_dims = cur.unpack("<I", f"the dims of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} (info at byte {at}) has {n_dims} dims; GGML allows 1 to {MAX_DIMS}")
    ne = [cur.unpack("<Q", f"the dims of {name!r}") for _ in range(n_dims)]
    ggml_type = cur.unpack("<I", f"the type of {name!r}")
    offset = cur.unpack("<Q", f"the offset of {name!r}")
    if ggml_type not in GGML_TYPES:
        raise cur.fail(f"tensor {name!r} has GGML type {ggml_type}, which convspec does not know")
    return name, tuple(reversed(ne)), ggml_type, offset, at


def _placed(cur: _Cursor, infos: list, alignment: int, data_start: int) -> dict[str, GgufTensor]:
    """Tensor infos checked against each other and the file: aligned, inside it, not overlapping."""
    out: dict[str, GgufTensor] = {}
    for name, shape, ggml_type, offset, at in infos:
        if name in out:
            raise cur.fail(f"tensor {name!r} appears twice (the second info at byte {at})")
        elements, _ = block_size(ggml_type)
        if shape[-1] % elements:
            raise cur.fail(
                f"tensor {name!r}: rows of {shape[-1]} values are not whole {GGML_TYPES[ggml_type]} blocks "
                f"of {elements}"
            )
        nbytes = tensor_nbytes(shape, ggml_type)
        if offset % alignment:
            raise cur.fail(
                f"tensor {name!r}: its offset {offset} is not a multiple of the alignment {alignment}"
            )
        start = data_start + offset
        if nbytes > cur.size or start > cur.size - nbytes:
            raise cur.fail(
                f"tensor {name!r}: its data (bytes {start} to {start + nbytes}) runs past the end of the "
                f"file ({cur.size} bytes)",
                hint="the file is truncated or not a valid GGUF file",
            )
        out[name] = GgufTensor(name, shape, ggml_type, start, start + nbytes)
    spans = sorted((t.start, t.end, t.name) for t in out.values() if t.end > t.start)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise cur.fail(f"tensors {a!r} and {b!r} overlap in the file")
    return out


def entries(header: GgufHeader) -> tuple[dict[str, Entry], dict[str, int]]:
    """The header as checkpoint entries (torch shapes; a block type as the float32 it dequantizes
    to) and the block-typed keys with their GGML type: those are decoded on read, never copied."""
    out, decoded = {}, {}
    infos: dict[TensorInfo, TensorInfo] = {}
    file = str(header.path)
    for name, t in header.tensors.items():
        info = TensorInfo(t.shape, t.dtype or "float32")
        info = infos.setdefault(info, info)  # equal tensors share one TensorInfo (bind compares identity)
        out[name] = Entry(name, file, info, t.start, t.end)
        if t.dtype is None:
            decoded[name] = t.ggml_type
    return out, decoded


# ---- writing -----------------------------------------------------------------------------------


def _pack_value(vtype: str, value: Any) -> bytes:
    if vtype.startswith("arr:"):
        elem = vtype[4:]
        if elem.startswith("arr"):
            items = [_pack_value(elem, v) for v in value]
            return struct.pack("<IQ", ARRAY, len(value)) + b"".join(items)
        code = TYPE_IDS[elem]
        if elem == "str":
            body = b"".join(_pack_string(v) for v in value)
        else:
            body = struct.pack(f"<{len(value)}{SCALARS[code][1][1]}", *value)
        return struct.pack("<IQ", code, len(value)) + body
    if vtype == "str":
        return _pack_string(value)
    return struct.pack(SCALARS[TYPE_IDS[vtype]][1], value)


def _pack_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _type_code(vtype: str) -> int:
    return ARRAY if vtype.startswith("arr:") else TYPE_IDS[vtype]


def header_bytes(
    metadata: dict[str, tuple[str, Any]], tensors: list[tuple[str, tuple[int, ...], int]], alignment: int
) -> tuple[bytes, list[int], int]:
    """A GGUF v3 header for `tensors` (name, torch shape, GGML type) in that order, padded to the
    alignment; each tensor's offset from the start of the file; the file's size (each tensor padded
    to the alignment, the last too, as gguf-py writes it)."""
    parts = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, (vtype, value) in metadata.items():
        try:
            parts += [_pack_string(key), struct.pack("<I", _type_code(vtype)), _pack_value(vtype, value)]
        except (struct.error, KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(
                f"GGUF metadata {key!r}: {short(value)} is not a value of type {vtype}",
                hint=f"types: {', '.join(TYPE_IDS)}, and arr:<type> for a list",
            ) from None
    rel, pos = [], 0
    for name, shape, ggml_type in tensors:
        ne = tuple(reversed(shape)) or (1,)
        parts += [_pack_string(name), struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, pos)]
        rel.append(pos)
        pos += -(-tensor_nbytes(shape, ggml_type) // alignment) * alignment
    head = b"".join(parts)
    head += b"\0" * (-len(head) % alignment)
    return head, [len(head) + r for r in rel], len(head) + pos


def dtype_type(dtype: str) -> int:
    """The GGML type id storing a torch dtype's bytes as they are; CheckpointError for one GGUF lacks."""
    name = GGML_OF_DTYPE.get(dtype)
    if name is None:
        raise CheckpointError(
            f"a {dtype} tensor cannot be stored in GGUF",
            hint=f"GGUF stores {', '.join(sorted(GGML_OF_DTYPE))}: pass --dtype to cast",
        )
    return next(code for code, n in GGML_TYPES.items() if n == name)


assert set(PLAIN_TYPES.values()) <= set(ITEMSIZE)
