"""The executor: run a bound plan's groups with torch."""

from __future__ import annotations

import torch

from .bind import BoundPlan, Group, bind
from .compile.plan import Plan
from .interpret import Interpreter
from .ops import Op, TensorInfo


class TorchRun(Interpreter):
    """The op DAG on tensors: each op's torch apply."""

    def call(self, op: Op, p: dict, leaves: list) -> list:
        return op.apply(p, leaves)


def run_group(bound: BoundPlan, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The output tensors of one group, given its source tensors by key."""
    env = {n: {idx: tensors[k] for idx, k in m.items()} for n, m in group.members.items()}
    env = TorchRun(bound.plan).run(group.rule, env)
    return {target: env[value][idx] for target, (value, idx) in group.out_values.items()}


@torch.no_grad()
def apply_plan(
    plan: Plan, state_dict: dict[str, torch.Tensor], strict: bool = False
) -> dict[str, torch.Tensor]:
    """Convert a dict of tensors to the target layout (works on the meta device too)."""
    bound = bind(plan, {k: TensorInfo.of(t) for k, t in state_dict.items()}, strict=strict)
    out: dict[str, torch.Tensor] = {}
    for src, dst in bound.passthrough.items():
        out[dst] = state_dict[src]
    for g in bound.groups:
        out.update(run_group(bound, g, state_dict))
    return out
