"""cast: change the dtype; exact (and so invertible) only when every value survives the round trip."""

from __future__ import annotations

from ..dtypes import DTYPES
from .base import NotInvertible, Op, OpError, Param, TensorInfo

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


class Cast(Op):
    name = "cast"
    doc = "Convert to `dtype`. With `from` declared and a widening cast, it is exact and invertible."
    params = (
        Param("dtype", "dtype"),
        Param("from", "dtype", None, "the input dtype: checked, and needed for the inverse"),
    )

    def infer(self, p, ins):
        (x,) = ins
        if p.get("from") is not None and p["from"] != x.dtype:
            raise OpError(f"cast declares from={p['from']} but the input is {x.dtype}")
        return [TensorInfo(x.shape, p["dtype"])]

    def apply(self, p, ins):
        return [ins[0].to(DTYPES[p["dtype"]])]

    def inverse(self, p, n_inputs):
        src, dst = p.get("from"), p["dtype"]
        if src is None:
            raise NotInvertible(f"the inverse of cast(dtype={dst}) needs the input dtype: add from=...")
        if src != dst and (src, dst) not in EXACT:
            raise NotInvertible(f"cast from {src} to {dst} loses information (lossy)")
        return "cast", {"dtype": src, "from": dst}

    def check(self, p):
        for k in ("dtype", "from"):
            if p.get(k) is not None and p[k] not in DTYPES:
                raise OpError(f"unknown dtype {p[k]!r}; known: {', '.join(DTYPES)}")
