"""Sharded loading on torch.distributed (issue 16): each rank reads only the source bytes of its own
shard of each converted tensor (`regions.RegionReader`) and wraps it as a DTensor with
`DTensor.from_local`: no collective on the data path. Replicated tensors are read by every rank:
each reads from its own page cache or disk, where a broadcast would add a collective and a copy."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConvspecError
from .ranks import agreed
from .streaming import Loaded

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh

# transformers' tp_plan styles, as the placement of a weight on a 1-D mesh: colwise cuts the output
# features (dim 0 of a Linear's weight, and its bias), rowwise the input features (the last dim);
# experts cuts the stacked experts (dim 0 of a fused experts tensor)
STYLES = {"colwise": 0, "rowwise": -1, "experts": 0, "ep": 0}


def placements_of(spec: Any, ndim: int) -> tuple:
    """A placement as DTensor takes it: a style name (`STYLES`), "replicate", or DTensor placements."""
    from torch.distributed.tensor import Replicate, Shard

    if spec is None or spec == "replicate":
        return (Replicate(),)
    if isinstance(spec, str):
        if spec not in STYLES:
            raise ConvspecError(
                f"unknown placement {spec!r}", hint=f"use one of {', '.join([*STYLES, 'replicate'])}"
            )
        return (Shard(STYLES[spec] % max(ndim, 1)),)
    return tuple(spec) if isinstance(spec, Sequence) else (spec,)


def local_region(
    shape: tuple[int, ...], mesh: DeviceMesh, placements: Sequence
) -> tuple[tuple[int, int], ...]:
    """This rank's region of a tensor of `shape` placed on `mesh`, as DTensor cuts it (one box: a
    strided shard, several, is `local_blocks`)."""
    blocks = local_blocks(shape, _sizes(mesh), mesh.get_coordinate(), placements)
    if len(blocks) != 1:
        raise ConvspecError(
            f"a strided placement {list(placements)} holds {len(blocks)} regions a rank",
            hint="use convspec.sharded.local_blocks",
        )
    return blocks[0][0]


Block = tuple[tuple[tuple[int, int], ...], tuple[int, ...]]  # a region of the tensor, where it lies locally


def local_blocks(
    shape: Sequence[int], sizes: Sequence[int], coords: Sequence[int], placements: Sequence
) -> list[Block]:
    """The regions of a tensor of `shape` a rank at `coords` of a mesh of `sizes` holds, each with
    its offset in the local tensor, mesh dim by mesh dim as DTensor cuts even shards: `Shard(d)`
    takes the rank's part of what is left of dim d; `_StridedShard(d, split_factor=f)` (transformers'
    packed gate/up) its part of each of f equal pieces, so f regions a rank."""

    ranges = [[(0, n)] for n in shape]
    for n, p, c in zip(sizes, placements, coords, strict=True):
        if not cuts(p):
            continue
        factor = _split_factor(p)
        d = p.dim % len(shape)
        piece = sum(b - a for a, b in ranges[d]) // (n * (factor or 1))
        ranges[d] = [
            r
            for k in range(factor or 1)
            for r in _portion(ranges[d], (c + k * n) * piece, (c + k * n + 1) * piece)
        ]
    out = []
    for combo in itertools.product(*(_with_offsets(r) for r in ranges)):
        out.append((tuple(r for r, _ in combo), tuple(at for _, at in combo)))
    return out


def cuts(p) -> bool:
    """Whether a placement cuts a tensor dim: `Shard`, or DTensor's strided shard."""
    from torch.distributed.tensor import Shard

    return isinstance(p, Shard) or _split_factor(p) is not None


def _split_factor(p) -> int | None:
    """A strided shard's split factor (DTensor's private `_StridedShard`); None for any other."""
    from torch.distributed.tensor.placement_types import _StridedShard

    return p.split_factor if isinstance(p, _StridedShard) else None


