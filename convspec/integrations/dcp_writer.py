"""Saving a sharded state dict in the converted layout back to the original one through
`torch.distributed.checkpoint` (issue 16): each rank writes the bytes of its own chunks straight into
the HF safetensors shards, which come out byte-identical to `plan.inverse().save` of the full state dict.

Where an element goes is read through the same slice maps as a sharded load: element ids of the
original tensors take the place of their values (`ElementIds`), so a chunk of a converted tensor
says, element by element, which original key and offset it came from."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from torch.distributed.checkpoint import StorageWriter
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ..blocks import Run
from ..dtypes import ITEMSIZE
from ..errors import ConvspecError
from ..io.destination import write_error
from ..io.memory import tensor_memory
from ..io.writer import AtomicDir, lay_out, parse_size, pwrite_all, write_index
from ..ops import TensorInfo
from ..ops.base import dtype_name
from ..ops.cast import cast_tensor
from ..ops.slicing import Region, SliceMap, strides
from ..regions import RegionReader, cut_runs

if TYPE_CHECKING:
    import torch
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem

    from ..bind import BoundPlan
    from ..compile.plan import Plan

BLOCK = 1 << 22  # elements of a chunk placed at a time: their ids, order and bytes stay a few tens of MB
MIN_RUN = 16  # elements: a chunk whose runs of consecutive ids are shorter on average is sorted by id


class Target(NamedTuple):
    """What every rank needs to write its chunks, sent by the coordinator in each rank's plan
    (`SavePlan.storage_data`): the temporary directory holding the shard files (headers written,
    sized), the original layout in output order, and where each original tensor's data starts."""

    tmp: str
    entries: list[tuple[str, tuple[int, ...], str]]
    files: list[str]
    where: dict[str, tuple[str, int]]  # original key -> (file name, byte offset of its data in the file)


class ElementIds(RegionReader):
    """A region reader that reads, for every element of a converted region, the global id of the
    original element it is: `bases[key]` plus its row-major index in the original tensor. Ops move
    ids as they move values; a cast (an op that `changes_values`) passes them through unchanged."""

    def __init__(self, bound: BoundPlan, bases: dict[str, int], total: int):
        import torch

        super().__init__(bound, None)  # type: ignore[arg-type]  # no checkpoint: nothing is read
        self.bases = bases
        # ids in 32 bits where they all fit: half the memory and time of every op they go through
        self.dtype = torch.int32 if total < 2**31 else torch.int64

    def source(self, key: str, region: Region) -> torch.Tensor:
        import torch

        ids = torch.tensor(self.bases[key], dtype=self.dtype)
        for (a, b), step in zip(region, strides(self.bound.layout[key].shape), strict=True):
            ids = ids.unsqueeze(-1) + torch.arange(a, b, dtype=self.dtype) * step
        return ids

    def finish(self, m: SliceMap, read: list) -> torch.Tensor:
        if m.op is not None and m.op.changes_values:
            m = m._replace(op=None, params=None, output=0)
        return super().finish(m, read)


