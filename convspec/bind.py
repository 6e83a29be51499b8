"""Bind: Plan x checkpoint layout -> concrete groups with inferred output shapes. Reads headers only."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .companions import check_group, dequant_rule, layout_problems, passthrough_pairs, unclaimed_scales
from .compile.plan import Plan, PlanRule
from .errors import BindError, Problem
from .interpret import GroupError, Index, Infer, Value, in_order, index_order
from .ops import OPS, OpError, TensorInfo
from .ops.stacking import MembersLimit
from .routing import base_lead, follow_renames, route_all, unlead

# tensors unstacking may make in one conversion: MAX_UNSTACKED, plus one per UNSTACKED_BYTES they hold.
# Models make tens of thousands, of megabytes each; a header must not make millions of empty or
# one-byte tensors (bind spends tens of microseconds and hundreds of bytes on each)
MAX_UNSTACKED = 1 << 16
UNSTACKED_BYTES = 4096


LIMIT_HINT = "nothing was read or written; docs/safety.md (Groups and shapes) lists the limits"


class LimitError(BindError):
    """A limit of bind is passed: raised at once, before more is made. `keys` are the source keys of
    the group, so that the caller, who knows the files, can name the file too."""

    def __init__(self, problems: list[str], keys: list[str], *, hint: str | None = None):
        super().__init__(problems, hint=hint)
        self.keys = keys


@dataclass
class Group:
    """One application of a convert rule: its members (by input and index) and its output keys."""

    rule: PlanRule
    keep: dict[str, str]
    members: dict[str, dict[Index, str]] = field(default_factory=dict)  # input -> index -> source key
    outputs: dict[str, TensorInfo] = field(default_factory=dict)  # final target key -> info
    out_values: dict[str, tuple[str, Index]] = field(default_factory=dict)  # target key -> (value, index)

    @property
    def name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.keep.items()) or "(all)"

    @cached_property
    def source_keys(self) -> list[str]:
        """The members' keys, each input's in index order (made once: reports and runs ask per group)."""
        return [k for m in self.members.values() for k in _by_index(m)]


def _by_index(member: dict[Index, str]) -> list[str]:
    """One input's keys in index order: at once for the usual 0..n-1, else sorted by index_order."""
    ordered = in_order(member)
    if ordered is None:
        ordered = [k for _, k in sorted(member.items(), key=lambda kv: index_order(kv[0]))]
    return ordered


@dataclass
class BoundPlan:
    """A plan bound to one checkpoint layout (`Plan.bind`): every group, every output key with its
    shape and dtype, and what is left over. Made from headers alone; no tensor data is read.

    Attributes:
        plan: the `Plan` that was bound.
        layout: the source layout, {key: TensorInfo(shape, dtype)}.
        groups: each application of a convert rule: its members (source keys) and outputs.
        passthrough: source key -> output key for keys renamed or left unchanged.
        unmatched: source keys no rule claimed (passed through unchanged).
        dropped: source keys a drop rule removed.
        outputs: {target_key: (shape, dtype)}, every key the conversion writes.
        warnings: notes found while binding (none are errors).
        aliased: keys a one-way alias renamed (saved back under the new name).

    Example:
        >>> shapes = {"w1": (48, 32), "w2": (32, 48), "w3": (48, 32)}
        >>> layout = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": (s, "bfloat16")
        ...           for e in range(4) for w, s in shapes.items()}
        >>> layout["lm_head.weight"] = ((128, 32), "bfloat16")
        >>> bound = convspec.compile("mixtral").bind(layout)
        >>> len(bound.groups), bound.unmatched, bound.claimed
        (2, ['lm_head.weight'], 12)
        >>> bound.coverage()["converted"], bound.coverage()["unmatched"]
        (12, 1)
    """

    plan: Plan
    layout: dict[str, TensorInfo]
    groups: list[Group]
    passthrough: dict[str, str]  # source key -> final key (renamed or unchanged)
    unmatched: list[str]  # source keys no rule touched
    dropped: list[str]
    outputs: dict[str, tuple[tuple[int, ...], str]]
    warnings: list[str] = field(default_factory=list)
    aliased: list[str] = field(default_factory=list)  # keys an alias renamed: saved under the new name
    already: list[str] = field(default_factory=list)  # unmatched keys already in the target layout
    ambiguous: list[str] = field(default_factory=list)  # claimed keys the inverse plan would claim too

    @property
    def claimed(self) -> int:
        """How many source keys some rule claimed (converted, renamed or dropped)."""
        return len(self.layout) - len(self.unmatched)

    def coverage(self) -> dict[str, Any]:
        """Counts of the source keys: `keys`, `converted`, `renamed`, `dropped`, `unmatched` (of which
        `already` are in the target layout: the inverse plan would claim them, and they pass through
        unchanged), and `claimed_share` (claimed / keys, 1.0 for an empty layout)."""
        total = len(self.layout)
        return {
            "keys": total,
            "converted": sum(len(g.source_keys) for g in self.groups),
            "renamed": sum(1 for s, d in self.passthrough.items() if s != d),
            "dropped": len(self.dropped),
            "unmatched": len(self.unmatched),
            "already": len(self.already),
            "claimed_share": (self.claimed / total) if total else 1.0,
        }


