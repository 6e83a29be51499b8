"""The device a user names (`--device`, `device=`), checked before anything is read or written: a
conversion that would fail on its first tensor, after minutes of reading, fails at once instead,
with one message. `cpu` is answered without importing torch (a conversion made only of file copies
never loads it)."""

from __future__ import annotations

from typing import Any

from .errors import DeviceError

WRITES = "convert writes the data"  # why convert refuses the meta device
COMPARES = "verify compares the data"  # and verify


def check_device(device: Any, *, needs_data: str | None = None) -> str:
    """`device` (a string such as "cpu", "cuda", "cuda:1", or a torch.device) as the string torch
    takes, once it is known to exist on this machine. `needs_data` says what needs the tensors'
    data ("convert writes it"): with it, the meta device, which holds shapes and no data, is
    refused for that reason; without it, meta is accepted (shape-only loading).

    Raises DeviceError: an unknown device string, a device this machine lacks, an index beyond its
    device count, or meta where data is needed.
    """
    if device == "cpu":
        return "cpu"
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r}", hint=_use(torch)) from None
    name = str(dev)
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "meta":
        if needs_data is not None:
            raise DeviceError(
                f"device {name!r} holds shapes, not data, and {needs_data}",
                hint=f"{_use(torch)}; for shapes only, `convert --dry-run` or `compile --against`",
            )
        return name
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is not None and not available():
        raise DeviceError(
            f"device {name!r} is not available: {_why_absent(torch, dev.type)}", hint=_use(torch)
        )
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        n = count()
        have = f"{dev.type}:0" if n == 1 else f"{dev.type}:0 to {dev.type}:{n - 1}"
        raise DeviceError(
            f"device {name!r} does not exist: this machine has {n} {dev.type} device(s) ({have})",
            hint=f"use {dev.type} or {have}",
        )
    try:
        torch.empty(0, device=dev)  # a backend without an availability test: try it
    except Exception as exc:  # noqa: BLE001 - any failure means the device cannot be used
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0].split(". ")[0]
        raise DeviceError(f"device {name!r} is not available: {reason}", hint=_use(torch)) from None
    return name


def _why_absent(torch: Any, kind: str) -> str:
    if kind == "cuda" and torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return f"torch finds no {kind} device on this machine"


def _use(torch: Any) -> str:
    """What to do instead: `use a device this machine has: cpu, cuda:0, cuda:1`."""
    found = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        backend = getattr(torch, kind, None)
        try:
            if backend is None or not backend.is_available():
                continue
            n = backend.device_count() if hasattr(backend, "device_count") else 1
        except Exception:  # noqa: BLE001 - a backend that cannot say is not offered
            continue
        found += [kind] if kind == "mps" else [f"{kind}:{i}" for i in range(n)]
    return f"use a device this machine has: {', '.join(found)}"
