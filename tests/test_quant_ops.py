"""dequant_fp8: bit for bit transformers 5.23's `Fp8Dequantize._dequantize_one` on the same tensors,
a hand-computed case, and the op in a spec: applied, declared lossy, a bad grid one bind error."""

from __future__ import annotations

import pytest
import torch
from helpers.tensors import bit_equal, random_tensor

import convspec
from convspec.lint import check_spec
from convspec.ops import OPS, NotInvertible, OpError, TensorInfo
from convspec.ops.slicing import evaluate
from convspec.spec import parse_spec

OP = OPS["dequant_fp8"]
SPEC = (
    "spec q\nconvert w = {p:path}.weight, s = {p:path}.weight_scale_inv -> {p}.weight = dequant_fp8(w, s)\n"
)

# (weight shape, scale grid shape): 2-D and stacked experts, 128 x 128 blocks and small ones
SHAPES = [
    ((256, 384), (2, 3)),
    ((3, 256, 128), (3, 2, 1)),
    ((12, 16), (3, 2)),  # blocks of 4 x 8
    ((2, 4, 8, 16), (2, 4, 2, 2)),
    ((5, 7), (1, 1)),  # one block
    ((6, 8), (6, 8)),  # blocks of 1 x 1
]


def _weight(shape, seed):
    """Random FP8 bits, NaNs (S.1111.111) included: both sides must treat them alike."""
    return random_tensor(shape, "float8_e4m3fn", seed)


