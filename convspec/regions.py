"""A region of a converted tensor, read from the original checkpoint: only the source bytes it is
made of (issue 16). From the target, each op's slice map (`Op.slice_map`) says which regions of its
inputs it needs, down to the source keys, whose regions are read as byte runs into their place.

The walk goes from a target back to its sources, on demand, where the interpreter (`interpret.py`)
goes forward over whole collections: the shapes it needs are the interpreter's (`infer_group`)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .blocks import Run, block_runs
from .dtypes import DTYPES, ITEMSIZE
from .errors import ConvspecError
from .interpret import chunked, infer_group, node_params, ordered_members
from .ops import OPS, TensorInfo
from .ops.base import short
from .ops.slicing import Region, SliceMap, finish, join, strides, whole

if TYPE_CHECKING:
    import torch

    from .bind import BoundPlan, Group
    from .compile.plan import Node, PlanRule
    from .io.checkpoint import Checkpoint


@dataclass
class ReadStats:
    """What a reader read: bytes, byte runs (one read each at most), and the regions of converted
    tensors that had to be read whole or wider than asked (an op with no exact map for them)."""

    bytes: int = 0
    runs: int = 0
    wider: int = 0


class RegionReader:
    """Regions of the converted tensors of one bound checkpoint, each read from the source bytes it
    is made of. `stats` counts what was read."""

    def __init__(self, bound: BoundPlan, ckpt: Checkpoint):
        self.bound, self.ckpt = bound, ckpt
        # source keys whose bytes are not their values (a GGUF block type): never read as byte runs
        self._decoded = ckpt.decoded if ckpt is not None else {}
        self.stats = ReadStats()
        self.by_runs_reads = 0  # regions read straight from their target's byte runs (no walk)
        self._made_by = {t: (g, v, idx) for g in bound.groups for t, (v, idx) in g.out_values.items()}
        self._source_of = {dst: src for src, dst in bound.passthrough.items()}
        self._source_of.update({k: k for k in bound.unmatched})
        self._values: dict[int, dict] = {}
        self._producers: dict[int, dict[str, tuple[Node, int]]] = {}
        self._moves: dict[int, dict[str, list[Run]] | None] = {}
        # the byte-run path reads values; a subclass that reads something else (`source`, `finish`)
        # gets the walk through the slice maps, which calls them
        self.by_runs = type(self).source is RegionReader.source and type(self).finish is RegionReader.finish

    def read(self, target: str, region: Region | None = None) -> torch.Tensor:
        """`region` (per dim, [start, stop); None: all of it) of the converted tensor `target`."""
        if target not in self.bound.outputs:
            raise ConvspecError(f"{target} is not a key of the converted checkpoint")
        shape, _ = self.bound.outputs[target]
        region = whole(shape) if region is None else tuple(tuple(r) for r in region)
        if len(region) != len(shape) or any(
            len(r) != 2 or any(type(x) is not int for x in r) or not 0 <= r[0] <= r[1] <= s
            for r, s in zip(region, shape, strict=False)
        ):
            raise ConvspecError(
                f"region {short([list(r) for r in region])} is not inside {target}'s shape {list(shape)}",
                hint="give one [start, stop) per dim, 0 <= start <= stop <= size",
            )
        if any(a == b for a, b in region):  # nothing to read
            import torch

            return torch.empty(tuple(b - a for a, b in region), dtype=DTYPES[self.bound.outputs[target][1]])
        if target in self._source_of:
            return self.source(self._source_of[target], region)
        group, value, idx = self._made_by[target]
        runs = self._block_runs(group, target) if self.by_runs else None
        if runs is not None:
            return self._assemble(target, region, runs)
        return self._value(group, value, idx, region)

    # ---- the byte-run path: a target of a group that only moves whole blocks -------------------

    def byte_runs(self, target: str) -> list[Run] | None:
        """The target's bytes as runs of source bytes in its own order: one for a key that passes
        through, its block-move group's (blocks.py), or None where its group computes."""
        if target in self._source_of:
            source = self._source_of[target]
            if source in self._decoded:
                return None
            return [Run(source, 0, 0, self.bound.layout[source].nbytes)]
        return self._block_runs(self._made_by[target][0], target)

    def _block_runs(self, g: Group, target: str) -> list[Run] | None:
        """The target's bytes as runs of source bytes (blocks.py), or None: its group computes."""
        if id(g) not in self._moves:
            self._moves[id(g)] = block_runs(self.bound, g, 0)  # no smaller read than the walk's
        runs = self._moves[id(g)]
        if runs is not None and self._decoded and any(k in self._decoded for k in g.source_keys):
            runs = self._moves[id(g)] = None  # a block-typed GGUF source: its bytes are not the values
        return None if runs is None else runs[target]

    def _assemble(self, target: str, region: Region, runs: list[Run]) -> torch.Tensor:
        """The region, read in one pass from the target's runs cut to it: no member tensor, no copy."""
        shape, dtype = self.bound.outputs[target]
        pieces = cut_runs(runs, shape, region, ITEMSIZE[dtype])
        self.stats.bytes += sum(p.size for p in pieces)
        self.stats.runs += len(pieces)
        self.by_runs_reads += 1
        return self.ckpt.assemble(tuple(b - a for a, b in region), dtype, pieces)

    # ---- following the maps --------------------------------------------------------------------

    def _value(self, g: Group, value: str, idx: tuple, region: Region) -> torch.Tensor:
        made = self._made(g.rule).get(value)
        if made is None:  # a rule input: its leaves are source keys
            return self.source(g.members[value][idx], region)
        node, k = made
        op = OPS[node.op]
        p = node_params(self.bound.plan, g.rule, node)
        if op.reduces:
            members = self._members(g, node, p, idx, k)
            infos = [self._info(g, node.inputs[0], j) for j in members]
            m = op.slice_map(p, infos, 0, region)
            inputs = [(node.inputs[0], j) for j in members]
        elif op.expands:
            name, in_idx, k = self._expanded(g, node, op, p, idx)
            m = op.slice_map(p, [self._info(g, name, in_idx)], k, region)
            inputs = [(name, in_idx)]
        else:
            infos = [self._info(g, a, idx) for a in node.inputs]
            m = op.slice_map(p, infos, k, region)
            inputs = [(a, idx) for a in node.inputs]
        if not m.exact:
            self.stats.wider += 1
        read = [
            join([self._value(g, name, i, r) for r in regions], m.join) if regions else None
            for (name, i), regions in zip(inputs, m.reads, strict=True)
        ]
        return self.finish(m, read)

    def finish(self, m: SliceMap, read: list) -> torch.Tensor:
        """A region from what was read of each input: the op applied, then narrowed. A subclass
        that reads something other than values (where elements come from) overrides it."""
        return finish(m, read)

    def _made(self, rule: PlanRule) -> dict[str, tuple[Node, int]]:
        """Each value the rule's DAG makes: the node that makes it, and which of its outputs it is."""
        made = self._producers.get(rule.index)
        if made is None:
            made = self._producers[rule.index] = {
                out: (node, k) for node in rule.nodes for k, out in enumerate(node.outputs)
            }
        return made

    def _env(self, g: Group) -> dict:
        """Every value of the group's DAG, leaf by leaf (source keys, or inferred TensorInfos)."""
        env = self._values.get(id(g))
        if env is None:
            env = self._values[id(g)] = infer_group(self.bound.plan, g.rule, g.members, self.bound.layout)
        return env

    def _info(self, g: Group, value: str, idx: tuple) -> TensorInfo:
        leaf = self._env(g)[value][idx]
        return self.bound.layout[leaf] if isinstance(leaf, str) else leaf

    def _members(self, g: Group, node: Node, p: dict, idx: tuple, k: int) -> list[tuple]:
        """The indices of the members a reducing node stacks into output `k` at `idx`, in order, as
        the interpreter groups and cuts them."""
        name = node.inputs[0]
        indices = {i: i for i in self._env(g)[name]}  # the collection, each leaf its own index
        lists = ordered_members(indices, g.rule.free_of[name], p["over"], node.op)
        return chunked(lists[idx], p.get("parts", 1))[k]

    def _expanded(self, g: Group, node: Node, op, p: dict, idx: tuple) -> tuple[str, tuple, int]:
        """Which input, at which index, and which of its outputs makes member `idx` of an expanding
        node (the members of several inputs are numbered on from one to the next)."""
        pos = g.rule.free_of[node.outputs[0]].index(p["over"])
        i, in_idx = int(idx[pos]), idx[:pos] + idx[pos + 1 :]
        for name in node.inputs:
            n = len(op.infer(p, [self._info(g, name, in_idx)]))
            if i < n:
                return name, in_idx, i
            i -= n
        raise KeyError(idx)  # pragma: no cover - bind made every member

    # ---- the bytes -----------------------------------------------------------------------------

    def source(self, key: str, region: Region) -> torch.Tensor:
        """A region of a source tensor, read as byte runs straight into its place."""
        import torch

        info = self.bound.layout[key]
        shape, item = info.shape, ITEMSIZE[info.dtype]
        out = tuple(b - a for a, b in region)
        if 0 in out:
            return torch.empty(out, dtype=DTYPES[info.dtype])
        if key in self._decoded:  # decoded whole (a block spans a row), then cut
            self.stats.bytes += info.nbytes
            self.stats.runs += 1
            return self.ckpt.get(key)[tuple(slice(a, b) for a, b in region)].contiguous()
        runs = list(region_runs(shape, region, item))
        self.stats.bytes += sum(n for _, _, n in runs)
        self.stats.runs += len(runs)
        return self.ckpt.assemble(out, info.dtype, [(key, s, d, n) for s, d, n in runs])


