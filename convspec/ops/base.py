"""The op interface: each op validates its parameters, infers shapes, applies with torch, and inverts."""

from __future__ import annotations

import difflib
import re
import reprlib
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ..dtypes import DTYPES, ITEMSIZE
from ..errors import ConvspecError
from ..frozen import thaw
from .slicing import Region, SliceMap, whole_inputs

if TYPE_CHECKING:
    import torch

    from ..compile.expr import ConfigExpr
    from .blockmoves import Blocks

REQUIRED = object()

# torch's sizes, strides and byte counts are int64: a shape whose dims (0 counted as 1) times the
# item size reach 2**63 cannot be made, not even empty (torch sizes an empty tensor's strides too)
MAX_EXTENT = 1 << 63

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a capture's name, as the grammar has it


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise OpError(f"unsupported dtype {dtype}")
    return name


class OpError(ConvspecError):
    """An op cannot run on these shapes or parameters; the caller adds the rule and the keys."""


class NotInvertible(Exception):
    """Raised by `Op.inverse` with the reason the op cannot be undone exactly."""


class NoLowRank(Exception):
    """Raised by `Op.low_rank` with the reason the op has no counterpart on low-rank factors."""


class Factors(NamedTuple):
    """A weight of `ndim` dims held as factors L @ R over its last two dims (LoRA: L is B, R is A),
    or, `swapped`, as their transpose there. L is [..., rows, rank], R is [..., rank, cols]."""

    ndim: int
    swapped: bool = False

    @property
    def rows(self) -> int:
        """The weight's dim that L's rows make."""
        return self.ndim - 1 if self.swapped else self.ndim - 2

    @property
    def cols(self) -> int:
        """The weight's dim that R's columns make."""
        return self.ndim - 2 if self.swapped else self.ndim - 1


class OnFactors(NamedTuple):
    """An op on a weight as ops on its factors: `left` on the L's of its inputs, `right` on their R's,
    each (op name, params) or None where the factor is kept as it is: one input to several outputs
    shares it, several inputs to one output must hold the same one. `outs`: the outputs' factors."""

    left: tuple[str, dict] | None
    right: tuple[str, dict] | None
    outs: tuple[Factors, ...]
    joins_ranks: bool = False  # the outputs' rank is the inputs' ranks together (a block-diagonal join)
    # DoRA's magnitude, one value per row of the weight: True, it follows as L does (`left`, whose
    # leading and row dims are the weight's); an (op, params) of its own; False, it cannot follow
    rows: Any = True


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

    def accepts(self, v: Any, names: type = str) -> bool:
        """Whether `v` is a value of this kind (a capture name: an instance of `names`)."""
        kind = self.kind
        if kind == "int":
            return isinstance(v, int) and not isinstance(v, bool)
        if kind in ("ints", "shape"):
            return isinstance(v, list) and not any(isinstance(x, bool) or not isinstance(x, int) for x in v)
        if kind == "bool":
            return isinstance(v, bool)
        if kind == "dtype":
            return isinstance(v, str) and v in DTYPES
        if kind == "capture":
            return isinstance(v, names) and NAME.fullmatch(v) is not None
        raise AssertionError(kind)  # pragma: no cover

    def check(self, op: str, v: Any, names: type = str) -> None:
        """Raise OpError unless `v` is a value of this parameter of op `op` (what the spec or a plan
        file gives; a capture name is an instance of `names`)."""
        if self.accepts(v, names):
            return
        if self.kind == "dtype":
            close = difflib.get_close_matches(str(v), list(DTYPES), 1)
            raise OpError(
                f"unknown dtype {short(v)} for {op}",
                hint=(f"did you mean {close[0]!r}? " if close else "") + f"dtypes: {', '.join(DTYPES)}",
            )
        what = {"int": "an integer", "bool": "true or false", "capture": "a capture name"}
        must = what.get(self.kind, "a list of integers")
        raise OpError(f"parameter {self.name} of {op} must be {must}, got {short(v)}")


