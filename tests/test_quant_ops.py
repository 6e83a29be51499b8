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
    if dtype in (torch.uint8, torch.float8_e8m0fnu):  # E8M0 exponents, as bytes or as their dtype
        return torch.randint(110, 140, shape, generator=gen, dtype=torch.uint8).view(dtype)
    return (torch.rand(shape, generator=gen) * 2 ** torch.randint(-12, 4, shape, generator=gen)).to(dtype)


@pytest.mark.parametrize(("wshape", "sshape"), SHAPES, ids=str)
@pytest.mark.parametrize(
    "sdtype", [torch.float32, torch.bfloat16, torch.uint8, torch.float8_e8m0fnu], ids=str
)
@pytest.mark.parametrize("out", ["bfloat16", "float32", "float16"])
def test_bit_identical_to_transformers(wshape, sshape, sdtype, out):
    """With the block derived from the grid or given: the same bits either way."""
    q, s = _weight(wshape, 1), _scale(sshape, sdtype, 2)
    want = _transformers(q, s, out)
    (got,) = OP.apply({"dtype": out}, [q, s])
    assert bit_equal(got, want)
    assert OP.infer({"dtype": out}, [TensorInfo.of(q), TensorInfo.of(s)]) == [TensorInfo.of(got)]
    block = [wshape[-2] // sshape[-2], wshape[-1] // sshape[-1]]
    (given,) = OP.apply({"dtype": out, "block": block}, [q, s])
    assert bit_equal(given, want)
    assert OP.infer({"dtype": out, "block": block}, [TensorInfo.of(q), TensorInfo.of(s)]) == [
        TensorInfo.of(got)
    ]


def _transformers(q, s, out):
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    return fp8.Fp8Dequantize(None)._dequantize_one(q, s, getattr(torch, out))


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


# ---- dequant_fp8 with a block size: grids of ceil(dim / block) -------------------------------------


def _reference(q, s, out, block):
    """Each element its float32 product with its block's scale, cast: the scale spread by
    repeat_interleave and cropped, independent of the op's pad-and-crop."""
    rows, cols = q.shape[-2:]
    s32 = (s.to(torch.float32) - 127.0).exp2() if s.dtype == torch.uint8 else s.to(torch.float32)
    spread = s32.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :rows, :cols]
    return (q.to(torch.float32) * spread).to(getattr(torch, out))


RAGGED = [
    ((576, 300), [128, 128], (5, 3)),  # DeepSeek-V3's kv_a_proj_with_mqa rows (576 = 4.5 blocks)
    ((2, 10, 7), [4, 3], (2, 3, 3)),  # stacked experts, both dims partial
    ((9, 8), [4, 8], (3, 1)),  # one dim partial, the other whole
    ((3, 5), [8, 8], (1, 1)),  # one block larger than the weight
    ((0, 5), [4, 4], (0, 2)),  # no rows
]


@pytest.mark.parametrize(("wshape", "block", "sshape"), RAGGED, ids=str)
@pytest.mark.parametrize(
    "sdtype", [torch.float32, torch.bfloat16, torch.float8_e8m0fnu, torch.uint8], ids=str
)
@pytest.mark.parametrize("out", ["bfloat16", "float32"])
def test_a_partial_last_block_is_its_float32_product(wshape, block, sshape, sdtype, out):
    q, s = _weight(wshape, 7), _scale(sshape, sdtype, 8)
    (got,) = OP.apply({"dtype": out, "block": block}, [q, s])
    assert bit_equal(got, _reference(q, s, out, block))
    assert OP.infer({"dtype": out, "block": block}, [TensorInfo.of(q), TensorInfo.of(s)]) == [
        TensorInfo.of(got)
    ]


def test_deepseek_v3_kv_a_proj_where_transformers_refuses():
    """576 rows in blocks of 128: transformers derives the block from the grid and raises; with
    block=[128, 128] the whole blocks are transformers' own bits, the last half block its products."""
    q, s = _weight((576, 256), 9), _scale((5, 2), torch.float32, 10)
    with pytest.raises(ValueError, match="not divisible"):
        _transformers(q, s, "bfloat16")
    (got,) = OP.apply({"dtype": "bfloat16", "block": [128, 128]}, [q, s])
    assert bit_equal(got[:512], _transformers(q[:512], s[:4], "bfloat16"))
    assert bit_equal(got[512:], _transformers(q[512:], s[4:], "bfloat16"))  # 64 rows, one grid row


