"""cast: change the dtype; exact (and so invertible) only when every value survives the round trip.

Torch's float casts are exact for every number, but not for NaNs: float32 -> bfloat16 turns every NaN
into one pattern, and other casts set the quiet bit of a signalling NaN or drop its payload. So the
NaNs of a float-to-float cast are rewritten from their bits (`cast_tensor`): the sign is kept, and
the payload is moved to the top of the wider mantissa, or its top bits kept in the narrower one.
A cast and its inverse then give back every bit pattern, NaNs included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..dtypes import DTYPES, ITEMSIZE
from .base import NotInvertible, OnFactors, Op, OpError, Param, check_extent
from .slicing import SliceMap

if TYPE_CHECKING:
    import torch

# (from, to) pairs where every value of `from` is exactly representable in `to`.
_FLOATS = ("float8_e4m3fn", "float8_e5m2", "float16", "bfloat16", "float32", "float64")
EXACT: set[tuple[str, str]] = {
    ("float8_e4m3fn", "float16"),
    ("float8_e4m3fn", "bfloat16"),
    ("float8_e4m3fn", "float32"),
    ("float8_e4m3fn", "float64"),
    ("float8_e5m2", "float16"),
    ("float8_e5m2", "bfloat16"),
    ("float8_e5m2", "float32"),
    ("float8_e5m2", "float64"),
    ("float16", "float32"),
    ("float16", "float64"),
    ("bfloat16", "float32"),
    ("bfloat16", "float64"),
    ("float32", "float64"),
    ("int8", "int16"),
    ("int8", "int32"),
    ("int8", "int64"),
    ("int16", "int32"),
    ("int16", "int64"),
    ("int32", "int64"),
    ("uint8", "int16"),
    ("uint8", "int32"),
    ("uint8", "int64"),
    ("bool", "uint8"),
    ("bool", "int8"),
    ("bool", "int16"),
    ("bool", "int32"),
    ("bool", "int64"),
}


# mantissa bits of each float dtype: a NaN's payload is its mantissa (never zero)
MANTISSA = {"float64": 52, "float32": 23, "float16": 10, "bfloat16": 7, "float8_e4m3fn": 3, "float8_e5m2": 2}
NAN_CHUNK = 1 << 24  # elements looked at for NaNs at a time: the mask stays at 16 MiB for any tensor


def cast_tensor(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """`t` as `dtype`: torch's cast, with every NaN of a float-to-float cast rewritten from its bits
    (see the module docstring), so no payload or sign is lost to torch's choice of NaN."""
    import torch

    src = str(t.dtype).removeprefix("torch.")
    out = t.to(DTYPES[dtype])
    if src == dtype or src not in MANTISSA or dtype not in MANTISSA or t.device.type == "meta":
        return out
    out = out.contiguous()
    flat_in, flat_out = t.reshape(-1), out.view(-1)
    bits_out = flat_out.view(_ints(dtype))
    for start in range(0, flat_in.numel(), NAN_CHUNK):
        part = flat_in[start : start + NAN_CHUNK]
        nan = torch.isnan(part)
        if bool(nan.any()):
            chunk = bits_out[start : start + NAN_CHUNK]
            chunk[nan] = _nan_bits(part[nan].view(_ints(src)), src, dtype)
    return out


def _nan_bits(bits: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """The NaNs `bits` (of `src`, as signed integers of its width) as NaNs of `dst`, same width ints."""
    import torch

    b = bits.to(torch.int64)  # sign-extended: the sign bit is the sign of b
    m_in, m_out, width = MANTISSA[src], MANTISSA[dst], 8 * ITEMSIZE[dst]
    mant = b & ((1 << m_in) - 1)
    if dst == "float8_e4m3fn":  # its only NaN is S.1111.111
        mant = torch.full_like(mant, 7)
    elif m_out >= m_in:
        mant = mant << (m_out - m_in)
    else:  # the payload's top bits; a payload that leaves none is the quiet NaN (not an infinity)
        mant = mant >> (m_in - m_out)
        mant = torch.where(mant == 0, 1 << (m_out - 1), mant)
    value = (((1 << (width - 1 - m_out)) - 1) << m_out) | mant  # all-ones exponent, the payload
    value = torch.where(b < 0, value | -(1 << (width - 1)), value)  # the sign bit (two's complement)
    return value.to(_ints(dst))


class Cast(Op):
    name = "cast"
    doc = "Convert to `dtype`. With `from` declared and a widening cast, it is exact and invertible."
    changes_values = True
    grid_refusal = "would change a quantized weight's values without its scales"
    params = (
        Param("dtype", "dtype"),
        Param("from", "dtype", None, "the input dtype: checked, and needed for the inverse"),
    )

    def infer(self, p, ins):
        (x,) = ins
        if p.get("from") is not None and p["from"] != x.dtype:
            raise OpError(f"cast declares from={p['from']} but the input is {x.dtype}")
        return [check_extent("cast", x.shape, p["dtype"])]

    def apply(self, p, ins):
        return [cast_tensor(ins[0], p["dtype"])]

    def loses(self, p):
        src, dst = p.get("from"), p["dtype"]
        if src is not None and src != dst and (src, dst) not in EXACT:
            return f"cast from {src} to {dst} loses information (lossy)"
        return None

    def inverse(self, p, n_inputs):
        reason = self.loses(p)
        if reason is not None:
            raise NotInvertible(reason)
        return self.nearest_inverse(p, n_inputs)

    def nearest_inverse(self, p, n_inputs):
        """The cast back to `from`: exact for a widening cast, the nearest values for a narrowing one."""
        src, dst = p.get("from"), p["dtype"]
        if src is None:
            raise NotInvertible(f"the inverse of cast(dtype={dst}) needs the input dtype: add from=...")
        return "cast", {"dtype": src, "from": dst}

    def check(self, p):
        for k in ("dtype", "from"):
            if p.get(k) is not None and p[k] not in DTYPES:
                raise OpError(f"unknown dtype {p[k]!r}; known: {', '.join(DTYPES)}")

    def slice_map(self, p, ins, k, region):
        return SliceMap(((region,),), self, p)

    def low_rank(self, p, ins):
        """The factors keep their own dtype: an adapter's precision is its own (float32 factors of a
        bfloat16 model are usual), and casting them would make the adapter plan lossy."""
        return OnFactors(None, None, (ins[0],))


def _ints(dtype: str):
    """The signed integer torch dtype as wide as `dtype`: a view of its bits."""
    import torch

    return getattr(torch, f"int{8 * ITEMSIZE[dtype]}")