def short(v: Any) -> str:
    """A value for a message, cut short: a config value may be huge (reprlib bounds its size)."""
    try:
        return reprlib.repr(thaw(v))
    except ValueError:  # an int of more than 4300 digits has no repr
        return f"a {type(v).__name__} too large to show"


class Op:
    """Base of every op: the one home of its meaning (parameters, shapes, torch, inverse, exactness,
    block moves). Subclasses are stateless: parameters come in as a dict of plain values."""

    name: ClassVar[str]
    doc: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int | None] = 1
    reduces: ClassVar[bool] = False  # takes a collection over `over` and makes one tensor (stack)
    expands: ClassVar[bool] = False  # takes one tensor and makes a collection over `over` (unstack)
    moves_blocks: ClassVar[bool] = False  # only moves whole blocks of trailing dims (the byte-copy path)
    changes_values: ClassVar[bool] = False  # maps element values (cast); otherwise it only moves elements
    count_param: ClassVar[str | None] = None  # the parameter that sets how many values the op yields

    def n_outputs(self, p: dict) -> int | None:
        """How many values the op yields; None when it follows the number of targets (chunk)."""
        return 1

    def n_outputs_configured(self, expr: ConfigExpr) -> int | None:
        """How many values the op yields when its `count_param` is the config expression `expr`
        (compiled without the config); None when it follows the targets. By default it must be known."""
        raise OpError(
            f"{self.name} {self.count_param}={expr.text} sets how many values it yields, so it must "
            "be a number here",
            hint="write the number, or compile with the config",
        )

    def check(self, p: dict) -> None:
        """Static checks on evaluated parameters; raise OpError with what to fix."""

    def check_configured(self, p: dict, n_values: int) -> None:
        """Parameters evaluated from the config at bind (the compiler checked the literal ones): the
        kinds the op takes, its own checks, and as many values as the rule names (a config cannot make
        an op yield a million tensors)."""
        for param in self.params:
            v = p.get(param.name)
            if v is not None and not param.accepts(v):
                raise OpError(
                    f"{self.name}: parameter {param.name} from the config is {v!r}, not a valid {param.kind}"
                )
        self.check(p)
        n = self.n_outputs(p)
        if n is not None and n != n_values:
            raise OpError(f"{self.name} yields {n} values with this config, the rule names {n_values}")

    def infer(self, p: dict, ins: list[TensorInfo]) -> list[TensorInfo]:
        raise NotImplementedError

    def apply(self, p: dict, ins: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def loses(self, p: dict) -> str | None:
        """Why the op loses information with these parameters (its inverse cannot give the input back
        exactly), or None when it is exact."""
        return None

    def inverse(self, p: dict, n_inputs: int) -> tuple[str, dict]:
        """The op (name, params) that undoes this one exactly; raises NotInvertible with the reason."""
        raise NotInvertible(f"{self.name} has no inverse")

    def low_rank(self, p: dict, ins: list[Factors]) -> OnFactors:
        """This op on weights held as low-rank factors (`Factors`), for the adapter of a weight it
        converts; raises NoLowRank with the reason where the factors cannot follow it."""
        raise NoLowRank(f"{self.name} has no counterpart on low-rank factors: (B @ A) after it is no B' @ A'")

    def nearest_inverse(self, p: dict, n_inputs: int) -> tuple[str, dict]:
        """The op that brings the output back as near as it can: the inverse a lossy plan uses."""
        return self.inverse(p, n_inputs)

    def slice_map(self, p: dict, ins: list[TensorInfo], k: int, region: Region) -> SliceMap:
        """Which regions of the inputs (of these shapes) make `region` of output `k` (`ops.slicing`).
        By default every input is read whole and the output narrowed: an op that can do better says
        how, and its map is exact where the region is aligned to what the op moves."""
        return whole_inputs(self, p, ins, k, region)

    def whole_dims(self, p: dict, rank: int) -> int | None:
        """How many trailing dims of its input (of `rank` dims) a block move leaves whole: the bytes
        the block path copies as they are. None for an op that does not move whole blocks."""
        if not self.moves_blocks:
            return None
        dim = self.block_dim(p, rank)
        return rank - dim if self.reduces else rank - dim - 1

    def move_blocks(self, p: dict, ins: list[Blocks], rank: int) -> list[Blocks]:
        """The op on values seen as their blocks' ids (`ops.blockmoves.Blocks`), for an op whose
        `moves_blocks` is set; `rank` counts the dims of the first input, blocks' own included."""
        raise NotImplementedError

    grid_refusal: ClassVar[str] = (
        "moves values inside the blocks of a quantized weight, so its scales cannot follow"
    )

    def on_grid(self, p: dict, blocks: tuple[int, ...]) -> dict:
        """This op's parameters on the scale grid of a quantized weight whose blocks have the shape
        `blocks` (one size per dim, 1 where a dim is not blocked): the scales follow the weight. OpError
        when they cannot."""
        raise OpError(f"{self.name} {self.grid_refusal}", hint=DEQUANTIZE_HINT)

    def carry_blocks(self, p: dict, ins: list[TensorInfo] | None, blocks: tuple[int, ...]) -> tuple[int, ...]:
        """The blocks of the op's outputs, from its inputs' `blocks`; given the inputs' shapes (bind),
        OpError where the op would cut a block (a part that is not a whole number of blocks)."""
        raise OpError(f"{self.name} {self.grid_refusal}", hint=DEQUANTIZE_HINT)

    def block_dim(self, p: dict, rank: int) -> int:
        """The op's `dim` parameter as a non-negative dim, for an input of `rank` dims."""
        return p["dim"] % (rank + 1 if self.reduces else rank)

    # ---- helpers for subclasses --------------------------------------------------------------

    @staticmethod
    def norm_dim(dim: int, ndim: int, what: str = "dim") -> int:
        if not -ndim <= dim < max(ndim, 1):
            raise OpError(f"{what}={dim} is out of range for a tensor with {ndim} dims")
        return dim % ndim if ndim else 0


def on_one_dim(op: Op, p: dict, f: Factors, n_out: int = 1, key: str = "dim") -> OnFactors:
    """`op` along one dim `p[key]` of a weight, moving elements within it: on both factors along a
    leading dim, on L along the rows, on R along the columns (the other factor kept, or shared)."""
    dim = op.norm_dim(p[key], f.ndim)
    outs = (f,) * n_out
    if dim < f.ndim - 2:
        p = {**p, key: dim}
        return OnFactors((op.name, p), (op.name, p), outs)
    if dim == f.rows:
        return OnFactors((op.name, {**p, key: f.ndim - 2}), None, outs)
    return OnFactors(None, (op.name, {**p, key: f.ndim - 1}), outs, rows=False)


DEQUANTIZE_HINT = "dequantize the weights first: --dequantize, or dequantize=True in Python"


def whole_blocks(op: str, sizes: list[int], dim: int, block: int) -> None:
    """Every part but the last a whole number of blocks along `dim` (the last may end ragged, as a grid
    of ceil(dim / block) allows); else OpError naming the part and its size."""
    for k, size in enumerate(sizes[:-1]):
        if size % block:
            raise OpError(
                f"{op}: part {k} has {size} along dim {dim}, not a whole number of blocks of {block}: "
                "the scale grid cannot follow",
                hint=DEQUANTIZE_HINT,
            )


def grid_sizes(op: str, sizes: Any, dim: int, block: int) -> list[int]:
    """Part sizes along a blocked dim, in blocks (the last part rounded up)."""
    if not isinstance(sizes, (list, tuple)):
        raise OpError(
            f"{op}: sizes from the config ({sizes}) on a quantized weight: the scale grid's sizes need numbers",
            hint="write the sizes as numbers, compile with the config, or dequantize",
        )
    whole_blocks(op, list(sizes), dim, block)
    return [s // block for s in sizes[:-1]] + [-(-sizes[-1] // block)] if sizes else []


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