def as_infos(layout: dict) -> dict[str, TensorInfo]:
    """The layout with every value a TensorInfo (as it comes from a checkpoint's headers: no copy)."""
    if set(map(type, layout.values())) <= {TensorInfo}:
        return layout
    return {k: _info(v) for k, v in layout.items()}


def _info(v) -> TensorInfo:
    if type(v) is TensorInfo:
        return v
    shape, dtype = v
    if type(shape) is not tuple or not all(type(s) is int for s in shape):
        shape = tuple(int(s) for s in shape)
    return TensorInfo(shape, dtype if type(dtype) is str else str(dtype))


def bind(plan: Plan, layout: dict, strict: bool = False) -> BoundPlan:
    """Match every key in one pass, form groups, infer outputs, and report every problem at once."""
    enabled = gc.isenabled()
    gc.disable()  # bind makes ~3 small objects per key and no cycles: a collection pass is pure cost
    try:
        return _bind(plan, layout, strict)
    finally:
        if enabled:
            gc.enable()


def _bind(plan: Plan, layout: dict, strict: bool) -> BoundPlan:
    infos = as_infos(layout)
    inverse = plan.inverse(allow_lossy=True) if plan.inverse_rules is not None else None
    lead = base_lead(plan, infos)
    routes = route_all(plan, list(infos), inverse, lead)
    problems: list[str] = routes.problems
    passthrough, unmatched, dropped = routes.passthrough, routes.unmatched, routes.dropped
    aliased = set(routes.aliased)
    rules = plan.rules
    groups: dict[tuple[int, tuple], Group] = {}
    for (ri, keep), members in routes.members.items():
        rule = rules[ri]
        members = {n: members[n] for n, _ in rule.inputs if n in members}  # the rule's order: weights first
        groups[(ri, keep)] = Group(rule, dict(zip(rule.keep, keep, strict=False)), members)

    if plan.quant is not None and plan.quant.dequantize is not None:
        _dequant_passthrough(plan, infos, passthrough, unmatched, groups)
    outputs: dict[str, TensorInfo] = {}
    origin: dict[str, str] = {}

    def emit(target: str, info: TensorInfo, source: str) -> None:
        if target in outputs:
            problems.append(f"two sources map to the key {target}: {origin[target]} and {source}")
            return
        outputs[target] = info
        origin[target] = source

    for src, dst in passthrough.items():
        emit(dst, infos[src], src)
    source = layout_problems(plan.quant, infos, "checkpoint") if plan.quant is not None else []
    if source:  # a weight without its scale, a wrong grid: the groups' own errors would only follow from it
        problems.extend(source)
    else:
        _infer_groups(plan, groups.values(), infos, lead, emit, problems)
        problems.extend(_companion_problems(plan, outputs, groups.values(), infos))
    # a key no rule touches that the inverse would rename or convert is already in the target layout:
    # it passes through unchanged, and saving back writes it in the original layout
    left = set(unmatched)
    already = [src for src, dst, _ in routes.collisions if src == dst and src in left]
    warnings = [
        f"{src} is renamed to {dst}, but the inverse "
        + ("would be claimed by a convert" if back is None else f"would come back as {back}")
        + ": the inverse of another rename takes it first on the way back"
        for src, dst, back in routes.collisions
        if src != dst or src not in left
    ]
    warnings += _inverse_claims(plan, groups.values(), lead)
    refused = [k for k in unmatched if k not in set(already)] if strict else []
    if strict:  # without strict the forward plan takes an ambiguous key (BoundPlan.ambiguous lists it)
        problems.extend(f"no rule claims {k}" for k in refused)
        problems.extend(warnings)
        problems.extend(
            f"{k} reads as a key of either layout: a rule claims it, and the inverse plan would claim it too"
            for k in routes.ambiguous
        )
    if problems:
        raise BindError(
            problems,
            hint="nothing was read or written"
            if not strict or not refused
            else "strict mode: every key must be claimed by a rule, or be in the target layout already",
        )
    return BoundPlan(
        plan=plan,
        layout=infos,
        groups=list(groups.values()),
        passthrough=passthrough,
        unmatched=unmatched,
        dropped=dropped,
        outputs={k: (v.shape, v.dtype) for k, v in outputs.items()},
        warnings=warnings,
        aliased=sorted(aliased),
        already=already,
        ambiguous=list(routes.ambiguous),
    )


