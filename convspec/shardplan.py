"""Who reads what, before a byte is read (issue 16, `convspec compile --against DIR --shard tp=4,ep=2`):
the placement of every converted tensor under transformers' own tp and ep plans (bundled in
`hf/tp_plans.json`), each rank's region of it, and the bytes and read calls that region costs,
counted by walking the slice maps over meta tensors."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import ConvspecError
from .regions import ReadStats, RegionReader, region_runs

if TYPE_CHECKING:
    import torch

    from .bind import BoundPlan
    from .ops.slicing import Region, SliceMap

AXES = ("ep", "tp")  # the mesh's dims, in this order, for the axes a shard names
PLANS = Path(__file__).parent / "hf" / "tp_plans.json"


# ---- the shard spec ------------------------------------------------------------------------------


MAX_RANKS = 1 << 17  # ranks a shard's mesh may have: past the largest jobs, and `compile --shard` lists each


def parse_shard(text: str) -> dict[str, int]:
    """A shard spec (`tp=4`, `ep=2`, `tp=2,ep=2`) as {axis: size}, in mesh order (ep before tp)."""
    from .ops.base import short

    hint = "write AXIS=N[,AXIS=N] with AXIS tp or ep and N a positive whole number, e.g. tp=2,ep=2"
    shown = short(str(text))
    sizes: dict[str, int] = {}
    for part in str(text).split(","):
        axis, eq, n = (s.strip() for s in part.partition("="))
        if not eq or axis not in AXES:
            what = f"unknown axis {short(axis)}" if eq else f"{short(part.strip())} is not AXIS=N"
            raise ConvspecError(f"bad shard {shown}: {what}", hint=hint)
        if axis in sizes:
            raise ConvspecError(f"bad shard {shown}: {axis} is given twice", hint=hint)
        digits = n.lstrip("0")
        if not re.fullmatch(r"[0-9]+", n) or not digits:
            raise ConvspecError(
                f"bad shard {shown}: {axis}={n if len(n) <= 20 else short(n)} is not a positive whole number",
                hint=hint,
            )
        sizes[axis] = int(digits) if len(digits) <= 7 else MAX_RANKS + 1  # no int of a huge text
    if math.prod(sizes.values()) > MAX_RANKS:
        raise ConvspecError(
            f"bad shard {shown}: a mesh of more than {MAX_RANKS:,} ranks",
            hint="shard over fewer ranks (tp times ep)",
        )
    return {a: sizes[a] for a in AXES if a in sizes}


# ---- transformers' styles as placements ----------------------------------------------------------

# Styles that shard a parameter, as the tensor dim they cut (given the parameter's ndim and name), the
# way transformers' `shard_param` does (distributed/tensor_parallel.py, expert_parallel.py).
SHARDS = {
    "colwise": lambda ndim, name: max(ndim - 2, 0),  # Shard(ndim - 2): weight rows, bias, stacked out dim
    "colwise_rep": lambda ndim, name: max(ndim - 2, 0),
    "colwise_gather_output": lambda ndim, name: max(ndim - 2, 0),
    "rowwise": lambda ndim, name: None if name == "bias" else ndim - 1,  # Shard(-1); bias replicated
    "rowwise_rep": lambda ndim, name: None if name == "bias" else ndim - 1,
    "rowwise_split_input": lambda ndim, name: None if name == "bias" else ndim - 1,
    "embedding_rowwise": lambda ndim, name: 0,
    "embedding_colwise": lambda ndim, name: 1,
    "grouped_gemm": lambda ndim, name: 0,  # expert parallel: whole experts per rank
    "experts": lambda ndim, name: 0,  # convspec.sharded's names for it
    "ep": lambda ndim, name: 0,
    # gate and up packed in one tensor: each rank a part of each half, DTensor's _StridedShard
    "packed_colwise": lambda ndim, name: 0 if ndim == 1 else ("strided", ndim - 2),
    "packed_rowwise": lambda ndim, name: None if ndim == 1 else ("strided", ndim - 1),
}
EP_STYLES = {"grouped_gemm", "experts", "ep"}  # an override's style that goes on the ep dim
# Styles that hook a module's forward and leave its parameters whole on every rank.
WHOLE = {
    "replicate",
    "moe_tp_experts",
    "ep_dispatch_experts",
    "sequence_parallel",
    "replicated_with_grad_allreduce",
    "mla_kv_a_proj",
    "all_reduce",
    "moe_identity_expert",
    "local_params",
}


@cache
def bundled_plans() -> dict[str, dict[str, dict[str, str]]]:
    """transformers' base-model tp and ep plans by model type, as `tools/tp_plans.py` bundled them."""
    return json.loads(PLANS.read_text(encoding="utf-8"))["plans"]


