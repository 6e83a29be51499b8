"""Dequantizing ops for FP8 (e4m3) weights, each with the numerics of the transformers 5.23 code that
loads that format, so a dequantized output is bit for bit the tensor transformers loads:

- `dequant_fp8`: block-wise scales (`weight_scale_inv`, DeepSeek-V3), as `Fp8Dequantize._dequantize_one`;
- `dequant_fp8_tensor`: compressed-tensors' per-tensor, per-channel or per-group `weight_scale`.

Lossy one way: undoing them would need a quantize op. The `quantize_*` functions (not ops) make such
checkpoints for tests and benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import NotInvertible, Op, OpError, Param, check_extent
from .slicing import SliceMap, whole

if TYPE_CHECKING:
    import torch

WEIGHT_DTYPES = ("float8_e4m3fn",)
# uint8 scales are E8M0 exponents stored as bytes (a scale of 2 ** (byte - 127)), as transformers reads
# them; float8_e8m0fnu is the same exponent as a dtype, which torch converts to float32 itself
SCALE_DTYPES = ("float32", "bfloat16", "float8_e8m0fnu", "uint8")
TENSOR_SCALE_DTYPES = ("float32", "bfloat16", "float16")  # compressed-tensors' weight_scale
OUT_DTYPES = ("float16", "bfloat16", "float32", "float64")
FP8_MAX = 448.0  # the largest float8_e4m3fn


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


def check_dtypes(op: str, w, s, scale_dtypes: tuple[str, ...]) -> None:
    if w.dtype not in WEIGHT_DTYPES:
        raise OpError(f"{op}: the weight is {w.dtype}, not {' or '.join(WEIGHT_DTYPES)}")
    if s.dtype not in scale_dtypes:
        raise OpError(f"{op}: the scale is {s.dtype}, not one of {', '.join(scale_dtypes)}")


class DequantFp8(Dequantize):
    name = "dequant_fp8"
    doc = "FP8 e4m3 weight `w` times its block scale grid `s` (`weight_scale_inv`), as `dtype`."
    what = "an FP8 weight with its block scales"
    params = (
        *Dequantize.params,
        Param(
            "block",
            "ints",
            None,
            "the block [rows, cols]: the grid is ceil(dim / block), the last block "
            "may be partial; default: derived from the grid, which must divide the weight",
        ),
    )

    def check(self, p):
        super().check(p)
        block = p.get("block")
        if block is not None and (len(block) != 2 or min(block) < 1):
            raise OpError(f"dequant_fp8: block must be two positive sizes [rows, cols], got {block}")

    def infer(self, p, ins):
        self.check(p)
        w, s = ins
        check_dtypes(self.name, w, s, SCALE_DTYPES)
        block_shape(w.shape, s.shape, p.get("block"))
        return [check_extent(self.name, w.shape, p["dtype"])]

    def apply(self, p, ins):
        return [dequantize(ins[0], ins[1], p["dtype"], p.get("block"))]

    def slice_map(self, p, ins, k, region):
        """The whole blocks the region touches, and their scales; narrowed to the region after. Never
        exact (the scales are read too), but a shard of whole blocks reads only its own bytes."""
        w, s = ins
        lead, spans_w, spans_s, narrow = region[:-2], [], [], [(0, b - a) for a, b in region[:-2]]
        blocks = block_shape(w.shape, s.shape, p.get("block"))
        for (a, b), block, size in zip(region[-2:], blocks, w.shape[-2:], strict=True):
            lo, hi = a // block, -(-b // block)
            if not size:  # an empty dim (only with `block`: a derived grid of 0 has no block size)
                lo = hi = 0
            elif lo == hi:  # an empty span: one block read, none of it kept
                lo, hi = (lo - 1, lo) if lo else (0, 1)
            spans_w.append((lo * block, min(hi * block, size)))
            spans_s.append((lo, hi))
            narrow.append((a - lo * block, b - lo * block))
        reads = ((lead + tuple(spans_w),), (lead + tuple(spans_s),))
        return SliceMap(reads, self, p, 0, tuple(narrow))


def block_shape(
    weight: tuple[int, ...], scale: tuple[int, ...], block: list[int] | tuple[int, int] | None = None
) -> tuple[int, int]:
    """The block (rows, cols) of a weight of shape `weight` with a scale grid of shape `scale`: `block`
    when given (the grid must then be ceil(dim / block)), else derived from the grid as transformers
    does; OpError when the shapes do not fit."""
    shapes = f"weight {list(weight)}, scale grid {list(scale)}"
    if len(weight) < 2 or len(scale) != len(weight):
        raise OpError(f"dequant_fp8: the weight and its scale grid need the same rank, 2 or more: {shapes}")
    if weight[:-2] != scale[:-2]:
        raise OpError(f"dequant_fp8: the weight and its scale grid differ in their leading dims: {shapes}")
    (rows, cols), (grid_rows, grid_cols) = weight[-2:], scale[-2:]
    if block is not None:
        want = [-(-rows // block[0]), -(-cols // block[1])]
        if [grid_rows, grid_cols] != want:
            raise OpError(
                f"dequant_fp8: blocks of {list(block)} over a weight's last two dims {[rows, cols]} need a "
                f"scale grid of {want} (ceil(dim / block)): {shapes}",
                hint="the grid has one scale per block, the last block of a dim may be partial",
            )
        return block[0], block[1]
    if not grid_rows or not grid_cols or rows % grid_rows or cols % grid_cols:
        raise OpError(
            f"dequant_fp8: the weight's last two dims are not divisible by the scale grid's: {shapes}",
            hint="the grid has one scale per block: ceil(dim / block) along each of the last two dims; "
            "a grid that does not divide needs block=[rows, cols]",
        )
    return rows // grid_rows, cols // grid_cols


def _scale_f32(scale: torch.Tensor) -> torch.Tensor:
    """The scales as float32, as transformers reads them: uint8 bytes are E8M0 exponents."""
    import torch

    if scale.dtype == torch.uint8:
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


SLAB = 1 << 21  # float32 values dequantized at a time (8 MiB): a larger weight goes by slabs of block rows


def dequantize(weight, scale, dtype: str, block: list[int] | tuple[int, int] | None = None):
    """`weight` times `scale` spread over its blocks, in float32, then cast to `dtype`: the same torch
    operations, in the same order, as transformers' `Fp8Dequantize._dequantize_one`. With `block` and
    a last block that is partial, the weight is padded to whole blocks first and the result cropped:
    each element is still its float32 product, cast. A weight of more than SLAB values is dequantized
    slab by slab of whole block rows into its output (each element the same product): the float32
    temporaries stay small, and a fused tensor is written once."""
    import torch

    from ..dtypes import DTYPES

    rows, cols = weight.shape[-2:]
    grid_rows, grid_cols = scale.shape[-2:]
    if block is None:
        sizes = rows // grid_rows, cols // grid_cols
    else:  # a block past its dim is the dim (one block): padded by less than a block, never by a huge one
        sizes = min(block[0], rows) or 1, min(block[1], cols) or 1
    if weight.numel() <= SLAB or weight.device.type == "meta":
        return _dequantize(weight, scale, DTYPES[dtype], sizes)
    out = torch.empty(weight.shape, dtype=DTYPES[dtype], device=weight.device)
    w3, s3, o3 = (
        weight.reshape(-1, rows, cols),
        scale.reshape(-1, grid_rows, grid_cols),
        out.view(-1, rows, cols),
    )
    step = max(1, SLAB // max(sizes[0] * cols, 1))  # block rows a slab holds
    for i in range(w3.shape[0]):
        for g in range(0, grid_rows, step):
            r0, r1 = g * sizes[0], min((g + step) * sizes[0], rows)
            _dequantize(w3[i, r0:r1], s3[i, g : g + step], DTYPES[dtype], sizes, out=o3[i, r0:r1])
    return out


def _dequantize(weight, scale, dtype, sizes: tuple[int, int], out=None):
    """One slab: the float32 product of each element and its block's scale, cast to `dtype` (into
    `out` when given: `copy_` casts as `to` does, without a tensor between)."""
    import torch

    rows, cols = weight.shape[-2:]
    grid_rows, grid_cols = scale.shape[-2:]
    block_rows, block_cols = sizes
    w32 = weight.to(torch.float32)
    padded = (grid_rows * block_rows, grid_cols * block_cols)
    if padded != (rows, cols):
        w32 = torch.nn.functional.pad(w32, (0, padded[1] - cols, 0, padded[0] - rows))
    blocked = (*weight.shape[:-2], grid_rows, block_rows, grid_cols, block_cols)
    q = w32.reshape(blocked)
    s = _scale_f32(scale).unsqueeze(-1).unsqueeze(-3)  # [..., grid_rows, 1, grid_cols, 1]
    if out is not None and padded == (rows, cols):  # the float32 product cast as it is written
        return torch.mul(q, s, out=out.view(blocked))
    q = q.mul_(s).reshape(*weight.shape[:-2], *padded)  # the float32 product, in place (as `q * s`)
    q = q if padded == (rows, cols) else q[..., :rows, :cols]
    if out is not None:
        return out.copy_(q)
    return q.to(dtype).contiguous()


class DequantFp8Tensor(Dequantize):
    name = "dequant_fp8_tensor"
    doc = (
        "compressed-tensors FP8: e4m3 weight `w` times its `weight_scale` `s` (per tensor, channel or "
        "group), multiplied in `compute` (default: the scale's dtype), as `dtype`."
    )
    what = "an FP8 weight with its weight_scale"
    params = (
        *Dequantize.params,
        Param(
            "compute",
            "dtype",
            None,
            "the dtype the product is taken in: default the scale's, as "
            "compressed-tensors decompresses a linear; float32 as transformers dequantizes FP8 experts",
        ),
    )

    def check(self, p):
        super().check(p)
        if p.get("compute") not in (None, *OUT_DTYPES):
            raise OpError(
                f"dequant_fp8_tensor multiplies in a float dtype, not {p['compute']}: compute must be one "
                f"of {', '.join(OUT_DTYPES)}"
            )

    def infer(self, p, ins):
        self.check(p)
        w, s = ins
        check_dtypes(self.name, w, s, TENSOR_SCALE_DTYPES)
        tensor_scale_kind(w.shape, s.shape)
        return [check_extent(self.name, w.shape, p.get("dtype", "bfloat16"))]

    def apply(self, p, ins):
        return [dequantize_tensor(ins[0], ins[1], p.get("dtype", "bfloat16"), p.get("compute"))]

    def slice_map(self, p, ins, k, region):
        """Per channel, the region's rows of the scale; per group, the whole groups its columns touch
        (narrowed after); per tensor, the scale whole. Never exact: the scales are read too."""
        w, s = ins
        narrow = tuple((0, b - a) for a, b in region)
        if tensor_scale_kind(w.shape, s.shape) == "tensor":
            return SliceMap(((region,), (whole(s.shape),)), self, p, 0, narrow)
        (a, b), (c, d) = region[-2:]
        cols, groups = w.shape[-1], s.shape[-1]
        size, lo, hi = 0, 0, groups  # no columns: every group read, each of none
        if cols:
            size = cols // groups
            lo, hi = c // size, -(-d // size)
            if lo == hi:  # an empty span: one group read, none of it kept
                lo, hi = (lo - 1, lo) if lo else (0, 1)
        rows = (a, b) if s.shape[-2] == w.shape[-2] else (0, 1)
        reads = ((region[:-1] + ((lo * size, hi * size),),), (region[:-2] + (rows, (lo, hi)),))
        return SliceMap(reads, self, p, 0, narrow[:-1] + ((c - lo * size, d - lo * size),))


def tensor_scale_kind(weight: tuple[int, ...], scale: tuple[int, ...]) -> str:
    """ "tensor" for a scale of shape [] or [1]; "channel" for [..., rows or 1, 1]; "group" for
    [..., rows or 1, G] with G dividing the weight's columns; else an OpError naming both shapes."""
    shapes = f"weight {list(weight)}, weight_scale {list(scale)}"
    if len(weight) < 2:
        raise OpError(f"dequant_fp8_tensor: the weight needs 2 dims or more: {shapes}")
    if tuple(scale) in ((), (1,)):
        return "tensor"
    (rows, cols), lead = weight[-2:], weight[:-2]
    if len(scale) != len(weight) or tuple(scale[:-2]) != tuple(lead) or scale[-2] not in (rows, 1):
        raise OpError(
            f"dequant_fp8_tensor: the scale fits neither per tensor ([] or [1]), per channel ([..., rows, 1]) "
            f"nor per group ([..., rows, groups]): {shapes}",
            hint="block scales ([..., ceil(rows / block), ceil(cols / block)]) are dequant_fp8's",
        )
    groups = scale[-1]
    if not groups or cols % groups:
        raise OpError(
            f"dequant_fp8_tensor: {groups} groups do not divide the weight's {cols} columns: {shapes}",
            hint="per group, the scale has one column per group of columns",
        )
    return "channel" if groups == 1 else "group"