def _infer_groups(
    plan: Plan,
    groups,
    infos: dict[str, TensorInfo],
    lead: str,
    emit: Callable[[str, TensorInfo, str], None],
    problems: list,
) -> None:
    """Infer every group's outputs, in rule and group order: fill in its outputs, `emit` each final
    key, add each group's problem to `problems`; a passed limit raises LimitError at once."""
    made = held = 0  # tensors unstacking made so far, and their bytes (MAX_UNSTACKED)
    infer = Infer(plan, infos)
    for g in sorted(groups, key=lambda g: (g.rule.index, index_order(tuple(g.keep.values())))):
        rule = g.rule
        missing = [n for n, _ in rule.inputs if n not in g.members]
        if missing:
            pat = dict(rule.inputs)[missing[0]]
            have = next(iter(g.members.values()))
            problems.append(
                Problem(
                    f"{rule.label}: group {g.name} has no {missing[0]!r} key (expected "
                    f"{pat.display()} with {g.name}; the group has {next(iter(have.values()))})",
                    rule.number,
                )
            )
            continue
        blocks = plan.quant is not None  # first: a cut block explains the shapes that would follow
        try:  # the members' leaves are source keys: infer looks their TensorInfos up
            if blocks:
                check_group(plan, rule, g.members, infos)
            blocks = False
            env = infer.run(rule, dict(g.members))
        except MembersLimit as exc:
            raise LimitError(
                [
                    Problem(
                        f"{rule.label}: group {g.name}: {exc.message} (keys: {_short(g.source_keys)})",
                        rule.number,
                    )
                ],
                g.source_keys,
                hint=LIMIT_HINT,
            ) from None
        except (GroupError, OpError) as exc:
            msg = exc.message if isinstance(exc, OpError) else str(exc)
            if blocks and plan.quant.dequantize is not None:  # it joins FP8 blocks, then dequantizes them
                msg += (
                    "; this plan joins the FP8 weights before it dequantizes them: write the rule with "
                    "dequant_fp8 on each weight to dequantize them first (docs/quantization.md)"
                )
            problems.append(
                Problem(f"{rule.label}: group {g.name}: {msg} (keys: {_short(g.source_keys)})", rule.number)
            )
            continue
        n, size = _unstacked(rule, env)
        made, held = made + n, held + size
        if made > MAX_UNSTACKED + held // UNSTACKED_BYTES:
            raise LimitError(
                [
                    Problem(
                        f"{rule.label}: group {g.name}: unstacking makes {made} tensors of {held} bytes by "
                        f"here, more than the limit of {MAX_UNSTACKED} plus one per {UNSTACKED_BYTES} bytes "
                        f"(keys: {_short(g.source_keys)})",
                        rule.number,
                    )
                ],
                g.source_keys,
                hint=LIMIT_HINT,
            )
        source = f"{rule.label} group {g.name}"
        for value, pat in rule.outputs:
            vfree = rule.free_of[value]
            for idx, info in env[value].items():
                if type(info) is str:  # an input written straight to a target: its source key's info
                    info = infos[info]
                key = pat.format({**g.keep, **dict(zip(vfree, idx, strict=False))})
                target, _ = follow_renames(plan, unlead(key, lead), rule.index + 1, True, lead)
                g.outputs[target] = info
                g.out_values[target] = (value, idx)
                emit(target, info, source)


