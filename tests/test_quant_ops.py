"""dequant_fp8: bit for bit transformers 5.23's `Fp8Dequantize._dequantize_one` on the same tensors,
a hand-computed case, and the op in a spec: applied, declared lossy, a bad grid one bind error."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from helpers.tensors import bit_equal, random_tensor

import convspec
from convspec.lint import check_spec
from convspec.ops import OPS, NotInvertible, OpError, TensorInfo
from convspec.ops.quant import quantize_fp8_blocks, quantize_fp8_tensor
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
    found = [f for f in check_spec(str(tmp_path / "q.cspec")).findings if f.code in ("W204", "W209")]
    assert [f.code for f in found] == ["W209"]  # the more specific code, alone


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
    spread = s32.repeat_interleave(min(block[0], rows), -2).repeat_interleave(min(block[1], cols), -1)
    spread = spread[..., :rows, :cols]  # (spread by at most the dim: a block past it is cropped anyway)
    return (q.to(torch.float32) * spread).to(getattr(torch, out))


RAGGED = [
    ((576, 300), [128, 128], (5, 3)),  # DeepSeek-V3's kv_a_proj_with_mqa rows (576 = 4.5 blocks)
    ((2, 10, 7), [4, 3], (2, 3, 3)),  # stacked experts, both dims partial
    ((9, 8), [4, 8], (3, 1)),  # one dim partial, the other whole
    ((3, 5), [8, 8], (1, 1)),  # one block larger than the weight
    ((0, 5), [4, 4], (0, 2)),  # no rows
    ((3, 5), [2**40, 2**62], (1, 1)),  # blocks far past the weight: one block, nothing padded to them
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


# ---- dequant_fp8_tensor: compressed-tensors FP8 ------------------------------------------------------

TENSOR_OP = OPS["dequant_fp8_tensor"]


def _ct_decompress(state_dict, scheme):
    """compressed-tensors' numerics (the package is not installable here), copied as the oracle for
    what transformers calls: `NaiveQuantizationCompressor.decompress` (compressors/naive_quantized/base.py)
    calls `dequantize(x_q, scale, dtype=torch.get_default_dtype())` (quantization/lifecycle/forward.py),
    which infers the strategy from the scale's shape; per tensor or channel `_dequantize` returns
    `x_q.to(scale.dtype) * scale` uncast, per group the same over `unflatten(-1, (groups, size))`, then
    `.to(dtype)`."""
    x, scale = state_dict["weight"], state_dict["weight_scale"]
    if scale.ndim <= 1 or scale.shape[1] == 1:
        out = x.to(scale.dtype) * scale
    else:
        grouped = x.unflatten(-1, (scale.shape[1], x.shape[1] // scale.shape[1]))
        out = (
            (grouped.to(scale.dtype) * scale.unsqueeze(-1))
            .flatten(start_dim=-2)
            .to(torch.get_default_dtype())
        )
    return {**state_dict, "weight": out}


@pytest.fixture
def ct_dequantize(monkeypatch):
    """transformers 5.23's own `CompressedTensorsDequantize.convert` (integrations/compressed_tensors.py,
    lines 73-131), with `compressed_tensors.compressors` (imported at line 81) stubbed by
    `_ct_decompress`: the dense path (lines 85-93) is that, then transformers' `.to(dtype)`; the FP8
    experts path (lines 98-123) is transformers' alone. Returns f(input_dict, dtype) -> its output."""
    ct = pytest.importorskip("transformers.integrations.compressed_tensors")
    compressor = types.SimpleNamespace(decompress=_ct_decompress)
    registry = types.SimpleNamespace(get_value_from_registry=lambda name: compressor)
    monkeypatch.setitem(sys.modules, "compressed_tensors", types.ModuleType("compressed_tensors"))
    stub = types.ModuleType("compressed_tensors.compressors")
    stub.BaseCompressor = registry
    monkeypatch.setitem(sys.modules, "compressed_tensors.compressors", stub)
    scheme = types.SimpleNamespace(
        format="float-quantized", weights=types.SimpleNamespace(type="float", num_bits=8, strategy="channel")
    )
    quantizer = types.SimpleNamespace(compressor=types.SimpleNamespace(quantization_config=None))

    def run(input_dict, dtype):
        model = types.SimpleNamespace(get_parameter=lambda name: torch.empty(0, dtype=getattr(torch, dtype)))
        op = ct.CompressedTensorsDequantize(quantizer, scheme)
        return op.convert(input_dict, [], [], full_layer_name="m.experts.w", model=model)

    return run


