"""Random tensors with arbitrary bit patterns, and bit-for-bit comparison."""

from __future__ import annotations

import math

import torch

DTYPE_NAMES = ["float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e8m0fnu", "int8", "bool"]


def random_tensor(shape, dtype: torch.dtype | str, seed: int, finite: bool = False) -> torch.Tensor:
    """A tensor of `shape` with random bits (NaNs and infs included unless `finite`)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=gen, dtype=torch.uint8).view(torch.bool).reshape(shape)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), generator=gen, dtype=torch.uint8)
    t = raw.view(dtype).reshape(shape)
    if finite and dtype.is_floating_point:
        ok = torch.isfinite(t.to(torch.float32))
        t = (
            torch.where(ok, t.to(torch.float32), 0.0).to(dtype)
            if t.element_size() == 1
            else torch.where(ok, t, torch.zeros((), dtype=dtype))
        )
    return t


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (works for float8 and bool, where == is not bit equality)."""
    dense = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)  # standard strides
    return dense.reshape(-1).view(torch.uint8)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k
