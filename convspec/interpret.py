"""One interpreter over a rule's op DAG: the walk (collections, reducing over `over`, expanding, the
member checks) is written once; what a leaf is and what an op does to it is a subclass's `call`
(TensorInfos for bind, tensors for run, block ids for blocks), as in torch.fx's Interpreter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .compile.evaluate import evaluate
from .compile.expr import ConfigExpr
from .derived import derived
from .ops import OPS, Op, TensorInfo
from .ops.stacking import MAX_MEMBERS, MembersLimit, too_many

if TYPE_CHECKING:
    from .compile.plan import Node, Plan, PlanRule

Index = tuple[str, ...]
Value = dict[Index, Any]  # a collection: capture values (in the value's `free` order) -> leaf


class GroupError(Exception):
    """A problem inside one group; bind adds the rule and the group's name."""


def node_params(plan: Plan, rule: PlanRule, node: Node) -> dict:
    """A node's parameters with any config expression evaluated and checked by its op (held in the
    plan's derived tables)."""
    return derived(plan, ("params", rule.index, plan.is_inverse, id(node)), lambda: _evaluated(plan, node))


def _evaluated(plan: Plan, node: Node) -> dict:
    out, deferred = {}, False
    for k, v in node.params:
        if isinstance(v, ConfigExpr):
            v, deferred = evaluate(v.ir, plan.config, node.where), True
        out[k] = v
    if deferred:  # the compiler checked literal parameters; these it could not see
        OPS[node.op].check_configured(out, len(node.outputs))
    return out


class Interpreter:
    """Evaluates a rule's op DAG over collections (capture values -> leaf). Subclasses override
    `call(op, params, leaves) -> list` (one op on the leaves of one member); `run` is the walk."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def call(self, op: Op, p: dict, leaves: list) -> list:
        raise NotImplementedError

    def run(self, rule: PlanRule, env: dict[str, Value]) -> dict[str, Value]:
        """Every value of the rule's DAG, from `env` (its inputs by name); `env` is filled in."""
        free = rule.free_of
        for node in rule.nodes:
            op = OPS[node.op]
            p = node_params(self.plan, rule, node)
            args = [env[a] for a in node.inputs]
            if op.reduces:
                outs = self.reduce(node, op, p, args[0], free[node.inputs[0]])
            elif op.expands:
                outs = [self.expand(node, op, p, args, free[node.outputs[0]])]
            else:
                outs = self.map(node, op, p, args, free[node.inputs[0]])
            for name, o in zip(node.outputs, outs, strict=op.reduces):
                env[name] = o
        return env

    def reduce(self, node: Node, op: Op, p: dict, arg: Value, arg_free: tuple[str, ...]) -> list[Value]:
        """An op that makes one leaf of the members over `over` (stack): per value of the other
        captures, in `parts` runs of consecutive members (as torch.chunk cuts them)."""
        over = p["over"]
        lists = ordered_members(arg, arg_free, over, node.op)
        parts = p.get("parts", 1)
        outs: list[Value] = [{} for _ in range(parts)]
        call = self.call
        for rest, members in lists.items():
            n = len(members)
            if n > MAX_MEMBERS:
                raise MembersLimit(too_many(f"{node.op} over {over}", n))
            chunks = chunked(members, parts)
            if not chunks[-1]:
                raise GroupError(f"{node.op}(parts={parts}) of {n} members leaves a part empty")
            for k, chunk in enumerate(chunks):
                outs[k][rest] = call(op, p, chunk)[0]
        return outs

    def expand(self, node: Node, op: Op, p: dict, args: list[Value], out_free: tuple[str, ...]) -> Value:
        """An op that makes a collection over `over` of each leaf (unstack); with several inputs,
        the members of each are numbered on from the last."""
        over = p["over"]
        pos = out_free.index(over)
        out: Value = {}
        call = self.call
        for idx in args[0]:
            i = 0
            for a in args:
                parts = call(op, p, [a[idx]])
                if len(out) + len(parts) > MAX_MEMBERS:  # a collection of collections
                    raise MembersLimit(too_many(f"{node.op} over {over}", len(out) + len(parts)))
                for part in parts:
                    out[idx[:pos] + (str(i),) + idx[pos:]] = part
                    i += 1
        return out

    def map(self, node: Node, op: Op, p: dict, args: list[Value], arg_free: tuple[str, ...]) -> list[Value]:
        """Any other op: applied member by member, its inputs holding the same members."""
        keys = set(args[0])
        for a, name in zip(args[1:], node.inputs[1:], strict=False):
            if set(a) != keys:
                diff = sorted(set(a) ^ keys)[0]
                raise GroupError(
                    f"{node.op} inputs {node.inputs[0]} and {name} have different members "
                    f"({', '.join(f'{c}={v}' for c, v in zip(arg_free, diff, strict=False))} is in only one)"
                )
        outs: list[Value] = [{} for _ in node.outputs]
        call = self.call
        for idx in sorted(keys, key=index_order):
            results = call(op, p, [a[idx] for a in args])
            if len(results) != len(node.outputs):
                raise GroupError(
                    f"{node.op} yields {len(results)} values, the rule names {len(node.outputs)}"
                )
            for o, r in zip(outs, results, strict=False):
                o[idx] = r
        return outs


