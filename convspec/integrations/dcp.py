"""A `torch.distributed.checkpoint` StorageReader that presents an original-layout checkpoint in its
converted layout (issue 16): DCP plans and reshards, and each read item is served from the source
bytes its region of a converted tensor is made of (`regions.RegionReader`), nothing more."""

from __future__ import annotations

import difflib
import os
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch.distributed.checkpoint import StorageReader

from ..errors import ConvspecError
from .dcp_writer import ConvspecWriter  # the way back, beside the reader

__all__ = ["ConvspecReader", "ConvspecWriter"]

if TYPE_CHECKING:
    from torch.distributed.checkpoint import LoadPlan, LoadPlanner, Metadata
    from torch.futures import Future

    from ..regions import ReadStats

SHOWN = 5  # keys named in one error message at most


class ConvspecReader(StorageReader):
    """`dcp.load(state_dict, storage_reader=ConvspecReader(plan, src))`: `src`, a checkpoint in the
    layout `plan` reads, loaded as the layout it writes. The checkpoint is bound on construction
    (headers only), so a checkpoint the plan does not fit is a ConvspecError here, not inside DCP."""

    def __init__(self, plan, src: str | os.PathLike, strict: bool = False):
        super().__init__()
        self.plan, self.strict = plan, strict
        self._bind(src)

    def _bind(self, src: str | os.PathLike) -> None:
        from ..io.formats import open_checkpoint
        from ..regions import RegionReader
        from ..streaming import bind_checkpoint

        ckpt = open_checkpoint(src)
        self.bound = bind_checkpoint(self.plan, ckpt, self.strict)
        self.src, self.ckpt = src, ckpt
        self.regions = RegionReader(self.bound, ckpt)
        self.load_id = uuid.uuid4().hex

    @property
    def stats(self) -> ReadStats:
        """What the last load read: bytes, byte runs, regions read wider than asked."""
        return self.regions.stats

    @property
    def checkpoint_id(self) -> str | os.PathLike:
        return self.src

    # ---- the StorageReader protocol, in the order dcp.load calls it ------------------------------

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """A new load; `checkpoint_id` (given to dcp.load) names another checkpoint to bind."""
        if checkpoint_id is not None and os.fspath(checkpoint_id) != os.fspath(self.src):
            self._bind(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        """A safetensors checkpoint: a folder holding .safetensors files, or one such file."""
        path = os.fspath(checkpoint_id)
        if os.path.isdir(path):
            return any(name.endswith(".safetensors") for name in os.listdir(path))
        return path.endswith(".safetensors") and os.path.isfile(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Every converted tensor as one chunk of its whole shape, from the headers: no data is read."""
        import torch
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            Metadata,
            StorageMeta,
            TensorProperties,
            TensorStorageMetadata,
        )

        from ..dtypes import DTYPES

        tensors = {}
        for target, (shape, dtype) in self.bound.outputs.items():
            size = torch.Size(shape)
            chunk = ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=size)
            tensors[target] = TensorStorageMetadata(TensorProperties(dtype=DTYPES[dtype]), size, [chunk])
        meta = StorageMeta(checkpoint_id=os.fspath(self.src), load_id=self.load_id)
        return Metadata(state_dict_metadata=tensors, storage_meta=meta)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        """A fresh count of what this load reads (the regions are found as items come)."""
        from ..regions import RegionReader

        self.regions = RegionReader(self.bound, self.ckpt)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Each read item's region of its converted tensor, read from its source bytes and copied
        into the place the planner resolves for it (a plain tensor, or a DTensor's local shard)."""
        from torch.distributed.checkpoint.planner import LoadItemType
        from torch.futures import Future

        for item in plan.items:
            target = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                raise ConvspecError(
                    f"{target}: DCP asks for a non-tensor value; a converted checkpoint holds only tensors",
                    hint="load only tensors through ConvspecReader",
                )
            # the stored chunk is the whole tensor (offsets 0), so the item's offsets are the region's
            region = tuple((o, o + n) for o, n in zip(item.storage_offsets, item.lengths, strict=True))
            got = self.regions.read(target, region)
            dest = planner.resolve_tensor(item).detach()
            if dest.shape != got.shape:  # pragma: no cover - the planner sizes both from the same item
                raise ConvspecError(f"{target}: region {list(got.shape)} for a place of {list(dest.shape)}")
            dest.copy_(got)
            planner.commit_tensor(item, dest)
        done: Future = Future()
        done.set_result(None)
        return done

    # ---- the errors DCP would wrap -----------------------------------------------------------------

    def check(self, state_dict: Mapping[str, Any]) -> None:
        """Refuse, as one ConvspecError, a state dict this checkpoint cannot fill: a key that is not
        in the converted layout, a shape that differs, a value that is not a tensor. dcp.load raises
        everything inside it wrapped in a CheckpointException; calling this first on every rank
        (no collective) gives the plain error, on every rank, before any data is read."""
        import torch

        outputs, problems, unknown = self.bound.outputs, [], []
        for key, value in _flat(state_dict):
            if key not in outputs:
                unknown.append(key)
            elif not isinstance(value, torch.Tensor):
                problems.append(f"{key} is a {type(value).__name__}, not a tensor")
            elif tuple(value.shape) != tuple(outputs[key][0]):
                shape = list(outputs[key][0])
                problems.append(f"{key} has shape {list(value.shape)}; the checkpoint's is {shape}")
        if unknown:
            verb = "is" if len(unknown) == 1 else "are"
            problems.insert(0, f"{_some(unknown)} {verb} not in the converted layout")
        if problems:
            fit = f"the state dict does not fit {self.src} as {self.plan.name} converts it"
            raise ConvspecError(f"{fit}: " + "; ".join(problems), hint=self._hint(unknown))

    def _hint(self, unknown: list[str]) -> str:
        """Where the unknown keys come from: the original layout, or a near name."""
        original = [k for k in unknown if k in self.bound.layout]
        if original:
            return f"{original[0]} is a key of the original checkpoint: give the state dict of the converted model"
        close = difflib.get_close_matches(unknown[0], list(self.bound.outputs), 1) if unknown else []
        if close:
            return f"did you mean {close[0]}?"
        return "give tensors of the converted layout's keys and shapes (read_metadata() lists them)"


def _flat(state_dict: Mapping[str, Any], prefix: str = ""):
    """The (key, value) pairs of a state dict, nested dicts flattened with dots as DCP flattens them."""
    for key, value in state_dict.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")
