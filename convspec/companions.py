"""Headers-only checks of quantized weights and their companions, run by bind before any data is
read: every weight has its scale, of the scheme's dtype and grid shape, no companion is an orphan,
and no op of a group cuts a block of a quantized weight (`Op.carry_blocks`)."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from .interpret import Interpreter
from .ops import TensorInfo
from .quantization import SCHEMES, Quant, resolve_quant, suffix
from .spec.model import Quantization

if TYPE_CHECKING:
    from pathlib import Path

    from .compile.plan import Plan, PlanRule

MAX_SHOWN = 5  # problems of one kind listed before "and N more"


def layout_problems(q: Quant, layout: dict[str, TensorInfo], side: str) -> list[str]:
    """What is wrong with the quantized weights of `layout` (the checkpoint's keys, or the keys the
    conversion writes: `side` says which), one message per problem, each naming its key."""
    scheme = q.kind
    found: dict[str, list[str]] = {}

    def say(kind: str, msg: str) -> None:
        found.setdefault(kind, []).append(msg)

    for key, info in layout.items():
        owner = owner_of(q, key)
        if owner is not None:
            weight, role, _ = owner
            if weight not in layout:
                say("orphan", f"{key} is a companion of {weight}, which the {side} lacks")
            elif role == 0:
                problem = _grid_problem(q, weight, layout[weight], key, info)
                if problem:
                    say("grid", problem)
            continue
        scale = q.scale_of(key) if info.dtype in scheme.weight_dtypes else None
        if scale is not None and scale not in layout:
            say("missing", f"{key} is a quantized weight ({info.dtype}) without its scale {scale}")
    problems = []
    for msgs in found.values():
        problems += msgs[:MAX_SHOWN]
        if len(msgs) > MAX_SHOWN:
            problems.append(f"... and {len(msgs) - MAX_SHOWN} more like it in the {side}")
    return problems


def owner_of(q: Quant, key: str) -> tuple[str, int, str] | None:
    """The weight a companion key belongs to, which of its companions it is (0: the scale), and that
    companion's suffix (`_scale_inv`, `.input_scale`)."""
    for form in q.forms:
        for role, c in enumerate(form.companions):
            if key.endswith(c) and c:
                return key[: len(key) - len(c)] + form.weight, role, c
    return None


def _grid_problem(q: Quant, weight: str, w: TensorInfo, key: str, s: TensorInfo) -> str | None:
    """Why `s` is not the scale of `w` under the scheme (dtypes, then the grid's shape), or None."""
    scheme = q.kind
    if w.dtype not in scheme.weight_dtypes:
        return f"{weight} has the scale {key} but is {w.dtype}, not {' or '.join(scheme.weight_dtypes)}"
    if s.dtype not in scheme.scale_dtypes:
        return f"{key} is {s.dtype}: a {scheme.name} scale is one of {', '.join(scheme.scale_dtypes)}"
    want = expected_grid(q, w.shape, s.shape)
    if want is None or tuple(s.shape) in want:
        return None
    shapes = " or ".join(str(list(g)) for g in want)
    return f"{key} has the grid {list(s.shape)}, not {shapes} for {weight} of shape {list(w.shape)}" + (
        f" in blocks of {list(q.block)}" if q.block else ""
    )


