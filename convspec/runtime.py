"""What a Plan's conveniences do (`plan.bind`, `.apply`, `.stream`, `.load`, `.load_into`, `.save`,
`.to_json`, `Plan.from_json`, `.check`): the one place they are routed through. The compile layer
imports nothing above it; this module, above bind, run and io, installs itself into
`compile/plan.py` when `convspec` is imported (dependency inversion), so no import cycle closes.
The heavy layers (torch, the readers) are imported on first use, as before."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .compile import check as plan_check
from .compile import plan as _plan
from .compile import plan_json
from .devices import check_device
from .errors import ConvspecError

if TYPE_CHECKING:
    from .bind import BoundPlan
    from .compile.plan import Plan


def bind(plan: Plan, layout: dict, strict: bool = False) -> BoundPlan:
    from .bind import bind as bind_layout

    return bind_layout(plan, layout, strict=strict)


def apply(plan: Plan, state_dict: dict, strict: bool = False) -> dict:
    from .run import apply_plan

    return apply_plan(plan, state_dict, strict=strict)


def stream(plan: Plan, src, device: str, dtype: str | None, strict: bool) -> Iterator[tuple[str, Any]]:
    from .io.formats import open_checkpoint
    from .streaming import bind_checkpoint, stream_bound

    device = check_device(device)  # meta too (shapes only); before anything is read
    ckpt = open_checkpoint(src)
    yield from stream_bound(bind_checkpoint(plan, ckpt, strict), ckpt, device, dtype)


def load(
    plan: Plan, src, device: str, dtype: str | None, strict: bool, shard: Any = None, mesh: Any = None
) -> dict:
    if shard is not None or mesh is not None:
        return _load_sharded(plan, src, device, dtype, strict, shard, mesh)
    from .io.formats import open_checkpoint
    from .streaming import Loaded, bind_checkpoint, stream_bound

    device = check_device(device)
    ckpt = open_checkpoint(src)
    bound = bind_checkpoint(plan, ckpt, strict)
    return Loaded(stream_bound(bound, ckpt, device, dtype), bound=bound)


def _load_sharded(plan: Plan, src, device: str, dtype: str | None, strict: bool, shard, mesh) -> dict:
    """`plan.load(src, shard=...)`: the mesh given, or one over every rank on `device`'s type."""
    from .ops.base import short
    from .ranks import check_job
    from .sharded import load_sharded
    from .shardplan import load_by_plan

    if mesh is None:  # the mesh is made over the job's ranks
        check_job(f"plan.load(shard={short(shard)})" if isinstance(shard, str) else "plan.load(shard=...)")
    if isinstance(shard, str):
        if mesh is not None:
            raise ConvspecError(
                f"shard={shard!r} makes its own mesh", hint="give placements by key with mesh=, or no mesh"
            )
        return load_by_plan(plan, src, shard, str(check_device(device)), strict, dtype)[0]
    if mesh is None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        mesh = init_device_mesh(str(check_device(device)).split(":")[0], (world,))
    return load_sharded(plan, src, mesh, shard, strict, dtype=dtype)[0]


def load_into(plan: Plan, model, src, strict: bool, device: str | None):
    from .io.formats import open_checkpoint
    from .load_into import load_into as fill
    from .streaming import bind_checkpoint, stream_bound

    place = _model_placements(model, plan.base_prefix)
    if place is not None:  # a parallelized model: each rank reads its parameters' shards
        from .sharded import load_placed

        loaded, _ = load_placed(plan, src, lambda bound: place, device=device)
        return fill(model, loaded.items(), strict, plan.base_prefix, len(loaded.bound.already))

    dev = check_device(device or next((str(p.device) for p in model.parameters() if not p.is_meta), "cpu"))
    ckpt = open_checkpoint(src)
    bound = bind_checkpoint(plan, ckpt)
    items = stream_bound(bound, ckpt, dev)
    return fill(model, items, strict=strict, base_prefix=plan.base_prefix, already=len(bound.already))


def _model_placements(model, base_prefix: str):
    """Where a model's DTensor parameters and buffers lie, as a `sharded.Place` by converted key
    (tried with and without `base_prefix`, as filling the model tries them); None when it has none."""
    import itertools

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    named = itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    )
    placed = {k: (t.device_mesh, tuple(t.placements)) for k, t in named if isinstance(t, DTensor)}
    if not placed:
        return None

    def place(target: str, ndim: int):
        names = (
            (target, f"{base_prefix}.{target}", target.removeprefix(f"{base_prefix}."))
            if base_prefix
            else (target,)
        )
        return next((placed[k] for k in names if k in placed), None)

    return place


def save(plan: Plan, state_dict: dict, dst, max_shard_size: str | int, overwrite: bool) -> list[str]:
    from .streaming import save_state_dict

    return save_state_dict(plan, state_dict, dst, max_shard_size, overwrite)


def to_json(plan: Plan, indent: int | None) -> str:
    return json.dumps(plan_json.plan_dict(plan), indent=indent)


def from_json(text: str | bytes) -> Plan:
    return plan_json.loads(text)


def check(plan: Plan) -> None:
    plan_check.check_plan(plan)


def dequantize(plan: Plan, dtype: str) -> Plan:
    from .compile.dequantize import dequantized

    return dequantized(plan, dtype)


def adapter(plan: Plan, config: dict | None) -> Plan:
    from .compile.lora import derive

    return derive(plan, config).plan


_plan.install_runtime(sys.modules[__name__])
