"""The op registry: one small class per op, looked up by name."""

from __future__ import annotations

from ..dtypes import DTYPES
from .base import NotInvertible, Op, OpError, Param, TensorInfo, dtype_name
from .cast import Cast
from .joining import Cat, Chunk, Split
from .layout import Permute, Reshape, Transpose
from .rope import Deinterleave, Interleave, PermuteRope, UnpermuteRope
from .stacking import Stack, Unstack

OPS: dict[str, Op] = {
    op.name: op()
    for op in (
        Stack,
        Unstack,
        Cat,
        Split,
        Chunk,
        Transpose,
        Permute,
        Reshape,
        PermuteRope,
        UnpermuteRope,
        Interleave,
        Deinterleave,
        Cast,
    )
}

__all__ = ["DTYPES", "OPS", "NotInvertible", "Op", "OpError", "Param", "TensorInfo", "dtype_name"]
