"""RoPE layouts: interleaved (complex pairs) <-> half-split, per head; and plain interleaving."""

from __future__ import annotations

from .base import Op, OpError, Param, TensorInfo


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
