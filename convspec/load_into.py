"""Filling an nn.Module from a plan: meta models get the tensors assigned, allocated ones are copied into."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ConvspecError


@dataclass
class LoadReport:
    """What a load left out or could not place."""

    missing: list[str] = field(default_factory=list)  # model parameters/buffers the checkpoint did not fill
    unexpected: list[str] = field(default_factory=list)  # converted keys the model has no place for
    mismatched: list[tuple[str, tuple, tuple]] = field(
        default_factory=list
    )  # key, checkpoint shape, model shape

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = []
        if self.missing:
            parts.append(
                f"{len(self.missing)} missing (would keep random init): {', '.join(self.missing[:5])}"
            )
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {', '.join(self.unexpected[:5])}")
        if self.mismatched:
            parts.append(
                "shape mismatch: "
                + ", ".join(f"{k} {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:5])
            )
        return "; ".join(parts) or "ok"


class LoadError(ConvspecError):
    """`load_into(strict=True)` found keys missing, unexpected or of the wrong shape."""

    def __init__(self, report: LoadReport):
        super().__init__(
            f"the checkpoint does not fill the model: {report}",
            hint="pass strict=False to load what fits and inspect the report",
        )
        self.report = report


@torch.no_grad()
def load_into(model: torch.nn.Module, items, strict: bool = True, base_prefix: str = "") -> LoadReport:
    """Place (key, tensor) pairs into `model`'s parameters and buffers; returns the report. With the
    spec's `base_prefix`, a key the model lacks is tried with that prefix added or removed, so a
    base-model checkpoint fills a model with a head and the other way round."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    report = LoadReport()
    filled: set[str] = set()
    for key, tensor in items:
        if base_prefix and key not in targets:
            if f"{base_prefix}.{key}" in targets:
                key = f"{base_prefix}.{key}"
            elif key.startswith(base_prefix + ".") and key[len(base_prefix) + 1 :] in targets:
                key = key[len(base_prefix) + 1 :]
        param = targets.get(key)
        if param is None:
            report.unexpected.append(key)
            continue
        if tuple(param.shape) != tuple(tensor.shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(param.shape)))
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if param.is_meta:
            value = tensor.to(param.dtype)
            if isinstance(param, torch.nn.Parameter):
                setattr(owner, attr, torch.nn.Parameter(value, requires_grad=param.requires_grad))
            else:
                owner._buffers[attr] = value
        else:
            param.copy_(tensor)
        filled.add(key)
    persistent = {k for k in targets if _persistent(model, k)}
    report.missing = sorted(persistent - filled)
    if strict and not report.ok:
        raise LoadError(report)
    return report


def _persistent(model: torch.nn.Module, key: str) -> bool:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return attr not in getattr(owner, "_non_persistent_buffers_set", set())
