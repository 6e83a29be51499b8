"""Slice maps (issue 16, part 1): for every op, every output and many regions, reading the regions its
map names, applying what it says and narrowing gives exactly that region of the op's output; and a
region aligned to what the op moves is read exactly (no byte outside it), as each op declares."""

from __future__ import annotations

import math
import random

import pytest
import torch

from convspec.ops import OPS, Op, TensorInfo, ggml
from convspec.ops.slicing import SliceMap, evaluate, read_numel, region_numel, take, whole

# (op, params, input shapes): small, with odd sizes, negative dims and more than one part
CASES = [
    ("stack", {"over": "e", "dim": 0}, [(3, 4)] * 5),
    ("stack", {"over": "e", "dim": 1}, [(3, 4)] * 3),
    ("stack", {"over": "e", "dim": -1}, [(2, 3)] * 4),
    ("unstack", {"over": "e", "dim": 0}, [(4, 3, 2)]),
    ("unstack", {"over": "e", "dim": 2}, [(2, 3, 4)]),
    ("cat", {"dim": 0}, [(3, 4), (5, 4), (1, 4)]),
    ("cat", {"dim": 1, "sizes": [2, 3]}, [(4, 2), (4, 3)]),
    ("split", {"dim": 0, "sizes": [2, 5, 1]}, [(8, 3)]),
    ("split", {"dim": -1, "sizes": [3, 1]}, [(2, 4)]),
    ("chunk", {"n": 3, "dim": 0}, [(9, 2)]),
    ("chunk", {"n": 2, "dim": 1}, [(3, 8)]),
    ("transpose", {"dim0": 0, "dim1": 1}, [(3, 5)]),
    ("transpose", {"dim0": -1, "dim1": 0}, [(2, 3, 4)]),
    ("permute", {"dims": [2, 0, 1]}, [(2, 3, 4)]),
    ("reshape", {"shape": [6, 4]}, [(3, 2, 4)]),
    ("reshape", {"shape": [4, -1]}, [(8, 3)]),
    ("reshape", {"shape": [3, 8]}, [(4, 6)]),
    ("permute_rope", {"heads": 3}, [(12, 5)]),
    ("permute_rope", {"heads": 2}, [(8,)]),
    ("unpermute_rope", {"heads": 2}, [(12, 3)]),
    ("interleave", {"dim": 0, "parts": 2}, [(8, 3)]),
    ("interleave", {"dim": 1, "parts": 3}, [(2, 9)]),
    ("deinterleave", {"dim": 0, "parts": 2}, [(8, 3)]),
    ("deinterleave", {"dim": 1, "parts": 3}, [(2, 9)]),
    ("cast", {"dtype": "float64"}, [(3, 4)]),
    ("cast", {"dtype": "bfloat16"}, [(5,)]),
    ("dequant_fp8", {"dtype": "float32"}, [(12, 16), (3, 2)]),
    ("dequant_fp8", {"dtype": "bfloat16"}, [(2, 6, 3), (2, 2, 1)]),
    ("dequant_fp8", {"dtype": "float32", "block": [4, 3]}, [(10, 7), (3, 3)]),  # partial last blocks
    ("dequant_fp8", {"dtype": "float32", "block": [2, 5]}, [(2, 4, 5), (2, 2, 1)]),
    ("dequant_fp8_tensor", {"dtype": "float32"}, [(6, 8), (6, 1)]),  # per channel
    ("dequant_fp8_tensor", {"dtype": "float32"}, [(2, 6, 8), (2, 6, 4)]),  # per group of 2
    ("dequant_fp8_tensor", {"dtype": "bfloat16"}, [(6, 9), (1, 3)]),  # groups shared by the rows
    ("dequant_fp8_tensor", {"dtype": "float32"}, [(5, 4), (1,)]),  # per tensor
    ("dequant_fp8_tensor", {"dtype": "float32", "compute": "float32"}, [(3, 4), (1, 1)]),
    ("dequant_mxfp4", {"dtype": "float32"}, [(2, 3, 2, 4), (2, 3, 2)]),
    ("dequant_mxfp4", {"dtype": "bfloat16"}, [(1, 2, 3, 1, 2), (1, 2, 3, 1)]),
    ("add", {"value": 1}, [(3, 4)]),
    ("log_neg", {}, [(5,)]),
    ("neg_exp", {}, [(3, 4)]),
    ("unsqueeze", {"dim": 1}, [(3, 4)]),
    ("unsqueeze", {"dim": -1}, [(3, 4)]),
    ("unsqueeze", {"dim": 0}, [(5,)]),
    ("squeeze", {"dim": 1}, [(3, 1, 4)]),
    ("squeeze", {"dim": -1}, [(4, 1)]),
    ("regroup_heads", {"groups": 2, "size": 3, "rows": 2}, [(12, 3)]),
    ("regroup_heads", {"groups": 3, "size": 2, "rows": 1, "dim": 1, "offset": 2}, [(2, 8)]),
    ("regroup_heads", {"groups": 2, "size": 2, "rows": 3, "dim": -1, "offset": 1}, [(2, 3, 13)]),
    ("regroup_heads", {"groups": 1, "size": 4, "rows": 2, "offset": 3}, [(11, 2)]),  # one group: a copy
    ("dequant_ggml", {"type": 8}, [(3, 68)]),  # q8_0
    ("dequant_ggml", {"type": 2}, [(2, 3, 36)]),  # q4_0
    ("quantize_ggml", {"type": 8}, [(3, 64)]),
    ("quantize_ggml", {"type": 2}, [(2, 1, 96)]),
    ("block_diag", {"dim": -2, "sizes": [2, 3]}, [(2, 4), (3, 4)]),
    ("block_diag", {"dim": -1, "equal": True}, [(2, 3, 2)] * 3),
    ("unblock_diag", {"n": 2, "dim": -2, "sizes": [1, 3]}, [(4, 6)]),
    ("unblock_diag", {"n": 3, "dim": -1}, [(2, 6, 3)]),
    ("share", {"n": 3}, [(3, 4)]),
    ("same", {}, [(3, 4)] * 2),
    ("flatten", {"dim": 0, "sizes": [2, -1]}, [(2, 3, 4)]),
    ("flatten", {"dim": 1, "sizes": [3, 4]}, [(2, 3, 4)]),
    ("unflatten", {"dim": 1, "sizes": [-1, 2]}, [(3, 4)]),
]
# the dtypes of an op's inputs where they are not float32, input by input (values small and finite)
INPUT_DTYPES = {
    "dequant_fp8": ("float8_e4m3fn", "float32"),
    "dequant_fp8_tensor": ("float8_e4m3fn", "float32"),
    "dequant_mxfp4": ("uint8", "uint8"),
    "dequant_ggml": ("uint8",),
}