class ConvspecWriter(StorageWriter):
    """A `torch.distributed.checkpoint` StorageWriter that saves a state dict in `plan`'s converted
    layout (plain tensors or DTensors, sharded any way) as the original checkpoint: HF safetensors
    shards of at most `max_shard_size` and their index, original names, in `dst` (atomically: it is
    complete or absent). `plan` is the forward plan (original -> converted); it must be invertible
    exactly. Every rank writes its own chunks into the shared files, so `dst` must be on a
    filesystem every rank sees, as for DCP's FileSystemWriter."""

    def __init__(
        self, plan: Plan, dst: str | os.PathLike, max_shard_size: str | int = "5GB", overwrite=False
    ):
        super().__init__()
        plan.inverse()  # a lossy plan is refused here, before any rank plans anything
        self.plan, self.dst, self.overwrite = plan, Path(dst), overwrite
        self.limit = parse_size(max_shard_size)
        self.is_coordinator = False
        self._atomic: AtomicDir | None = None
        self._cleanup: weakref.finalize | None = None

    # ---- the StorageWriter interface ------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """A new save begins (to `checkpoint_id` where given): what an unfinished one left is removed."""
        self.abort()
        if checkpoint_id is not None:
            self.dst = Path(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.dst)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, str | os.PathLike)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        from torch.distributed.checkpoint.planner import WriteItemType

        if not plan.usable:
            raise ConvspecError(
                "ConvspecWriter cannot use DCP's plan caching", hint="save without enable_plan_caching"
            )
        others = [i.index.fqn for i in plan.items if i.type == WriteItemType.BYTE_IO]
        if others:
            raise ConvspecError(
                f"{others[0]} is not a tensor: a safetensors checkpoint holds tensors only",
                hint="save the model's state dict alone",
            )
        # the state dict's order, which the dedup of the global plan loses and the output follows
        return dataclasses.replace(plan, storage_data=list(dict.fromkeys(i.index.fqn for i in plan.items)))

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator: the original layout, bound from the converted one every rank's items
        describe, and its shard files made (headers written, sized) in a temporary directory."""
        infos = {}
        for p in plans:
            for item in p.items:
                td = item.tensor_data
                infos[item.index.fqn] = TensorInfo(tuple(td.size), dtype_name(td.properties.dtype))
        # in the coordinator's state dict order (then any key only another rank holds), as Plan.save
        # of the full state dict would see it
        order = [k for p in plans if isinstance(p.storage_data, list) for k in p.storage_data]
        converted = {k: infos[k] for k in dict.fromkeys([*order, *infos]) if k in infos}
        entries = original_layout(self.plan, converted)
        target = self._create(entries)
        return [dataclasses.replace(p, storage_data=target) for p in plans]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """On every rank: its own chunks (DCP's dedup gave each replicated one to one rank), each
        element written at the offset of the original element it is."""
        target = plan.storage_data
        if not isinstance(target, Target):
            raise ConvspecError(
                "the save plan carries no ConvspecWriter target: was it made by another writer?"
            )
        results = write_chunks(self.plan, target, plan.items, planner)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator, once every rank has written: the index, then the directory committed."""
        if self._atomic is None:
            raise ConvspecError("ConvspecWriter.finish without a save in progress")
        target = self._target
        write_index(
            Path(target.tmp), target.entries, {k: f for k, (f, _) in target.where.items()}, target.files
        )
        try:
            self._atomic.commit()
        except BaseException:
            self.abort()
            raise
        self._forget()

    # ---- the temporary directory ----------------------------------------------------------------

    def abort(self) -> None:
        """Remove what an unfinished save made (its temporary directory): done by itself when another
        rank failed and DCP raised, once this writer is dropped or the process ends."""
        if self._cleanup is not None:
            self._cleanup()
        self._forget()

    def _forget(self) -> None:
        if self._cleanup is not None:
            self._cleanup.detach()
        self._atomic = self._cleanup = None

    def _create(self, entries: list) -> Target:
        """The shard files `write_sharded` would write, headers written and sized
        (`io.writer.lay_out`), in a new temporary directory beside `dst`."""
        self.abort()
        atomic = AtomicDir(self.dst, overwrite=self.overwrite)
        self._atomic, self._cleanup = atomic, weakref.finalize(self, atomic.abort)
        try:
            names, places = lay_out(atomic.tmp, entries, self.limit)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise write_error(exc, self.dst, atomic.tmp) from None
            raise
        where = {k: (p.file, p.offset) for k, p in places.items()}
        self._target = Target(os.path.abspath(atomic.tmp), entries, names, where)
        return self._target


def original_layout(plan: Plan, converted: dict[str, TensorInfo]) -> list[tuple[str, tuple[int, ...], str]]:
    """The original entries (key, shape, dtype) of a converted layout, in the order `Plan.save` writes
    them. Refuses a state dict the forward plan would not make again exactly as it is."""
    from ..streaming import output_order

    entries = output_order(plan.inverse().bind(converted))
    made = plan.bind({k: TensorInfo(s, d) for k, s, d in entries}).outputs
    made = {k: TensorInfo(tuple(s), d) for k, (s, d) in made.items()}
    if made != converted:
        odd = sorted(set(made.items()) ^ set(converted.items()))[0]
        raise ConvspecError(
            f"{odd[0]} {list(odd[1].shape)} {odd[1].dtype}: the state dict does not convert back to "
            f"the layout it is in",
            hint=f"save a state dict in the layout {plan.name} converts to",
        )
    return entries


def write_chunks(
    plan: Plan, target: Target, items: list[WriteItem], planner: SavePlanner
) -> list[WriteResult]:
    """This rank's items written into the shard files, block by block; one WriteResult each."""
    entries = target.entries
    ends = list(itertools.accumulate((math.prod(s) for _, s, _ in entries), initial=0))
    bases = {k: base for (k, _, _), base in zip(entries, ends, strict=False)}
    bound = plan.bind({k: TensorInfo(s, d) for k, s, d in entries})
    reader = ElementIds(bound, bases, ends[-1])
    out = _Files(target, bases)
    results = []
    try:
        for item in items:
            chunk, fqn = item.tensor_data.chunk, item.index.fqn
            data = planner.resolve_data(item).detach()
            if tuple(data.shape) != tuple(chunk.sizes):
                raise ConvspecError(
                    f"{fqn}: a chunk of {list(data.shape)} where {list(chunk.sizes)} was planned"
                )
            runs = reader.byte_runs(fqn) if data.numel() else None
            if runs is not None and dtype_name(data.dtype) == bound.outputs[fqn][1]:
                _copy(out, runs, bound.outputs[fqn][0], tuple(chunk.offsets), data)
            else:
                _place(reader, out, fqn, tuple(chunk.offsets), data)
            results.append(WriteResult(item.index, data.numel() * data.element_size(), None))
        out.sync()
    finally:
        out.close()
    return results


def _copy(out: _Files, runs: list[Run], shape: tuple[int, ...], offsets: tuple[int, ...], data) -> None:
    """A chunk at `offsets` of a tensor of `shape` made of source `runs`: the runs cut to the chunk
    (`regions.cut_runs`, as a sharded load reads them), a pwrite each."""
    raw = tensor_memory(data.cpu().contiguous())
    region = tuple((o, o + s) for o, s in zip(offsets, data.shape, strict=True))
    for r in cut_runs(runs, shape, region, data.element_size()):
        out.write(r.source, r.src, raw[r.dst : r.dst + r.size])


def _place(reader: ElementIds, out: _Files, fqn: str, offsets: tuple[int, ...], data: torch.Tensor) -> None:
    """A chunk of converted tensor `fqn` at `offsets`, BLOCK elements or so at a time (whole rows of
    its first dim): the ids of its elements read, and its values written at theirs."""
    if data.numel() == 0:
        return
    if data.dim() == 0:
        out.put(reader.read(fqn, ()).reshape(-1), data.reshape(-1).cpu())
        return
    rest = tuple((o, o + s) for o, s in zip(offsets[1:], data.shape[1:], strict=True))
    step = max(1, BLOCK // max(1, math.prod(data.shape[1:])))
    for a in range(0, data.shape[0], step):
        b = min(data.shape[0], a + step)
        ids = reader.read(fqn, ((offsets[0] + a, offsets[0] + b), *rest))
        out.put(ids.reshape(-1), data[a:b].cpu().reshape(-1))


class _Files:
    """The shard files as one rank writes them: each run of consecutive global ids one pwrite at its
    offset, of the values cast back to the original key's dtype."""

    def __init__(self, target: Target, bases: dict[str, int]):
        self.tmp = Path(target.tmp)
        keys = [k for k, _, _ in target.entries]
        self.dtypes = [d for _, _, d in target.entries]
        self.bases = [bases[k] for k in keys]
        self.ends = [bases[k] + math.prod(s) for k, s, _ in target.entries]
        self.files = [target.where[k][0] for k in keys]
        # the file offset global id 0 would have, were it of this key: the key's data offset, less its base
        self.origin = [target.where[k][1] - bases[k] * ITEMSIZE[d] for k, _, d in target.entries]
        self.where = target.where
        self.fds: dict[str, int] = {}

    def put(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """`values[i]` written as element `ids[i]` (global ids, each once), by runs of consecutive
        ids: in the chunk's order where its runs are long, else sorted by id into the files' order
        (a transposed chunk: its runs are single elements, an original row's are whole rows)."""
        import torch

        n = ids.numel()
        cuts = (ids[1:] != ids[:-1] + 1).nonzero().flatten() + 1
        if len(cuts) * MIN_RUN > n:
            ids, order = torch.sort(ids)
            values = values[order]
            cuts = (ids[1:] != ids[:-1] + 1).nonzero().flatten() + 1
        starts = torch.cat([torch.zeros(1, dtype=cuts.dtype), cuts])
        bounds, firsts = [*starts.tolist(), n], ids[starts].tolist()
        raws: dict[str, memoryview] = {}  # the values as each dtype they go back to, cast once
        for j, first in enumerate(firsts):
            r0, r1 = bounds[j], bounds[j + 1]
            while r0 < r1:  # a run of ids may go on from one key into the next: cut at the keys
                k = bisect.bisect_right(self.bases, first) - 1
                r = min(r1, r0 + self.ends[k] - first)
                dtype = self.dtypes[k]
                if dtype not in raws:
                    raws[dtype] = tensor_memory(self._as(values, dtype))
                item = ITEMSIZE[dtype]
                pwrite_all(
                    self._fd(self.files[k]), raws[dtype][r0 * item : r * item], self.origin[k] + first * item
                )
                first, r0 = first + r - r0, r

    def write(self, key: str, offset: int, data: memoryview) -> None:
        """Bytes at `offset` in original tensor `key`'s data."""
        name, start = self.where[key]
        pwrite_all(self._fd(name), data, start + offset)

    @staticmethod
    def _as(values: torch.Tensor, dtype: str) -> torch.Tensor:
        """The values in the original key's dtype: the cast the inverse plan applies."""
        if dtype_name(values.dtype) != dtype:
            values = cast_tensor(values, dtype)
        return values.contiguous()

    def _fd(self, name: str) -> int:
        fd = self.fds.get(name)
        if fd is None:
            fd = self.fds[name] = os.open(self.tmp / name, os.O_WRONLY)
        return fd

    def sync(self) -> None:
        """This rank's writes on disk before the coordinator commits (on a network filesystem, seen by it)."""
        for fd in self.fds.values():
            os.fsync(fd)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
