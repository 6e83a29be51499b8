"""Ops that map element values or reorder head blocks, for llama.cpp's layouts: norms stored as `w + 1`
(`add`), mamba's `A` as `-exp(A_log)` (`log_neg`, `neg_exp`), squeezed conv weights (`squeeze`,
`unsqueeze`) and value heads tiled rather than grouped by key head (`regroup_heads`).

The value maps compute in float32 for narrower floats and cast back, as transformers' GGUF loader
does (`(t.float() - 1).to(t.dtype)`), so they round: each is the other's nearest inverse, never an
exact one."""

from __future__ import annotations

import math
from typing import ClassVar

from .base import NotInvertible, Op, OpError, Param, TensorInfo, on_one_dim
from .blockmoves import Blocks
from .slicing import SliceMap, replaced, whole_inputs

MAX_ADD = 1 << 24  # the largest |value| of add: every integer up to it is exact in float32
VALUE_REFUSAL = "would change a quantized weight's values without its scales"


def _float_only(op: str, x: TensorInfo) -> None:
    if not (x.dtype.startswith("float") or x.dtype == "bfloat16"):
        raise OpError(
            f"{op} maps floating-point values, got a {x.dtype} tensor",
            hint="cast it to a float dtype first",
        )


def _compute(t, f):
    """`f` of `t` in float32 (float64 stays float64), cast back to `t`'s dtype."""
    import torch

    wide = t if t.dtype == torch.float64 else t.float()
    return f(wide).to(t.dtype)


class ValueMap(Op):
    """An elementwise map of float values: shape and dtype kept, any region read as itself."""

    changes_values = True
    grid_refusal = VALUE_REFUSAL

    def infer(self, p, ins):
        (x,) = ins
        _float_only(self.name, x)
        return [x]

    def slice_map(self, p, ins, k, region):
        return SliceMap(((region,),), self, p)

    def inverse(self, p, n_inputs):
        raise NotInvertible(self.loses(p))


class Add(ValueMap):
    name = "add"
    doc = "x + value, in float32 (float64 as is), cast back: llama.cpp stores some norms as w + 1."
    params = (Param("value", "int", doc="the integer added (negative to subtract)"),)

    def check(self, p):
        if abs(p["value"]) > MAX_ADD:
            raise OpError(
                f"add value={p['value']} is past {MAX_ADD} (2**24), where float32 stops being exact"
            )

    def apply(self, p, ins):
        return [_compute(ins[0], lambda t: t + p["value"])]

    def loses(self, p):
        v = p["value"]
        return (
            f"add(value={v}) rounds in floating point: adding {-v} back does not give every x again (lossy)"
        )

    def nearest_inverse(self, p, n_inputs):
        return "add", {"value": -p["value"]}


class LogNeg(ValueMap):
    name = "log_neg"
    doc = "log(-x), in float32 (float64 as is), cast back: GGUF's ssm_a (-exp(A_log)) to A_log."

    def apply(self, p, ins):
        import torch

        return [_compute(ins[0], lambda t: torch.log(-t))]

    def loses(self, p):
        return "log_neg rounds: -exp(log(-x)) is not x for every x, and x >= 0 has no log(-x) (lossy)"

    def nearest_inverse(self, p, n_inputs):
        return "neg_exp", {}


class NegExp(ValueMap):
    name = "neg_exp"
    doc = "-exp(x), in float32 (float64 as is), cast back: A_log to GGUF's ssm_a."

    def apply(self, p, ins):
        import torch

        return [_compute(ins[0], lambda t: -torch.exp(t))]

    def loses(self, p):
        return "neg_exp rounds: log(-(-exp(x))) is not x for every x, and it overflows to -inf (lossy)"

    def nearest_inverse(self, p, n_inputs):
        return "log_neg", {}


