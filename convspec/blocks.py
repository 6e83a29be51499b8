"""Block plans: a group whose ops only move whole contiguous blocks (stack, unstack, cat, split,
chunk) becomes byte ranges, source -> output. It then runs as reads straight into the preallocated
output, or as in-kernel file copies, with no tensor decoded and no intermediate buffer."""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import NamedTuple

from .bind import BoundPlan, Group, evaluate_rule, infer_group, node_params
from .derived import derived
from .dtypes import ITEMSIZE
from .ops import OPS

BLOCK_OPS = frozenset({"stack", "unstack", "cat", "split", "chunk"})
MIN_AVERAGE_RUN = 64 * 1024  # smaller runs: one syscall each costs more than torch's copy loops
MAX_BLOCKS = 1 << 22  # the index tensors stay small (a few MiB)


class Run(NamedTuple):
    """`size` bytes of one source tensor, from byte `src` of it, go to byte `dst` of an output."""

    source: str
    src: int
    dst: int
    size: int


def block_runs(bound: BoundPlan, group: Group) -> dict[str, list[Run]] | None:
    """Every output of the group as runs of source bytes in output order, or None when the group
    has to compute (an op that is not a block move, mixed dtypes, or runs too small to pay off)."""
    rule = group.rule
    if not rule.nodes or not all(n.op in BLOCK_OPS for n in rule.nodes):
        return None
    layout = bound.layout
    keys = [k for m in group.members.values() for k in m.values()]
    dtypes = {layout[k].dtype for k in keys}
    if len(dtypes) != 1:
        return None
    signature = (
        rule.index,
        tuple((n, tuple((i, layout[k].shape) for i, k in m.items())) for n, m in group.members.items()),
        tuple(group.out_values.values()),
    )
    itemsize = ITEMSIZE[dtypes.pop()]
    by_position = derived(
        bound.plan, ("block_runs", signature), lambda: _runs_by_position(bound, group, itemsize)
    )
    if by_position is None:
        return None
    return {
        target: [Run(keys[s], a, b, n) for s, a, b, n in runs]
        for target, runs in zip(group.out_values, by_position, strict=True)
    }


def _runs_by_position(bound: BoundPlan, group: Group, itemsize: int):
    """The runs with sources by their position in the group's member order (shared by every group
    of the same rule and shapes, e.g. every layer of a model)."""
    plan, rule, layout = bound.plan, group.rule, bound.layout
    values = infer_group(plan, rule, group.members, layout)
    ranks = {}
    for name, value in values.items():
        leaf = next(iter(value.values()))
        ranks[name] = len((layout[leaf] if type(leaf) is str else leaf).shape)
    untouched = [_untouched(plan, rule, node, ranks) for node in rule.nodes]
    if None in untouched or min(untouched) < 1:
        return None
    t = min(untouched)
    # one id per block (the last t dims of a source, contiguous in its file); the ops move ids
    env, bases, base = {}, [], 0
    for name, m in group.members.items():
        env[name] = {}
        for idx, key in m.items():
            shape = layout[key].shape
            if 0 in shape:  # no bytes to move; torch makes empty tensors of any (huge) shape at no cost
                return None
            lead = shape[: len(shape) - t]
            n = math.prod(lead)
            if base + n > MAX_BLOCKS:  # before the ids are made
                return None
            env[name][idx] = Blocks(lead, list(range(base, base + n)))
            bases.append(base)
            base += n
    any_key = next(iter(next(iter(group.members.values())).values()))
    shape = layout[any_key].shape
    block = math.prod(shape[len(shape) - t :]) * itemsize

    def apply(op, p, leaves):
        rank = len(leaves[0].shape) + t
        return _MOVES[op.name](leaves, p, p["dim"] % (rank + 1 if op.reduces else rank))

    env = evaluate_rule(plan, rule, env, apply)
    out, total_runs, total_bytes = [], 0, 0
    for value, idx in group.out_values.values():
        ids = env[value][idx].ids
        starts = _run_starts(ids, bases)
        ends = starts[1:] + [len(ids)] if starts else []  # an empty output (a zero-size dim): no runs
        runs = []
        for p, end in zip(starts, ends, strict=True):
            j = bisect_right(bases, ids[p]) - 1
            runs.append((j, (ids[p] - bases[j]) * block, p * block, (end - p) * block))
        out.append(runs)
        total_runs += len(runs)
        total_bytes += len(ids) * block
    if total_runs and total_bytes / total_runs < MIN_AVERAGE_RUN:
        return None
    return out