def _dequant_passthrough(plan: Plan, infos: dict, passthrough: dict, unmatched: list, groups: dict) -> None:
    """A dequantizing plan: each quantized weight that would pass through (renamed or not) becomes a
    group of `companions.dequant_rule`, with its scale; its output keeps the weight's final name."""
    rule = dequant_rule(plan)
    taken = set()
    for weight, scale, out in list(passthrough_pairs(plan.quant, infos, passthrough)):
        groups[(rule.index, (out,))] = Group(rule, {"k": out}, {"w": {(): weight}, "w.scale": {(): scale}})
        del passthrough[weight], passthrough[scale]
        taken.update((weight, scale))
    if taken:
        unmatched[:] = [k for k in unmatched if k not in taken]


def _companion_problems(plan: Plan, outputs: dict, groups, infos: dict) -> list[str]:
    """What the conversion writes of quantized weights and companions (`convspec.companions`), the
    checkpoint's being checked first; without a quantization, the converted weights that would leave
    their scales behind."""
    q = plan.quant
    if q is None:
        return unclaimed_scales(plan, infos, [k for g in groups for k in g.source_keys])
    return layout_problems(q, outputs, "converted layout") if q.dequantize is None else []


def _unstacked(rule: PlanRule, env: dict[str, Value]) -> tuple[int, int]:
    """How many tensors the group's expanding ops (unstack) made, and their bytes."""
    n = size = 0
    for node in rule.nodes:
        if OPS[node.op].expands:
            made = env[node.outputs[0]]
            n += len(made)
            size += sum(info.nbytes for info in made.values())
    return n, size


def _inverse_claims(plan: Plan, groups, lead: str = "") -> list[str]:
    """Convert outputs that the inverse plan would hand to another rule than this convert's inverse
    (possible when an included spec's rules overlap the including spec's): saving back would differ."""
    if plan.inverse_rules is None or plan.is_inverse or not groups:
        return []
    inverse = plan.inverse(allow_lossy=True)
    out = []
    for g in groups:
        for target in g.outputs:
            _, hit = follow_renames(inverse, target, lead=lead)
            undoes = None if hit is None else inverse.rules[hit[0]].number - 1  # the forward rule
            if hit is None or (undoes != g.rule.index and not _same_convert(g.rule, plan.rules[undoes])):
                other = "passes it through" if hit is None else f"gives it to rule {undoes + 1}"
                out.append(
                    f"{target} comes from {g.rule.label}, but the inverse plan {other}: saving back would "
                    "not undo this convert"
                )
    out += _members_back(plan, inverse, groups, lead)
    return out


def _members_back(plan: Plan, inverse: Plan, groups, lead: str = "") -> list[str]:
    """A convert's inputs are undone under the names its rule saw (after the renames before it);
    the inverse's renames after that must give back the checkpoint's names. Checked on the first
    member of each input of each rule: renames see a key's shape, and all members share it."""
    out, seen = [], set()
    for g in groups:
        for name, members in g.members.items():
            if (g.rule.index, name) in seen or not members:
                continue
            seen.add((g.rule.index, name))
            src = next(iter(members.values()))
            renamed, hit = follow_renames(plan, src, lead=lead)
            if hit is None or hit[0] != g.rule.index:
                continue
            undone = next((r.index for r in inverse.rules if r.undoes == g.rule.number), None)
            if undone is None:
                continue
            back, _ = follow_renames(inverse, renamed, undone + 1, True, lead)
            if back != src:
                out.append(f"{src} is an input of {g.rule.label}, but saving back would write it as {back}")
    return out


def _same_convert(a: PlanRule, b: PlanRule) -> bool:
    """Two converts that do the same to the same keys but for a prefix (a spec and its include)."""

    def sig(r: PlanRule):
        return [(n.op, n.params) for n in r.nodes], len(r.inputs), len(r.outputs)

    def near(x, y) -> bool:
        return all(
            p.text.endswith(q.text) or q.text.endswith(p.text) for (_, p), (_, q) in zip(x, y, strict=True)
        )

    return (
        b.kind == "convert" and sig(a) == sig(b) and near(a.inputs, b.inputs) and near(a.outputs, b.outputs)
    )


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f", ... ({len(keys)} keys)" if len(keys) > 3 else "")