class Unsqueeze(Op):
    name = "unsqueeze"
    doc = "Insert a dim of size 1 at `dim` (of the output, as torch.unsqueeze)."
    params = (Param("dim", "int"),)
    moves_blocks = True

    def _at(self, p, rank: int) -> int:
        """Where the new dim goes, as a dim of the output (of rank + 1 dims)."""
        if not -rank - 1 <= p["dim"] <= rank:
            raise OpError(
                f"unsqueeze dim={p['dim']} is out of range for a tensor with {rank} dims "
                f"(a new dim goes at {-rank - 1}..{rank})"
            )
        return p["dim"] % (rank + 1)

    def infer(self, p, ins):
        (x,) = ins
        d = self._at(p, len(x.shape))
        return [TensorInfo(x.shape[:d] + (1,) + x.shape[d:], x.dtype)]

    def apply(self, p, ins):
        return [ins[0].unsqueeze(p["dim"])]

    def inverse(self, p, n_inputs):
        return "squeeze", {"dim": p["dim"]}

    def whole_dims(self, p, rank):
        return rank - self._at(p, rank)

    def move_blocks(self, p, ins, rank):
        (x,) = ins
        d = self._at(p, rank)
        return [Blocks(x.shape[:d] + (1,) + x.shape[d:], x.ids)]

    def on_grid(self, p, blocks):
        return p

    def carry_blocks(self, p, ins, blocks):
        d = self._at(p, len(blocks))
        return blocks[:d] + (1,) + blocks[d:]

    def slice_map(self, p, ins, k, region):
        d = self.norm_dim(p["dim"], len(region))
        if region[d][0] == region[d][1]:  # nothing of the new dim: an empty output
            return whole_inputs(self, p, ins, k, region)
        return SliceMap((((region[:d] + region[d + 1 :]),),), self, p)


class Squeeze(Op):
    name = "squeeze"
    doc = "Remove the dim `dim`, which must have size 1."
    params = (Param("dim", "int"),)
    moves_blocks = True

    def infer(self, p, ins):
        (x,) = ins
        d = self._dim(p, tuple(x.shape))
        return [TensorInfo(x.shape[:d] + x.shape[d + 1 :], x.dtype)]

    def _dim(self, p, shape: tuple[int, ...]) -> int:
        """The dim squeezed; OpError unless it exists and has size 1 (torch would keep it silently)."""
        if not shape:
            raise OpError(f"squeeze dim={p['dim']} of a tensor with no dims")
        d = self.norm_dim(p["dim"], len(shape))
        if shape[d] != 1:
            raise OpError(
                f"squeeze dim={p['dim']} of a tensor of shape {list(shape)}: it has size {shape[d]}, not 1"
            )
        return d

    def apply(self, p, ins):
        return [ins[0].squeeze(self._dim(p, tuple(ins[0].shape)))]

    def inverse(self, p, n_inputs):
        return "unsqueeze", {"dim": p["dim"]}

    def move_blocks(self, p, ins, rank):
        (x,) = ins
        d = self.block_dim(p, rank)
        return [Blocks(x.shape[:d] + x.shape[d + 1 :], x.ids)]

    def on_grid(self, p, blocks):
        return p

    def carry_blocks(self, p, ins, blocks):
        d = self.norm_dim(p["dim"], len(blocks))
        return blocks[:d] + blocks[d + 1 :]

    def slice_map(self, p, ins, k, region):
        d = self.norm_dim(p["dim"], len(region) + 1)
        return SliceMap(((region[:d] + ((0, 1),) + region[d:],),), self, p)


