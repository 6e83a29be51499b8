"""Filling an nn.Module from a plan: meta models get the tensors assigned, allocated ones are copied into."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ConvspecError


@dataclass
class LoadReport:
    """What `Plan.load_into` left out or could not place; `ok` when nothing.

    Attributes:
        missing: model parameters and persistent buffers the checkpoint did not fill (they would
            keep their random initialisation).
        unexpected: converted keys the model has no place for.
        mismatched: (key, checkpoint shape, model shape) for each shape that differs.
        on_meta: non-persistent buffers no checkpoint holds, left on the meta device (a transformers
            model gets them computed; another model's caller must).

    Example:
        >>> report = convspec.LoadReport(missing=["lm_head.weight"])
        >>> report.ok, str(report)
        (False, '1 missing (would keep random init): lm_head.weight')
    """

    missing: list[str] = field(default_factory=list)  # model parameters/buffers the checkpoint did not fill
    unexpected: list[str] = field(default_factory=list)  # converted keys the model has no place for
    mismatched: list[tuple[str, tuple, tuple]] = field(
        default_factory=list
    )  # key, checkpoint shape, model shape
    on_meta: list[str] = field(default_factory=list)  # non-persistent buffers left without data
    already: int = 0  # checkpoint keys that were in the target layout already (passed through unchanged)

    @property
    def ok(self) -> bool:
        """True when every parameter was filled, every key placed, and every shape right."""
        return not (self.missing or self.unexpected or self.mismatched or self.on_meta)

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
        if self.on_meta:
            parts.append(
                f"{len(self.on_meta)} buffer(s) no checkpoint holds left on meta (the model cannot run): "
                + ", ".join(self.on_meta[:5])
            )
        out = "; ".join(parts) or "ok"
        if self.already:
            out += f" ({self.already} key(s) were in the target layout already)"
        return out


class LoadError(ConvspecError):
    """`load_into(strict=True)` found keys missing, unexpected or of the wrong shape."""

    def __init__(self, report: LoadReport):
        super().__init__(
            f"the checkpoint does not fill the model: {report}",
            hint="pass strict=False to load what fits and inspect the report",
        )
        self.report = report


@torch.no_grad()
def load_into(
    model: torch.nn.Module, items, strict: bool = True, base_prefix: str = "", already: int = 0
) -> LoadReport:
    """Place (key, tensor) pairs into `model`'s parameters and buffers; returns the report. With the
    spec's `base_prefix`, a key the model lacks is tried with that prefix added or removed, so a
    base-model checkpoint fills a model with a head and the other way round. `already` (how many
    keys bind found in the target layout) is passed on to the report."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    report = LoadReport(already=already)
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
    left = [k for k, t in targets.items() if t.is_meta and k not in persistent]
    if left and filled:
        _materialize_buffers(model, left, filled)
        left = [k for k, t in model.named_buffers(remove_duplicate=False) if t.is_meta and k in set(left)]
    report.on_meta = sorted(left)
    if strict and not report.ok:
        raise LoadError(report)
    return report


def _materialize_buffers(model: torch.nn.Module, keys: list[str], filled: set[str]) -> None:
    """Non-persistent buffers (rotary `inv_freq`, `position_ids`) are in no checkpoint: a model built
    on meta gets them as transformers' own loader does, allocated on the model's device and computed
    by the model's weight initialisation, which skips every tensor this load filled."""
    if not (hasattr(model, "initialize_weights") and hasattr(model, "get_parameter_or_buffer")):
        return  # not a transformers model: the caller must compute them (the report lists them)
    device = model.get_parameter_or_buffer(next(iter(filled))).device
    for key in keys:
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[attr] = torch.empty_like(owner._buffers[attr], device=device)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name not in keys:
            t._is_hf_initialized = True
    model.initialize_weights()


def _persistent(model: torch.nn.Module, key: str) -> bool:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return attr not in getattr(owner, "_non_persistent_buffers_set", set())
