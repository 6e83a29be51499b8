"""Property tests for every op: apply then inverse is the identity bit for bit, infer agrees with
apply, apply runs on the meta device, and lossy ops say so."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers.tensors import DTYPE_NAMES, bit_equal, random_tensor
from hypothesis import given, settings
from hypothesis import strategies as st

import convspec
from convspec.ops import DTYPES, OPS, NotInvertible, TensorInfo, ggml
from convspec.ops.cast import EXACT

SETTINGS = settings(max_examples=30, deadline=None)

dims_st = st.lists(st.integers(1, 4), min_size=0, max_size=3)


def _dim(data, ndim: int) -> int:
    return data.draw(st.integers(-ndim, ndim - 1)) if ndim else 0


def b_stack(data, dtype, seed):
    shape = data.draw(dims_st)
    n = data.draw(st.integers(1, 4))
    dim = data.draw(st.integers(-(len(shape) + 1), len(shape)))
    ins = [random_tensor(shape, dtype, seed + i) for i in range(n)]
    return {"over": "e", "dim": dim}, ins


def b_unstack(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    return {"over": "e", "dim": _dim(data, len(shape))}, [random_tensor(shape, dtype, seed)]


def b_cat(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    dim = _dim(data, len(shape))
    n = data.draw(st.integers(2, 4))
    equal = data.draw(st.booleans())
    sizes = [shape[dim]] * n if equal else data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    ins = []
    for i, s in enumerate(sizes):
        sh = list(shape)
        sh[dim] = s
        ins.append(random_tensor(sh, dtype, seed + i))
    p = {"dim": dim, "sizes": None, "equal": True} if equal else {"dim": dim, "sizes": sizes, "equal": False}
    return p, ins


def b_split(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    dim = _dim(data, len(shape))
    sizes = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=4))
    shape[dim] = sum(sizes)
    return {"dim": dim, "sizes": sizes}, [random_tensor(shape, dtype, seed)]


def b_chunk(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    dim = _dim(data, len(shape))
    n = data.draw(st.integers(1, 4))
    shape[dim] *= n
    return {"n": n, "dim": dim}, [random_tensor(shape, dtype, seed)]


def b_transpose(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    p = {"dim0": _dim(data, len(shape)), "dim1": _dim(data, len(shape))}
    return p, [random_tensor(shape, dtype, seed)]


def b_permute(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    dims = data.draw(st.permutations(range(len(shape))))
    return {"dims": list(dims)}, [random_tensor(shape, dtype, seed)]


def b_reshape(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    target = data.draw(st.permutations(shape))
    target = list(target) if data.draw(st.booleans()) else [math.prod(shape)]
    if data.draw(st.booleans()):
        target[data.draw(st.integers(0, len(target) - 1))] = -1
    from_shape = list(shape)
    if data.draw(st.booleans()):
        from_shape[data.draw(st.integers(0, len(shape) - 1))] = -1
    return {"shape": target, "from_shape": from_shape}, [random_tensor(shape, dtype, seed)]


def _rope(data, dtype, seed):
    heads = data.draw(st.integers(1, 3))
    half = data.draw(st.integers(1, 3))
    shape = [heads * 2 * half] + data.draw(st.lists(st.integers(1, 4), max_size=1))
    return {"heads": heads}, [random_tensor(shape, dtype, seed)]


def _interleave(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    dim = _dim(data, len(shape))
    parts = data.draw(st.integers(1, 3))
    shape[dim] *= parts
    return {"dim": dim, "parts": parts}, [random_tensor(shape, dtype, seed)]


EXACT_PAIRS = sorted(EXACT)


def b_cast(data, dtype, seed):
    src, dst = data.draw(st.sampled_from(EXACT_PAIRS))
    shape = data.draw(dims_st)
    # random bits, NaNs of every payload included: the cast keeps them (test_hostile_bind checks all)
    return {"dtype": dst, "from": src}, [random_tensor(shape, src, seed)]


def b_dequant_mxfp4(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 3), min_size=4, max_size=5))  # [..., G, B], rank 4+
    out = data.draw(st.sampled_from(["bfloat16", "float16", "float32"]))
    return {"dtype": out}, [random_tensor(shape, "uint8", seed), random_tensor(shape[:-1], "uint8", seed + 1)]


FLOATS = ("float32", "bfloat16", "float16")


def _float(dtype: str) -> str:
    """The drawn dtype where it is one the value ops take, else float32."""
    return dtype if dtype in FLOATS else "float32"


def b_add(data, dtype, seed):
    shape = data.draw(dims_st)
    return {"value": data.draw(st.integers(-4, 4))}, [random_tensor(shape, _float(dtype), seed)]


def b_value(data, dtype, seed):  # log_neg, neg_exp: any values (NaNs and infs included)
    return {}, [random_tensor(data.draw(dims_st), _float(dtype), seed)]


def b_unsqueeze(data, dtype, seed):
    shape = data.draw(dims_st)
    dim = data.draw(st.integers(-(len(shape) + 1), len(shape)))
    return {"dim": dim}, [random_tensor(shape, dtype, seed)]


def b_squeeze(data, dtype, seed):
    shape = data.draw(dims_st)
    dim = data.draw(st.integers(0, len(shape)))
    shape.insert(dim, 1)
    if data.draw(st.booleans()):
        dim -= len(shape)
    return {"dim": dim}, [random_tensor(shape, dtype, seed)]


def b_regroup_heads(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    dim = _dim(data, len(shape))
    a, b, r, offset = (data.draw(st.integers(lo, 3)) for lo in (1, 1, 1, 0))
    shape[dim] = offset + a * b * r
    p = {"groups": a, "size": b, "rows": r, "dim": dim, "offset": offset}
    return p, [random_tensor(shape, dtype, seed)]


def _diagonal_parts(data, dtype, seed):
    """Parts for block_diag: leading dims alike, one rank (the other of the last two dims) shared."""
    lead = data.draw(st.lists(st.integers(1, 3), max_size=1))
    dim = data.draw(st.sampled_from([-2, -1]))
    n, rank = data.draw(st.integers(2, 4)), data.draw(st.integers(1, 3))
    equal = data.draw(st.booleans())
    sizes = (
        [data.draw(st.integers(1, 3))] * n
        if equal
        else data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    )
    shapes = [[*lead, s, rank] if dim == -2 else [*lead, rank, s] for s in sizes]
    ins = [random_tensor(sh, dtype, seed + i) for i, sh in enumerate(shapes)]
    return dim, sizes, equal, ins


def b_block_diag(data, dtype, seed):
    dim, sizes, equal, ins = _diagonal_parts(data, dtype, seed)
    return {"dim": dim, "sizes": None if equal else sizes, "equal": equal}, ins


def b_unblock_diag(data, dtype, seed):
    dim, sizes, equal, ins = _diagonal_parts(data, dtype, seed)
    (x,) = OPS["block_diag"].apply({"dim": dim}, ins)
    return {"n": len(ins), "dim": dim, "sizes": None if equal else sizes}, [x]


def b_share(data, dtype, seed):
    return {"n": data.draw(st.integers(1, 4))}, [random_tensor(data.draw(dims_st), dtype, seed)]


def b_same(data, dtype, seed):  # copies of one tensor, bit for bit (NaNs and -0.0 included)
    x = random_tensor(data.draw(dims_st), dtype, seed)
    return {}, [x.clone() for _ in range(data.draw(st.integers(1, 4)))]


def b_flatten(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 3), min_size=2, max_size=4))
    dim = data.draw(st.integers(0, len(shape) - 2))
    sizes = shape[dim : dim + data.draw(st.integers(2, len(shape) - dim))]
    if data.draw(st.booleans()):
        sizes[data.draw(st.integers(0, len(sizes) - 1))] = -1
    return {"dim": dim, "sizes": sizes}, [random_tensor(shape, dtype, seed)]


def b_unflatten(data, dtype, seed):
    shape = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    dim = data.draw(st.integers(0, len(shape) - 1))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=2, max_size=3))
    shape[dim] = math.prod(sizes)
    if data.draw(st.booleans()):
        sizes[data.draw(st.integers(0, len(sizes) - 1))] = -1
    return {"dim": dim, "sizes": sizes}, [random_tensor(shape, dtype, seed)]


GGML = st.sampled_from(sorted(ggml.DEQUANTIZABLE))


def b_dequant_ggml(data, dtype, seed):
    t = data.draw(GGML)
    shape = data.draw(st.lists(st.integers(1, 3), max_size=2)) + [
        ggml.block_size(t)[1] * data.draw(st.integers(0, 2))
    ]
    return {"type": t}, [random_tensor(shape, "uint8", seed)]


def b_quantize_ggml(data, dtype, seed):
    t = data.draw(st.sampled_from(sorted(ggml.QUANTIZABLE)))
    shape = data.draw(st.lists(st.integers(1, 3), max_size=2)) + [
        ggml.block_size(t)[0] * data.draw(st.integers(0, 2))
    ]
    return {"type": t}, [random_tensor(shape, _float(dtype), seed, finite=True)]


BUILDERS = {
    "stack": b_stack,
    "unstack": b_unstack,
    "cat": b_cat,
    "split": b_split,
    "chunk": b_chunk,
    "transpose": b_transpose,
    "permute": b_permute,
    "reshape": b_reshape,
    "permute_rope": _rope,
    "unpermute_rope": _rope,
    "interleave": _interleave,
    "deinterleave": _interleave,
    "cast": b_cast,
    "dequant_mxfp4": b_dequant_mxfp4,
    "add": b_add,
    "log_neg": b_value,
    "neg_exp": b_value,
    "unsqueeze": b_unsqueeze,
    "squeeze": b_squeeze,
    "regroup_heads": b_regroup_heads,
    "dequant_ggml": b_dequant_ggml,
    "quantize_ggml": b_quantize_ggml,
    "block_diag": b_block_diag,
    "unblock_diag": b_unblock_diag,
    "share": b_share,
    "same": b_same,
    "flatten": b_flatten,
    "unflatten": b_unflatten,
}


ONE_WAY = {"dequant_fp8", "dequant_fp8_tensor"}  # no inverse by design: tests/test_quant_ops.py tests them
ONE_WAY |= {"no_low_rank"}  # refuses whatever it is given: tests/test_lowrank_ops.py tests it


def test_every_op_has_a_builder():
    assert set(BUILDERS) | ONE_WAY == set(OPS)


def _infos(ts):
    return [TensorInfo.of(t) for t in ts]


@pytest.mark.parametrize("name", sorted(BUILDERS))
@SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPE_NAMES), seed=st.integers(0, 2**31))
def test_apply_then_inverse_is_identity(name, data, dtype, seed):
    op = OPS[name]
    p, ins = BUILDERS[name](data, dtype, seed)
    op.check(p)
    outs = op.apply(p, ins)
    assert len(outs) == (op.n_outputs(p) if not op.expands else len(outs))
    # infer agrees with apply, before any data is read
    assert op.infer(p, _infos(ins)) == _infos(outs)
    if op.loses(p) is not None:  # a lossy op (a dequantization) has no exact inverse, and says why
        with pytest.raises(NotInvertible, match=re.escape(op.loses(p))):
            op.inverse(p, len(ins))
        return
    # the inverse undoes it bit for bit
    inv_name, inv_p = op.inverse(p, len(ins))
    inv = OPS[inv_name]
    inv.check(inv_p)
    back = inv.apply(inv_p, outs)
    assert inv.infer(inv_p, _infos(outs)) == _infos(ins)
    assert len(back) == len(ins)
    for a, b in zip(back, ins, strict=True):
        assert bit_equal(a, b)
    # the inverse of the inverse is the op again (same effect); only a widening cast's inverse
    # (a narrowing cast) has none of its own: a Plan keeps the forward rules for that
    try:
        again_name, again_p = inv.inverse(inv_p, len(outs))
    except NotInvertible:
        assert name == "cast" and p["from"] != p["dtype"]
        return
    again = OPS[again_name].apply(again_p, back)
    assert all(bit_equal(a, b) for a, b in zip(again, outs, strict=True))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPE_NAMES), seed=st.integers(0, 2**31))
def test_apply_on_meta(name, data, dtype, seed):
    op = OPS[name]
    p, ins = BUILDERS[name](data, dtype, seed)
    outs = op.apply(p, ins)
    metas = op.apply(p, [t.to("meta") for t in ins])
    assert len(metas) == len(outs)
    for m, o in zip(metas, outs, strict=True):
        assert m.device.type == "meta"
        assert (m.shape, m.dtype) == (o.shape, o.dtype)


# ---- lossy ops ------------------------------------------------------------------------------


def test_every_narrowing_cast_is_lossy():
    for src in DTYPES:
        for dst in DTYPES:
            p = {"dtype": dst, "from": src}
            if src == dst or (src, dst) in EXACT:
                assert OPS["cast"].inverse(p, 1) == ("cast", {"dtype": src, "from": dst})
            else:
                with pytest.raises(NotInvertible, match="lossy"):
                    OPS["cast"].inverse(p, 1)


@pytest.mark.parametrize(("src", "dst"), [("float32", "bfloat16"), ("bfloat16", "float16"), ("int8", "bool")])
def test_narrowing_cast_really_loses_values(src, dst):
    x = random_tensor((64,), src, 0, finite=True)
    y = OPS["cast"].apply({"dtype": dst}, [x])[0]
    back = OPS["cast"].apply({"dtype": src}, [y])[0]
    assert not bit_equal(back, x)


def test_cast_without_from_is_not_invertible():
    with pytest.raises(NotInvertible, match="from="):
        OPS["cast"].inverse({"dtype": "float32", "from": None}, 1)


def test_cat_without_sizes_or_equal_is_not_invertible():
    with pytest.raises(NotInvertible, match="sizes"):
        OPS["cat"].inverse({"dim": 0, "sizes": None, "equal": False}, 2)


def test_reshape_without_from_shape_is_not_invertible():
    with pytest.raises(NotInvertible, match="from_shape"):
        OPS["reshape"].inverse({"shape": [4], "from_shape": None}, 1)


def _plan(tmp_path, text):
    path = tmp_path / "s.cspec"
    path.write_text(text)
    return convspec.compile(str(path))


def test_plan_with_narrowing_cast_is_lossy(tmp_path):
    plan = _plan(
        tmp_path, "spec s\nconvert x = {p:path}.w\n  -> {p}.v = cast(x, dtype=bfloat16, from=float32)\n"
    )
    assert len(plan.lossy) == 1 and "float32 to bfloat16 loses information" in plan.lossy[0]
    with pytest.raises(convspec.NotInvertibleError, match="cannot be inverted exactly"):
        plan.inverse()
    inv = plan.inverse(allow_lossy=True)
    x = torch.tensor([1.0, 2.0], dtype=torch.float32)
    back = inv.apply(plan.apply({"a.w": x}))
    assert back["a.w"].dtype == torch.float32 and torch.equal(back["a.w"], x)


def test_plan_with_cat_without_sizes_has_no_inverse(tmp_path):
    plan = _plan(tmp_path, "spec s\nconvert a = {p:path}.a, b = {p:path}.b\n  -> {p}.ab = cat(a, b)\n")
    assert plan.inverse_error is not None and "needs the part sizes" in plan.inverse_error
    with pytest.raises(convspec.NotInvertibleError, match="needs the part sizes"):
        plan.inverse(allow_lossy=True)


def test_plan_with_widening_cast_is_exact(tmp_path):
    plan = _plan(
        tmp_path, "spec s\nconvert x = {p:path}.w\n  -> {p}.v = cast(x, dtype=float32, from=bfloat16)\n"
    )
    assert plan.lossy == ()
    x = random_tensor((5, 3), "bfloat16", 3, finite=True)
    out = plan.apply({"m.w": x})
    assert out["m.v"].dtype == torch.float32
    assert bit_equal(plan.inverse().apply(out)["m.w"], x)


def test_cast_nan_payload():  # torch alone quiets this signaling NaN; the cast op keeps its bits
    x = torch.tensor([0x7C01], dtype=torch.int16).view(torch.float16)  # a signaling NaN
    y = OPS["cast"].apply({"dtype": "float32"}, [x])[0]
    back = OPS["cast"].apply({"dtype": "float16"}, [y])[0]
    assert bit_equal(back, x)
