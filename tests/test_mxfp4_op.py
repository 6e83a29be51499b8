"""dequant_mxfp4 (issue 17, part 4): MXFP4 experts dequantized bit for bit as transformers 5.23's
`convert_moe_packed_tensors` does it, usable in a spec, and declared lossy."""

from __future__ import annotations

import pytest
import torch
from helpers.tensors import bit_equal

import convspec
from convspec.lint import check_spec
from convspec.ops import OPS, NotInvertible, OpError, TensorInfo
from convspec.ops.mxfp4 import quantize

OP = OPS["dequant_mxfp4"]


def _packed(shape, seed, lo=110, hi=135):
    """Random blocks of `shape` ([..., G, B]) and scales with exponents in [lo, hi)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    scales = torch.randint(lo, hi, shape[:-1], generator=gen, dtype=torch.uint8)
    return blocks, scales


def _transformers(blocks, scales, dtype):
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    return mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=getattr(torch, dtype))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize(("lo", "hi"), [(110, 135), (0, 256)], ids=["realistic", "extremes"])
@pytest.mark.parametrize("shape", [(4, 6, 3, 16), (2, 3, 5, 7, 4)], ids=["gpt-oss", "5d"])
def test_bit_identical_to_transformers(dtype, lo, hi, shape):
    blocks, scales = _packed(shape, seed=len(shape) + lo, lo=lo, hi=hi)
    want = _transformers(blocks, scales, dtype)
    got = OP.apply({"dtype": dtype}, [blocks, scales])[0]
    assert bit_equal(got, want.contiguous())
    assert OP.infer({"dtype": dtype}, [TensorInfo.of(blocks), TensorInfo.of(scales)]) == [TensorInfo.of(got)]
    if (lo, hi) == (110, 135):  # finite in every output dtype
        assert bool(torch.isfinite(got.float()).all())


def test_every_byte_and_exponent_matches_transformers():
    """All 256 bytes under all 256 exponents, in one gpt-oss-shaped tensor."""
    blocks = torch.arange(256, dtype=torch.uint8).repeat(256).reshape(1, 256, 16, 16)
    scales = torch.arange(256, dtype=torch.uint8).reshape(1, 256, 1).repeat(1, 1, 16)
    for dtype in ("bfloat16", "float32"):
        want = _transformers(blocks, scales, dtype)
        assert bit_equal(OP.apply({"dtype": dtype}, [blocks, scales])[0], want.contiguous())


def test_a_hand_computed_case():
    """Byte 0x2B: low nibble 0xB is -1.5, high nibble 0x2 is 1.0 (e2m1); scale 129 is 2 ** 2.
    Output [E, G * B * 2, rows]: the values of one block run down dim 1."""
    blocks = torch.zeros(1, 1, 1, 2, dtype=torch.uint8)
    blocks[0, 0, 0, 0] = 0x2B
    blocks[0, 0, 0, 1] = 0xF7  # 6.0, then -6.0
    scales = torch.tensor([[[129]]], dtype=torch.uint8)
    out = OP.apply({"dtype": "float32"}, [blocks, scales])[0]
    assert out.shape == (1, 4, 1) and out.dtype == torch.float32
    assert out.reshape(-1).tolist() == [-6.0, 4.0, 24.0, -24.0]
    assert OPS["dequant_mxfp4"].apply({}, [blocks, scales])[0].dtype == torch.bfloat16  # the default


def test_infer_checks_dtypes_and_shapes():
    blocks, scales = TensorInfo((2, 3, 4, 16), "uint8"), TensorInfo((2, 3, 4), "uint8")
    assert OP.infer({"dtype": "bfloat16"}, [blocks, scales]) == [TensorInfo((2, 128, 3), "bfloat16")]
    with pytest.raises(OpError, match=r"blocks of shape \[2, 3, 4, 16\] need scales of shape \[2, 3, 4\]"):
        OP.infer({"dtype": "bfloat16"}, [blocks, TensorInfo((2, 3, 5), "uint8")])
    with pytest.raises(OpError, match="uint8 blocks and uint8 scales, got uint8 blocks and float32"):
        OP.infer({"dtype": "bfloat16"}, [blocks, TensorInfo((2, 3, 4), "float32")])
    with pytest.raises(OpError, match="4 dims or more"):
        OP.infer({"dtype": "bfloat16"}, [TensorInfo((3, 4, 16), "uint8"), TensorInfo((3, 4), "uint8")])
    with pytest.raises(OpError, match="float dtype, not int8"):
        OP.infer({"dtype": "int8"}, [blocks, scales])


def test_lossy_and_not_invertible():
    assert "lossy" in OP.loses({"dtype": "bfloat16"})
    with pytest.raises(NotInvertible, match="would need a quantize op"):
        OP.inverse({"dtype": "bfloat16"}, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_as_transformers_on_cuda():
    blocks, scales = _packed((4, 6, 3, 16), 5, lo=0, hi=256)
    got = OP.apply({"dtype": "bfloat16"}, [blocks.cuda(), scales.cuda()])[0]
    assert got.device.type == "cuda"
    assert bit_equal(got.cpu(), _transformers(blocks.cuda(), scales.cuda(), "bfloat16").cpu().contiguous())


def test_apply_on_meta():
    blocks, scales = _packed((2, 3, 4, 16), 0)
    out = OP.apply({"dtype": "float32"}, [blocks.to("meta"), scales.to("meta")])[0]
    assert (out.device.type, tuple(out.shape), out.dtype) == ("meta", (2, 128, 3), torch.float32)


SPEC = """spec gptoss_dequant
convert b = {p:path}.gate_up_proj_blocks, s = {p:path}.gate_up_proj_scales
  -> {p}.gate_up_proj = dequant_mxfp4(b, s, dtype=DTYPE)