def _scale(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:  # E8M0 exponents as bytes
        return torch.randint(110, 140, shape, generator=gen, dtype=torch.uint8)
    return (torch.rand(shape, generator=gen) * 2 ** torch.randint(-12, 4, shape, generator=gen)).to(dtype)


@pytest.mark.parametrize(("wshape", "sshape"), SHAPES, ids=str)
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("out", ["bfloat16", "float32", "float16"])
def test_bit_identical_to_transformers(wshape, sshape, sdtype, out):
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    q, s = _weight(wshape, 1), _scale(sshape, sdtype, 2)
    want = fp8.Fp8Dequantize(None)._dequantize_one(q, s, getattr(torch, out))
    (got,) = OP.apply({"dtype": out}, [q, s])
    assert bit_equal(got, want)
    assert OP.infer({"dtype": out}, [TensorInfo.of(q), TensorInfo.of(s)]) == [TensorInfo.of(got)]


def test_a_hand_computed_case():
    """Blocks of 1 x 2 over a 2 x 4 weight: each pair of a row times its own scale."""
    q = torch.tensor([[1.0, -2.0, 0.5, 448.0], [3.0, 0.0, -1.5, 6.0]]).to(torch.float8_e4m3fn)
    s = torch.tensor([[0.5, 2.0], [-1.0, 0.25]])
    (got,) = OP.apply({"dtype": "float32"}, [q, s])
    assert got.tolist() == [[0.5, -1.0, 1.0, 896.0], [-3.0, -0.0, -0.375, 1.5]]
    (e8m0,) = OP.apply({"dtype": "float32"}, [q, torch.tensor([[126, 128], [127, 129]], dtype=torch.uint8)])
    assert e8m0.tolist() == [[0.5, -1.0, 1.0, 896.0], [3.0, 0.0, -6.0, 24.0]]


@pytest.mark.parametrize(
    ("weight", "scale", "message"),
    [
        (
            ((8, 8), "float8_e4m3fn"),
            ((3, 1), "float32"),
            r"not divisible by the scale grid's: weight \[8, 8\], scale",
        ),
        (((8, 8), "float8_e4m3fn"), ((2, 0), "float32"), "not divisible"),
        (((2, 8, 8), "float8_e4m3fn"), ((3, 2, 2), "float32"), "differ in their leading dims"),
        (((2, 8, 8), "float8_e4m3fn"), ((2, 2), "float32"), "same rank"),
        (((8,), "float8_e4m3fn"), ((1,), "float32"), "same rank, 2 or more"),
        (((8, 8), "bfloat16"), ((2, 2), "float32"), "the weight is bfloat16, not float8_e4m3fn"),
        (((8, 8), "float8_e4m3fn"), ((2, 2), "float16"), "the scale is float16"),
    ],
)
def test_infer_refuses_what_does_not_fit(weight, scale, message):
    with pytest.raises(OpError, match=message):
        OP.infer({"dtype": "bfloat16"}, [TensorInfo(*weight), TensorInfo(*scale)])


def test_the_output_dtype_is_a_float():
    with pytest.raises(OpError, match="the output must be one of"):
        OP.check({"dtype": "int8"})


def test_apply_on_meta():
    (got,) = OP.apply(
        {"dtype": "bfloat16"},
        [
            torch.empty(4, 8, 16, dtype=torch.float8_e4m3fn, device="meta"),
            torch.empty(4, 2, 2, device="meta"),
        ],
    )
    assert (got.device.type, tuple(got.shape), got.dtype) == ("meta", (4, 8, 16), torch.bfloat16)


def test_it_has_no_inverse():
    with pytest.raises(NotInvertible, match="would need a quantize op"):
        OP.inverse({"dtype": "bfloat16"}, 2)
    assert "lossy" in OP.loses({"dtype": "bfloat16"})


def _plan():
    return convspec.compile(parse_spec(SPEC, "q.cspec"))


def test_a_spec_dequantizes_a_state_dict():
    q, s = _weight((2, 16, 8), 3), _scale((2, 4, 2), torch.float32, 4)
    state = {"model.mlp.experts.weight": q, "model.mlp.experts.weight_scale_inv": s}
    out = _plan().apply(state)
    assert list(out) == ["model.mlp.experts.weight"]
    assert bit_equal(out["model.mlp.experts.weight"], OP.apply({"dtype": "bfloat16"}, [q, s])[0])
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    want = fp8.Fp8Dequantize(None)._dequantize_one(q, s, torch.bfloat16)
    assert bit_equal(out["model.mlp.experts.weight"], want)


def test_the_plan_is_lossy_and_its_inverse_refused_with_the_reason(tmp_path):
    """No nearest inverse either: the plan has none at all, and says why."""
    plan = _plan()
    assert (
        "dequant_fp8 dequantizes" in plan.inverse_error and "would need a quantize op" in plan.inverse_error
    )
    with pytest.raises(convspec.NotInvertibleError, match="would need a quantize op"):
        plan.inverse()
    with pytest.raises(convspec.NotInvertibleError, match="would need a quantize op"):
        plan.inverse(allow_lossy=True)
    (tmp_path / "q.cspec").write_text(SPEC)
    found = [f for f in check_spec(str(tmp_path / "q.cspec")).findings if f.code == "W204"]
    assert len(found) == 1 and "dequant_fp8 dequantizes" in found[0].message


def test_a_bad_grid_is_one_bind_error_naming_the_key():
    layout = {"m.weight": ((8, 8), "float8_e4m3fn"), "m.weight_scale_inv": ((3, 1), "float32")}
    with pytest.raises(
        convspec.BindError, match=r"scale grid \[3, 1\] \(keys: m\.weight, m\.weight_scale_inv\)"
    ) as info:
        _plan().bind(layout)
    assert str(info.value).count("not divisible") == 1


def test_a_shard_of_whole_blocks_reads_its_blocks_and_their_scales():
    """Rows 128..256 of a 256 x 384 weight in blocks of 128: one block row and one scale row."""
    q, s = _weight((256, 384), 5), _scale((2, 3), torch.float32, 6)
    region = ((128, 256), (0, 384))
    m = OP.slice_map({"dtype": "bfloat16"}, [TensorInfo.of(q), TensorInfo.of(s)], 0, region)
    assert m.reads == ((((128, 256), (0, 384)),), (((1, 2), (0, 3)),))
    assert bit_equal(evaluate(m, [q, s]), OP.apply({"dtype": "bfloat16"}, [q, s])[0][128:256])