def plans_of(model_type: str) -> dict[str, dict[str, str]]:
    """The tp and ep plans transformers applies to a model type's base model: its config's, and on
    the tp side the vocabulary-parallel input embedding `init_parallel_plans` adds to any tp plan
    (the head's rule is the model class's, which the bundle does not hold: `lm_head` stays whole)."""
    plans = dict(bundled_plans().get(model_type, {}))
    if plans.get("tp"):
        plans["tp"] = {"embed_tokens": "embedding_rowwise", **plans["tp"]}
    return plans


@cache
def _pattern(glob: str) -> re.Pattern:
    """A plan name (`layers.*.mlp.experts`: `*` a layer number) as a regex of a module path below any
    prefix (the base model's `model.`, a composite model's `model.language_model.`)."""
    return re.compile(r"(?:.*\.)?" + re.escape(glob).replace(r"\*", r"\d+"))


def _style_of(plan: Mapping[str, str], target: str) -> str | None:
    """The style a plan gives the parameter `target`: an entry naming it, else one naming the module
    that holds it directly (as transformers applies a module entry to its own weight and bias)."""
    owner = target.rpartition(".")[0]
    for path in (target, owner):
        for glob, style in plan.items():
            if _pattern(glob).fullmatch(path):
                return style
    return None


def _is_expert(ep_plan: Mapping[str, str], target: str) -> bool:
    """Whether the ep plan names `target`, its module or a module above it (transformers then drops
    every tp rule of it)."""
    parts = target.split(".")
    paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(_pattern(glob).fullmatch(path) for glob in ep_plan for path in paths)


class Placed(NamedTuple):
    """A model's tensors on a mesh: its shape and dim names, each target's placement (one per mesh
    dim, DTensor's `Shard`/`Replicate`), the style each axis gave it, and why a target a plan would
    shard is read whole instead."""

    mesh_shape: tuple[int, ...]
    mesh_dim_names: tuple[str, ...]
    placements: dict[str, tuple]
    styles: dict[str, dict[str, str]]
    reasons: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    plan: Any = None  # the plan whose scale grids follow their weights (`companions.scale_grids`)


