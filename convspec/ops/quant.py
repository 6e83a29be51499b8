"""dequant_fp8: block-wise FP8 (e4m3) weights times their per-block `weight_scale_inv`, with the
numerics of transformers 5.23's `Fp8Dequantize._dequantize_one`, so a dequantized output is bit for
bit the tensor transformers loads. Lossy one way: undoing it would need a quantize op."""

from __future__ import annotations

from .base import NotInvertible, Op, OpError, Param, check_extent
from .slicing import SliceMap

WEIGHT_DTYPES = ("float8_e4m3fn",)
# uint8 scales are E8M0 exponents stored as bytes (a scale of 2 ** (byte - 127)), as transformers reads them
SCALE_DTYPES = ("float32", "bfloat16", "uint8")
OUT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class Dequantize(Op):
    """What every dequantizing op shares: two inputs (the quantized values and their scales), a float
    output `dtype`, and no way back, not even a nearest one, until a quantize op exists."""

    changes_values = True
    min_inputs = 2
    max_inputs = 2
    params = (Param("dtype", "dtype", "bfloat16", f"the output dtype: {', '.join(OUT_DTYPES)}"),)
    what: str = ""  # what it dequantizes, for the reason it gives

    def check(self, p):
        if p.get("dtype", "bfloat16") not in OUT_DTYPES:
            raise OpError(
                f"{self.name} dequantizes to a float dtype, not {p['dtype']}: the output must be one of "
                f"{', '.join(OUT_DTYPES)}",
                hint=f"dtype: {', '.join(OUT_DTYPES)}",
            )

    def loses(self, p):
        return f"{self.name} dequantizes {self.what} (lossy): its inverse would need a quantize op"

    def nearest_inverse(self, p, n_inputs):
        raise NotInvertible(self.loses(p))

    def inverse(self, p, n_inputs):
        return self.nearest_inverse(p, n_inputs)


class DequantFp8(Dequantize):
    name = "dequant_fp8"
    doc = "FP8 e4m3 weight `w` times its block scale grid `s` (`weight_scale_inv`), as `dtype`."
    what = "an FP8 weight with its block scales"

    def infer(self, p, ins):
        w, s = ins
        if w.dtype not in WEIGHT_DTYPES:
            raise OpError(f"dequant_fp8: the weight is {w.dtype}, not {' or '.join(WEIGHT_DTYPES)}")
        if s.dtype not in SCALE_DTYPES:
            raise OpError(f"dequant_fp8: the scale is {s.dtype}, not one of {', '.join(SCALE_DTYPES)}")
        block_shape(w.shape, s.shape)
        return [check_extent(self.name, w.shape, p["dtype"])]

    def apply(self, p, ins):
        return [dequantize(ins[0], ins[1], p["dtype"])]

    def slice_map(self, p, ins, k, region):
        """The whole blocks the region touches, and their scales; narrowed to the region after. Never
        exact (the scales are read too), but a shard of whole blocks reads only its own bytes."""
        w, s = ins
        lead, spans_w, spans_s, narrow = region[:-2], [], [], [(0, b - a) for a, b in region[:-2]]
        for (a, b), block in zip(region[-2:], block_shape(w.shape, s.shape), strict=True):
            lo, hi = a // block, -(-b // block)
            if lo == hi:  # an empty span: one block read, none of it kept (a grid of 0 has no block size)
                lo, hi = (lo - 1, lo) if lo else (0, 1)
            spans_w.append((lo * block, hi * block))
            spans_s.append((lo, hi))
            narrow.append((a - lo * block, b - lo * block))
        reads = ((lead + tuple(spans_w),), (lead + tuple(spans_s),))
        return SliceMap(reads, self, p, 0, tuple(narrow))


def block_shape(weight: tuple[int, ...], scale: tuple[int, ...]) -> tuple[int, int]:
    """The block (rows, cols) of a weight of shape `weight` with a scale grid of shape `scale`,
    derived from the grid as transformers does; OpError when the shapes do not fit."""
    shapes = f"weight {list(weight)}, scale grid {list(scale)}"
    if len(weight) < 2 or len(scale) != len(weight):
        raise OpError(f"dequant_fp8: the weight and its scale grid need the same rank, 2 or more: {shapes}")
    if weight[:-2] != scale[:-2]:
        raise OpError(f"dequant_fp8: the weight and its scale grid differ in their leading dims: {shapes}")
    (rows, cols), (grid_rows, grid_cols) = weight[-2:], scale[-2:]
    if not grid_rows or not grid_cols or rows % grid_rows or cols % grid_cols:
        raise OpError(
            f"dequant_fp8: the weight's last two dims are not divisible by the scale grid's: {shapes}",
            hint="the grid has one scale per block: ceil(dim / block) along each of the last two dims",
        )
    return rows // grid_rows, cols // grid_cols


def dequantize(weight, scale, dtype: str):
    """`weight` times `scale` spread over its blocks, in float32, then cast to `dtype`: the same torch
    operations, in the same order, as transformers' `Fp8Dequantize._dequantize_one`."""
    import torch

    from ..dtypes import DTYPES

    rows, cols = weight.shape[-2:]
    grid_rows, grid_cols = scale.shape[-2:]
    block_rows, block_cols = rows // grid_rows, cols // grid_cols
    w32 = weight.to(torch.float32)
    s32 = (scale.to(torch.float32) - 127.0).exp2() if scale.dtype == torch.uint8 else scale.to(torch.float32)
    q = w32.reshape(-1, grid_rows, block_rows, grid_cols, block_cols)
    s = s32.reshape(-1, grid_rows, grid_cols).unsqueeze(-1).unsqueeze(2)
    return (q * s).to(DTYPES[dtype]).reshape(weight.shape)
