"""GGML block types: dequantize (lossy) and quantize, by gguf-py's `gguf.quants` (the optional `gguf`
extra, imported only when an op runs). The type table (names, block sizes) is written here, so a GGUF
reader, a writer and the ops' shape checks need no gguf-py; a test checks it equals gguf-py's."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from .base import NotInvertible, Op, OpError, Param, TensorInfo, check_extent
from .slicing import SliceMap

if TYPE_CHECKING:
    import torch

# GGML type id: (name, elements per block, bytes per block), as gguf-py 0.19.0's GGML_QUANT_SIZES
_TABLE: dict[int, tuple[str, int, int]] = {
    0: ("f32", 1, 4),
    1: ("f16", 1, 2),
    2: ("q4_0", 32, 18),
    3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22),
    7: ("q5_1", 32, 24),
    8: ("q8_0", 32, 34),
    9: ("q8_1", 32, 40),
    10: ("q2_k", 256, 84),
    11: ("q3_k", 256, 110),
    12: ("q4_k", 256, 144),
    13: ("q5_k", 256, 176),
    14: ("q6_k", 256, 210),
    15: ("q8_k", 256, 292),
    16: ("iq2_xxs", 256, 66),
    17: ("iq2_xs", 256, 74),
    18: ("iq3_xxs", 256, 98),
    19: ("iq1_s", 256, 50),
    20: ("iq4_nl", 32, 18),
    21: ("iq3_s", 256, 110),
    22: ("iq2_s", 256, 82),
    23: ("iq4_xs", 256, 136),
    24: ("i8", 1, 1),
    25: ("i16", 1, 2),
    26: ("i32", 1, 4),
    27: ("i64", 1, 8),
    28: ("f64", 1, 8),
    29: ("iq1_m", 256, 56),
    30: ("bf16", 1, 2),
    34: ("tq1_0", 256, 54),
    35: ("tq2_0", 256, 66),
    39: ("mxfp4", 32, 17),
    40: ("nvfp4", 64, 36),
    41: ("q1_0", 128, 18),
}

GGML_TYPES: dict[int, str] = {t: name for t, (name, _, _) in _TABLE.items()}
BLOCK_TYPES: frozenset[int] = frozenset(t for t, (_, n, _) in _TABLE.items() if n > 1)  # quantized blocks
# the block types gguf-py 0.19.0 dequantizes (not q8_1, q8_k, q1_0) and quantizes
DEQUANTIZABLE: frozenset[int] = BLOCK_TYPES - {9, 15, 41}
QUANTIZABLE: frozenset[int] = frozenset({2, 3, 6, 7, 8, 34, 35, 39})
_IDS = {name: t for t, name in GGML_TYPES.items()}
CHUNK_BYTES = 1 << 24  # packed bytes (de)quantized at a time: gguf-py's temporaries stay small
GGUF_HINT = "pip install 'convspec[gguf]'"


def type_id(name: str | int) -> int:
    """The GGML type id of `name` ("q8_0" or "Q8_0"; an id is checked and returned); OpError if unknown."""
    if isinstance(name, int) and not isinstance(name, bool):
        if name not in GGML_TYPES:
            raise OpError(f"unknown GGML type id {name}", hint=f"known ids: {sorted(GGML_TYPES)}")
        return name
    key = str(name).lower()
    if key not in _IDS:
        close = difflib.get_close_matches(key, list(_IDS), 1)
        raise OpError(
            f"unknown GGML type {name!r}",
            hint=(f"did you mean {close[0]!r}? " if close else "") + f"types: {', '.join(_IDS)}",
        )
    return _IDS[key]


def block_size(type: str | int) -> tuple[int, int]:
    """(elements, bytes) of one block of GGML type `type` (a float type's block is one element)."""
    _, n, size = _TABLE[type_id(type)]
    return n, size


def row_bytes(type: str | int, cols: int) -> int:
    """The bytes of a row of `cols` values of GGML type `type`; OpError unless whole blocks."""
    n, size = block_size(type)
    if cols % n:
        raise OpError(
            f"a {GGML_TYPES[type_id(type)]} row of {cols} values is not a whole number of blocks of {n}"
        )
    return cols // n * size


def _gguf_quants():
    """gguf-py's quants module, or OpError saying how to install it."""
    try:
        from gguf import quants
    except ImportError as e:
        raise OpError(f"GGML block types need the gguf package (gguf-py): {e}", hint=GGUF_HINT) from None
    return quants


def _qtype(t: int):
    """gguf-py's enum member for the id `t` (its functions are typed for it)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(t)


def _convert(x: torch.Tensor, out_shape: tuple[int, ...], out_dtype, fn, chunk_rows: int) -> torch.Tensor:
    """`fn` (numpy to numpy, row by row) over the rows of `x`, a chunk at a time, into a new tensor."""
    import numpy as np
    import torch

    if x.device.type == "meta":
        return torch.empty(out_shape, dtype=out_dtype, device="meta")
    out = torch.empty(out_shape, dtype=out_dtype)
    src, dst = x.detach().cpu().contiguous(), out
    if src.numel() and out.numel():
        src, dst = src.reshape(-1, src.shape[-1]), out.view(-1, out.shape[-1])
        with np.errstate(all="ignore"):
            for r in range(0, src.shape[0], chunk_rows):
                dst[r : r + chunk_rows] = torch.from_numpy(fn(src[r : r + chunk_rows].numpy()))
    return out.to(x.device)


class GgmlOp(Op):
    """What dequant_ggml and quantize_ggml share: a `type` parameter, rows of whole blocks, lossy."""

    changes_values = True
    params = (Param("type", "int", doc="the GGML type id (gguf.GGMLQuantizationType): q8_0 is 8"),)
    types: frozenset[int] = frozenset()
    verb = ""

    def check(self, p):
        t = p["type"]
        if t not in self.types:
            what = f"{GGML_TYPES[t]} ({t})" if t in GGML_TYPES else f"unknown type {t}"
            names = ", ".join(f"{GGML_TYPES[k]}={k}" for k in sorted(self.types))
            raise OpError(f"{self.name} cannot {self.verb} GGML {what}", hint=f"types: {names}")

    def inverse(self, p, n_inputs):
        raise NotInvertible(self.loses(p))


class DequantGgml(GgmlOp):
    name = "dequant_ggml"
    doc = "Packed GGML blocks (uint8 rows) to float32 values, by gguf-py. Lossy."
    types = DEQUANTIZABLE
    verb = "dequantize"

    def infer(self, p, ins):
        self.check(p)
        (x,) = ins
        n, size = block_size(p["type"])
        if x.dtype != "uint8" or not x.shape or x.shape[-1] % size:
            raise OpError(
                f"dequant_ggml type={GGML_TYPES[p['type']]} takes uint8 rows of whole {size}-byte blocks, "
                f"got a {x.dtype} tensor of shape {list(x.shape)}"
            )
        return [check_extent(self.name, (*x.shape[:-1], x.shape[-1] // size * n), "float32")]

    def apply(self, p, ins):
        import torch

        (x,) = ins
        (out,) = self.infer(p, [TensorInfo.of(x)])
        quants = _gguf_quants() if x.device.type != "meta" else None
        t = _qtype(p["type"]) if quants else None
        rows = max(1, CHUNK_BYTES // max(1, x.shape[-1]))
        return [_convert(x, out.shape, torch.float32, lambda a: quants.dequantize(a, t), rows)]

    def loses(self, p):
        name = GGML_TYPES.get(p["type"], p["type"])
        return f"dequant_ggml of {name} blocks is lossy: quantizing the values again need not give the same blocks"

    def nearest_inverse(self, p, n_inputs):
        if p["type"] not in QUANTIZABLE:
            raise NotInvertible(
                f"{self.loses(p)}, and gguf-py cannot quantize to {GGML_TYPES.get(p['type'], p['type'])}"
            )
        return "quantize_ggml", {"type": p["type"]}

    def slice_map(self, p, ins, k, region):
        """The whole blocks of its rows the region touches, narrowed after (never exact: bytes in,
        values out)."""
        n, size = block_size(p["type"])
        return _block_map(self, p, region, n, size)


class QuantizeGgml(GgmlOp):
    name = "quantize_ggml"
    doc = "Float rows to packed GGML blocks (uint8), by gguf-py. Lossy."
    types = QUANTIZABLE
    verb = "quantize to"

    def infer(self, p, ins):
        self.check(p)
        (x,) = ins
        n, size = block_size(p["type"])
        if not (x.dtype.startswith("float") or x.dtype == "bfloat16"):
            raise OpError(f"quantize_ggml takes floating-point values, got a {x.dtype} tensor")
        if not x.shape or x.shape[-1] % n:
            raise OpError(
                f"quantize_ggml type={GGML_TYPES[p['type']]}: rows of shape {list(x.shape)} are not a "
                f"whole number of blocks of {n} values"
            )
        return [check_extent(self.name, (*x.shape[:-1], x.shape[-1] // n * size), "uint8")]

    def apply(self, p, ins):
        import torch

        (x,) = ins
        (out,) = self.infer(p, [TensorInfo.of(x)])
        quants = _gguf_quants() if x.device.type != "meta" else None
        t = _qtype(p["type"]) if quants else None
        rows = max(1, CHUNK_BYTES // max(1, 4 * x.shape[-1]))
        return [_convert(x.float(), out.shape, torch.uint8, lambda a: quants.quantize(a, t), rows)]

    def loses(self, p):
        return f"quantize_ggml to {GGML_TYPES.get(p['type'], p['type'])} rounds the values (lossy)"

    def nearest_inverse(self, p, n_inputs):
        return "dequant_ggml", {"type": p["type"]}

    def slice_map(self, p, ins, k, region):
        n, size = block_size(p["type"])
        return _block_map(self, p, region, size, n)


def _block_map(op: Op, p: dict, region, out_block: int, in_block: int) -> SliceMap:
    """Rows map to rows; along the last dim, the output blocks of `out_block` the region touches are
    the input blocks of `in_block` read, and the region is narrowed from them."""
    *lead, (a, b) = region
    lo, hi = a // out_block, -(-b // out_block)
    read = (*lead, (lo * in_block, hi * in_block))
    narrow = (*((0, e - s) for s, e in lead), (a - lo * out_block, b - lo * out_block))
    return SliceMap(((read,),), op, p, 0, narrow)


__all__ = [
    "BLOCK_TYPES",
    "DEQUANTIZABLE",
    "GGML_TYPES",
    "QUANTIZABLE",
    "DequantGgml",
    "QuantizeGgml",
    "block_size",
    "row_bytes",
    "type_id",
]


def dequantize(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """The values of packed GGML blocks (uint8 rows): `dequant_ggml` applied, for a reader decoding a file."""
    return DequantGgml().apply({"type": ggml_type}, [raw])[0]


def quantize(values: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Float rows as packed GGML blocks: `quantize_ggml` applied, for a writer encoding a file."""
    return QuantizeGgml().apply({"type": ggml_type}, [values])[0]
