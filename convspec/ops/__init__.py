"""The op registry: one small class per op, looked up by name. `register` opens it to new ops: an
op is one `Op` subclass, and nothing outside this package knows op names."""

from __future__ import annotations

from ..dtypes import DTYPES
from .base import Factors, NoLowRank, NotInvertible, OnFactors, Op, OpError, Param, TensorInfo, dtype_name
from .blockmoves import Blocks
from .cast import Cast
from .ggml import DequantGgml, QuantizeGgml
from .joining import Cat, Chunk, Split
from .layout import Permute, Reshape, Transpose
from .lowrank import BlockDiag, Flatten, Same, Share, Unadaptable, UnblockDiag, Unflatten
from .mxfp4 import DequantMxfp4
from .quant import DequantFp8, DequantFp8Tensor
from .rope import Deinterleave, Interleave, PermuteRope, UnpermuteRope
from .stacking import Stack, Unstack
from .values import Add, LogNeg, NegExp, RegroupHeads, Squeeze, Unsqueeze

OPS: dict[str, Op] = {}


def register(op_class: type[Op]) -> type[Op]:
    """Add an op (its class) to the registry under its `name`, for every front end, compiler pass and
    backend; usable as a class decorator. A name taken already is refused."""
    name = op_class.name
    if name in OPS:
        raise ValueError(f"an op named {name!r} is registered already")
    OPS[name] = op_class()
    return op_class


def unregister(name: str) -> None:
    """Remove the op `name` (tests that registered one put the registry back)."""
    del OPS[name]


for _op in (
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
    DequantFp8,
    DequantFp8Tensor,
    DequantMxfp4,
    Add,
    LogNeg,
    NegExp,
    Unsqueeze,
    Squeeze,
    RegroupHeads,
    DequantGgml,
    QuantizeGgml,
    BlockDiag,
    UnblockDiag,
    Share,
    Same,
    Flatten,
    Unflatten,
    Unadaptable,
):
    register(_op)

__all__ = [
    "DTYPES",
    "OPS",
    "Blocks",
    "Factors",
    "NoLowRank",
    "OnFactors",
    "NotInvertible",
    "Op",
    "OpError",
    "Param",
    "TensorInfo",
    "dtype_name",
    "register",
    "unregister",
]