def _run_starts(ids: list[int], bases: list[int]) -> list[int]:
    """Positions where a run of consecutive ids begins: a gap, or the first block of a source."""
    if not ids:
        return []
    first = set(bases)
    pairs = enumerate(zip(ids, ids[1:], strict=False), 1)
    return [0] + [p for p, (a, b) in pairs if b != a + 1 or b in first]


class Blocks(NamedTuple):
    """A value as its blocks' ids: `shape` is its leading dims (each block is the rest), row-major."""

    shape: tuple[int, ...]
    ids: list[int]


def _rows(x: Blocks, dim: int, start: int, stop: int) -> list[int]:
    """The ids of x[..., start:stop, ...] along `dim`, row-major."""
    rest = math.prod(x.shape[dim + 1 :])
    span = x.shape[dim] * rest
    out: list[int] = []
    for o in range(math.prod(x.shape[:dim])):
        out += x.ids[o * span + start * rest : o * span + stop * rest]
    return out


def _stack(xs: list[Blocks], p: dict, dim: int) -> list[Blocks]:
    inner, ids = math.prod(xs[0].shape[dim:]), []
    for o in range(math.prod(xs[0].shape[:dim])):
        for x in xs:
            ids += x.ids[o * inner : (o + 1) * inner]
    return [Blocks(xs[0].shape[:dim] + (len(xs),) + xs[0].shape[dim:], ids)]


def _cat(xs: list[Blocks], p: dict, dim: int) -> list[Blocks]:
    inners, ids = [math.prod(x.shape[dim:]) for x in xs], []
    for o in range(math.prod(xs[0].shape[:dim])):
        for x, inner in zip(xs, inners, strict=True):
            ids += x.ids[o * inner : (o + 1) * inner]
    size = sum(x.shape[dim] for x in xs)
    return [Blocks(xs[0].shape[:dim] + (size,) + xs[0].shape[dim + 1 :], ids)]


def _split(xs: list[Blocks], p: dict, dim: int, sizes=None) -> list[Blocks]:
    (x,) = xs
    out, start = [], 0
    for size in sizes if sizes is not None else p["sizes"]:
        out.append(Blocks(x.shape[:dim] + (size,) + x.shape[dim + 1 :], _rows(x, dim, start, start + size)))
        start += size
    return out


def _chunk(xs: list[Blocks], p: dict, dim: int) -> list[Blocks]:
    return _split(xs, p, dim, [xs[0].shape[dim] // p["n"]] * p["n"])


def _unstack(xs: list[Blocks], p: dict, dim: int) -> list[Blocks]:
    parts = _split(xs, p, dim, [1] * xs[0].shape[dim])
    return [Blocks(b.shape[:dim] + b.shape[dim + 1 :], b.ids) for b in parts]


_MOVES = {"stack": _stack, "cat": _cat, "split": _split, "chunk": _chunk, "unstack": _unstack}


def _untouched(plan, rule, node, ranks: dict[str, int]) -> int | None:
    """How many trailing dims of its input the node leaves whole (None: not a block move)."""
    op = OPS[node.op]
    p = node_params(plan, rule, node)
    if "dim" not in p:
        return None
    rank = ranks[node.inputs[0]]
    dim = p["dim"] % (rank + 1 if op.reduces else rank)
    return rank - dim if op.reduces else rank - dim - 1