def _dtypes(name, shapes) -> list[str]:
    return list(INPUT_DTYPES.get(name, ("float32",) * len(shapes)))


def _inputs(shapes, dtypes=None) -> list[torch.Tensor]:
    n, out = 0, []
    for s, dtype in zip(shapes, dtypes or ["float32"] * len(shapes), strict=True):
        numel = 1  # distinct values everywhere (uint8: modulo 256): a wrong element cannot match by chance
        for d in s:
            numel *= d
        x = torch.arange(n, n + numel, dtype=torch.float32).reshape(s)
        out.append(
            x if dtype == "float32" else (x % 256 if dtype == "uint8" else x).to(getattr(torch, dtype))
        )
        n += numel
    return out


def _values(name, params, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs an op reads as numbers: negative ones for log_neg, GGML blocks of finite scales."""
    if name == "log_neg":
        return [-(x + 1) for x in xs]
    if name == "same":  # parts that share one factor
        return [xs[0]] * len(xs)
    if name == "unblock_diag":  # a block-diagonal tensor of distinct blocks
        (x,) = xs
        n, dim = params["n"], params["dim"]
        sizes = params.get("sizes") or [x.shape[dim] // n] * n
        other = [x.shape[-1 if dim == -2 else -2] // n] * n
        rows, cols = (sizes, other) if dim == -2 else (other, sizes)
        parts = [x[..., :r, :c] + i * 100 for i, (r, c) in enumerate(zip(rows, cols, strict=True))]
        return OPS["block_diag"].apply({"dim": dim}, parts)
    if name == "dequant_ggml":
        t = params["type"]
        n, size = ggml.block_size(t)
        floats = torch.linspace(-3, 3, xs[0].numel() // size * n).reshape(*xs[0].shape[:-1], -1)
        return OPS["quantize_ggml"].apply({"type": t}, [floats])
    return xs


def _regions(shape, rng: random.Random, count: int = 40):
    yield whole(shape)
    for _ in range(count):
        region = []
        for size in shape:
            a = rng.randrange(size + 1)
            region.append((a, rng.randrange(a, size + 1)))
        yield tuple(region)


@pytest.mark.parametrize(
    ("name", "params", "shapes"), CASES, ids=lambda v: str(v) if isinstance(v, str) else ""
)
def test_a_region_made_from_its_map_is_that_region_of_the_output(name, params, shapes):
    op = OPS[name]
    xs = _values(name, params, _inputs(shapes, _dtypes(name, shapes)))
    infos = [TensorInfo(tuple(s), d) for s, d in zip(shapes, _dtypes(name, shapes), strict=True)]
    outs = op.apply(params, xs)
    assert [tuple(o.shape) for o in outs] == [i.shape for i in op.infer(params, infos)]
    rng = random.Random(f"{name}{params}")
    for k, out in enumerate(outs):
        for region in _regions(tuple(out.shape), rng):
            m = op.slice_map(params, infos, k, region)
            assert isinstance(m, SliceMap)
            got = evaluate(m, xs)
            assert torch.equal(got, take(out, region).contiguous()), (k, region, m)
            if m.exact:
                assert read_numel(m) == region_numel(region), (k, region, m)


def _aligned(name, params, shape, inputs, rng):
    """Regions each op promises to read exactly: any region for the ops that move or cast whole
    elements; rows of whole heads for rope; whole periods for interleave; whole rows for reshape."""
    for region in _regions(shape, rng):
        if name in ("permute_rope", "unpermute_rope"):
            rows = shape[0] // params["heads"]
            a, b = region[0]
            region = ((a - a % rows, b - b % rows), *region[1:])
        elif name == "interleave":
            dim, parts = params["dim"] % len(shape), params["parts"]
            a, b = region[dim]
            region = (*region[:dim], (a - a % parts, b - b % parts), *region[dim + 1 :])
        elif name == "reshape":  # output rows that are whole rows of the input
            region = (region[0], *((0, s) for s in shape[1:]))
            out_row, in_row = math.prod(shape[1:]), math.prod(inputs[0][1:])
            if any(i * out_row % in_row for i in region[0]):
                continue
        elif name in ("deinterleave", "dequant_fp8", "dequant_fp8_tensor"):  # dequant_* read the scales too
            continue  # its rows are strided in the input: a covering read, by its own account
        elif name == "dequant_mxfp4":
            continue  # reads its inputs whole (a byte holds two values, a scale a block of them)
        elif name in ("dequant_ggml", "quantize_ggml"):
            continue  # whole blocks of bytes in, values out (or back): never counted as exact
        elif name in ("block_diag", "unblock_diag", "share", "same", "flatten", "unflatten"):
            continue  # LoRA factors, small: read whole (the default map), never counted as exact
        if region_numel(region):  # an empty region reads nothing worth counting
            yield region


@pytest.mark.parametrize(
    ("name", "params", "shapes"), CASES, ids=lambda v: str(v) if isinstance(v, str) else ""
)
def test_an_aligned_region_is_read_exactly(name, params, shapes):
    op = OPS[name]
    infos = [TensorInfo(tuple(s), d) for s, d in zip(shapes, _dtypes(name, shapes), strict=True)]
    rng = random.Random(f"aligned {name}{params}")
    for k, info in enumerate(op.infer(params, infos)):
        for region in _aligned(name, params, info.shape, shapes, rng):
            m = op.slice_map(params, infos, k, region)
            assert m.exact, (k, region, m)
            assert read_numel(m) == region_numel(region)


def test_a_rope_region_through_a_head_reads_the_heads_it_touches():
    """The smallest covering read: the two heads rows 5..7 touch (rows 4..8 of 12), narrowed after."""
    op, infos = OPS["permute_rope"], [TensorInfo((12, 2), "float32")]
    m = op.slice_map({"heads": 3}, infos, 0, ((5, 7), (0, 2)))
    assert m.reads == ((((4, 8), (0, 2)),),) and m.params == {"heads": 1} and not m.exact


def test_an_op_without_a_slice_map_reads_its_inputs_whole_and_says_so():
    class Negate(Op):  # an op that declares no slice map: the default
        name = "negate_for_slices"

        def infer(self, p, ins):
            return list(ins)

        def apply(self, p, ins):
            return [-ins[0]]

    op, (x,) = Negate(), _inputs([(4, 3)])
    m = op.slice_map({}, [TensorInfo((4, 3), "float32")], 0, ((1, 3), (0, 2)))
    assert not m.exact and m.reads == ((whole((4, 3)),),)
    assert torch.equal(evaluate(m, [x]), -x[1:3, 0:2])
