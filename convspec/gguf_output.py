"""Converting into one GGUF file: its metadata from the config (and from what a conversion from GGUF
kept beside the weights), each tensor's GGML type, the file written atomically."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .bind import BoundPlan
from .io.checkpoint import Checkpoint
from .io.config import load_config
from .io.gguf_checkpoint import GgufCheckpoint, saved_gguf
from .io.gguf_writer import FILE_TYPES, AtomicFile, check_gguf_type, tensor_types, write_gguf
from .io.safetensors import CheckpointError
from .ops.ggml import GGML_TYPES


def gguf_metadata(
    ckpt: Checkpoint, types: dict[str, int], tensor_names: list[str], chosen: bool = False
) -> tuple[dict[str, tuple[str, Any]], list[str]]:
    """The metadata to write and the tensor order: a GGUF's own (kept beside a conversion from it)
    where the config still says the same, the config's (`convspec.ggufmeta`) where it says more or
    otherwise; general.file_type from the types written, where a type was chosen or the file had one."""
    if isinstance(ckpt, GgufCheckpoint):  # GGUF to GGUF: the file's own
        saved, order = dict(ckpt.header.metadata), list(ckpt.header.tensors)
    else:
        saved, order = saved_gguf(ckpt.src if ckpt.src.is_dir() else None)
    meta = dict(saved)
    for key, (vtype, value) in _from_config(ckpt, tensor_names, saved).items():
        if key not in meta or meta[key][1] != value:
            meta[key] = (vtype, value)
    file_type = _file_type(types)
    if file_type is not None and (chosen or "general.file_type" in meta):
        meta["general.file_type"] = ("u32", file_type)
    known = set(tensor_names)
    laid = [n for n in order if n in known]
    return meta, laid + [n for n in tensor_names if n not in set(laid)]


def _from_config(ckpt: Checkpoint, tensor_names: list[str], saved: dict) -> dict[str, tuple[str, Any]]:
    """The metadata the checkpoint's config.json describes; {} where the GGUF's own metadata was kept
    and the config is missing, of a model type no GGUF mapping knows, or says what that metadata says
    (every key transformers reads from it equal): then the file's own keys stay as they were."""
    from . import ggufmeta
    from .errors import ConvspecError

    config = load_config(ckpt.config)
    if config is None:
        if saved:
            return {}
        raise CheckpointError(
            f"{ckpt.src} has no config.json, which a GGUF file's metadata is made from",
            hint="convert a Hugging Face directory that has its config.json",
        )
    try:
        arch = ggufmeta.gguf_arch(config.get("model_type", ""))
    except ConvspecError:
        if saved:
            return {}
        raise
    if saved and _says_the_same(ggufmeta, arch, config, saved, tensor_names):
        return {}
    return ggufmeta.metadata_from_config(config, tensor_names)


def _says_the_same(ggufmeta, arch: str, config: dict, saved: dict, tensor_names: list[str]) -> bool:
    """Whether the config is what the kept metadata describes, on every key transformers reads."""
    from .errors import ConvspecError

    try:
        implied = ggufmeta.config_from_metadata({k: v for k, (_, v) in saved.items()}, tensor_names)
    except ConvspecError:
        return False
    return all(_lookup(implied, key) == _lookup(config, key) for key in ggufmeta.loading_keys(arch))


def _lookup(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _file_type(types: dict[str, int]) -> int | None:
    """llama.cpp's file type: the type most tensors are stored as."""
    if not types:
        return None
    common, _ = Counter(types.values()).most_common(1)[0]
    return FILE_TYPES.get(GGML_TYPES[common])


def check_gguf_names(bound: BoundPlan, src: str | Path, dst: str | Path) -> None:
    """Refuse a source key that would reach the GGUF file under its own name: no rule claims it and it
    is not in the GGUF layout already, so it has no llama.cpp name (a layout the spec does not read)."""
    already = set(bound.already)
    left = [k for k in bound.unmatched if k not in already]
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise CheckpointError(
            f"cannot write {dst}: {len(left)} tensor(s) of {src} have no GGUF name in spec "
            f"{bound.plan.name}: {shown}",
            hint="a GGUF file holds llama.cpp's names only: convert a checkpoint in the layout the spec "
            "reads (`convspec explain SPEC KEY` shows which rule would claim a key)",
        )


def write_gguf_output(
    ckpt: Checkpoint,
    dst: str | Path,
    entries: list[tuple[str, tuple[int, ...], str]],
    tensors: Iterable[tuple[str, Any]],
    *,
    gguf_type: str | None = None,
    overwrite: bool = False,
) -> tuple[list[str], Any]:
    """Write the converted tensors (arriving in `entries` order, as tensors or byte ranges to copy:
    those to cast or quantize are read) as the GGUF file `dst`. The file's name and what was cleaned
    up of killed earlier runs."""
    chosen = check_gguf_type(gguf_type)
    types = tensor_types(entries, chosen)
    metadata, order = gguf_metadata(ckpt, types, [k for k, _, _ in entries], chosen is not None)
    atomic = AtomicFile(dst, overwrite=overwrite)
    with atomic as fd:
        write_gguf(fd, entries, tensors, metadata, types, order)
    return [atomic.dst.name], atomic.cleanup
