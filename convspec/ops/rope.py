"""RoPE layouts: interleaved (complex pairs) <-> half-split, per head; and plain interleaving."""

from __future__ import annotations

from .base import NoLowRank, OnFactors, Op, OpError, Param, TensorInfo, on_one_dim
from .slicing import Region, SliceMap, replaced, whole_inputs


def _rope_check(p, x: TensorInfo, name: str) -> None:
    if len(x.shape) not in (1, 2):
        raise OpError(f"{name} works on 1-D or 2-D tensors, got {list(x.shape)}")
    heads = p["heads"]
    if heads < 1 or x.shape[0] % (2 * heads):
        raise OpError(f"{name}: dim 0 of {list(x.shape)} is not divisible by 2 x heads ({heads})")


def _permute(t, heads: int, to_halves: bool):
    rows = t.shape[0]
    half = rows // heads // 2
    inner = (half, 2) if to_halves else (2, half)
    tail = tuple(t.shape[1:])
    return t.reshape(heads, *inner, *tail).transpose(1, 2).reshape(rows, *tail).contiguous()


def _rope_slice(op: Op, p: dict, ins: list[TensorInfo], region: Region) -> SliceMap:
    """Rows of whole heads are the same heads' rows, permuted within each: read them and permute
    with that many heads. Rows cutting through a head: the heads they touch, then narrowed."""
    (a, b) = region[0]
    if a == b:
        return _nothing(region, 0)
    rows = ins[0].shape[0] // p["heads"]
    first, last = a // rows, -(-b // rows)
    narrow = (
        None if (a % rows, b % rows) == (0, 0) else _relative(region, 0, (a - first * rows, b - first * rows))
    )
    read = replaced(region, 0, (first * rows, last * rows))
    return SliceMap(((read,),), op, {"heads": last - first}, 0, narrow)


def _nothing(region: Region, dim: int) -> SliceMap:
    """An empty region along `dim`: an empty read of the input in the rest of the region."""
    return SliceMap(((replaced(region, dim, (0, 0)),),))


def _relative(region: Region, dim: int, span: tuple[int, int]) -> Region:
    """What to keep of a result read for `region`: `span` along `dim`, all of every other dim."""
    return replaced(tuple((0, b - a) for a, b in region), dim, span)


class PermuteRope(Op):
    name = "permute_rope"
    doc = "Per head, reorder rows from interleaved pairs (x0 y0 x1 y1 ...) to halves (x0 x1 ... y0 y1 ...)."
    params = (Param("heads", "int"),)

    def infer(self, p, ins):
        _rope_check(p, ins[0], self.name)
        return [ins[0]]

    def apply(self, p, ins):
        return [_permute(ins[0], p["heads"], True)]

    def inverse(self, p, n_inputs):
        return "unpermute_rope", {"heads": p["heads"]}

    def slice_map(self, p, ins, k, region):
        return _rope_slice(self, p, ins, region)

    def low_rank(self, p, ins):
        (f,) = ins
        if f.ndim != 2 or f.swapped:
            raise NoLowRank(f"{self.name} permutes dim 0, which is not the rows of a 2-D weight here")
        return OnFactors((self.name, p), None, (f,))


class UnpermuteRope(Op):
    name = "unpermute_rope"
    doc = "Per head, reorder rows from halves back to interleaved pairs: the inverse of permute_rope."
    params = (Param("heads", "int"),)

    def infer(self, p, ins):
        _rope_check(p, ins[0], self.name)
        return [ins[0]]

    def apply(self, p, ins):
        return [_permute(ins[0], p["heads"], False)]

    def inverse(self, p, n_inputs):
        return "permute_rope", {"heads": p["heads"]}

    def slice_map(self, p, ins, k, region):
        return _rope_slice(self, p, ins, region)

    def low_rank(self, p, ins):
        (f,) = ins
        if f.ndim != 2 or f.swapped:
            raise NoLowRank(f"{self.name} permutes dim 0, which is not the rows of a 2-D weight here")
        return OnFactors((self.name, p), None, (f,))


