"""cat / split / chunk: joining tensors along a dim and cutting them apart again."""

from __future__ import annotations

from . import blockmoves
from .base import (
    NoLowRank,
    NotInvertible,
    OnFactors,
    Op,
    OpError,
    Param,
    TensorInfo,
    check_extent,
    grid_sizes,
    on_one_dim,
    same_dtype,
    whole_blocks,
)
from .slicing import SliceMap, replaced


def _check_sizes(p):
    sizes = p.get("sizes")
    if sizes is not None and any(s < 0 for s in sizes):
        raise OpError(f"sizes={sizes} has a negative size")


class Cat(Op):
    name = "cat"
    doc = "Concatenate tensors along `dim`."
    params = (
        Param("dim", "int", 0),
        Param("sizes", "ints", None, "the part sizes along dim: checked forward, used by the inverse"),
        Param("equal", "bool", False, "the parts are equal: checked forward, the inverse chunks"),
    )
    min_inputs = 2
    max_inputs = None
    moves_blocks = True

    def check(self, p):
        _check_sizes(p)

    def infer(self, p, ins):
        dtype = same_dtype("cat", ins)
        ndims = {len(i.shape) for i in ins}
        if len(ndims) > 1:
            raise OpError(
                "cat of tensors with different numbers of dims: " + ", ".join(str(list(i.shape)) for i in ins)
            )
        dim = self.norm_dim(p["dim"], len(ins[0].shape))
        rest = {i.shape[:dim] + i.shape[dim + 1 :] for i in ins}
        if len(rest) > 1:
            raise OpError(
                f"cat along dim {dim} of tensors whose other dims differ: "
                + ", ".join(str(list(i.shape)) for i in ins)
            )
        parts = [i.shape[dim] for i in ins]
        if p.get("sizes") is not None and list(p["sizes"]) != parts:
            raise OpError(
                f"cat declares sizes={list(p['sizes'])} but the parts have sizes {parts} along dim {dim}"
            )
        if p.get("equal") and len(set(parts)) > 1:
            raise OpError(f"cat declares equal=true but the parts have sizes {parts} along dim {dim}")
        shape = list(ins[0].shape)
        shape[dim] = sum(parts)
        return [check_extent("cat", tuple(shape), dtype)]

    def apply(self, p, ins):
        import torch

        return [torch.cat(ins, dim=p["dim"])]

    def inverse(self, p, n_inputs):
        if p.get("sizes") is not None:
            return "split", {"dim": p["dim"], "sizes": p["sizes"]}
        if p.get("equal"):
            return "chunk", {"dim": p["dim"], "n": n_inputs}
        raise NotInvertible(
            f"the inverse of cat(dim={p['dim']}) needs the part sizes, which the fused tensor does not carry: "
            "add sizes=[...] (config expressions allowed) or equal=true"
        )

    def move_blocks(self, p, ins, rank):
        return [blockmoves.cat(ins, self.block_dim(p, rank))]

    def on_grid(self, p, blocks):
        dim = self.norm_dim(p["dim"], len(blocks))
        if p.get("sizes") is None or blocks[dim] == 1:
            return p
        return {**p, "sizes": grid_sizes("cat", p["sizes"], dim, blocks[dim])}

    def carry_blocks(self, p, ins, blocks):
        dim = self.norm_dim(p["dim"], len(blocks))
        if ins is not None:
            whole_blocks("cat", [i.shape[dim] for i in ins], dim, blocks[dim])
        return blocks

    def slice_map(self, p, ins, k, region):
        dim = self.norm_dim(p["dim"], len(region))
        a, b = region[dim]
        reads, offset = [], 0
        for x in ins:
            size = x.shape[dim]
            lo, hi = max(a, offset), min(b, offset + size)
            reads.append((replaced(region, dim, (lo - offset, hi - offset)),) if lo < hi else ())
            offset += size
        if sum(map(bool, reads)) < 2:  # one part (or none: an empty region, read as an empty one)
            if not any(reads):
                reads[0] = (replaced(region, dim, (0, 0)),)
            return SliceMap(tuple(reads))
        return SliceMap(tuple(reads), self, {"dim": dim})

    def low_rank(self, p, ins):
        f = ins[0]
        if len(set(ins)) > 1:
            raise NoLowRank("joins weights whose factors lie differently (one transposed)")
        dim = self.norm_dim(p["dim"], f.ndim)
        if dim < f.ndim - 2:
            p = {**p, "dim": dim}
            return OnFactors((self.name, p), (self.name, p), (f,))
        sized = {"sizes": p.get("sizes"), "equal": bool(p.get("equal"))}
        if dim == f.rows:  # B block-diagonal, the A's stacked along the rank (PEFT's form)
            return OnFactors(
                ("block_diag", {"dim": -2, **sized}),
                ("cat", {"dim": f.ndim - 2, "equal": True}),
                (f,),
                True,
                ("cat", {"dim": f.ndim - 2, **sized}),
            )
        return OnFactors(
            ("cat", {"dim": f.ndim - 1, "equal": True}),
            ("block_diag", {"dim": -1, **sized}),
            (f,),
            True,
            False,
        )


