"""Slice maps: which regions of an op's inputs make a region of one of its outputs, so that a reader
(one rank of many) can read only the source bytes its slice of a converted tensor is made of.

A region is a rectangle, one `(start, stop)` per dim. An op answers `Op.slice_map` with a `SliceMap`:
read these regions of these inputs, apply this op (often the op itself with smaller parameters, or
nothing), take this output, and narrow it where the read had to cover more than was asked."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

    from .base import Op, TensorInfo

Region = tuple[tuple[int, int], ...]  # per dim, [start, stop)


class SliceMap(NamedTuple):
    """How a region of output `output` of an op is made. `reads[i]`: the regions of input i to read
    (none: input i is not needed; several: they are read and joined along `join` in order). `op` and
    `params`: the op applied to the inputs read, often the op itself with smaller parameters (None:
    what was read is the output). `narrow`: the
    part of that result that was asked for, when the reads cover more (None: exactly the region)."""

    reads: tuple[tuple[Region, ...], ...]
    op: Op | None = None
    params: dict | None = None
    output: int = 0
    narrow: Region | None = None
    join: int = 0

    @property
    def exact(self) -> bool:
        """Nothing outside the region asked for is read."""
        return self.narrow is None


def whole(shape: tuple[int, ...]) -> Region:
    """The region of a whole tensor."""
    return tuple((0, s) for s in shape)


def strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The element strides of a row-major (contiguous) tensor of `shape`."""
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def region_numel(region: Region) -> int:
    return math.prod(b - a for a, b in region)


def read_numel(m: SliceMap) -> int:
    """How many elements the map reads (what a reader's byte count is made of)."""
    return sum(region_numel(r) for regions in m.reads for r in regions)


def replaced(region: Region, dim: int, span: tuple[int, int]) -> Region:
    """`region` with dim `dim` replaced by `span`."""
    return region[:dim] + (span,) + region[dim + 1 :]


def whole_inputs(op: Op, p: dict, ins: list[TensorInfo], k: int, region: Region) -> SliceMap:
    """The map of an op that cannot map a slice: read every input whole, apply, narrow."""
    return SliceMap(tuple((whole(i.shape),) for i in ins), op, p, k, region)


def take(t: torch.Tensor, region: Region) -> torch.Tensor:
    """The region of a tensor (a view)."""
    return t[tuple(slice(a, b) for a, b in region)]


def evaluate(m: SliceMap, inputs: list[torch.Tensor]) -> torch.Tensor:
    """A slice map run on whole input tensors (a reader runs it on what it read instead): the region
    of the op's output it was made for."""
    read = [
        join([take(x, r) for r in regions], m.join) if regions else None
        for x, regions in zip(inputs, m.reads, strict=True)
    ]
    return finish(m, read)


def join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The regions read of one input, as one tensor (joined along the map's `join` dim)."""
    import torch

    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def finish(m: SliceMap, read: list[torch.Tensor | None]) -> torch.Tensor:
    """The region, from what was read of each input (None where the map reads nothing of it)."""
    present = [x for x in read if x is not None]
    out = present[0] if m.op is None else m.op.apply(m.params or {}, present)[m.output]
    return (out if m.narrow is None else take(out, m.narrow)).contiguous()