class Infer(Interpreter):
    """Shapes and dtypes (TensorInfo) of every value, before anything is read. The rule's first ops
    see source keys in place of their TensorInfos, looked up in `infos`."""

    def __init__(self, plan: Plan, infos: dict[str, TensorInfo]):
        super().__init__(plan)
        self.infos = infos

    def call(self, op: Op, p: dict, leaves: list) -> list:
        infos = self.infos
        if set(map(type, leaves)) == {str}:  # a collection's members, or a rule's inputs
            leaves = list(map(infos.__getitem__, leaves))
        else:  # keys mixed with values that earlier ops made
            leaves = [infos[x] if type(x) is str else x for x in leaves]
        return op.infer(p, leaves)


def infer_group(plan: Plan, rule: PlanRule, members: dict, infos: dict) -> dict[str, Value]:
    """Every value of one group's op DAG as TensorInfos, from the members' source keys."""
    return Infer(plan, infos).run(rule, dict(members))


# ---- the order of a collection's members ---------------------------------------------------------


def ordered_members(arg: Value, arg_free: tuple[str, ...], over: str, op: str) -> dict[Index, list]:
    """A collection's leaves per value of its other captures, each list ordered by `over` (what a
    reducing op takes, keyed by the index of the leaf it makes)."""
    ordered = in_order(arg) if len(arg_free) == 1 else None
    if ordered is not None:  # the common case, in bulk: one collection over 0..n-1
        return {(): ordered}
    return _ordered_by_rest(arg, arg_free.index(over), over, op)


def chunked(members: list, parts: int) -> list[list]:
    """`parts` runs of consecutive members as torch.chunk cuts them: ceil(n / parts) each, the last
    one shorter (or empty)."""
    size = -(-len(members) // parts)
    return [members[k * size : (k + 1) * size] for k in range(parts)]


def _ordered_by_rest(value: Value, pos: int, over: str, op: str) -> dict[Index, list]:
    """A collection split by its other captures, each part a list ordered by `over` (0..n-1). The
    numbers are a key's text: no step counts up to them, so `experts.99999999999` costs one."""
    groups: dict[Index, dict[str, Any]] = {}
    for idx, leaf in value.items():
        groups.setdefault(idx[:pos] + idx[pos + 1 :], {})[idx[pos]] = leaf
    out = {}
    for rest, members in groups.items():
        have = len(members)
        if all(i in members for i in map(str, range(have))):
            out[rest] = [members[str(i)] for i in range(have)]
            continue
        raise GroupError(_missing_members(members, over, op))
    return out


def _missing_members(members: dict[str, Any], over: str, op: str) -> str:
    """What a collection over `over` lacks of 0..n-1: the first missing numbers (at most 8)."""
    have = len(members)
    last = max(members, key=_number_order)
    top = int(last) if len(last) <= 18 else have + 8  # past the 8 missing shown, when that long
    missing, i = [], 0
    while len(missing) < 8 and i <= min(top, have + 8):  # at most `have` of the numbers are there
        if str(i) not in members:
            missing.append(str(i))
        i += 1
    many = len(last) > 18 or int(last) + 1 - have > 1
    return (
        f"{over}={missing[0]} is missing: {op} over {{{over}}} needs 0..{_short_number(last)} "
        f"and has {have} of them" + (f" (missing {', '.join(missing)})" if many else "")
    )


def _number_order(v: str) -> tuple[int, str]:
    """Numbers (ASCII digits, no leading zeros) in numeric order, without int(): a key may hold
    thousands of digits, past what int() reads."""
    return len(v), v


def _short_number(v: str) -> str:
    return v if len(v) <= 24 else f"{v[:10]}...{v[-4:]} ({len(v)} digits)"


def in_order(value: Value) -> list | None:
    """A collection over one integer capture as a list ordered by it, or None unless it is 0..n-1."""
    try:
        return list(map(value.__getitem__, _indices(len(value))))
    except KeyError:
        return None


_INDICES: list[tuple[str]] = []


def _indices(n: int) -> list[tuple[str]]:
    """[("0",), ("1",), ... (str(n-1),)]: the indices of a complete collection, made once."""
    while len(_INDICES) < n:
        _INDICES.append((str(len(_INDICES)),))
    return _INDICES[:n]


def index_order(idx: Index):
    """Sort key of a collection index: numbers (ASCII digits, of any length) in numeric order, then
    names (`²` is a name: str.isdigit says yes, int() says no)."""
    return tuple(_digits_order(v) if v.isascii() and v.isdigit() else (1, 0, v) for v in idx)


def _digits_order(v: str) -> tuple[int, int, str]:
    n = v.lstrip("0") or "0"
    return 0, len(n), n