def placements_for(
    bound: BoundPlan | Mapping[str, Any],
    model_type: str,
    shard: str | Mapping[str, int],
    overrides: Mapping[str, Any] | None = None,
) -> Placed:
    """Every converted tensor's placement for `shard` ("tp=2,ep=2" or {axis: size}) under the tp and
    ep plans transformers gives `model_type`. `bound`: a bound plan, or {target: shape}. A target the
    ep plan names is cut on the ep dim only; a style with no even DTensor placement is replicated,
    with the reason. `overrides` ({glob, or "re:" regex: style, or a list of one style or tensor dim
    per mesh dim}) come first, the first that matches. Placements as `load_sharded` takes them."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    sizes = (
        parse_shard(shard)
        if isinstance(shard, str)
        else parse_shard(",".join(f"{a}={n}" for a, n in shard.items()))
    )
    overrides = check_overrides(overrides or {})
    plans = plans_of(model_type)
    for axis in sizes:
        if not plans.get(axis) and not overrides:
            raise ConvspecError(
                f"transformers has no {axis} plan for model type {model_type!r}",
                hint="shard along an axis its plan has, check the model type (config.json's model_type), "
                "or give the placements (--placements FILE)",
            )
    shapes = {t: _shape(s) for t, s in _outputs(bound).items()}
    placed, styles, reasons = {}, {}, {}
    for target, shape in shapes.items():
        per_dim, used = [], {}
        for axis, style in zip(sizes, _styles(target, sizes, plans, overrides), strict=True):
            dim, why = (
                (style, None) if isinstance(style, int) else _dim_of(style, shape, target.rpartition(".")[2])
            )
            if isinstance(dim, int) and not 0 <= dim < len(shape):
                dim, why = None, f"dim {style} of a tensor with {len(shape)} dims {list(shape)}, read whole"
            if style is not None:
                used[axis] = f"Shard({style})" if isinstance(style, int) else style
            if why:
                reasons[target] = why
            per_dim.append(
                Replicate()
                if dim is None
                else _StridedShard(dim[1], split_factor=2)
                if isinstance(dim, tuple)
                else Shard(dim)
            )
        placed[target], styles[target] = tuple(per_dim), used
    plan = getattr(bound, "plan", None)
    _follow_weights(plan, placed, styles, reasons, overrides)
    return Placed(tuple(sizes.values()), tuple(sizes), placed, styles, reasons, shapes, plan)


def _follow_weights(plan, placed: dict, styles: dict, reasons: dict, overrides: Mapping[str, Any]) -> None:
    """Each scale grid of a kept quantized weight placed as its weight (the plans name weights, and a
    module's entry would place a stacked grid by its own style), unless an override names the grid."""
    from .companions import scale_grids

    for grid, (weight, _) in scale_grids(plan, placed).items():
        if any(_matches(pattern, grid) for pattern in overrides):
            continue
        placed[grid], styles[grid] = placed[weight], dict(styles[weight])
        reasons.pop(grid, None)
        if weight in reasons:
            reasons[grid] = reasons[weight]


def _styles(target: str, sizes: Mapping[str, int], plans: Mapping, overrides: Mapping[str, Any]) -> list:
    """The style (or tensor dim) each mesh axis gives `target`: an override's, else the plans'."""
    for pattern, value in overrides.items():
        if not _matches(pattern, target):
            continue
        if isinstance(value, list):
            if len(value) != len(sizes):
                raise ConvspecError(
                    f"{target}: the placement {value} of {pattern!r} names {len(value)} mesh dim(s) "
                    f"for a mesh of {len(sizes)} ({', '.join(sizes)})",
                    hint="give one style or tensor dim per mesh dim, or one style",
                )
            return [None if v == "replicate" else v for v in value]
        return [value if (axis == "ep") == (value in EP_STYLES) else None for axis in sizes]
    expert = "ep" in sizes and _is_expert(plans.get("ep", {}), target)
    return [None if axis == "tp" and expert else _style_of(plans.get(axis, {}), target) for axis in sizes]


def _matches(pattern: str, target: str) -> bool:
    """Whether an override's pattern (a glob, or a "re:" regex) names `target`."""
    return bool(
        re.fullmatch(pattern[3:], target) if pattern.startswith("re:") else fnmatchcase(target, pattern)
    )


def check_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Placement overrides as `placements_for` takes them, each checked: a glob or a "re:" regex, and a
    known style, or a list of styles and tensor dims."""
    known = sorted({*SHARDS, *WHOLE})
    out = {}
    for pattern, value in overrides.items():
        if not isinstance(pattern, str):
            raise ConvspecError(f"placement pattern {pattern!r} is not a string")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ConvspecError(f"placement pattern {pattern!r} is not a regex: {exc}") from None
        items = value if isinstance(value, list) else [value]
        for v in items:
            ok = (type(v) is int and v >= 0 and isinstance(value, list)) or (
                isinstance(v, str) and v in known
            )
            if not ok:
                raise ConvspecError(
                    f"placement {v!r} of {pattern!r} is not a style"
                    + (" or a tensor dim" if isinstance(value, list) else ""),
                    hint=f"use one of {', '.join(known)}; in a list, also a tensor dim (0, 1, ...)",
                )
        out[pattern] = value
    return out


MAX_PLACEMENTS_BYTES = 1 << 20  # a placements file: a few patterns, never megabytes


def read_overrides(path: str) -> dict[str, Any]:
    """A `--placements` file: a JSON object {glob or "re:" regex: style, or a list per mesh dim},
    read as every side file is (`io.sidefile.load_json`: capped, UTF-8, no key given twice)."""
    from .io.sidefile import load_json

    data = load_json(path, MAX_PLACEMENTS_BYTES, what="placements file")
    if not isinstance(data, dict):
        raise ConvspecError(f"{path}: placements are a JSON object {{pattern: style}}")
    return check_overrides(data)


def _outputs(bound) -> Mapping[str, Any]:
    return bound.outputs if hasattr(bound, "outputs") else bound


def _shape(s) -> tuple[int, ...]:
    """A shape, from a shape or a bound plan's (shape, dtype)."""
    return tuple(s[0]) if len(s) == 2 and isinstance(s[0], (tuple, list)) else tuple(s)


def _dim_of(style: str | None, shape: tuple[int, ...], name: str) -> tuple[Any, str | None]:
    """The dim a style cuts (None: whole; ("strided", d): a strided shard of d, two packed halves),
    and why a style that cuts is read whole instead."""
    if style is None or style in WHOLE:
        return None, None
    if style not in SHARDS:
        return None, f"{style}: a style convspec does not map, read whole"
    dim = SHARDS[style](len(shape), name)
    if isinstance(dim, tuple):  # a strided shard of dim[1], halves packed
        return dim, None
    if dim is not None and not 0 <= dim < len(shape):
        return None, f"{style}: cuts dim {dim} of a tensor with {len(shape)} dims {list(shape)}, read whole"
    return dim, None


# ---- each rank's region --------------------------------------------------------------------------


class _Mesh:
    """What `sharded._check_fits` asks of a mesh (its ndim and sizes), with no process group."""

    def __init__(self, shape: tuple[int, ...], names: tuple[str, ...] | None = None):
        self.shape, self.ndim, self.mesh_dim_names = shape, len(shape), names

    def size(self, dim: int) -> int:
        return self.shape[dim]


def check_fits(placed: Placed) -> None:
    """Every placement cuts its dim into even shards, and every scale grid holds its weight shard's
    blocks, none cut: checked as `load_sharded` checks them (`sharded.check_placed`)."""
    from .sharded import check_placed

    mesh = _Mesh(placed.mesh_shape, placed.mesh_dim_names)
    check_placed(placed.plan, placed.shapes, {t: (mesh, p) for t, p in placed.placements.items()})


def coords_of(rank: int, mesh_shape: Sequence[int]) -> tuple[int, ...]:
    """A rank's coordinates on a row-major mesh (as `init_device_mesh` numbers ranks)."""
    out = []
    for n in reversed(mesh_shape):
        rank, c = divmod(rank, n)
        out.append(c)
    return tuple(reversed(out))


def rank_blocks(
    shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence, coords: Sequence[int]
) -> tuple[Region, ...]:
    """The regions of a tensor of `shape` a rank at `coords` holds (one, or a strided shard's
    several), as `load_sharded` reads them (`sharded.local_blocks`)."""
    from .sharded import local_blocks

    return tuple(region for region, _ in local_blocks(shape, mesh_shape, coords, placements))


# ---- what each rank reads, from headers only -----------------------------------------------------


class CountingReader(RegionReader):
    """A region reader that reads no data: each source region is counted as the byte runs the real
    reader would read (`regions.region_runs`) and stands as a meta tensor of its shape, which the ops map
    like any other. `wider`: each target read wider than asked, with the ops that widened it."""

    def __init__(self, bound: BoundPlan):
        super().__init__(bound, None)  # type: ignore[arg-type]  # never read: `source` is replaced
        self.wider: dict[str, list[str]] = {}
        self._target = ""

    def read(self, target: str, region: Region | None = None) -> torch.Tensor:
        self._target = target
        return super().read(target, region)

    def source(self, key: str, region: Region) -> torch.Tensor:
        import torch

        from .dtypes import DTYPES, ITEMSIZE

        info = self.bound.layout[key]
        out = tuple(b - a for a, b in region)
        if 0 not in out:
            runs = list(region_runs(info.shape, region, ITEMSIZE[info.dtype]))
            self.stats.bytes += sum(n for _, _, n in runs)
            self.stats.runs += len(runs)
        return torch.empty(out, dtype=DTYPES[info.dtype], device="meta")

    def finish(self, m: SliceMap, read: list) -> torch.Tensor:
        import torch

        from .ops.slicing import finish

        if not m.exact:
            ops = self.wider.setdefault(self._target, [])
            name = type(m.op).name if m.op is not None else "read"
            if name not in ops:
                ops.append(name)
        try:
            return finish(m, read)
        except (NotImplementedError, RuntimeError):  # an op with no meta kernel: run it on empty memory
            real = [None if x is None else torch.empty(x.shape, dtype=x.dtype) for x in read]
            out = finish(m, real)
            return torch.empty(out.shape, dtype=out.dtype, device="meta")


@dataclass
class RankIO:
    """What one rank reads: its coordinates on the mesh, bytes and read calls (`ReadStats`), and the
    targets it reads wider than its shard, with the ops that widened each."""

    rank: int
    coords: tuple[int, ...]
    stats: ReadStats
    wider: dict[str, list[str]] = field(default_factory=dict)


def rank_io(bound: BoundPlan, placed: Placed) -> list[RankIO]:
    """Each rank's reads of its shards (what `load_sharded` reads on that rank), counted from the
    headers: every placement is checked first, as `load_sharded` checks it. A region several ranks
    share (a whole tensor, a shard of its replicas) is walked once."""
    check_fits(placed)
    reader = CountingReader(bound)
    cost: dict[tuple[str, tuple[Region, ...]], tuple[int, int, int, list[str] | None]] = {}
    out = []
    for rank in range(math.prod(placed.mesh_shape)):
        io = RankIO(rank, coords_of(rank, placed.mesh_shape), ReadStats())
        for target, p in placed.placements.items():
            regions = rank_blocks(placed.shapes[target], placed.mesh_shape, p, io.coords)
            c = cost.get((target, regions))
            if c is None:
                before = (reader.stats.bytes, reader.stats.runs, reader.stats.wider)
                reader.wider.pop(target, None)
                for region in regions:
                    reader.read(target, region)
                after = (reader.stats.bytes, reader.stats.runs, reader.stats.wider)
                c = cost[target, regions] = (
                    *(a - b for a, b in zip(after, before, strict=True)),
                    reader.wider.get(target),
                )
            io.stats.bytes, io.stats.runs, io.stats.wider = (
                io.stats.bytes + c[0],
                io.stats.runs + c[1],
                io.stats.wider + c[2],
            )
            if c[3]:
                io.wider[target] = c[3]
        out.append(io)
    return out


class ShardReport(NamedTuple):
    """`compile --shard`: the placements, each rank's reads, and the checkpoint's size in bytes."""

    model_type: str
    placed: Placed
    ranks: list[RankIO]
    total: int

    def fallbacks(self) -> dict[str, str]:
        """Each target some rank reads whole or wider than its shard, and why."""
        out = dict(self.placed.reasons)
        for r in self.ranks:
            for target, ops in r.wider.items():
                out.setdefault(
                    target, f"{', '.join(ops)} has no exact slice map here: read wider, then narrowed"
                )
        return out

    def to_json(self) -> dict:
        p = self.placed
        return {
            "model_type": self.model_type,
            "mesh": dict(zip(p.mesh_dim_names, p.mesh_shape, strict=True)),
            "checkpoint_bytes": self.total,
            "ranks": [
                {"rank": r.rank, "coords": list(r.coords), "bytes": r.stats.bytes, "reads": r.stats.runs}
                | {"wider": r.wider}
                for r in self.ranks
            ],
            "placements": {t: [repr(x) for x in v] for t, v in p.placements.items()},
            "fallbacks": self.fallbacks(),
        }

    def lines(self, style) -> list[str]:
        """The report as text: one row per rank, then the targets read whole or wider, and why."""
        from .style import table

        p = self.placed
        mesh = " x ".join(f"{a}={n}" for a, n in zip(p.mesh_dim_names, p.mesh_shape, strict=True))
        head = f"{self.model_type} on a mesh {mesh} ({len(self.ranks)} ranks), from headers only"
        rows = [("rank", *p.mesh_dim_names, "bytes read", "read calls", "share")]
        for r in self.ranks:
            share = f"{100 * r.stats.bytes / self.total:.1f}%" if self.total else "-"
            rows.append((str(r.rank), *map(str, r.coords), f"{r.stats.bytes:,}", f"{r.stats.runs:,}", share))
        out = [style.bold(head), f"checkpoint: {self.total:,} bytes", *table(rows, indent="  ")]
        counts = {
            a: sum(1 for v in p.placements.values() if _cuts(v[i])) for i, a in enumerate(p.mesh_dim_names)
        }
        whole = sum(1 for v in p.placements.values() if not any(map(_cuts, v)))
        out.append(
            "sharded: "
            + ", ".join(f"{n} on {a}" for a, n in counts.items())
            + f"; whole on every rank: {whole}"
        )
        grids = _companions(p)
        if grids:
            same = sum(p.placements[g] == p.placements[w] for g, (w, _) in grids.items())
            out.append(f"scale grids placed as their weights: {same} of {len(grids)}")
        fall = self.fallbacks()
        if fall:
            out.append(f"read whole or wider than the shard ({len(fall)}):")
            out += [f"  {t}: {why}" for t, why in fall.items()]
        else:
            out.append("no target is read wider than its shard")
        return out


def _companions(p: Placed) -> dict[str, tuple[str, tuple[int, int]]]:
    from .companions import scale_grids

    return scale_grids(p.plan, p.placements)


def _cuts(placement) -> bool:
    from .sharded import cuts

    return cuts(placement)


def model_type_of(plan) -> str:
    """The model type whose plans apply: the `model_type` of the config the plan was compiled with
    (the checkpoint's config.json under `--against`), else the spec's first model type."""
    mt = (plan.config or {}).get("model_type")
    if isinstance(mt, str) and mt:
        return mt
    return plan.model_types[0] if plan.model_types else plan.name


def shard_report(
    bound: BoundPlan, model_type: str, shard: str, overrides: Mapping[str, Any] | None = None
) -> ShardReport:
    """Placements for `shard` under `model_type`'s plans (and `overrides`, first) and what each rank
    reads, from headers only."""
    from .dtypes import ITEMSIZE

    placed = placements_for(bound, model_type, shard, overrides)
    ranks = rank_io(bound, placed)
    total = sum(math.prod(i.shape) * ITEMSIZE[i.dtype] for i in bound.layout.values())
    return ShardReport(model_type, placed, ranks, total)


def load_by_plan(plan, src, shard: str, device: str = "cpu", strict: bool = False, dtype: str | None = None):
    """`plan.load(src, shard="tp=2,ep=2")`: a mesh of those axes over every rank of the job (ep
    before tp), each tensor placed as transformers' tp and ep plans for the model type place it
    (`shardplan.placements_for`). Returns the tensors, as `load_sharded` does."""
    from torch.distributed.device_mesh import init_device_mesh

    from .sharded import Place, load_placed

    sizes = parse_shard(shard)  # the same on every rank: refused alike, before any collective
    mesh = init_device_mesh(device.split(":")[0], tuple(sizes.values()), mesh_dim_names=tuple(sizes))

    def placing(bound) -> Place:
        placed = placements_for(bound, model_type_of(plan), sizes).placements
        return lambda target, ndim: (mesh, placed[target])

    return load_placed(plan, src, placing, strict, dtype=dtype)
