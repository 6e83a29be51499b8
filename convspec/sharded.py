"""Sharded loading on torch.distributed (issue 16): each rank reads only the source bytes of its own
shard of each converted tensor (`regions.RegionReader`) and wraps it as a DTensor with
`DTensor.from_local`: no collective on the data path. Replicated tensors are read by every rank:
each reads from its own page cache or disk, where a broadcast would add a collective and a copy."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .companions import scale_grids
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
    target key, or a function of it; a key it does not name is replicated, but the scale grid of a
    kept quantized weight is placed as its weight). Each rank reads the source bytes of its own shard
    only. Returns the tensors and what this rank read (`ReadStats`). Every rank calls it; a rank that
    finds a problem (a placement, a shard that cuts a block, a file) makes all of them raise."""
    choose = placements if callable(placements) else (placements or {}).get

    def placing(bound) -> Place:
        grids = scale_grids(bound.plan, bound.outputs)

        def place(target: str, ndim: int):
            spec = choose(target)
            if spec is None and target in grids:  # a scale grid not placed: as its weight is
                spec = choose(grids[target][0])
            return mesh, placements_of(spec, ndim)

        return place

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
    from .io.formats import open_checkpoint
    from .ops.cast import cast_tensor
    from .ops.slicing import strides
    from .regions import RegionReader
    from .streaming import bind_checkpoint

    with agreed():  # every check on every rank before any data is read: headers, bind, placements
        check_dtype(dtype)
        ckpt = open_checkpoint(src)
        bound = bind_checkpoint(plan, ckpt, strict)
        place = placing(bound)
        placed = {target: place(target, len(shape)) for target, (shape, _) in bound.outputs.items()}
        check_placed(bound.plan, {t: s for t, (s, _) in bound.outputs.items()}, placed)
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


def check_placed(plan, shapes: Mapping[str, tuple[int, ...]], placed: Mapping[str, Any]) -> None:
    """Every placement fits its tensor (`_check_fits`), and every scale grid of a kept quantized
    weight holds exactly the blocks of its weight's shard, which cuts no block (`check_grid`)."""
    grids = scale_grids(plan, shapes)
    for target, where in placed.items():
        if where is not None and target not in grids:
            _check_fits(target, shapes[target], *where)
    seen: dict = {}  # the ranks are walked once per shapes and placements, not once per layer
    for grid, (weight, block) in grids.items():
        check_grid(weight, shapes[weight], placed[weight], grid, shapes[grid], placed[grid], block, seen)
        if placed[grid] is not None:
            _check_fits(grid, shapes[grid], *placed[grid])


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


# ---- scale grids of quantized weights (issue 17): placed as their weights, whole blocks a rank ----


_W, _G = "\0weight", "\0grid"  # the names in a problem found once for every pair alike


def check_grid(
    weight: str,
    wshape: tuple[int, ...],
    wwhere,
    grid: str,
    gshape: tuple[int, ...],
    gwhere,
    block: tuple[int, int],
    seen: dict | None = None,
) -> None:
    """Refuse, before any data is read, a weight's shard that cuts a block of its scale grid, and a
    grid placed so that a rank does not hold exactly the blocks of its weight's shard. `wwhere`,
    `gwhere`: (mesh, placements), or None for a tensor read whole. Every rank is checked alike, so
    every rank finds the same problem; `seen` keeps what was found for the same shapes and placements."""
    if len(wshape) < 2 or len(gshape) != len(wshape) or (wwhere is None and gwhere is None):
        return
    if gwhere is not None and not _fits_mesh(gshape, *gwhere):
        return  # `_check_fits` says what is wrong with the grid's placement
    mesh = (wwhere or gwhere)[0]
    if wwhere is not None and gwhere is not None and _ranks_of(wwhere[0]) != _ranks_of(gwhere[0]):
        raise ConvspecError(
            f"{grid} lies on another mesh than its weight {weight}",
            hint="place a scale grid on its weight's mesh, as its weight",
        )
    wp = tuple(wwhere[1]) if wwhere is not None else None
    gp = tuple(gwhere[1]) if gwhere is not None else None
    key = (tuple(wshape), tuple(gshape), _sizes(mesh), _names(mesh), repr(wp), repr(gp), tuple(block))
    seen = {} if seen is None else seen
    if key not in seen:
        seen[key] = _grid_problem(wshape, wp, gshape, gp, mesh, tuple(block))
    problem = seen[key]
    if problem is not None:
        message, hint = problem
        raise ConvspecError(message.replace(_W, weight).replace(_G, grid), hint=hint)


