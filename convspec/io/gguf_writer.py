"""Writing one GGUF file atomically: the header computed from the entries before any tensor, each
tensor then written (or copied file to file) straight to its offset, the file renamed into place last."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..ops.base import short
from ..ops.ggml import BLOCK_TYPES, GGML_TYPES, QUANTIZABLE, block_size, type_id
from .destination import check_destination, make_folders, output_path, remove_folders, write_error
from .gguf import DEFAULT_ALIGNMENT, PLAIN_TYPES, dtype_type, header_bytes, tensor_nbytes
from .safetensors import CheckpointError
from .writer import (
    TMP_MARK,
    Atomic,
    Cleanup,
    FileCopy,
    _deferred_interrupt,
    _fsync_dir,
    _mark,
    _uninterrupted,
    clean_temporaries,
    gather,
    pwrite_all,
    tensor_bytes,
    write_item,
)

if TYPE_CHECKING:
    import torch

# what --gguf-type takes: the type of every tensor of 2 dims or more (1-D ones stay F32, as llama.cpp
# keeps norms and biases)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # llama.cpp's general.file_type


def check_gguf_type(name: str | None) -> int | None:
    """The GGML type id `--gguf-type` names, or None; CheckpointError naming the choices."""
    if name is None:
        return None
    if str(name).lower() not in GGUF_TYPES:
        raise CheckpointError(
            f"unknown GGUF type {short(name)}", hint=f"--gguf-type takes one of {', '.join(GGUF_TYPES)}"
        )
    return type_id(name)


# tensors llama.cpp's converter keeps F32 whatever the file type (convert_hf_to_gguf.py prepare_tensors):
# norms, router and convolution weights, ssm constants, relative position biases
KEEP_F32 = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ssm_conv1d.weight",
    "shortconv.conv.weight",
    "ssm_a",
    "ssm_d",
    "attn_rel_b.weight",
    "position_embd.weight",
    "token_types.weight",
)


def tensor_types(entries: list[tuple[str, tuple[int, ...], str]], gguf_type: int | None) -> dict[str, int]:
    """Each output's GGML type: its own dtype's, or with `gguf_type`, that type for tensors of two
    dims or more (F16 where rows are not whole blocks: llama.cpp's fallback), F32 for the rest and
    for those llama.cpp keeps F32 (KEEP_F32)."""
    out = {}
    for key, shape, dtype in entries:
        if gguf_type is None:
            out[key] = dtype_type(dtype)
        elif len(shape) < 2 or key.endswith(KEEP_F32):
            out[key] = dtype_type("float32")
        elif gguf_type in BLOCK_TYPES and shape[-1] % block_size(gguf_type)[0]:
            out[key] = dtype_type("float16")
        else:
            out[key] = gguf_type
    return out


class AtomicFile(Atomic):
    """A temporary file beside `dst`, renamed into place only by `commit()`; removed on failure. Named
    as AtomicDir names its temporaries, so the next run clears what a killed one left."""

    def __init__(self, dst: str | Path, overwrite: bool = False):
        self.dst = output_path(dst)
        check_destination(dst)
        self.overwrite = overwrite
        self._made: list[Path] = []
        self.fd: int | None = None
        self.tmp = self.dst.parent / f".{self.dst.name}{TMP_MARK}{_mark()}"
        parent = self.dst.parent
        self.cleanup = clean_temporaries(self.dst) if parent.is_dir() else Cleanup([], None, [])
        if os.path.lexists(self.dst):
            if not overwrite:
                raise CheckpointError(f"{self.dst} already exists", hint="pass --overwrite to replace it")
            if self.dst.is_dir() and not self.dst.is_symlink():
                raise CheckpointError(
                    f"cannot write {dst}: it is a folder, and a GGUF output is one file",
                    hint="name a .gguf file that is not a folder",
                )
        try:
            with _deferred_interrupt():
                self._made = make_folders(parent)
                self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            self.abort()
            raise write_error(exc, self.dst, self.tmp) from None

    def commit(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        if self.overwrite:
            os.replace(self.tmp, self.dst)  # atomic for a file: the old one or the new one
        elif not self._rename_noreplace():
            raise CheckpointError(
                f"{self.dst} appeared while converting; it was left as it is",
                hint="pass --overwrite to replace it",
            )
        _fsync_dir(self.dst.parent)
        self._made = []

    def abort(self) -> None:
        with _uninterrupted():
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            remove_folders(self._made)
            self._made = []

    def __enter__(self) -> int:
        return self.fd


def write_gguf(
    fd: int,
    entries: list[tuple[str, tuple[int, ...], str]],
    tensors: Iterable[tuple[str, torch.Tensor | FileCopy]],
    metadata: Mapping[str, tuple[str, Any]],
    types: Mapping[str, int],
    order: list[str] | None = None,
) -> int:
    """Write a GGUF file to `fd`: tensors arrive in `entries` order and are laid out in `order` (by
    default the same); a tensor whose type is not its dtype's is cast or quantized on the way. The
    number of bytes written."""
    by_key = {key: (shape, dtype) for key, shape, dtype in entries}
    laid = order or [key for key, _, _ in entries]
    head, offsets, end = header_bytes(
        metadata, [(k, by_key[k][0], types[k]) for k in laid], DEFAULT_ALIGNMENT
    )
    at = dict(zip(laid, offsets, strict=True))
    os.ftruncate(fd, end)  # the padding between tensors is zeros, as gguf-py writes it
    pwrite_all(fd, memoryview(head), 0)
    sources: dict[str, int] = {}
    try:
        for key, item in tensors:
            shape, dtype = by_key[key]
            ggml_type = types[key]
            if isinstance(item, FileCopy) and ggml_type != dtype_type(dtype):  # bytes to cast: read them
                item = _read(item, shape, dtype, sources)
            if isinstance(item, FileCopy):
                size = sum(span[3] for span in item.spans)
                write_item(fd, at[key], (key, shape, dtype, size), (key, item), sources)
            else:
                data = tensor_bytes(stored_as(item, ggml_type))
                if len(data) != tensor_nbytes(shape, ggml_type):
                    raise RuntimeError(f"writer expected {key} {list(shape)}, got {list(item.shape)}")
                pwrite_all(fd, data, at[key])
    finally:
        for src in sources.values():
            os.close(src)
    return end


def _read(item: FileCopy, shape: tuple[int, ...], dtype: str, sources: dict[str, int]) -> torch.Tensor:
    """The tensor a FileCopy's spans hold."""
    import torch

    from ..dtypes import DTYPES

    size = sum(span[3] for span in item.spans)
    for file in {span[0] for span in item.spans}:
        if file not in sources:
            sources[file] = os.open(file, os.O_RDONLY)
    data = gather(sorted(item.spans), sources, size)
    return torch.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape) if size else torch.empty(shape)


def stored_as(t: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """`t` as GGUF stores it with this type: cast to its dtype, or quantized into blocks."""
    from ..dtypes import DTYPES
    from ..ops.ggml import quantize

    name = GGML_TYPES[ggml_type]
    if name in PLAIN_TYPES:
        dtype = DTYPES[PLAIN_TYPES[name]]
        return t if t.dtype == dtype else t.to(dtype)
    if ggml_type not in QUANTIZABLE:
        raise CheckpointError(f"convspec cannot quantize to {name}", hint="choose --gguf-type q8_0 or q4_0")
    return quantize(t.float(), ggml_type)
