"""A CPU tensor's bytes as a memoryview, without a copy and without numpy (not a dependency).

`Tensor.numpy()` was the usual way to hand a tensor's memory to `os.preadv`/`os.pwrite`; it needs
numpy at run time, which convspec does not declare (docs/decisions.md). A ctypes array laid over
the tensor's storage gives the same writable buffer: the array keeps the tensor alive, and the
memoryview keeps the array alive."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def tensor_memory(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, sharing its memory (format 'B')."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(
            f"tensor_memory needs a contiguous CPU tensor, got {t.device} contiguous={t.is_contiguous()}"
        )
    n = t.numel() * t.element_size()
    if n == 0:  # an empty tensor may have no storage at all (data_ptr 0)
        return memoryview(bytearray())
    buf = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    buf._keep = t  # type: ignore[attr-defined]  # the tensor lives as long as the buffer
    return memoryview(buf).cast("B")