@pytest.mark.parametrize(
    ("block", "sshape", "message"),
    [
        (
            [128, 128],
            (4, 2),
            r"blocks of \[128, 128\] over a weight's last two dims \[576, 256\] need a scale "
            r"grid of \[5, 2\] \(ceil\(dim / block\)\): weight \[576, 256\], scale grid \[4, 2\]",
        ),
        ([128, 64], (5, 2), r"need a scale grid of \[5, 4\]"),
        ([0, 128], (5, 2), r"block must be two positive sizes \[rows, cols\], got \[0, 128\]"),
        ([128], (5, 2), r"block must be two positive sizes"),
    ],
)
def test_a_block_that_does_not_fit_the_grid_is_refused(block, sshape, message):
    infos = [TensorInfo((576, 256), "float8_e4m3fn"), TensorInfo(sshape, "float32")]
    with pytest.raises(OpError, match=message):
        OP.infer({"dtype": "bfloat16", "block": block}, infos)


def test_a_spec_with_a_block_dequantizes_and_binds(tmp_path):
    spec = SPEC.replace("dequant_fp8(w, s)", "dequant_fp8(w, s, block=[4, 4])")
    plan = convspec.compile(parse_spec(spec, "q.cspec"))
    q, s = _weight((6, 5), 11), _scale((2, 2), torch.bfloat16, 12)
    out = plan.apply({"m.weight": q, "m.weight_scale_inv": s})
    assert bit_equal(out["m.weight"], _reference(q, s, "bfloat16", [4, 4]))
    with pytest.raises(
        convspec.BindError, match=r"need a scale grid of \[2, 2\].*\(keys: m\.weight, m\.weight_scale_inv\)"
    ):
        plan.bind({"m.weight": ((6, 5), "float8_e4m3fn"), "m.weight_scale_inv": ((1, 2), "float32")})


def test_a_shard_of_a_ragged_grid_reads_its_blocks_and_their_scales():
    """Rows 512..576 of DeepSeek-V3's kv_a_proj_with_mqa: the last, half block and its scale row."""
    q, s = _weight((576, 256), 13), _scale((5, 2), torch.float32, 14)
    p = {"dtype": "bfloat16", "block": [128, 128]}
    m = OP.slice_map(p, [TensorInfo.of(q), TensorInfo.of(s)], 0, ((512, 576), (0, 256)))
    assert m.reads == ((((512, 576), (0, 256)),), (((4, 5), (0, 2)),))
    assert bit_equal(evaluate(m, [q, s]), OP.apply(p, [q, s])[0][512:576])


# ---- float8_e8m0fnu scales in files ----------------------------------------------------------------


def test_e8m0_scales_load_from_safetensors_as_transformers_reads_them(tmp_path):
    from safetensors.torch import save_file

    from convspec.io.safetensors import read_layout

    q, s = _weight((8, 16), 15), _scale((2, 2), torch.float8_e8m0fnu, 16)
    save_file({"m.weight": q, "m.weight_scale_inv": s}, str(tmp_path / "model.safetensors"))
    layout = read_layout(tmp_path)
    assert layout["m.weight_scale_inv"].info == TensorInfo((2, 2), "float8_e8m0fnu")
    out = _plan().load(tmp_path)
    assert bit_equal(out["m.weight"], _transformers(q, s, "bfloat16"))


def test_e8m0_scales_pass_through_a_convert_byte_for_byte(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    s = _scale((3, 4), torch.float8_e8m0fnu, 17)
    (tmp_path / "src").mkdir()
    save_file({"m.scale": s}, str(tmp_path / "src/model.safetensors"))
    (tmp_path / "id.cspec").write_text("spec id\nrename {p:path}.scale -> {p}.s\n")
    convspec.convert(str(tmp_path / "id.cspec"), tmp_path / "src", tmp_path / "dst")
    with safe_open(str(tmp_path / "dst/model.safetensors"), "pt") as f:
        assert bit_equal(f.get_tensor("m.s"), s)