def _interleave_check(p, x: TensorInfo, name: str) -> int:
    dim = Op.norm_dim(p["dim"], len(x.shape))
    if p["parts"] < 1 or x.shape[dim] % p["parts"]:
        raise OpError(f"{name}: dim {dim} of {list(x.shape)} is not divisible by parts={p['parts']}")
    return dim


def _regroup(t, dim: int, a: int, b: int):
    shape = list(t.shape)
    split = shape[:dim] + [a, b] + shape[dim + 1 :]
    return t.reshape(split).transpose(dim, dim + 1).reshape(shape).contiguous()


class Interleave(Op):
    name = "interleave"
    doc = "Along `dim`, turn `parts` consecutive blocks [a.., b..] into interleaved rows [a0 b0 a1 b1 ...]."
    params = (Param("dim", "int", 0), Param("parts", "int", 2))

    def infer(self, p, ins):
        _interleave_check(p, ins[0], self.name)
        return [ins[0]]

    def apply(self, p, ins):
        x = ins[0]
        dim = p["dim"] % x.ndim
        return [_regroup(x, dim, p["parts"], x.shape[dim] // p["parts"])]

    def inverse(self, p, n_inputs):
        return "deinterleave", {"dim": p["dim"], "parts": p["parts"]}

    def slice_map(self, p, ins, k, region):
        """Output rows a period of `parts` at a time are, in each part, consecutive input rows: read
        those `parts` row ranges and interleave them (an unaligned region: the periods it touches)."""
        dim = self.norm_dim(p["dim"], len(region))
        parts, (a, b) = p["parts"], region[dim]
        if a == b:
            return _nothing(region, dim)
        size = ins[0].shape[dim] // parts
        lo, hi = a - a % parts, -(-b // parts) * parts
        reads = tuple(
            replaced(region, dim, (q * size + lo // parts, q * size + hi // parts)) for q in range(parts)
        )
        narrow = None if (lo, hi) == (a, b) else _relative(region, dim, (a - lo, b - lo))
        return SliceMap((reads,), self, {"dim": dim, "parts": parts}, 0, narrow, join=dim)

    def low_rank(self, p, ins):
        return on_one_dim(self, p, ins[0])


class Deinterleave(Op):
    name = "deinterleave"
    doc = "Along `dim`, gather interleaved rows [a0 b0 a1 b1 ...] into `parts` blocks [a.., b..]."
    params = (Param("dim", "int", 0), Param("parts", "int", 2))

    def infer(self, p, ins):
        _interleave_check(p, ins[0], self.name)
        return [ins[0]]

    def apply(self, p, ins):
        x = ins[0]
        dim = p["dim"] % x.ndim
        return [_regroup(x, dim, x.shape[dim] // p["parts"], p["parts"])]

    def inverse(self, p, n_inputs):
        return "interleave", {"dim": p["dim"], "parts": p["parts"]}

    def slice_map(self, p, ins, k, region):
        """Rows of one output block are every `parts`-th input row: read the input rows of all the
        periods they fall in, deinterleave, and keep that block's rows. Rows of several blocks: the
        whole input."""
        dim = self.norm_dim(p["dim"], len(region))
        parts, (a, b) = p["parts"], region[dim]
        if a == b:
            return _nothing(region, dim)
        size = ins[0].shape[dim] // parts
        block = a // size
        if (b - 1) // size != block:
            return whole_inputs(self, p, ins, k, region)
        r0, r1 = a - block * size, b - block * size
        read = replaced(region, dim, (r0 * parts, r1 * parts))
        rows = r1 - r0
        narrow = None if parts == 1 else _relative(region, dim, (block * rows, (block + 1) * rows))
        return SliceMap(((read,),), self, {"dim": dim, "parts": parts}, 0, narrow)

    def low_rank(self, p, ins):
        return on_one_dim(self, p, ins[0])
