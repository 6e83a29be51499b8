"""dequant_mxfp4: MXFP4 (gpt-oss) experts to floats, with transformers 5.23's numerics and layout.

Blocks are uint8 `[*prefix, G, B]`, two FP4 e2m1 values a byte (low nibble first); scales are uint8
`[*prefix, G]`, E8M0 exponents biased by 127. Each value is its FP4 value (looked up in `dtype`) times
`2 ** (scale - 127)` by `torch.ldexp`, as `transformers.integrations.mxfp4.convert_moe_packed_tensors`
computes it; the result `[*prefix, G * B * 2]` then has dims 1 and 2 swapped, as transformers returns
it for gpt-oss (`[E, rows, G, B]` blocks give `[E, G * B * 2, rows]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..dtypes import DTYPES
from .base import OpError, check_extent
from .quant import Dequantize

if TYPE_CHECKING:
    import torch

# the 16 FP4 e2m1 values by nibble, transformers' FP4_VALUES
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
ROWS_PER_CHUNK = 1 << 16  # blocks dequantized at a time: bounds the int32 nibble indices (4 MiB for B=16)


def out_shape(blocks: tuple[int, ...]) -> tuple[int, ...]:
    """The shape transformers returns for blocks of this shape: values flattened, dims 1 and 2 swapped."""
    *prefix, g, b = blocks
    flat = [*prefix, g * b * 2]
    flat[1], flat[2] = flat[2], flat[1]
    return tuple(flat)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: str) -> torch.Tensor:
    """transformers' `_convert_moe_packed_tensors` on these tensors, element for element (chunked by
    rows as it is; each element's value does not depend on the chunk)."""
    import torch

    torch_dtype = DTYPES[dtype]
    shape = out_shape(tuple(blocks.shape))
    if blocks.device.type == "meta" or scales.device.type == "meta":
        return torch.empty(shape, dtype=torch_dtype, device="meta")
    *prefix, g, b = blocks.shape
    rows = blocks.numel() // b if b else scales.numel()
    blk = blocks.to(torch.uint8).reshape(rows, b)
    exp = (scales.to(torch.int32) - 127).reshape(rows, 1)
    lut = torch.tensor(FP4_VALUES, dtype=torch_dtype, device=blocks.device)
    out = torch.empty(rows, b * 2, dtype=torch_dtype, device=blocks.device)
    for r0 in range(0, rows, ROWS_PER_CHUNK):
        part, sub = blk[r0 : r0 + ROWS_PER_CHUNK], out[r0 : r0 + ROWS_PER_CHUNK]
        sub[:, 0::2] = lut[(part & 0x0F).to(torch.int)]
        sub[:, 1::2] = lut[(part >> 4).to(torch.int)]
        torch.ldexp(sub, exp[r0 : r0 + ROWS_PER_CHUNK], out=sub)
    return out.reshape(*prefix, g * b * 2).transpose(1, 2).contiguous()


def quantize(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `dequantize`'s layout and the nearest of its values: `w` (finite, as transformers
    returns gpt-oss experts, `[E, G * block, rows]`, or `out_shape` of more dims) as uint8 blocks
    `[E, rows, G, block / 2]` and E8M0 scales `[E, rows, G]`. Each block's scale is 2 ** (floor(log2(amax)) - 2), the OCP MX rule (values
    past 6 saturate; an all-zero block gets 1), each value the nearest FP4 (ties to even), so quantizing
    a dequantized tensor gives back the same bytes."""
    import torch

    if w.dim() < 3 or block < 2 or block % 2 or w.transpose(1, 2).shape[-1] % block:
        raise ValueError(f"quantize: w {list(w.shape)} is no dequantize output of blocks of {block} values")
    x = w.transpose(1, 2).to(torch.float64)  # [*prefix, G * block], as dequantize makes it before the swap
    x = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = x.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.frexp(amax)[1] - 1 - 2, 0)  # floor(log2(amax)) - 2
    scales = (exp + 127).clamp(0, 254).to(torch.uint8)
    v = x / (scales.to(torch.float64) - 127).exp2().unsqueeze(-1)
    mag = v.abs().clamp(max=6.0)
    code = sum(((mag > t) if down else (mag >= t)).to(torch.uint8) for t, down in FP4_CUTS)
    code = code | torch.signbit(v).to(torch.uint8) << 3
    return code[..., 0::2] | code[..., 1::2] << 4, scales


# where an FP4 magnitude rounds up to the next value, and whether a tie rounds down (to the even code)
FP4_CUTS = ((0.25, True), (0.75, False), (1.25, True), (1.75, False), (2.5, True), (3.5, False), (5.0, True))


class DequantMxfp4(Dequantize):
    name = "dequant_mxfp4"
    doc = (
        "MXFP4 `blocks` (uint8 `[..., G, B]`) with their E8M0 `scales` (uint8 `[..., G]`) to `dtype`, "
        "as transformers' `convert_moe_packed_tensors` returns them. Lossy: no inverse."
    )
    what = "MXFP4 blocks with their scales"

    def infer(self, p, ins):
        self.check(p)
        blocks, scales = ins
        if (blocks.dtype, scales.dtype) != ("uint8", "uint8"):
            raise OpError(
                f"dequant_mxfp4 takes uint8 blocks and uint8 scales, got {blocks.dtype} blocks "
                f"and {scales.dtype} scales"
            )
        if len(blocks.shape) < 4 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
            raise OpError(
                f"dequant_mxfp4: blocks of shape {list(blocks.shape)} need scales of shape "
                f"{list(blocks.shape[:-1])} (one per block), got {list(scales.shape)}"
                if len(blocks.shape) >= 4
                else f"dequant_mxfp4: blocks of shape {list(blocks.shape)} must have 4 dims or more "
                "([experts, rows, groups, bytes], as gpt-oss has them)"
            )
        return [check_extent(self.name, out_shape(tuple(blocks.shape)), p.get("dtype", "bfloat16"))]

    def apply(self, p, ins):
        blocks, scales = ins
        return [dequantize(blocks, scales, p.get("dtype", "bfloat16"))]


__all__ = ["DequantMxfp4", "dequantize", "out_shape", "quantize"]
