"""Sharded loading on torch.distributed (issue 16): each rank reads only the source bytes of its own
shard of each converted tensor (`regions.RegionReader`) and wraps it as a DTensor with
`DTensor.from_local`: no collective on the data path. Replicated tensors are read by every rank:
each reads from its own page cache or disk, where a broadcast would add a collective and a copy."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConvspecError

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
    """This rank's region of a tensor of `shape` placed on `mesh`, as DTensor cuts it."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    size, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple((o, o + s) for o, s in zip(offset, size, strict=True))


def load_sharded(
    plan,
    src,
    mesh: DeviceMesh,
    placements: Mapping[str, Any] | Callable[[str], Any] | None = None,
    strict: bool = False,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Every converted tensor of `src` as a DTensor on `mesh`, placed as `placements` says (a dict by
    target key, or a function of it; a key it does not name is replicated). Each rank reads the
    source bytes of its own shard only. Returns the tensors and what this rank read (`ReadStats`)."""
    from torch.distributed.tensor import DTensor

    from .io.checkpoint import Checkpoint
    from .ops.slicing import strides
    from .regions import RegionReader
    from .streaming import bind_checkpoint

    ckpt = Checkpoint(src)
    bound = bind_checkpoint(plan, ckpt, strict)
    reader = RegionReader(bound, ckpt)
    choose = placements if callable(placements) else (placements or {}).get
    placed = {}
    for target, (shape, _) in bound.outputs.items():  # every placement checked before any read
        placed[target] = placements_of(choose(target), len(shape))
        _check_fits(target, shape, mesh, placed[target])
    out = {}
    for target, (shape, _) in bound.outputs.items():
        local = reader.read(target, local_region(shape, mesh, placed[target]))
        out[target] = DTensor.from_local(
            local, mesh, placed[target], run_check=False, shape=shape, stride=strides(shape)
        )
    return out, reader.stats


def _check_fits(target: str, shape: tuple[int, ...], mesh, placements: Sequence) -> None:
    """A placement must name one per mesh dim, and cut a dim the tensor has into even shards (DTensor
    would make uneven ones; a checkpoint's shards are meant to be equal)."""
    from torch.distributed.tensor import Shard

    if len(placements) != mesh.ndim:
        raise ConvspecError(
            f"{target}: {len(placements)} placement(s) for a mesh of {mesh.ndim} dims",
            hint="give one placement per mesh dim",
        )
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Shard):
            if not -len(shape) <= p.dim < len(shape):
                raise ConvspecError(
                    f"{target}: Shard({p.dim}) of a tensor with {len(shape)} dims {list(shape)}"
                )
            n = mesh.size(mesh_dim)
            if shape[p.dim] % n:
                raise ConvspecError(
                    f"{target}: dim {p.dim % len(shape)} of {list(shape)} ({shape[p.dim]}) does not divide "
                    f"into {n} shards",
                    hint="choose a placement whose dim divides by the mesh size, or replicate the tensor",
                )