def expected_grid(q: Quant, weight: tuple[int, ...], scale: tuple[int, ...]) -> list[tuple[int, ...]] | None:
    """The scale shapes the scheme allows for a weight of shape `weight` (None: any)."""
    grid = q.kind.grid
    if grid == "blocks":
        if len(weight) < 2:
            return [(*weight, 1)]
        (rows, cols), (br, bc) = weight[-2:], q.block
        return [(*weight[:-2], -(-rows // br), -(-cols // bc))]
    if grid == "mx":
        return [tuple(weight[:-1])]
    # per tensor ([] or [1]) or per channel ([rows, 1]), leading dims (stacked experts) kept
    lead = tuple(weight[:-2])
    return [(*lead,), (*lead, 1), (*lead, weight[-2], 1)] if len(weight) >= 2 else None


def unclaimed_scales(plan: Plan, layout: dict[str, TensorInfo], converted: list[str]) -> list[str]:
    """Without a quantization in the plan: the converted weights (`converted`, source keys in group
    order) whose scale no convert takes with them (it would be left behind, an orphan of a weight that
    no longer exists). Only the converted keys of a quantized dtype are looked at: binding a plain
    checkpoint costs a dtype test per converted key."""
    quantized = [k for k in converted if layout[k].dtype in WEIGHT_DTYPES]
    if not quantized:
        return []
    taken = set(converted)
    problems = []
    for scheme in SCHEMES.values():
        q = _own_quant(scheme.name)
        for key in quantized:
            scale = q.scale_of(key)
            w = layout[key]
            if (
                w.dtype in scheme.weight_dtypes
                and not q.is_companion(key)
                and scale in layout
                and scale not in taken
            ):
                problems.append(
                    f"{key} is a quantized weight ({w.dtype}) with the scale {scale}, and a convert "
                    f"claims it, but the plan {plan.name} has no quantization: its scales would be left "
                    "behind, no longer matching"
                )
        if problems:
            break
    if len(problems) > MAX_SHOWN:
        problems = [*problems[:MAX_SHOWN], f"... and {len(problems) - MAX_SHOWN} more like it"]
    return problems


WEIGHT_DTYPES = frozenset(d for s in SCHEMES.values() for d in s.weight_dtypes)


@cache
def _own_quant(scheme: str) -> Quant:
    """A scheme with its own companions and default block, resolved once."""
    return resolve_quant(Quantization(scheme=scheme), None)


def scale_grids(plan, targets) -> dict[str, tuple[str, tuple[int, int]]]:
    """The scale grids among `targets` ({grid: (its weight, the block it has one scale per)}): a
    block-quantized plan's kept weights' (`plan.quant`); none for a plan that dequantizes. A sharded
    load places each as its weight."""
    q = getattr(plan, "quant", None)
    if q is None or q.block is None or q.dequantize:
        return {}
    out = {}
    for target in targets:
        grid = None if q.is_companion(target) else q.scale_of(target)
        if grid is not None and grid != target and grid in targets:
            out[grid] = (target, q.block)
    return out


class Blocks(Interpreter):
    """The quantized weights of a group through its ops, as (TensorInfo, blocks) leaves: each op says
    where its outputs' blocks are (`Op.carry_blocks`), or that it cuts one (OpError)."""

    def __init__(self, plan: Plan, infos: dict[str, TensorInfo]):
        super().__init__(plan)
        self.infos, self.block = infos, plan.quant.blocks if plan.quant else ()

    def leaf(self, x) -> tuple[TensorInfo, tuple[int, ...]]:
        if type(x) is not str:
            return x
        info = self.infos[x]
        lead = max(len(info.shape) - len(self.block), 0)
        return info, ((1,) * lead + self.block)[-len(info.shape) :] if info.shape else ()

    def call(self, op, p, leaves):
        leaves = [self.leaf(x) for x in leaves]
        infos = [i for i, _ in leaves]
        blocks = op.carry_blocks(p, infos, leaves[0][1])
        return [(info, blocks) for info in op.infer(p, infos)]


def check_group(plan: Plan, rule: PlanRule, members: dict, infos: dict[str, TensorInfo]) -> None:
    """Raise OpError when an op of the group cuts a block of a quantized weight (a cat part, a split
    size or a chunk that is not a whole number of blocks). Only the weights' own ops are walked."""
    q = plan.quant
    weights = {n for n, pat in rule.inputs if not q.is_companion(pat.text)}
    if len(weights) == len(rule.inputs):
        return  # no scale in the group: not quantized here
    nodes = []
    for node in rule.nodes:
        if all(a in weights for a in node.inputs):
            nodes.append(node)
            weights.update(node.outputs)
    Blocks(plan, infos).run(
        _only(rule, tuple(nodes)), {n: members[n] for n, _ in rule.inputs if n in members}
    )


def _only(rule: PlanRule, nodes: tuple) -> PlanRule:
    from dataclasses import replace

    return replace(rule, nodes=nodes)


def dequant_rule(plan: Plan) -> PlanRule:
    """The rule that dequantizes a weight no convert claims (renamed or left as it is): its scale
    beside it, the scheme's op, the weight's own output key. Bind makes its groups, one per weight."""
    from .derived import derived

    return derived(plan, ("dequant-rule",), lambda: _dequant_rule(plan))


def _dequant_rule(plan: Plan) -> PlanRule:
    from .compile.dequantize import dequant_node
    from .compile.patterns import Pattern
    from .compile.plan import PlanRule
    from .errors import Span

    q = plan.quant
    form = q.forms[0]

    # made here: a spec may not write `{k:path}_scale_inv` (a path capture stands for whole segments)
    def pattern(tail: str) -> Pattern:
        return Pattern("{k:path}" + tail, (("cap", "k", "path"),) + ((("lit", tail, None),) if tail else ()))

    node = dequant_node(q, "w", "w.scale", Span(f"the {q.scheme} quantization", 0, 0), in_convert=False)
    return PlanRule(
        index=len(plan.rules),
        kind="convert",
        where=node.where,
        inputs=(("w", pattern(form.weight)), ("w.scale", pattern(form.companions[0]))),
        outputs=((node.outputs[0], pattern("")),),
        nodes=(node,),
        keep=("k",),
        free=((node.outputs[0], ()), ("w", ()), ("w.scale", ())),
        types=(("k", "path"),),
    )


def passthrough_pairs(q: Quant, layout: dict[str, TensorInfo], passthrough: dict[str, str]):
    """The quantized weights that pass through (renamed or not) with their scale: (weight, scale,
    the key the dequantized weight is written as)."""
    for key, dst in passthrough.items():
        scale = q.scale_of(key)
        if scale is None or layout[key].dtype not in q.kind.weight_dtypes or q.is_companion(key):
            continue
        out = q.form_of(key).stem(dst)
        if scale in passthrough and out is not None:
            yield key, scale, out + suffix(q.kind.dequantized)


def drop_quantization_config(path: Path, dtype: str) -> None:
    """The config.json of a dequantized output: no `quantization_config` (a loader would take the
    floats for quantized weights), its dtype the one the weights were dequantized to."""
    import json

    from .io.sidefile import MAX_CONFIG_BYTES, load_json

    if not path.is_file():
        return
    config = load_json(path, MAX_CONFIG_BYTES, what="config")
    if not isinstance(config, dict) or "quantization_config" not in config:
        return
    config.pop("quantization_config")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype
    path.write_text(json.dumps(config, indent=2) + "\n")


__all__ = [
    "Blocks",
    "check_group",
    "expected_grid",
    "layout_problems",
    "owner_of",
    "scale_grids",
    "unclaimed_scales",
]
