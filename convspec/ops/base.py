"""The op interface: each op validates its parameters, infers shapes, applies with torch, and inverts."""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ..dtypes import ITEMSIZE
from ..errors import ConvspecError

if TYPE_CHECKING:
    import torch

REQUIRED = object()

# torch's sizes, strides and byte counts are int64: a shape whose dims (0 counted as 1) times the
# item size reach 2**63 cannot be made, not even empty (torch sizes an empty tensor's strides too)
MAX_EXTENT = 1 << 63


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise OpError(f"unsupported dtype {dtype}")
    return name


class OpError(ConvspecError):
    """An op cannot run on these shapes or parameters; the caller adds the rule and the keys."""


class NotInvertible(Exception):
    """Raised by `Op.inverse` with the reason the op cannot be undone exactly."""


class TensorInfo(NamedTuple):
    """What bind knows of a tensor before reading it: its shape and dtype name. A named tuple: bind
    makes one per checkpoint key, so it must be cheap."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * ITEMSIZE[self.dtype]

    @staticmethod
    def of(t: torch.Tensor) -> TensorInfo:
        return TensorInfo(tuple(t.shape), dtype_name(t.dtype))


@dataclass(frozen=True)
class Param:
    """One op parameter: its name, its kind (int, ints, bool, dtype, capture, shape) and its default."""

    name: str
    kind: str
    default: Any = REQUIRED
    doc: str = ""


class Op:
    """Base of every op. Subclasses are stateless: parameters come in as a dict of plain values."""

    name: ClassVar[str]
    doc: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int | None] = 1
    reduces: ClassVar[bool] = False  # takes a collection over `over` and makes one tensor (stack)
    expands: ClassVar[bool] = False  # takes one tensor and makes a collection over `over` (unstack)
    block_copy: ClassVar[bool] = False  # only moves whole contiguous blocks (the byte-copy fast path)

    def n_outputs(self, p: dict) -> int | None:
        """How many values the op yields; None when it follows the number of targets (chunk)."""
        return 1

    def check(self, p: dict) -> None:
        """Static checks on evaluated parameters; raise OpError with what to fix."""

    def infer(self, p: dict, ins: list[TensorInfo]) -> list[TensorInfo]:
        raise NotImplementedError

    def apply(self, p: dict, ins: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def inverse(self, p: dict, n_inputs: int) -> tuple[str, dict]:
        """The op (name, params) that undoes this one; raises NotInvertible with the reason."""
        raise NotInvertible(f"{self.name} has no inverse")

    # ---- helpers for subclasses --------------------------------------------------------------

    @staticmethod
    def norm_dim(dim: int, ndim: int, what: str = "dim") -> int:
        if not -ndim <= dim < max(ndim, 1):
            raise OpError(f"{what}={dim} is out of range for a tensor with {ndim} dims")
        return dim % ndim if ndim else 0


def check_extent(op: str, shape: tuple[int, ...], dtype: str) -> TensorInfo:
    """A TensorInfo an op takes or makes, refused when torch could not hold it (MAX_EXTENT)."""
    extent = ITEMSIZE[dtype]
    for s in shape:
        extent *= s or 1
    if extent >= MAX_EXTENT:
        raise OpError(
            f"{op}: a {dtype} tensor of shape {list(shape)} is past what torch can hold: its dims "
            "(0 counted as 1) times its item size reach 2**63"
        )
    return TensorInfo(shape, dtype)


def same_dtype(op: str, ins: list[TensorInfo]) -> str:
    if ins.count(ins[0]) == len(ins):  # one identity check per member when infos are shared
        return ins[0].dtype
    dtypes = set(map(itemgetter(1), ins))  # TensorInfo is (shape, dtype)
    if len(dtypes) > 1:
        raise OpError(f"{op} over tensors of different dtypes: {', '.join(sorted(dtypes))}")
    return ins[0].dtype
