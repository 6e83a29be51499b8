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
    from .io.checkpoint import Checkpoint
    from .streaming import bind_checkpoint, stream_bound

    device = check_device(device)  # meta too (shapes only); before anything is read
    ckpt = Checkpoint(src)
    yield from stream_bound(bind_checkpoint(plan, ckpt, strict), ckpt, device, dtype)


def load(plan: Plan, src, device: str, dtype: str | None, strict: bool) -> dict:
    from .io.checkpoint import Checkpoint
    from .streaming import Loaded, bind_checkpoint, stream_bound

    device = check_device(device)
    ckpt = Checkpoint(src)
    bound = bind_checkpoint(plan, ckpt, strict)
    return Loaded(stream_bound(bound, ckpt, device, dtype), bound=bound)


def load_into(plan: Plan, model, src, strict: bool, device: str | None):
    from .io.checkpoint import Checkpoint
    from .load_into import load_into as fill
    from .streaming import bind_checkpoint, stream_bound

    dev = check_device(device or next((str(p.device) for p in model.parameters() if not p.is_meta), "cpu"))
    ckpt = Checkpoint(src)
    bound = bind_checkpoint(plan, ckpt)
    items = stream_bound(bound, ckpt, dev)
    return fill(model, items, strict=strict, base_prefix=plan.base_prefix, already=len(bound.already))


def save(plan: Plan, state_dict: dict, dst, max_shard_size: str | int, overwrite: bool) -> list[str]:
    from .io.writer import AtomicDir, parse_size, write_sharded
    from .ops import TensorInfo
    from .streaming import output_order

    bound = plan.bind({k: TensorInfo.of(t) for k, t in state_dict.items()})
    out = plan.apply(state_dict)
    entries = output_order(bound)
    with AtomicDir(dst, overwrite=overwrite) as tmp:
        return write_sharded(tmp, entries, ((k, out[k]) for k, _, _ in entries), parse_size(max_shard_size))


def to_json(plan: Plan, indent: int | None) -> str:
    return json.dumps(plan_json.plan_dict(plan), indent=indent)


def from_json(text: str | bytes) -> Plan:
    return plan_json.loads(text)


def check(plan: Plan) -> None:
    plan_check.check_plan(plan)


_plan.install_runtime(sys.modules[__name__])
