"""Block plans: a group whose ops only move whole contiguous blocks (stack, unstack, cat, split,
chunk) becomes byte ranges, source -> output. It then runs as reads straight into the preallocated
output, or as in-kernel file copies, with no tensor decoded and no intermediate buffer."""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch

from .bind import BoundPlan, Group, _infer_keys, evaluate_rule, node_params
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
    cache = bound.plan._cache.setdefault("block_runs", {})
    if signature not in cache:
        cache[signature] = _runs_by_position(bound, group, ITEMSIZE[dtypes.pop()])
    by_position = cache[signature]
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
    values = evaluate_rule(plan, rule, dict(group.members), partial(_infer_keys, layout))
    ranks = {}
    for name, value in values.items():
        leaf = next(iter(value.values()))
        ranks[name] = len((layout[leaf] if type(leaf) is str else leaf).shape)
    untouched = [_untouched(plan, rule, node, ranks) for node in rule.nodes]
    if None in untouched or min(untouched) < 1:
        return None
    t = min(untouched)
    # one index per block (the last t dims of a source, contiguous in its file); the ops move indices
    env, bases, base = {}, [], 0
    for name, m in group.members.items():
        env[name] = {}
        for idx, key in m.items():
            shape = layout[key].shape
            lead = shape[: len(shape) - t]
            n = math.prod(lead)
            env[name][idx] = torch.arange(base, base + n, dtype=torch.int64).reshape(lead)
            bases.append(base)
            base += n
            if base > MAX_BLOCKS:
                return None
    any_key = next(iter(next(iter(group.members.values())).values()))
    shape = layout[any_key].shape
    block = math.prod(shape[len(shape) - t :]) * itemsize

    def apply(op, p, leaves):
        rank = leaves[0].dim() + t
        return op.apply({**p, "dim": p["dim"] % (rank + 1 if op.reduces else rank)}, leaves)

    env = evaluate_rule(plan, rule, env, apply)
    starts = torch.tensor(bases, dtype=torch.int64)
    out, total_runs, total_bytes = [], 0, 0
    for value, idx in group.out_values.values():
        ids = env[value][idx].reshape(-1)
        new = torch.ones(len(ids), dtype=torch.bool)
        new[1:] = ids[1:] != ids[:-1] + 1
        new |= torch.isin(ids, starts)  # a run never crosses from one source into the next
        pos = new.nonzero().reshape(-1)
        lengths = torch.diff(pos, append=torch.tensor([len(ids)]))
        first = ids[pos]
        src = torch.searchsorted(starts, first, right=True) - 1
        offsets = (first - starts[src]) * block
        out.append(
            list(
                zip(
                    src.tolist(),
                    offsets.tolist(),
                    (pos * block).tolist(),
                    (lengths * block).tolist(),
                    strict=True,
                )
            )
        )
        total_runs += len(pos)
        total_bytes += len(ids) * block
    if total_runs and total_bytes / total_runs < MIN_AVERAGE_RUN:
        return None
    return out


def _untouched(plan, rule, node, ranks: dict[str, int]) -> int | None:
    """How many trailing dims of its input the node leaves whole (None: not a block move)."""
    op = OPS[node.op]
    p = node_params(plan, rule, node)
    if "dim" not in p:
        return None
    rank = ranks[node.inputs[0]]
    dim = p["dim"] % (rank + 1 if op.reduces else rank)
    return rank - dim if op.reduces else rank - dim - 1
