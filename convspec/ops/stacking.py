"""stack / unstack: between a collection of tensors indexed by a capture and one tensor."""

from __future__ import annotations

from operator import itemgetter

from . import blockmoves
from .base import Factors, NoLowRank, OnFactors, Op, OpError, Param, TensorInfo, check_extent, same_dtype
from .slicing import SliceMap, whole_inputs

# the most members one collection may have (a stack's inputs, an unstack's outputs): models have
# hundreds of experts or layers; a header's shape must not make millions of keys out of a few bytes
MAX_MEMBERS = 1 << 16


def too_many(what: str, n: int) -> str:
    """The message of a collection past MAX_MEMBERS (bind refuses the checkpoint with it)."""
    return f"{what} makes {n} tensors, more than the limit of {MAX_MEMBERS} per collection"


class MembersLimit(OpError):
    """A collection past MAX_MEMBERS: bind stops at once and names the checkpoint's file."""


class Stack(Op):
    name = "stack"
    doc = (
        "Stack the tensors of a collection, ordered by the integer capture `over`, along a new dim; "
        "with parts=k, k stacks of consecutive members (as torch.chunk splits them)."
    )
    params = (Param("over", "capture"), Param("dim", "int", 0), Param("parts", "int", 1))
    reduces = True
    moves_blocks = True
    count_param = "parts"

    def n_outputs(self, p):
        return p.get("parts", 1)

    def infer(self, p, ins):
        if ins.count(ins[0]) == len(ins):  # one identity check per member when infos are shared
            shapes = {ins[0].shape}
        else:
            shapes = set(map(itemgetter(0), ins))  # TensorInfo is (shape, dtype)
        if len(shapes) > 1:
            raise OpError(
                f"stack over {p['over']} of tensors with different shapes: "
                + ", ".join(str(list(s)) for s in sorted(shapes))
            )
        dtype = same_dtype("stack", ins)
        shape = list(ins[0].shape)
        dim = self.norm_dim(p["dim"], len(shape) + 1)
        shape.insert(dim, len(ins))
        return [check_extent("stack", tuple(shape), dtype)]

    def apply(self, p, ins):
        import torch

        return [torch.stack(ins, dim=p["dim"])]

    def inverse(self, p, n_inputs):
        return "unstack", {"over": p["over"], "dim": p["dim"], "parts": p.get("parts", 1)}

    def move_blocks(self, p, ins, rank):
        return [blockmoves.stack(ins, self.block_dim(p, rank))]

    def on_grid(self, p, blocks):
        return p

    def carry_blocks(self, p, ins, blocks):
        dim = self.norm_dim(p["dim"], len(blocks) + 1)
        return blocks[:dim] + (1,) + blocks[dim:]

    def slice_map(self, p, ins, k, region):
        """The members the region takes along the new dim, each read in the rest of the region."""
        dim = self.norm_dim(p["dim"], len(region))
        a, b = region[dim]
        if a == b:
            return whole_inputs(self, p, ins, k, region)
        rest = region[:dim] + region[dim + 1 :]
        reads = tuple((rest,) if a <= i < b else () for i in range(len(ins)))
        return SliceMap(reads, self, {"over": p["over"], "dim": dim})

    def low_rank(self, p, ins):
        (f,) = ins
        out = Factors(f.ndim + 1, f.swapped)
        dim = self.norm_dim(p["dim"], out.ndim)
        if dim > f.ndim - 2:
            raise NoLowRank(f"stack along dim {p['dim']} puts the stacked dim inside the rows and columns")
        p = {**p, "dim": dim}
        return OnFactors((self.name, p), (self.name, p), (out,))


class Unstack(Op):
    name = "unstack"
    doc = (
        "Split a tensor along `dim` into a collection indexed by the integer capture `over` (0..n-1); "
        "with parts=k, k tensors whose members are numbered on from one to the next."
    )
    params = (Param("over", "capture"), Param("dim", "int", 0), Param("parts", "int", 1))
    max_inputs = None
    expands = True
    moves_blocks = True

    def n_outputs(self, p):
        return 1  # one collection value

    def infer(self, p, ins):
        (x,) = ins
        dim = self.norm_dim(p["dim"], len(x.shape))
        n = x.shape[dim]
        if n > MAX_MEMBERS:  # refused before a list of n is made
            raise MembersLimit(too_many(f"unstack over {p['over']} of {list(x.shape)} along dim {dim}", n))
        check_extent("unstack", x.shape, x.dtype)  # its parts sit at offsets torch must count
        if n == 0:
            raise OpError(
                f"unstack over {p['over']} of {list(x.shape)}: dim {dim} has size 0, so it makes no "
                "tensor and the key would vanish (stacking nothing back cannot give it again)"
            )
        shape = x.shape[:dim] + x.shape[dim + 1 :]
        return [TensorInfo(shape, x.dtype)] * n

    def apply(self, p, ins):
        import torch

        return [t.contiguous() for t in torch.unbind(ins[0], dim=p["dim"])]

    def inverse(self, p, n_inputs):
        return "stack", {"over": p["over"], "dim": p["dim"], "parts": p.get("parts", 1)}

    def on_grid(self, p, blocks):
        return p

    def carry_blocks(self, p, ins, blocks):
        dim = self.norm_dim(p["dim"], len(blocks))
        if blocks[dim] != 1:
            raise OpError(
                f"unstack along dim {dim}, which holds blocks of {blocks[dim]} of a quantized weight"
            )
        return blocks[:dim] + blocks[dim + 1 :]

    def move_blocks(self, p, ins, rank):
        return blockmoves.unbind(ins[0], self.block_dim(p, rank))

    def slice_map(self, p, ins, k, region):
        """Member k's region is the input's, at k along the unstacked dim."""
        dim = self.norm_dim(p["dim"], len(region) + 1)
        return SliceMap(((region[:dim] + ((k, k + 1),) + region[dim:],),), self, p)

    def low_rank(self, p, ins):
        f = ins[0]  # parts=k: k inputs, each unstacked alike
        if len(set(ins)) > 1:
            raise NoLowRank("unstacks weights whose factors lie differently (one transposed)")
        dim = self.norm_dim(p["dim"], f.ndim)
        if dim >= f.ndim - 2:
            raise NoLowRank(f"unstack along dim {p['dim']} cuts the weight's rows or columns apart")
        p = {**p, "dim": dim}
        return OnFactors((self.name, p), (self.name, p), (Factors(f.ndim - 1, f.swapped),))
