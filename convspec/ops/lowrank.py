"""Ops on the low-rank factors of a weight (LoRA's B and A): block-diagonal joins, shared factors,
and the flattened expert dims PEFT stores. What each base op means for the factors is `Op.low_rank`."""

from __future__ import annotations

import math

from .base import NotInvertible, Op, OpError, Param, TensorInfo, check_extent, same_dtype


class FactorsApart(OpError):
    """Factors that no part-by-part adapters make: a B off its diagonal blocks, or parts' A's that
    differ. The adapter was trained on this layout, not converted to it. `short` says which."""

    def __init__(self, message: str, short: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.short = short


def _last_two(name: str, ins: list[TensorInfo]) -> None:
    for i in ins:
        if len(i.shape) < 2:
            raise OpError(f"{name} takes tensors of two dims or more, not {list(i.shape)}")
    if len({i.shape[:-2] for i in ins}) > 1:
        raise OpError(
            f"{name} of tensors whose leading dims differ: " + ", ".join(str(list(i.shape)) for i in ins)
        )


def _bytes(t):
    """A tensor's bytes, for comparing bits: == misses NaNs and -0.0, and float8 has no count_nonzero."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8)


def _sized_axis(p) -> int:
    dim = p.get("dim", -2)
    if dim not in (-2, -1):
        raise OpError(f"dim={dim}: the sizes describe one of the last two dims, -2 or -1")
    return dim


class BlockDiag(Op):
    name = "block_diag"
    doc = (
        "Place tensors on the diagonal of one (over their last two dims, zeros elsewhere): LoRA's B of "
        "weights joined along their rows. `sizes`/`equal` describe the parts along `dim` (-2 or -1), "
        "for the inverse; along the other of the two dims the parts are equal."
    )
    params = (
        Param("dim", "int", -2),
        Param("sizes", "ints", None, "the part sizes along dim: checked forward, used by the inverse"),
        Param("equal", "bool", False, "the parts are equal along dim: checked forward"),
    )
    min_inputs = 2
    max_inputs = None

    def check(self, p):
        _sized_axis(p)

    def infer(self, p, ins):
        dtype = same_dtype(self.name, ins)
        _last_two(self.name, ins)
        dim = _sized_axis(p)
        other = -1 if dim == -2 else -2
        parts = [i.shape[dim] for i in ins]
        if p.get("sizes") is not None and list(p["sizes"]) != parts:
            raise OpError(f"block_diag declares sizes={list(p['sizes'])} but the parts have sizes {parts}")
        if p.get("equal") and len(set(parts)) > 1:
            raise OpError(f"block_diag declares equal=true but the parts have sizes {parts}")
        ranks = [i.shape[other] for i in ins]
        if len(set(ranks)) > 1:
            raise OpError(
                f"block_diag needs parts of one rank (dim {other}), these have {ranks}: "
                "the inverse could not tell where each part's rank ends"
            )
        shape = list(ins[0].shape)
        shape[-2] = sum(i.shape[-2] for i in ins)
        shape[-1] = sum(i.shape[-1] for i in ins)
        return [check_extent(self.name, tuple(shape), dtype)]

    def apply(self, p, ins):
        import torch

        lead = ins[0].shape[:-2]
        rows, cols = sum(t.shape[-2] for t in ins), sum(t.shape[-1] for t in ins)
        out = torch.zeros((*lead, rows, cols), dtype=ins[0].dtype, device=ins[0].device)
        r = c = 0
        for t in ins:
            out[..., r : r + t.shape[-2], c : c + t.shape[-1]] = t
            r, c = r + t.shape[-2], c + t.shape[-1]
        return [out]

    def inverse(self, p, n_inputs):
        if p.get("sizes") is None and not p.get("equal"):
            raise NotInvertible("the inverse of block_diag needs the part sizes: sizes=[...] or equal=true")
        return "unblock_diag", {"dim": p.get("dim", -2), "n": n_inputs, "sizes": p.get("sizes")}


class UnblockDiag(Op):
    name = "unblock_diag"
    doc = (
        "The blocks on the diagonal of a block-diagonal tensor (over its last two dims); refuses one "
        "with a non-zero value off the diagonal, which no set of parts makes."
    )
    params = (
        Param("n", "int"),
        Param("dim", "int", -2),
        Param("sizes", "ints", None, "the part sizes along dim; None: n equal parts"),
    )
    count_param = "n"

    def n_outputs(self, p):
        return p["n"]

    def check(self, p):
        _sized_axis(p)
        if p["n"] < 1:
            raise OpError(f"unblock_diag n={p['n']} must be at least 1")
        if p.get("sizes") is not None and len(p["sizes"]) != p["n"]:
            raise OpError(f"unblock_diag sizes={list(p['sizes'])} for n={p['n']} parts")

    def _sizes(self, p, x: TensorInfo) -> tuple[list[int], list[int]]:
        dim, n = _sized_axis(p), p["n"]
        other = -1 if dim == -2 else -2

        def equal(total: int, axis: int) -> list[int]:
            if total % n:
                raise OpError(f"unblock_diag: dim {axis} of {list(x.shape)} is not {n} equal parts")
            return [total // n] * n

        sized = list(p["sizes"]) if p.get("sizes") is not None else equal(x.shape[dim], dim)
        if sum(sized) != x.shape[dim]:
            raise OpError(
                f"unblock_diag sizes {sized} add up to {sum(sized)}, not dim {dim} of {list(x.shape)}"
            )
        others = equal(x.shape[other], other)
        return (sized, others) if dim == -2 else (others, sized)

    def infer(self, p, ins):
        (x,) = ins
        _last_two(self.name, ins)
        rows, cols = self._sizes(p, x)
        return [TensorInfo((*x.shape[:-2], r, c), x.dtype) for r, c in zip(rows, cols, strict=True)]

    def apply(self, p, ins):
        (x,) = ins
        rows, cols = self._sizes(p, TensorInfo(tuple(x.shape), "float32"))
        out, r0 = [], 0
        rest = x.clone()
        for r, c in zip(rows, cols, strict=True):
            c0 = sum(cols[: len(out)])
            out.append(x[..., r0 : r0 + r, c0 : c0 + c].contiguous())
            rest[..., r0 : r0 + r, c0 : c0 + c] = 0
            r0 += r
        if x.device.type != "meta" and _bytes(rest).count_nonzero():  # bits: a -0.0 or a float8 too
            raise FactorsApart(
                f"the tensor of shape {list(x.shape)} is not block diagonal in {len(rows)} parts "
                f"(largest value off the diagonal: {rest.double().abs().max().item():.3g}): its parts were "
                "trained together, so they cannot be split into the adapters of separate weights",
                "a B is not block diagonal",
                hint="merge the adapter into the base model and convert the merged weights",
            )
        return out

    def inverse(self, p, n_inputs):
        dim = p.get("dim", -2)
        sizes = p.get("sizes")
        return "block_diag", {"dim": dim, "sizes": sizes, "equal": sizes is None}


class Share(Op):
    name = "share"
    doc = "The same tensor as `n` values: a factor every part of a split weight keeps (LoRA's A of q, k, v)."
    params = (Param("n", "int"),)
    count_param = "n"

    def n_outputs(self, p):
        return p["n"]

    def check(self, p):
        if p["n"] < 1:
            raise OpError(f"share n={p['n']} must be at least 1")

    def infer(self, p, ins):
        return [ins[0]] * p["n"]

    def apply(self, p, ins):  # copies: a state dict of one tensor under n keys is refused by save_file
        return [ins[0], *(ins[0].clone() for _ in range(p["n"] - 1))]

    def inverse(self, p, n_inputs):
        return "same", {}


class Same(Op):
    name = "same"
    doc = "One tensor from several that must be equal, bit for bit: the shared factor of parts joined again."
    min_inputs = 1
    max_inputs = None

    def infer(self, p, ins):
        if len(set(ins)) > 1:
            raise OpError(
                "same of tensors that differ: " + ", ".join(f"{list(i.shape)} {i.dtype}" for i in ins)
            )
        return [ins[0]]

    def apply(self, p, ins):
        import torch

        first = ins[0]
        if first.device.type == "meta":  # no values to compare: infer checked the shapes
            return [first]
        for i, t in enumerate(ins[1:], 2):
            if first.shape != t.shape or not torch.equal(_bytes(first), _bytes(t)):  # NaNs, -0.0
                raise FactorsApart(
                    f"the parts do not share one factor: part {i} differs from part 1 "
                    "(the weights were adapted separately, so they cannot be joined with one A)",
                    "the parts' A's differ",
                    hint="merge the adapter into the base model and convert the merged weights",
                )
        return [first]

    def inverse(self, p, n_inputs):
        return "share", {"n": n_inputs}


def _span(p, ndim: int, name: str) -> tuple[int, list[int]]:
    sizes = list(p["sizes"])
    if len(sizes) < 2 or sum(s == -1 for s in sizes) > 1 or any(s < -1 or s == 0 for s in sizes):
        raise OpError(f"{name} sizes={sizes}: two sizes or more, each positive, one -1 at most")
    dim = p.get("dim", 0)
    if not 0 <= dim < ndim:
        raise OpError(f"{name} dim={dim} is out of range for a tensor with {ndim} dims")
    return dim, sizes


def _resolve(sizes: list[int], total: int, name: str, shape) -> list[int]:
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % known:
            raise OpError(f"{name}: {total} (of {list(shape)}) is not a multiple of {known} (sizes={sizes})")
        sizes = [total // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != total:
        raise OpError(
            f"{name} sizes={sizes} hold {math.prod(sizes)} elements, the dim has {total} ({list(shape)})"
        )
    return sizes


class Flatten(Op):
    name = "flatten"
    doc = (
        "Merge the dims dim, dim+1, ... (as many as `sizes` names) into one; `sizes` (one -1 allowed) "
        "are checked forward and make it invertible. PEFT keeps an expert stack's factors so."
    )
    params = (Param("dim", "int", 0), Param("sizes", "ints"))

    def infer(self, p, ins):
        (x,) = ins
        dim, sizes = _span(p, len(x.shape), self.name)
        got = list(x.shape[dim : dim + len(sizes)])
        if len(got) != len(sizes) or any(s not in (-1, g) for s, g in zip(sizes, got, strict=True)):
            raise OpError(f"flatten declares sizes={sizes} at dim {dim}, the input is {list(x.shape)}")
        shape = (*x.shape[:dim], math.prod(got), *x.shape[dim + len(sizes) :])
        return [TensorInfo(shape, x.dtype)]

    def apply(self, p, ins):
        (x,) = ins
        dim = p.get("dim", 0)
        return [x.flatten(dim, dim + len(p["sizes"]) - 1).contiguous()]

    def inverse(self, p, n_inputs):
        return "unflatten", {"dim": p.get("dim", 0), "sizes": p["sizes"]}


class Unflatten(Op):
    name = "unflatten"
    doc = "Split dim `dim` into the dims `sizes` (one -1 allowed): the expert dim PEFT flattens, back."
    params = (Param("dim", "int", 0), Param("sizes", "ints"))

    def infer(self, p, ins):
        (x,) = ins
        dim, sizes = _span(p, len(x.shape), self.name)
        sizes = _resolve(sizes, x.shape[dim], self.name, x.shape)
        return [TensorInfo((*x.shape[:dim], *sizes, *x.shape[dim + 1 :]), x.dtype)]

    def apply(self, p, ins):
        (x,) = ins
        dim = p.get("dim", 0)
        sizes = _resolve(list(p["sizes"]), x.shape[dim], self.name, x.shape)
        return [x.unflatten(dim, sizes).contiguous()]

    def inverse(self, p, n_inputs):
        return "flatten", {"dim": p.get("dim", 0), "sizes": p["sizes"]}


class Unadaptable(Op):
    name = "no_low_rank"
    doc = (
        "Refuses, at bind, the adapter of a weight that a base op converts in a way low-rank factors "
        "cannot follow (`op`): an adapter plan holds one where the base rule has no adapter rule."
    )
    params = (Param("op", "capture", doc="the base op the factors cannot follow"),)
    max_inputs = None

    def n_outputs(self, p):
        return None

    def infer(self, p, ins):
        raise OpError(
            f"the adapter of this weight cannot be converted: LoRA factors cannot follow {p['op']}",
            hint="merge the adapter into the base model (PEFT merge_and_unload) and convert the merged weights",
        )

    def apply(self, p, ins):
        return self.infer(p, ins)

    def inverse(self, p, n_inputs):
        return self.name, dict(p)