def region_runs(shape: tuple[int, ...], region: Region, item: int):
    """The region of a row-major tensor as byte runs (source offset, offset in the region, size):
    the dims after the last one the region cuts are whole, so each run is that contiguous stretch."""
    d = len(shape) - 1
    while d >= 0 and region[d] == (0, shape[d]):
        d -= 1
    if d < 0:
        yield 0, 0, math.prod(shape) * item
        return
    step = strides(shape)
    a, b = region[d]
    size = (b - a) * step[d] * item
    dst = 0
    for lead in itertools.product(*(range(lo, hi) for lo, hi in region[:d])):
        src = (sum(i * s for i, s in zip(lead, step, strict=False)) + a * step[d]) * item
        yield src, dst, size
        dst += size


def cut_runs(runs: list[Run], shape: tuple[int, ...], region: Region, item: int) -> list[Run]:
    """The runs making a whole target (in target order, covering it) cut to a region of it, with
    their destinations in the region's own row-major buffer; a run going on where the last one ended,
    in the source and here, extends it."""
    out: list[Run] = []
    i = 0
    for at, local, size in region_runs(shape, region, item):
        end = at + size
        while runs[i].dst + runs[i].size <= at:
            i += 1
        j = i
        while j < len(runs) and runs[j].dst < end:
            r = runs[j]
            a, b = max(at, r.dst), min(end, r.dst + r.size)
            src, dst = r.src + a - r.dst, local + a - at
            last = out[-1] if out else None
            if (
                last
                and last.source == r.source
                and last.src + last.size == src
                and last.dst + last.size == dst
            ):
                out[-1] = last._replace(size=last.size + b - a)
            else:
                out.append(Run(r.source, src, dst, b - a))
            j += 1
        i = j - 1
    return out


def read_regions(
    plan, src, regions: dict[str, Region | None], strict: bool = False
) -> tuple[dict[str, torch.Tensor], ReadStats]:
    """`regions` of a checkpoint's converted tensors ({target: region, None for all of it}), each
    read from the source bytes it is made of, and what was read."""
    from .io.formats import open_checkpoint
    from .streaming import bind_checkpoint

    ckpt = open_checkpoint(src)
    reader = RegionReader(bind_checkpoint(plan, ckpt, strict), ckpt)
    return {t: reader.read(t, r) for t, r in regions.items()}, reader.stats
