"""transpose / permute / reshape: the same elements in another arrangement."""

from __future__ import annotations

import math

from .base import NoLowRank, NotInvertible, OnFactors, Op, OpError, Param, TensorInfo, check_extent
from .slicing import SliceMap, whole_inputs


class Transpose(Op):
    name = "transpose"
    doc = "Swap two dims."
    params = (Param("dim0", "int", 0), Param("dim1", "int", 1))

    def infer(self, p, ins):
        (x,) = ins
        a = self.norm_dim(p["dim0"], len(x.shape), "dim0")
        b = self.norm_dim(p["dim1"], len(x.shape), "dim1")
        shape = list(x.shape)
        shape[a], shape[b] = shape[b], shape[a]
        return [TensorInfo(tuple(shape), x.dtype)]

    def apply(self, p, ins):
        return [ins[0].transpose(p["dim0"], p["dim1"]).contiguous()]

    def inverse(self, p, n_inputs):
        return "transpose", {"dim0": p["dim0"], "dim1": p["dim1"]}

    def on_grid(self, p, blocks):
        return p

    def carry_blocks(self, p, ins, blocks):
        a, b = self.norm_dim(p["dim0"], len(blocks)), self.norm_dim(p["dim1"], len(blocks))
        out = list(blocks)
        out[a], out[b] = out[b], out[a]
        return tuple(out)

    def slice_map(self, p, ins, k, region):
        a = self.norm_dim(p["dim0"], len(region))
        b = self.norm_dim(p["dim1"], len(region))
        src = list(region)
        src[a], src[b] = src[b], src[a]
        return SliceMap(((tuple(src),),), self, p)

    def low_rank(self, p, ins):
        (f,) = ins
        a, b = sorted((self.norm_dim(p["dim0"], f.ndim), self.norm_dim(p["dim1"], f.ndim)))
        if (a, b) == (f.ndim - 2, f.ndim - 1):  # (L @ R)^T: the same factors, read the other way
            return OnFactors(None, None, (f._replace(swapped=not f.swapped),), rows=False)
        if b < f.ndim - 2:
            p = {"dim0": a, "dim1": b}
            return OnFactors((self.name, p), (self.name, p), (f,))
        raise NoLowRank(f"transpose({a}, {b}) swaps a leading dim with the weight's rows or columns")


class Permute(Op):
    name = "permute"
    doc = "Reorder all dims: output dim i is input dim dims[i]."
    params = (Param("dims", "ints"),)

    def check(self, p):
        dims = list(p["dims"])
        if sorted(dims) != list(range(len(dims))):
            raise OpError(f"permute dims={dims} is not a permutation of 0..{len(dims) - 1}")

    def infer(self, p, ins):
        (x,) = ins
        dims = list(p["dims"])
        if len(dims) != len(x.shape):
            raise OpError(f"permute dims={dims} for a tensor with {len(x.shape)} dims {list(x.shape)}")
        return [TensorInfo(tuple(x.shape[d] for d in dims), x.dtype)]

    def apply(self, p, ins):
        return [ins[0].permute(*p["dims"]).contiguous()]

    def inverse(self, p, n_inputs):
        dims = list(p["dims"])
        return "permute", {"dims": sorted(range(len(dims)), key=dims.__getitem__)}

    def on_grid(self, p, blocks):
        return p

    def carry_blocks(self, p, ins, blocks):
        if len(p["dims"]) != len(blocks):
            raise OpError(f"permute dims={list(p['dims'])} for a quantized weight of {len(blocks)} dims")
        return tuple(blocks[d] for d in p["dims"])

    def slice_map(self, p, ins, k, region):
        src = [region[0]] * len(region)
        for i, d in enumerate(p["dims"]):  # output dim i is input dim d
            src[d] = region[i]
        return SliceMap(((tuple(src),),), self, p)

    def low_rank(self, p, ins):
        (f,) = ins
        dims, n = [d % f.ndim for d in p["dims"]], f.ndim
        if len(dims) != n or sorted(dims[n - 2 :]) != [n - 2, n - 1]:
            raise NoLowRank(
                f"permute(dims={list(p['dims'])}) moves the weight's rows or columns among its leading dims"
            )
        lead = {"dims": [*dims[: n - 2], n - 2, n - 1]}
        swapped = f.swapped != (dims[n - 2] == n - 1)
        return OnFactors((self.name, lead), (self.name, lead), (f._replace(swapped=swapped),), rows=False)


def _resolve(shape: list[int], numel: int) -> tuple[int, ...]:
    """Fill in one -1 of a target shape, checking the element count."""
    if shape.count(-1) > 1:
        raise OpError(f"shape {shape} has more than one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known == 0 or numel % known:
            raise OpError(f"cannot reshape {numel} elements to {shape}")
        shape = [numel // known if s == -1 else s for s in shape]
    if math.prod(shape) != numel:
        raise OpError(f"cannot reshape {numel} elements to {shape}")
    return tuple(shape)


class Reshape(Op):
    name = "reshape"
    doc = "View the elements in another shape (one -1 allowed); from_shape makes it invertible."
    params = (
        Param("shape", "shape"),
        Param("from_shape", "shape", None, "the input's shape, which the inverse reshapes back to"),
    )

    def infer(self, p, ins):
        (x,) = ins
        numel = math.prod(x.shape)
        if p.get("from_shape") is not None:
            expected = _resolve(list(p["from_shape"]), numel)
            if expected != x.shape:
                raise OpError(
                    f"reshape declares from_shape={list(p['from_shape'])} but the input is {list(x.shape)}"
                )
        return [check_extent("reshape", _resolve(list(p["shape"]), numel), x.dtype)]

    def apply(self, p, ins):
        return [ins[0].reshape(list(p["shape"])).contiguous()]

    def inverse(self, p, n_inputs):
        if p.get("from_shape") is None:
            raise NotInvertible(
                "the inverse of reshape needs the input's shape, which the output does not carry: "
                "add from_shape=[...]"
            )
        return "reshape", {"shape": p["from_shape"], "from_shape": p["shape"]}

    def slice_map(self, p, ins, k, region):
        """Rows of the output that are whole rows of the input are read as such; else the input whole."""
        (x,) = ins
        out = _resolve(list(p["shape"]), math.prod(x.shape))
        if not out or not x.shape or any(r != (0, s) for r, s in zip(region[1:], out[1:], strict=True)):
            return whole_inputs(self, p, ins, k, region)
        start, stop = (i * math.prod(out[1:]) for i in region[0])
        row = math.prod(x.shape[1:])
        if not row or start % row or stop % row:
            return whole_inputs(self, p, ins, k, region)
        src = ((start // row, stop // row),) + tuple((0, s) for s in x.shape[1:])
        return SliceMap(((src,),), self, {"shape": [region[0][1] - region[0][0], *out[1:]]})