def dequantize_tensor(weight, scale, dtype: str, compute: str | None = None):
    """`weight` cast to `compute` (default the scale's dtype) times `scale` in it, then cast to `dtype`.
    Default: compressed-tensors' `_dequantize` (`x_q.to(scale.dtype) * scale`, what its
    `decompress` gives transformers for a linear, which casts it to the model's dtype); compute=float32:
    transformers' `CompressedTensorsDequantize` for FP8 experts (`(q.to(f32) * s.to(f32)).to(dtype)`)."""
    import torch

    from ..dtypes import DTYPES

    c = scale.dtype if compute is None else DTYPES[compute]
    if scale.dim() < 2 or scale.shape[-1] == 1:
        return (weight.to(c) * scale.to(c)).to(DTYPES[dtype])
    # per group, shaped as compressed-tensors shapes it (torch's kernels for other shapes may give a
    # NaN another payload), and through float32 as its group path returns it
    groups = scale.shape[-1]
    grouped = weight.to(c).unflatten(-1, (groups, weight.shape[-1] // groups)) * scale.to(c).unsqueeze(-1)
    out = grouped.flatten(start_dim=-2)
    return (out if compute is not None else out.to(torch.float32)).to(DTYPES[dtype])


# ---- quantizers (not ops): FP8 checkpoints made here, for tests and benchmarks --------------------


def _wide(w: torch.Tensor) -> torch.Tensor:
    """`w` in float64 when it is, else float32: the precision amax and the division are taken in (a
    float64 input, as an exact dequantization gives it, makes quantize a fixed point of dequantize)."""
    import torch

    return w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)


def _scales_of(amax: torch.Tensor, scale_dtype: str, allowed: tuple[str, ...]) -> torch.Tensor:
    """amax / 448 as `scale_dtype` (1 for an all-zero block). E8M0 scales (`float8_e8m0fnu`, or
    `uint8` bytes) follow the OCP MX rule, 2 ** (floor(log2(amax)) - 8), values past 448 saturating,
    so that quantizing a dequantized tensor gives back the same scales."""
    import torch

    from ..dtypes import DTYPES

    if scale_dtype not in allowed:
        raise ValueError(f"scale_dtype must be one of {', '.join(allowed)}, not {scale_dtype!r}")
    if scale_dtype in ("float8_e8m0fnu", "uint8"):
        exp = torch.frexp(amax.to(torch.float64))[1] - 1 - 8  # floor(log2(amax)) - 8
        byte = torch.where(amax > 0, exp + 127, 127).clamp(0, 254).to(torch.uint8)
        return byte if scale_dtype == "uint8" else byte.view(torch.float8_e8m0fnu)
    return torch.where(amax > 0, amax / FP8_MAX, 1.0).to(DTYPES[scale_dtype])


def _to_fp8(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x / s, saturated to +-448, as float8_e4m3fn (DeepSeek's `act_quant` divides the same way)."""
    import torch

    s = (s.to(torch.float64) - 127.0).exp2() if s.dtype == torch.uint8 else s.to(torch.float64)
    return (x / s.to(x.dtype)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_fp8_blocks(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), scale_dtype: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` ([..., rows, cols], finite) as DeepSeek-V3 publishes it: float8_e4m3fn values and a grid of
    ceil(dim / block) `weight_scale_inv`, each its block's amax / 448; ragged blocks padded with zeros.
    `dequant_fp8(q, s, block=block)` gives it back to within FP8's precision."""
    import torch

    rows, cols = w.shape[-2:]
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    block = (min(block[0], rows) or 1, min(block[1], cols) or 1)  # a block past its dim is the dim
    x = _wide(w)
    x = torch.nn.functional.pad(x, (0, grid[1] * block[1] - cols, 0, grid[0] * block[0] - rows))
    blocks = x.reshape(*w.shape[:-2], grid[0], block[0], grid[1], block[1])
    scale = _scales_of(blocks.abs().amax(dim=(-3, -1)), scale_dtype, SCALE_DTYPES)
    q = _to_fp8(blocks, scale.unsqueeze(-1).unsqueeze(-3)).reshape(x.shape)
    return q[..., :rows, :cols].contiguous(), scale


def quantize_fp8_tensor(
    w: torch.Tensor, per: str = "tensor", scale_dtype: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` ([..., rows, cols], finite) as compressed-tensors stores FP8: float8_e4m3fn values and a
    `weight_scale` of amax / 448, per tensor (shape [1]) or per channel (shape [..., rows, 1])."""
    x = _wide(w)
    if per == "tensor":
        amax = x.abs().amax().reshape(1)
        scale = _scales_of(amax, scale_dtype, TENSOR_SCALE_DTYPES)
        return _to_fp8(x, scale), scale
    if per == "channel":
        scale = _scales_of(x.abs().amax(dim=-1, keepdim=True), scale_dtype, TENSOR_SCALE_DTYPES)
        return _to_fp8(x, scale), scale
    raise ValueError(f"per must be 'tensor' or 'channel', not {per!r}")
