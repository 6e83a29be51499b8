"""Values as their blocks' ids: what a block-moving op does to them (the byte-range path of blocks.py).

A block is the last few dims of a source tensor, contiguous in its file. An op that only moves whole
blocks (stack, unstack, cat, split, chunk) says where each block goes with these helpers, so the
block path needs no copy of any op's meaning."""

from __future__ import annotations

import math
from typing import NamedTuple


class Blocks(NamedTuple):
    """A value as its blocks' ids: `shape` is its leading dims (each block is the rest), row-major."""

    shape: tuple[int, ...]
    ids: list[int]


def rows(x: Blocks, dim: int, start: int, stop: int) -> list[int]:
    """The ids of x[..., start:stop, ...] along `dim`, row-major."""
    rest = math.prod(x.shape[dim + 1 :])
    span = x.shape[dim] * rest
    out: list[int] = []
    for o in range(math.prod(x.shape[:dim])):
        out += x.ids[o * span + start * rest : o * span + stop * rest]
    return out


def stack(xs: list[Blocks], dim: int) -> Blocks:
    """The blocks of torch.stack(xs, dim)."""
    inner, ids = math.prod(xs[0].shape[dim:]), []
    for o in range(math.prod(xs[0].shape[:dim])):
        for x in xs:
            ids += x.ids[o * inner : (o + 1) * inner]
    return Blocks(xs[0].shape[:dim] + (len(xs),) + xs[0].shape[dim:], ids)


def cat(xs: list[Blocks], dim: int) -> Blocks:
    """The blocks of torch.cat(xs, dim)."""
    inners, ids = [math.prod(x.shape[dim:]) for x in xs], []
    for o in range(math.prod(xs[0].shape[:dim])):
        for x, inner in zip(xs, inners, strict=True):
            ids += x.ids[o * inner : (o + 1) * inner]
    size = sum(x.shape[dim] for x in xs)
    return Blocks(xs[0].shape[:dim] + (size,) + xs[0].shape[dim + 1 :], ids)


def split(x: Blocks, dim: int, sizes: list[int]) -> list[Blocks]:
    """The blocks of torch.split(x, sizes, dim)."""
    out, start = [], 0
    for size in sizes:
        out.append(Blocks(x.shape[:dim] + (size,) + x.shape[dim + 1 :], rows(x, dim, start, start + size)))
        start += size
    return out


def unbind(x: Blocks, dim: int) -> list[Blocks]:
    """The blocks of torch.unbind(x, dim)."""
    return [Blocks(b.shape[:dim] + b.shape[dim + 1 :], b.ids) for b in split(x, dim, [1] * x.shape[dim])]