class Split(Op):
    name = "split"
    doc = "Cut a tensor along `dim` into parts of the given sizes (one output per size)."
    params = (Param("dim", "int", 0), Param("sizes", "ints"))
    moves_blocks = True
    count_param = "sizes"

    def n_outputs(self, p):
        return len(p["sizes"])

    def n_outputs_configured(self, expr):
        if expr.length is None:
            raise OpError("split sizes must be a list [...] so the number of outputs is known")
        return expr.length

    def check(self, p):
        _check_sizes(p)

    def infer(self, p, ins):
        (x,) = ins
        check_extent("split", x.shape, x.dtype)  # its parts sit at offsets torch must count
        dim = self.norm_dim(p["dim"], len(x.shape))
        sizes = list(p["sizes"])
        if sum(sizes) != x.shape[dim]:
            raise OpError(
                f"split sizes {sizes} add up to {sum(sizes)}, but dim {dim} of "
                f"{list(x.shape)} has {x.shape[dim]}"
            )
        out = []
        for s in sizes:
            shape = list(x.shape)
            shape[dim] = s
            out.append(TensorInfo(tuple(shape), x.dtype))
        return out

    def apply(self, p, ins):
        import torch

        return [t.contiguous() for t in torch.split(ins[0], list(p["sizes"]), dim=p["dim"])]

    def inverse(self, p, n_inputs):
        return "cat", {"dim": p["dim"], "sizes": p["sizes"]}

    def move_blocks(self, p, ins, rank):
        return blockmoves.split(ins[0], self.block_dim(p, rank), p["sizes"])

    def on_grid(self, p, blocks):
        dim = self.norm_dim(p["dim"], len(blocks))
        return p if blocks[dim] == 1 else {**p, "sizes": grid_sizes("split", p["sizes"], dim, blocks[dim])}

    def carry_blocks(self, p, ins, blocks):
        dim = self.norm_dim(p["dim"], len(blocks))
        if ins is not None:
            whole_blocks("split", list(p["sizes"]), dim, blocks[dim])
        return blocks

    def slice_map(self, p, ins, k, region):
        dim = self.norm_dim(p["dim"], len(region))
        offset = sum(p["sizes"][:k])
        a, b = region[dim]
        return SliceMap(((replaced(region, dim, (a + offset, b + offset)),),))

    def low_rank(self, p, ins):
        return on_one_dim(self, p, ins[0])


class Chunk(Op):
    name = "chunk"
    doc = "Cut a tensor along `dim` into `n` equal parts (n defaults to the number of targets)."
    params = (Param("n", "int", None), Param("dim", "int", 0))
    moves_blocks = True
    count_param = "n"

    def n_outputs(self, p):
        return p.get("n")

    def n_outputs_configured(self, expr):
        return None  # a config expression for n: the targets give the count, and bind checks it

    def check(self, p):
        if p.get("n") is not None and p["n"] < 1:
            raise OpError(f"chunk needs n >= 1, got {p['n']}")

    def infer(self, p, ins):
        (x,) = ins
        check_extent("chunk", x.shape, x.dtype)  # its parts sit at offsets torch must count
        dim = self.norm_dim(p["dim"], len(x.shape))
        n = p["n"]
        if x.shape[dim] % n:
            raise OpError(
                f"chunk into {n} parts: dim {dim} of {list(x.shape)} ({x.shape[dim]}) is not divisible by {n}"
            )
        shape = list(x.shape)
        shape[dim] //= n
        return [TensorInfo(tuple(shape), x.dtype)] * n

    def apply(self, p, ins):
        import torch

        return [t.contiguous() for t in torch.chunk(ins[0], p["n"], dim=p["dim"])]

    def inverse(self, p, n_inputs):
        return "cat", {"dim": p["dim"], "equal": True}

    def move_blocks(self, p, ins, rank):
        (x,) = ins
        dim = self.block_dim(p, rank)
        return blockmoves.split(x, dim, [x.shape[dim] // p["n"]] * p["n"])

    def on_grid(self, p, blocks):
        return p

    def carry_blocks(self, p, ins, blocks):
        dim = self.norm_dim(p["dim"], len(blocks))
        if ins is not None and p.get("n"):
            whole_blocks("chunk", [ins[0].shape[dim] // p["n"]] * p["n"], dim, blocks[dim])
        return blocks

    def slice_map(self, p, ins, k, region):
        dim = self.norm_dim(p["dim"], len(region))
        offset = k * (ins[0].shape[dim] // p["n"])
        a, b = region[dim]
        return SliceMap(((replaced(region, dim, (a + offset, b + offset)),),))

    def low_rank(self, p, ins):
        return on_one_dim(self, p, ins[0])