"""


def _plan(tmp_path, dtype="bfloat16"):
    path = tmp_path / "s.cspec"
    path.write_text(SPEC.replace("DTYPE", dtype))
    return convspec.compile(str(path))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_spec_dequantizes_a_state_dict_as_transformers(tmp_path, dtype):
    plan = _plan(tmp_path, dtype)
    state = {}
    for layer in range(2):
        blocks, scales = _packed((4, 6, 3, 16), layer)
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj_blocks"] = blocks
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj_scales"] = scales
    out = plan.apply(state)
    assert sorted(out) == [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)]
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts.gate_up_proj"
        want = _transformers(state[p + "_blocks"], state[p + "_scales"], dtype)
        assert bit_equal(out[p], want.contiguous())


def test_the_plan_has_no_inverse_and_lint_marks_it(tmp_path):
    """No quantize op exists: the plan has no inverse (not even a best-effort one), with the reason."""
    plan = _plan(tmp_path)
    assert "would need a quantize op" in plan.inverse_error
    with pytest.raises(convspec.NotInvertibleError, match="would need a quantize op"):
        plan.inverse()
    with pytest.raises(convspec.NotInvertibleError, match="would need a quantize op"):
        plan.inverse(allow_lossy=True)
    findings = check_spec(tmp_path / "s.cspec").findings
    assert [f.code for f in findings if f.code in ("W204", "W209")] == ["W209"]  # the specific code, alone


def test_a_bad_scales_shape_is_one_bind_error_naming_the_key(tmp_path):
    plan = _plan(tmp_path)
    layout = {
        "m.experts.gate_up_proj_blocks": ((4, 6, 3, 16), "uint8"),
        "m.experts.gate_up_proj_scales": ((4, 6, 2), "uint8"),
    }
    with pytest.raises(convspec.BindError) as info:
        plan.bind(layout)
    message = str(info.value)
    assert "m.experts.gate_up_proj" in message
    assert "need scales of shape [4, 6, 3]" in message and "got [4, 6, 2]" in message


# ---- quantize: gpt-oss's layout made here, the inverse direction --------------------------------------


@pytest.mark.parametrize("shape", [(2, 64, 5), (3, 4, 2, 64)], ids=str)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_quantize_is_the_inverse_layout_near_in_value_and_a_fixed_point(shape, dtype):
    """`quantize` of a tensor in transformers' layout gives blocks and scales that transformers
    dequantizes back to it within FP4's step, and quantizing that again gives the same bytes."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(80)) * 5).to(getattr(torch, dtype))
    blocks, scales = quantize(x)
    assert blocks.dtype == scales.dtype == torch.uint8
    assert tuple(blocks.shape[:-1]) == tuple(scales.shape) and blocks.shape[-1] == 16
    back = _transformers(blocks, scales, "float32")
    assert back.shape == x.shape
    scale = (scales.to(torch.float32) - 127).exp2()  # [E, rows, G] -> per value, in x's layout
    step = scale.repeat_interleave(32, dim=-1).reshape(*x.transpose(1, 2).shape).transpose(1, 2) / 2
    assert bool(((back - x.float()).abs() <= x.float().abs() / 4 + step).all())
    for again in (back, back.to(getattr(torch, dtype)), OP.apply({"dtype": dtype}, [blocks, scales])[0]):
        b2, s2 = quantize(again)
        assert torch.equal(b2, blocks) and torch.equal(s2, scales)


def test_quantize_rounds_to_the_nearest_fp4_ties_to_even():
    """One block of 32 with amax 7, so scale 2 ** (floor(log2(7)) - 2) = 1 (byte 127): each value its
    nearest FP4, a tie to the even code, 7 saturating to 6, a negative that rounds to 0 kept as -0."""
    values = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -5.5, 7.0, 0.2] + [0.0] * 20
    blocks, scales = quantize(torch.tensor(values).reshape(1, 32, 1))
    assert scales.tolist() == [[[127]]]
    got = _transformers(blocks, scales, "float32").reshape(-1)[:12]
    assert got.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -6.0, 6.0, 0.0]
    assert torch.signbit(got[8]) and not torch.signbit(got[0])