# (weight, scale): per tensor ([], [1], and [1, 1] as transformers saves it), per channel, per group
TENSOR_SHAPES = [
    ((16, 24), ()),
    ((16, 24), (1,)),
    ((16, 24), (1, 1)),
    ((16, 24), (16, 1)),
    ((16, 24), (16, 3)),
    ((16, 24), (1, 4)),
]
SCALE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize(("wshape", "sshape"), TENSOR_SHAPES, ids=str)
@pytest.mark.parametrize("sdtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("out", ["bfloat16", "float32", "float16"])
def test_a_linear_is_bit_identical_to_transformers(ct_dequantize, wshape, sshape, sdtype, out):
    """The default: the product in the scale's dtype, as compressed-tensors decompresses a linear."""
    q, s = _weight(wshape, 20), _scale(sshape, sdtype, 21)
    want = ct_dequantize({"weight": [q], "weight_scale": [s]}, out)["m.experts.w"]
    (got,) = TENSOR_OP.apply({"dtype": out}, [q, s])
    assert bit_equal(got, want)
    assert TENSOR_OP.infer({"dtype": out}, [TensorInfo.of(q), TensorInfo.of(s)]) == [TensorInfo.of(got)]


@pytest.mark.parametrize("sshape", [(16, 1), (1, 1), ()], ids=str)
@pytest.mark.parametrize("sdtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("out", ["bfloat16", "float32", "float16"])
def test_stacked_experts_are_bit_identical_to_transformers(ct_dequantize, sshape, sdtype, out):
    """compute=float32: transformers' FP8 experts path, expert by expert, then stacked; the op takes
    the stacked [E, rows, cols] weight with its stacked scales."""
    experts = [(_weight((16, 24), 30 + e), _scale(sshape, sdtype, 40 + e)) for e in range(3)]
    got = ct_dequantize(
        {"m.e.gate.weight": [q for q, _ in experts], "m.e.gate.weight_scale": [s for _, s in experts]}, out
    )
    want = got["m.e.gate.weight"]
    q = torch.stack([q for q, _ in experts])
    s = torch.stack([s.reshape(-1, 1) if s.ndim < 2 else s for _, s in experts])
    (ours,) = TENSOR_OP.apply({"dtype": out, "compute": "float32"}, [q, s])
    assert bit_equal(ours, want)


def test_the_two_transformers_paths_differ_so_compute_chooses(ct_dequantize):
    """A bf16 scale to a float32 output: a linear's product is rounded to bf16, an expert's is not."""
    q, s = _weight((16, 24), 50), _scale((16, 1), torch.bfloat16, 51)
    linear = ct_dequantize({"weight": [q], "weight_scale": [s]}, "float32")["m.experts.w"]
    expert = ct_dequantize({"m.e.weight": [q], "m.e.weight_scale": [s]}, "float32")["m.e.weight"][0]
    assert not bit_equal(linear, expert)
    assert bit_equal(TENSOR_OP.apply({"dtype": "float32"}, [q, s])[0], linear)
    assert bit_equal(TENSOR_OP.apply({"dtype": "float32", "compute": "float32"}, [q, s])[0], expert)


def test_a_hand_computed_per_channel_case():
    q = torch.tensor([[1.0, -2.0, 448.0], [0.5, 3.0, -6.0]]).to(torch.float8_e4m3fn)
    s = torch.tensor([[0.5], [-2.0]])
    (got,) = TENSOR_OP.apply({"dtype": "float32"}, [q, s])
    assert got.tolist() == [[0.5, -1.0, 224.0], [-1.0, -6.0, 12.0]]
    (group,) = TENSOR_OP.apply({"dtype": "float32"}, [q[:, :2], torch.tensor([[1.0, 2.0], [4.0, 8.0]])])
    assert group.tolist() == [[1.0, -4.0], [2.0, 24.0]]


@pytest.mark.parametrize(
    ("weight", "scale", "params", "message"),
    [
        (
            ((8, 6), "float8_e4m3fn"),
            ((8, 4), "float32"),
            {},
            r"4 groups do not divide the weight's 6 columns",
        ),
        (
            ((8, 6), "float8_e4m3fn"),
            ((4, 1), "float32"),
            {},
            r"neither per tensor \(\[\] or \[1\]\), per channel",
        ),
        (((8, 6), "float8_e4m3fn"), ((8,), "float32"), {}, r"weight \[8, 6\], weight_scale \[8\]"),
        (((2, 8, 6), "float8_e4m3fn"), ((3, 8, 1), "float32"), {}, r"neither per tensor"),
        (((6,), "float8_e4m3fn"), ((), "float32"), {}, r"needs 2 dims or more"),
        (((8, 6), "bfloat16"), ((8, 1), "float32"), {}, r"the weight is bfloat16, not float8_e4m3fn"),
        (
            ((8, 6), "float8_e4m3fn"),
            ((8, 1), "uint8"),
            {},
            r"the scale is uint8, not one of float32, bfloat16, float16",
        ),
        (((8, 6), "float8_e4m3fn"), ((8, 1), "float32"), {"compute": "int32"}, r"compute must be one of"),
        (((8, 6), "float8_e4m3fn"), ((8, 1), "float32"), {"dtype": "int8"}, r"float dtype, not int8"),
    ],
)
def test_dequant_fp8_tensor_refuses_what_does_not_fit(weight, scale, params, message):
    with pytest.raises(OpError, match=message):
        TENSOR_OP.infer({"dtype": "bfloat16", **params}, [TensorInfo(*weight), TensorInfo(*scale)])


def test_dequant_fp8_tensor_in_a_spec_is_lossy_and_binds_with_the_keys():
    spec = "spec ct\nconvert w = {p:path}.weight, s = {p:path}.weight_scale -> {p}.weight = dequant_fp8_tensor(w, s)\n"
    plan = convspec.compile(parse_spec(spec, "ct.cspec"))
    q, s = _weight((4, 6), 60), _scale((4, 1), torch.bfloat16, 61)
    out = plan.apply({"m.weight": q, "m.weight_scale": s})
    assert bit_equal(out["m.weight"], TENSOR_OP.apply({"dtype": "bfloat16"}, [q, s])[0])
    assert "dequant_fp8_tensor dequantizes an FP8 weight with its weight_scale (lossy)" in plan.inverse_error
    with pytest.raises(
        convspec.BindError, match=r"weight_scale \[3, 1\] \(keys: m\.weight, m\.weight_scale\)"
    ):
        plan.bind({"m.weight": ((4, 6), "float8_e4m3fn"), "m.weight_scale": ((3, 1), "float32")})


def test_dequant_fp8_tensor_on_meta():
    (got,) = TENSOR_OP.apply(
        {"dtype": "float16"},
        [torch.empty(2, 4, 8, dtype=torch.float8_e4m3fn, device="meta"), torch.empty(2, 4, 2, device="meta")],
    )
    assert (got.device.type, tuple(got.shape), got.dtype) == ("meta", (2, 4, 8), torch.float16)


# ---- quantizers: FP8 checkpoints made here ------------------------------------------------------------

BLOCK_SCALES = ["float32", "bfloat16", "float8_e8m0fnu", "uint8"]


def _bytes(t):
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.parametrize("scale_dtype", BLOCK_SCALES)
@pytest.mark.parametrize(("shape", "block"), [((300, 200), (128, 128)), ((2, 9, 12), (4, 8))], ids=str)
def test_quantize_fp8_blocks_round_trips_near_and_is_a_fixed_point(scale_dtype, shape, block):
    """dequant(quantize(x)) is x to within FP8's step (1/16 of a value, E8M0's saturation 1/8), and
    quantizing an exact (float64) dequantization gives the same bytes back."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(70)) * 3
    q, s = quantize_fp8_blocks(x, block, scale_dtype)
    grid = (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    assert (q.dtype, q.shape, tuple(s.shape[-2:])) == (torch.float8_e4m3fn, x.shape, grid)
    assert str(s.dtype).removeprefix("torch.") == scale_dtype
    back = OP.apply({"dtype": "float64", "block": list(block)}, [q, s])[0]
    step = _reference(torch.ones_like(q), s, "float64", block) * 2**-9  # the smallest FP8 step, scaled
    tolerance = 1 / 8 if scale_dtype in ("float8_e8m0fnu", "uint8") else 1 / 16
    assert bool(((back - x.double()).abs() <= x.double().abs() * tolerance + step).all())
    q2, s2 = quantize_fp8_blocks(back, block, scale_dtype)
    assert bit_equal(q2, q) and torch.equal(_bytes(s2), _bytes(s))


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("per", ["tensor", "channel"])
def test_quantize_fp8_tensor_round_trips_near_and_is_a_fixed_point(scale_dtype, per):
    x = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(71))
    q, s = quantize_fp8_tensor(x, per, scale_dtype)
    assert tuple(s.shape) == ((1,) if per == "tensor" else (3, 16, 1))
    back = TENSOR_OP.apply({"dtype": "float64", "compute": "float64"}, [q, s])[0]
    assert bool(((back - x.double()).abs() <= x.double().abs() / 16 + s.double() * 2**-9).all())
    q2, s2 = quantize_fp8_tensor(back, per, scale_dtype)
    assert bit_equal(q2, q) and bit_equal(s2, s)


def test_quantize_keeps_zeros_and_refuses_what_it_cannot_make():
    q, s = quantize_fp8_blocks(torch.zeros(4, 4), (2, 2))
    assert s.tolist() == [[1.0, 1.0], [1.0, 1.0]] and not bool(q.float().any())
    with pytest.raises(ValueError, match="scale_dtype must be one of"):
        quantize_fp8_blocks(torch.ones(4, 4), (2, 2), "float16")
    with pytest.raises(ValueError, match="per must be"):
        quantize_fp8_tensor(torch.ones(4, 4), "group")


@pytest.mark.parametrize(
    ("sdtype", "out"),
    [(torch.float32, o) for o in ("bfloat16", "float16", "float32")] + [(torch.bfloat16, "bfloat16")],
    ids=str,
)
def test_the_two_paths_agree_where_docs_ops_says(sdtype, out):
    """docs/ops.md: float32 scales, and bfloat16 scales into bfloat16 (finite values)."""
    q, s = random_tensor((16, 24), "float8_e4m3fn", 90, finite=True), _scale((16, 1), sdtype, 91)
    default = TENSOR_OP.apply({"dtype": out}, [q, s])[0]
    assert bit_equal(default, TENSOR_OP.apply({"dtype": out, "compute": "float32"}, [q, s])[0])


def test_lint_marks_dequant_fp8_tensor(tmp_path):
    path = tmp_path / "ct.cspec"
    path.write_text(
        "spec ct\nconvert w = {p:path}.weight, s = {p:path}.weight_scale -> {p}.weight = dequant_fp8_tensor(w, s)\n"
    )
    found = [f for f in check_spec(str(path)).findings if f.code in ("W204", "W209")]
    assert [f.code for f in found] == ["W209"] and "dequant_fp8_tensor" in found[0].message


@pytest.mark.parametrize("sshape", [(), (1,), (2, 8, 1), (2, 8, 4), (2, 1, 2)], ids=str)
def test_a_region_of_dequant_fp8_tensor_from_its_slice_map(sshape):
    """Per tensor (0-D too), per channel, per group: the map's reads make that region of the output."""
    q, s = _weight((2, 8, 12), 100), _scale(sshape, torch.float32, 101)
    p = {"dtype": "float32"}
    whole_out = TENSOR_OP.apply(p, [q, s])[0]
    for region in [((0, 2), (0, 8), (0, 12)), ((1, 2), (3, 7), (2, 9)), ((0, 1), (5, 5), (12, 12))]:
        m = TENSOR_OP.slice_map(p, [TensorInfo.of(q), TensorInfo.of(s)], 0, region)
        assert not m.exact  # the scale is read too
        want = whole_out[tuple(slice(a, b) for a, b in region)]
        assert bit_equal(evaluate(m, [q, s]), want.contiguous())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize(
    "sdtype", [torch.float32, torch.bfloat16, torch.uint8, torch.float8_e8m0fnu], ids=str
)
def test_on_cuda_as_transformers_on_cuda(sdtype):
    q, s = _weight((3, 256, 384), 110).cuda(), _scale((3, 2, 3), sdtype, 111).cuda()
    (got,) = OP.apply({"dtype": "bfloat16"}, [q, s])
    assert got.device.type == "cuda" and bit_equal(got.cpu(), _transformers(q, s, "bfloat16").cpu())
    # against other torch calls (and the CPU): finite values, as a NaN's payload may follow the kernel
    q, s = (
        random_tensor((576, 200), "float8_e4m3fn", 112, finite=True).cuda(),
        _scale((5, 2), sdtype, 113).cuda(),
    )
    (got,) = OP.apply({"dtype": "bfloat16", "block": [128, 128]}, [q, s])
    assert bit_equal(got.cpu(), _reference(q, s, "bfloat16", [128, 128]).cpu())
    t, ts = (
        random_tensor((16, 24), "float8_e4m3fn", 114, finite=True).cuda(),
        _scale((16, 3), torch.bfloat16, 115).cuda(),
    )
    for p in ({"dtype": "float32"}, {"dtype": "bfloat16", "compute": "float32"}):
        assert bit_equal(TENSOR_OP.apply(p, [t, ts])[0].cpu(), TENSOR_OP.apply(p, [t.cpu(), ts.cpu()])[0])


@pytest.mark.parametrize("shape", [(3, 40, 48), (70, 33), (2, 64, 32)], ids=str)
def test_a_weight_dequantized_by_slabs_is_the_weight_dequantized_whole(shape, monkeypatch):
    """Past SLAB values a weight goes by slabs of whole block rows, written into its output: each
    element is still its float32 product, cast (ragged blocks too)."""
    from convspec.ops import quant

    torch.manual_seed(7)
    w = torch.randn(*shape).to(torch.float8_e4m3fn)
    grid = (-(-shape[-2] // 16), -(-shape[-1] // 16))
    s = torch.rand(*shape[:-2], *grid) + 0.1
    whole = quant.dequantize(w, s, "bfloat16", [16, 16])
    monkeypatch.setattr(quant, "SLAB", 16 * 16)  # a slab of one block row (or less)
    slabs = quant.dequantize(w, s, "bfloat16", [16, 16])
    assert torch.equal(whole.view(torch.int16), slabs.view(torch.int16))
    full = s.repeat_interleave(16, -2).repeat_interleave(16, -1)[..., : shape[-2], : shape[-1]]
    assert torch.equal(whole.view(torch.int16), (w.float() * full).to(torch.bfloat16).view(torch.int16))