class RegroupHeads(Op):
    name = "regroup_heads"
    doc = (
        "Along `dim`, from `offset` on, view [groups, size, rows] and swap the first two: tiled value "
        "heads to grouped by key head (transformers' TiledToGroupedRows), bloom's qkv."
    )
    params = (
        Param("groups", "int", doc="the outer count of the part viewed (A of [A, B, rows])"),
        Param("size", "int", doc="the inner count (B of [A, B, rows]): the output is [B, A, rows]"),
        Param("rows", "int", 1, "the block each head keeps whole along dim"),
        Param("dim", "int", 0),
        Param("offset", "int", 0, "the rows before it stay where they are"),
    )
    moves_blocks = True
    _positive: ClassVar[tuple[str, ...]] = ("groups", "size", "rows")

    def check(self, p):
        for k in self._positive:
            if p.get(k, 1) < 1:
                raise OpError(f"regroup_heads {k}={p[k]} must be 1 or more")
        if p.get("offset", 0) < 0:
            raise OpError(f"regroup_heads offset={p['offset']} must be 0 or more")

    def _span(self, p) -> int:
        return p["groups"] * p["size"] * p.get("rows", 1)

    def infer(self, p, ins):
        self.check(p)
        (x,) = ins
        d = self.norm_dim(p.get("dim", 0), len(x.shape))
        offset, span = p.get("offset", 0), self._span(p)
        if x.shape[d] - offset != span:
            raise OpError(
                f"regroup_heads: dim {d} of {list(x.shape)} minus offset={offset} has "
                f"{x.shape[d] - offset}, not groups x size x rows = {p['groups']} x {p['size']} x "
                f"{p.get('rows', 1)} = {span}"
            )
        return [x]

    def apply(self, p, ins):
        import torch

        x = ins[0]
        d, offset = p.get("dim", 0) % x.ndim, p.get("offset", 0)
        head, tail = x.narrow(d, 0, offset), x.narrow(d, offset, x.shape[d] - offset)
        shape = list(tail.shape)
        split = shape[:d] + [p["groups"], p["size"], p.get("rows", 1)] + shape[d + 1 :]
        tail = tail.reshape(split).transpose(d, d + 1).reshape(shape)
        return [torch.cat([head, tail], dim=d).contiguous()]

    def inverse(self, p, n_inputs):
        return "regroup_heads", {
            "groups": p["size"],
            "size": p["groups"],
            "rows": p.get("rows", 1),
            "dim": p.get("dim", 0),
            "offset": p.get("offset", 0),
        }

    def order(self, p, n: int) -> list[int]:
        """Output index i along dim is input index order[i] (n: the size of dim)."""
        a, b, r, offset = p["groups"], p["size"], p.get("rows", 1), p.get("offset", 0)
        tail = [offset + (ia * b + ib) * r + ir for ib in range(b) for ia in range(a) for ir in range(r)]
        return list(range(offset)) + tail

    def move_blocks(self, p, ins, rank):
        (x,) = ins
        d = self.block_dim(p, rank)
        rest = math.prod(x.shape[d + 1 :])
        span = x.shape[d] * rest
        ids: list[int] = []
        for o in range(math.prod(x.shape[:d])):
            for i in self.order(p, x.shape[d]):
                ids += x.ids[o * span + i * rest : o * span + (i + 1) * rest]
        return [Blocks(x.shape, ids)]

    def on_grid(self, p, blocks):
        d = self.norm_dim(p.get("dim", 0), len(blocks))
        if blocks[d] != 1:
            raise OpError(
                f"regroup_heads along dim {d}, which holds blocks of {blocks[d]} of a quantized weight"
            )
        return p

    def carry_blocks(self, p, ins, blocks):
        self.on_grid(p, blocks)
        return blocks

    def slice_map(self, p, ins, k, region):
        """Any region, exactly: the input rows of each head block it touches (blocks of `rows` rows
        are whole in the input), read in output order and joined; nothing is computed."""
        d = self.norm_dim(p.get("dim", 0), len(region))
        a, b = region[d]
        if a == b:
            return SliceMap(((region,),))
        spans: list[tuple[int, int]] = []
        for start, stop in self._runs(p, a, b):
            if spans and spans[-1][1] == start:  # contiguous in the input too: one read
                spans[-1] = (spans[-1][0], stop)
            else:
                spans.append((start, stop))
        return SliceMap((tuple(replaced(region, d, s) for s in spans),), join=d)

    def _runs(self, p, a: int, b: int):
        """The input rows (start, stop) of output rows a..b along dim, in output order."""
        ga, sb, r, offset = p["groups"], p["size"], p.get("rows", 1), p.get("offset", 0)
        if a < offset:
            yield a, min(b, offset)
        for c in range(max(a - offset, 0) // r, -(-(b - offset) // r) if b > offset else 0):
            ib, ia = divmod(c, ga)  # output chunk c is (size index, group index)
            lo, hi = max(a, offset + c * r), min(b, offset + (c + 1) * r)
            src = offset + (ia * sb + ib) * r - (offset + c * r)
            yield lo + src, hi + src

    def low_rank(self, p, ins):
        return on_one_dim(self, p, ins[0])


__all__ = ["Add", "LogNeg", "NegExp", "RegroupHeads", "Squeeze", "Unsqueeze"]