def _portion(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The global ranges of positions [lo, hi) of the ranges laid end to end."""
    out, at = [], 0
    for a, b in ranges:
        start, stop = max(lo, at), min(hi, at + b - a)
        if start < stop:
            out.append((a + start - at, a + stop - at))
        at += b - a
    return out


def _with_offsets(ranges: list[tuple[int, int]]) -> list[tuple[tuple[int, int], int]]:
    out, at = [], 0
    for a, b in ranges:
        out.append(((a, b), at))
        at += b - a
    return out


def _sizes(mesh) -> tuple[int, ...]:
    return tuple(mesh.size(i) for i in range(mesh.ndim))


class Sharded(Loaded):
    """What a sharded load returns: the tensors by key, `.bound` (what bind found) and `.stats` (what
    this rank read, `regions.ReadStats`)."""

    def __init__(self, items, bound, stats):
        super().__init__(items, bound)
        self.stats = stats


def load_sharded(
    plan,
    src,
    mesh: DeviceMesh,
    placements: Mapping[str, Any] | Callable[[str], Any] | None = None,
    strict: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Every converted tensor of `src` as a DTensor on `mesh`, placed as `placements` says (a dict by
    target key, or a function of it; a key it does not name is replicated). Each rank reads the
    source bytes of its own shard only. Returns the tensors and what this rank read (`ReadStats`).
    Every rank calls it; a rank that finds a problem (a placement, a file) makes all of them raise."""
    choose = placements if callable(placements) else (placements or {}).get

    def placing(bound) -> Place:
        return lambda target, ndim: (mesh, placements_of(choose(target), ndim))

    return load_placed(plan, src, placing, strict, device, dtype)


Place = Callable[[str, int], "tuple[DeviceMesh, tuple] | None"]


def load_placed(
    plan,
    src,
    placing: Callable[[Any], Place],
    strict: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """What `load_sharded` does, each target on the mesh and placements `place(target, ndim)` gives
    (None: a plain tensor, read whole), where `place = placing(bound)` may look at the bound plan;
    the targets of one load may lie on different meshes (a model's parameters). Local shards go to
    `device` (default: the mesh's device), cast to `dtype`."""
    from torch.distributed.tensor import DTensor

    from .dtypes import check_dtype
    from .io.checkpoint import Checkpoint
    from .ops.cast import cast_tensor
    from .ops.slicing import strides
    from .regions import RegionReader
    from .streaming import bind_checkpoint

    with agreed():  # every check on every rank before any data is read: headers, bind, placements
        check_dtype(dtype)
        ckpt = Checkpoint(src)
        bound = bind_checkpoint(plan, ckpt, strict)
        place = placing(bound)
        placed = {}
        for target, (shape, _) in bound.outputs.items():
            placed[target] = where = place(target, len(shape))
            if where is not None:
                _check_fits(target, shape, *where)
    reader = RegionReader(bound, ckpt)
    loaded = Sharded({}, bound, reader.stats)
    for target, (shape, _) in bound.outputs.items():
        where = placed[target]
        local = reader.read(target) if where is None else read_local(reader, target, shape, *where)
        to = device or (None if where is None else _mesh_device(where[0]))
        local = local if to is None or str(to) == "cpu" else local.to(to)
        local = cast_tensor(local, dtype) if dtype else local
        loaded[target] = (
            local
            if where is None
            else DTensor.from_local(local, *where, run_check=False, shape=shape, stride=strides(shape))
        )
    return loaded, reader.stats


def read_local(reader, target: str, shape: tuple[int, ...], mesh: DeviceMesh, placements: Sequence):
    """This rank's local tensor of `target`: its one region read straight, or a strided shard's
    regions each read into their place in it."""
    blocks = local_blocks(shape, _sizes(mesh), mesh.get_coordinate(), placements)
    if len(blocks) == 1:
        return reader.read(target, blocks[0][0])
    import torch

    from .dtypes import DTYPES

    size = [0] * len(shape)
    for region, at in blocks:
        size = [max(n, o + b - a) for n, o, (a, b) in zip(size, at, region, strict=True)]
    local = torch.empty(size, dtype=DTYPES[reader.bound.outputs[target][1]])
    for region, at in blocks:
        local[tuple(slice(o, o + b - a) for o, (a, b) in zip(at, region, strict=True))] = reader.read(
            target, region
        )
    return local


def _mesh_device(mesh: DeviceMesh) -> str:
    """Where a mesh's local tensors live: the CPU, or this process's current accelerator."""
    if mesh.device_type == "cpu":
        return "cpu"
    import torch

    module = getattr(torch, mesh.device_type)
    return f"{mesh.device_type}:{module.current_device()}"


def _check_fits(target: str, shape: tuple[int, ...], mesh, placements: Sequence) -> None:
    """A placement must name one per mesh dim, and cut a dim the tensor has into even shards (DTensor
    would make uneven ones; a checkpoint's shards are meant to be equal); a strided shard cuts a dim
    no other placement cuts."""

    if len(placements) != mesh.ndim:
        raise ConvspecError(
            f"{target}: {len(placements)} placement(s) for a mesh of {mesh.ndim} dims",
            hint="give one placement per mesh dim",
        )
    left = list(shape)  # what the mesh dims before leave of each dim
    cut: dict[int, int] = {}  # tensor dim -> how many placements cut it
    strided: set[int] = set()
    for mesh_dim, p in enumerate(placements):
        factor = _split_factor(p)
        if cuts(p):
            if not -len(shape) <= p.dim < len(shape):
                name = f"Shard({p.dim})" if not factor else f"_StridedShard({p.dim}, split_factor={factor})"
                raise ConvspecError(f"{target}: {name} of a tensor with {len(shape)} dims {list(shape)}")
            d, n = p.dim % len(shape), mesh.size(mesh_dim) * (factor or 1)
            cut[d] = cut.get(d, 0) + 1
            if factor:
                strided.add(d)
            if left[d] % n:
                what = f"{n // (factor or 1)} shards" + (f" of each of {factor} parts" if factor else "")
                raise ConvspecError(
                    f"{target}: dim {d} of {list(shape)} ({left[d]}) does not divide into {what}",
                    hint="choose a placement whose dim divides by the mesh size, or replicate the tensor",
                )
            left[d] //= mesh.size(mesh_dim)
    if any(cut[d] > 1 for d in strided):
        raise ConvspecError(
            f"{target}: a strided shard {list(placements)} with another placement on the same dim",
            hint="cut the dim a strided shard cuts on one mesh dim only",
        )
