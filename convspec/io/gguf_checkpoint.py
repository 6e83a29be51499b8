"""A GGUF file read as a checkpoint: the same lazy, byte-range interface as safetensors.

Plain-typed tensors (F32, F16, BF16, ...) are bytes torch reads as they are, so renames copy them file
to file. Block-typed ones (Q8_0, Q4_K, ...) are decoded on read by the `dequant_ggml` op: the block type
is how this file stores a tensor, chosen per tensor, not part of the layout a spec describes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint
from .gguf import MAX_NESTING, TYPE_IDS, GgufHeader, entries, read_header
from .safetensors import CheckpointError

if TYPE_CHECKING:
    import torch

SUFFIX = ".gguf"
METADATA_FILE = "gguf_metadata.json"  # the metadata a config.json does not hold, for the way back


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == SUFFIX


class GgufCheckpoint(Checkpoint):
    """One .gguf file. Its config is built from its metadata (`convspec.ggufmeta`); converting it
    writes that config.json and the rest of the metadata (tokenizer, ...) beside the weights."""

    def __init__(self, src: str | Path):
        self.files = None
        self.src = Path(src)
        self.header: GgufHeader = read_header(self.src)
        self.entries, self.decoded = entries(self.header)
        self.side_files = []
        self._fds = {}
        self._pool = None
        self._config: dict | None = None

    @property
    def config_path(self) -> Path | None:
        return None

    @property
    def config(self) -> dict | None:
        """The transformers config this file's metadata describes; None for an architecture that no
        GGUF mapping knows (a spec of one's own can still convert its tensors)."""
        if self._config is None:
            from .. import ggufmeta
            from ..errors import ConvspecError

            try:
                ggufmeta.model_type(str(self.header.value("general.architecture")))
            except ConvspecError:
                return None
            meta = {k: v for k, (_, v) in self.header.metadata.items()}
            self._config = ggufmeta.config_from_metadata(meta, list(self.header.tensors), str(self.src))
        return self._config

    def get(self, key: str) -> torch.Tensor:
        if key not in self.decoded:
            return super().get(key)
        from ..ops.ggml import dequantize

        t = self.header.tensors[key]
        return dequantize(self.assemble(t.stored.shape, "uint8", [(key, 0, 0, t.end - t.start)]), t.ggml_type)

    def copy_side_files(self, dst: Path) -> None:
        """config.json from the metadata, and the metadata itself for `convspec` to write back."""
        if self.config is not None:
            (dst / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        kept = [[k, t, v] for k, (t, v) in self.header.metadata.items()]
        saved = {"metadata": kept, "tensors": list(self.header.tensors)}
        (dst / METADATA_FILE).write_text(json.dumps(saved, ensure_ascii=False) + "\n")


def saved_gguf(directory: Path | None) -> tuple[dict[str, tuple[str, Any]], list[str]]:
    """What a conversion from GGUF left beside the weights for the way back: the file's metadata and
    its tensor order; ({}, []) when there is none."""
    from .sidefile import MAX_CONFIG_BYTES, load_json

    path = None if directory is None else directory / METADATA_FILE
    if path is None or not path.exists():
        return {}, []
    data = load_json(path, MAX_CONFIG_BYTES * 64, CheckpointError, "GGUF metadata file")
    items = data.get("metadata") if isinstance(data, dict) else None
    order = data.get("tensors", []) if isinstance(data, dict) else None
    if (
        not isinstance(items, list)
        or not all(_saved_item(i, TYPE_IDS) for i in items)
        or not isinstance(order, list)
        or not all(isinstance(n, str) for n in order)
    ):
        raise CheckpointError(
            f"{path}: not a GGUF metadata file ({{'metadata': [[key, type, value], ...], 'tensors': [names]}})",
            hint=f"remove {METADATA_FILE}, or convert the .gguf file again",
        )
    return {k: (t, v) for k, t, v in items}, order


def _saved_item(item: Any, types: dict) -> bool:
    """[key, type, value] with a type the reader reads back: arrays nested at most MAX_NESTING deep."""
    if not (
        isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[1], str)
    ):
        return False
    vtype, depth = item[1], 0
    while vtype.startswith("arr:"):
        vtype, depth = vtype.removeprefix("arr:"), depth + 1
    return depth <= MAX_NESTING and (vtype in types or (vtype == "arr" and depth < MAX_NESTING))