def _grid_problem(wshape, wp, gshape, gp, mesh, block) -> tuple[str, str] | None:
    """What `check_grid` refuses (message with the names as `_W` and `_G`, hint), or None. Walks every
    rank's coordinates along the mesh dims that cut either tensor."""
    sizes, n = _sizes(mesh), len(wshape)
    cutting = [i for i in range(len(sizes)) if any(p is not None and cuts(p[i]) for p in (wp, gp))]
    for picked in itertools.product(*(range(sizes[i]) for i in cutting)):
        coords = [0] * len(sizes)
        for i, c in zip(cutting, picked, strict=True):
            coords[i] = c
        wregions = _regions(wshape, sizes, coords, wp)
        for region in wregions:
            for d, b in zip(range(n - 2, n), block, strict=True):
                lo, hi = region[d]
                if lo % b or (hi % b and hi != wshape[d]):
                    return _cut_message(wshape, wp, mesh, d, b)
        want = [
            (*r[:-2], *((lo // b, -(-hi // b)) for (lo, hi), b in zip(r[-2:], block, strict=True)))
            for r in wregions
        ]
        got = _regions(gshape, sizes, coords, gp)
        if got != want and gp is None:
            return (
                f"{_G} is read whole on every rank, where its weight {_W} is placed {_show(wp)}",
                "place the scale grid as its weight (a model's scale parameter a DTensor placed as its "
                "weight), or dequantize",
            )
        if got != want:
            show = lambda rs: ", ".join(str([list(x) for x in r]) for r in rs)  # noqa: E731
            return (
                f"{_G}: placed {_show(gp)}, the rank at {list(coords)} holds the scales {show(got)}, where "
                f"the blocks of its weight {_W} (placed {_show(wp)}) are {show(want)}",
                "leave the scale grid out of the placements (it then follows its weight), or place it as "
                "its weight",
            )
    return None


def _cut_message(wshape, wp, mesh, d: int, b: int) -> tuple[str, str]:
    """Which mesh dims give each rank how many rows (columns) of dim d, cutting blocks of b."""
    sizes, names = _sizes(mesh), _names(mesh)
    by = [i for i, p in enumerate(wp) if cuts(p) and p.dim % len(wshape) == d]
    factor = max((_split_factor(wp[i]) or 1 for i in by), default=1)
    piece = wshape[d] // (factor * math.prod(sizes[i] for i in by))
    unit = "rows" if d == len(wshape) - 2 else "columns"
    axes = ",".join(f"{names[i]}={sizes[i]}" if names else f"a mesh dim of {sizes[i]}" for i in by)
    parts = f" in each of its {factor} packed parts" if factor > 1 else ""
    size = "a " + ("/".join(names[i] for i in by) if names else "mesh") + " size"
    return (
        f"{_W}: {axes} gives each rank {piece} {unit} of dim {d}{parts}, which cuts the blocks of {b} {unit} "
        f"its scale grid has one scale per",
        f"use {size} whose shards are whole blocks of {b}, or dequantize (plan.dequantize(), --dequantize)",
    )


def _fits_mesh(shape, mesh, placements) -> bool:
    """One placement per mesh dim, each cutting a dim the tensor has."""
    return len(placements) == mesh.ndim and all(
        -len(shape) <= p.dim < len(shape) for p in placements if cuts(p)
    )


def _regions(shape, sizes, coords, placements) -> list:
    if placements is None:
        return [tuple((0, n) for n in shape)]
    return [region for region, _ in local_blocks(shape, sizes, coords, placements)]


def _show(placements) -> str:
    return "whole" if placements is None else "[" + ", ".join(map(repr, placements)) + "]"


def _names(mesh) -> tuple[str, ...] | None:
    names = getattr(mesh, "mesh_dim_names", None)
    return tuple(names) if names else None


def _ranks_of(mesh):
    """Which rank sits where on a mesh (a DeviceMesh's rank layout; a shape for a mesh without one)."""
    layout = getattr(mesh, "mesh", None)
    return layout.tolist() if layout is not None else _sizes(mesh)
