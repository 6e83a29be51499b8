"""Block plans: a group whose ops only move whole contiguous blocks (each op says so: `Op.moves_blocks`)
becomes byte ranges, source -> output. It then runs as reads straight into the preallocated output,
or as in-kernel file copies, with no tensor decoded and no intermediate buffer."""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import NamedTuple

from .bind import BoundPlan, Group
from .derived import derived
from .dtypes import ITEMSIZE
from .interpret import Interpreter, infer_group, node_params
from .ops import OPS, Blocks, Op

MIN_AVERAGE_RUN = 64 * 1024  # smaller runs: one syscall each costs more than torch's copy loops
MAX_BLOCKS = 1 << 22  # the index tensors stay small (a few MiB)


class Run(NamedTuple):
    """`size` bytes of one source tensor, from byte `src` of it, go to byte `dst` of an output."""

    source: str
    src: int
    dst: int
    size: int


def block_runs(
    bound: BoundPlan, group: Group, min_average_run: int | None = None
) -> dict[str, list[Run]] | None:
    """Every output of the group as runs of source bytes in output order, or None when the group
    has to compute (an op that is not a block move, mixed dtypes, or runs averaging under
    `min_average_run` bytes, MIN_AVERAGE_RUN by default: read into tensors, a syscall per small run costs more than torch's copy;
    copied file to file, no tensor is made and any run pays off)."""
    rule = group.rule
    if not rule.nodes or not all(OPS[n.op].moves_blocks for n in rule.nodes):
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
    least = MIN_AVERAGE_RUN if min_average_run is None else min_average_run
    if by_position is None or by_position[1] < least:
        return None
    return {
        target: [Run(keys[s], a, b, n) for s, a, b, n in runs]
        for target, runs in zip(group.out_values, by_position[0], strict=True)
    }


def _runs_by_position(bound: BoundPlan, group: Group, itemsize: int):
    """The runs with sources by their position in the group's member order (shared by every group
    of the same rule and shapes, e.g. every layer of a model), and their average size in bytes."""
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

    env = BlockRun(plan, t).run(rule, env)
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
    return out, (total_bytes / total_runs if total_runs else math.inf)


def _run_starts(ids: list[int], bases: list[int]) -> list[int]:
    """Positions where a run of consecutive ids begins: a gap, or the first block of a source."""
    if not ids:
        return []
    first = set(bases)
    pairs = enumerate(zip(ids, ids[1:], strict=False), 1)
    return [0] + [p for p, (a, b) in pairs if b != a + 1 or b in first]


class BlockRun(Interpreter):
    """The op DAG on values seen as their blocks' ids: each op's block move. Every block is the last
    `whole` dims of a source, which no op of the rule cuts."""

    def __init__(self, plan, whole: int):
        super().__init__(plan)
        self.whole = whole

    def call(self, op: Op, p: dict, leaves: list[Blocks]) -> list[Blocks]:
        return op.move_blocks(p, leaves, len(leaves[0].shape) + self.whole)


def _untouched(plan, rule, node, ranks: dict[str, int]) -> int | None:
    """How many trailing dims of its input the node leaves whole (None: not a block move)."""
    return OPS[node.op].whole_dims(node_params(plan, rule, node), ranks[node.inputs[0]])
