"""The placements the distributed tests of the tiny Mixtral use, one copy: expert parallel on the
stacked experts, attention colwise and rowwise, the rest replicated; on a 2-D mesh, experts over one
mesh dim and each expert's rows over the other (EP x TP). Worker scripts import it as
`tests.helpers.placements` (the repository root is on their path)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate, Shard


def mixtral_placement(key: str, two_d: bool = False) -> list:
    """DTensor placements of a converted key of the tiny Mixtral, one per mesh dim."""
    if two_d:
        if key.endswith("experts.gate_up_proj"):
            return [Shard(0), Shard(1)]
        if key.endswith("experts.down_proj"):
            return [Shard(0), Shard(2)]
        if key.endswith("o_proj.weight"):
            return [Replicate(), Shard(1)]
        return [Replicate(), Shard(0)] if key.endswith("q_proj.weight") else [Replicate(), Replicate()]
    if key.endswith("experts.gate_up_proj"):
        return [Shard(0)]  # expert parallel: the stacked experts
    if key.endswith("experts.down_proj"):
        return [Shard(2)]  # the experts' input features
    if key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "embed_tokens.weight")):
        return [Shard(0)]  # colwise
    if key.endswith("o_proj.weight"):
        return [Shard(1)]  # rowwise
    return [Replicate()]


def model_holding(state: dict, value) -> torch.nn.Module:
    """A module whose parameters are the keys of `state` (each dotted prefix a submodule), the one of
    `key` being `value(key, tensor)`: a DTensor where a test places it, as `parallelize_module` makes."""
    model = torch.nn.Module()
    for key, t in state.items():
        owner = model
        *path, name = key.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(name, torch.nn.Parameter(value(key, t), requires_grad=False))
    return model
