"""GGML block ops (convspec/ops/ggml.py): dequant_ggml and quantize_ggml bit for bit gguf-py's, the
type table equal to gguf-py's, the lossy declarations, and the errors."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

import convspec
from convspec.errors import ConvspecError
from convspec.ops import OPS, NotInvertible, OpError, TensorInfo, ggml
from convspec.spec import parse_spec

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

Q4_0, Q8_0, Q4_K, Q6_K = 2, 8, 12, 14


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _dequant(t: int, data: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(data)
    (out,) = OPS["dequant_ggml"].apply({"type": t}, [x])
    assert OPS["dequant_ggml"].infer({"type": t}, [TensorInfo.of(x)]) == [TensorInfo.of(out)]
    return out


def test_the_type_table_is_gguf_pys():
    assert ggml.GGML_TYPES == {t.value: t.name.lower() for t in GGMLQuantizationType}
    assert {t: ggml.block_size(t) for t in ggml.GGML_TYPES} == {
        t.value: s for t, s in GGML_QUANT_SIZES.items()
    }
    assert ggml.BLOCK_TYPES == {t.value for t, (n, _) in GGML_QUANT_SIZES.items() if n > 1}


def _supported(fn, t: int) -> bool:
    n, size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
    try:
        if fn is quants.quantize:
            fn(np.zeros((1, n), dtype=np.float32), GGMLQuantizationType(t))
        else:
            fn(np.zeros((1, size), dtype=np.uint8), GGMLQuantizationType(t))
    except NotImplementedError:
        return False
    return True


def test_the_types_each_op_takes_are_those_gguf_py_supports():
    assert ggml.DEQUANTIZABLE == {t for t in ggml.BLOCK_TYPES if _supported(quants.dequantize, t)}
    assert ggml.QUANTIZABLE == {t for t in ggml.BLOCK_TYPES if _supported(quants.quantize, t)}
    assert {Q4_0, Q8_0, Q4_K, Q6_K} <= ggml.DEQUANTIZABLE and {Q4_0, Q8_0} <= ggml.QUANTIZABLE


def test_helpers():
    assert ggml.type_id("q8_0") == ggml.type_id("Q8_0") == 8 and ggml.type_id(14) == 14
    assert (
        ggml.block_size("f32") == (1, 4)
        and ggml.block_size("bf16") == (1, 2)
        and ggml.block_size(8) == (32, 34)
    )
    assert ggml.row_bytes("q4_k", 512) == 288 and ggml.row_bytes("f16", 3) == 6
    with pytest.raises(OpError, match="unknown GGML type 'Q8-0'") as e:
        ggml.type_id("Q8-0")
    assert "did you mean 'q8_0'?" in e.value.hint
    with pytest.raises(OpError, match="unknown GGML type id 4"):
        ggml.type_id(4)
    with pytest.raises(OpError, match="a q8_0 row of 40 values is not a whole number of blocks of 32"):
        ggml.row_bytes("q8_0", 40)


@pytest.mark.parametrize("t", [Q8_0, Q4_0])
def test_quantize_and_dequant_are_gguf_pys(t):
    data = np.random.default_rng(t).standard_normal((3, 5, 128)).astype(np.float32)
    x = torch.from_numpy(data)
    (q,) = OPS["quantize_ggml"].apply({"type": t}, [x])
    expected = quants.quantize(data, GGMLQuantizationType(t))
    assert q.dtype == torch.uint8 and np.array_equal(q.numpy(), expected)
    assert OPS["quantize_ggml"].infer({"type": t}, [TensorInfo.of(x)]) == [TensorInfo.of(q)]
    out = _dequant(t, expected)
    assert torch.equal(
        _bits(out), _bits(torch.from_numpy(quants.dequantize(expected, GGMLQuantizationType(t))))
    )
    assert out.shape == x.shape and (out - x).abs().max() < 0.5  # near: it rounds


def _k_blocks(t: int, n: int, seed: int) -> np.ndarray:
    """Random K-quant blocks whose f16 scale fields are sane numbers (not NaN or inf)."""
    rng = np.random.default_rng(seed)
    size = GGML_QUANT_SIZES[GGMLQuantizationType(t)][1]
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    halves = {Q4_K: (0, 2), Q6_K: (208,)}[t]  # Q4_K: d, dmin first; Q6_K: d last
    for at in halves:
        blocks[:, at : at + 2] = rng.uniform(-1, 1, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks


@pytest.mark.parametrize("t", [Q4_K, Q6_K])
def test_dequant_of_k_blocks_is_gguf_pys(t):
    blocks = _k_blocks(t, 6, t).reshape(2, 3 * GGML_QUANT_SIZES[GGMLQuantizationType(t)][1])
    out = _dequant(t, blocks)
    expected = quants.dequantize(blocks, GGMLQuantizationType(t))
    assert out.shape == (2, 768) and torch.isfinite(out).all()
    assert torch.equal(_bits(out), _bits(torch.from_numpy(expected)))


@pytest.mark.parametrize("t", sorted(ggml.DEQUANTIZABLE))
def test_every_dequantizable_type_on_random_bytes_is_gguf_pys(t, monkeypatch):
    """Random bytes (NaN scales included) and rows a chunk at a time: the same bits as one call."""
    size = ggml.block_size(t)[1]
    data = np.random.default_rng(t).integers(0, 256, (5, 2 * size), dtype=np.uint8)
    monkeypatch.setattr(ggml, "CHUNK_BYTES", 1)  # a row per chunk
    with np.errstate(all="ignore"):
        expected = quants.dequantize(data, GGMLQuantizationType(t))
    assert torch.equal(_bits(_dequant(t, data)), _bits(torch.from_numpy(expected)))


def test_both_are_lossy_with_each_other_as_nearest_inverse():
    deq, qu = OPS["dequant_ggml"], OPS["quantize_ggml"]
    for op, other in ((deq, "quantize_ggml"), (qu, "dequant_ggml")):
        p = {"type": Q8_0}
        assert "lossy" in op.loses(p) and op.changes_values
        assert op.nearest_inverse(p, 1) == (other, p)
        with pytest.raises(NotInvertible, match=re.escape(op.loses(p))):
            op.inverse(p, 1)
    with pytest.raises(NotInvertible, match="gguf-py cannot quantize to q6_k"):
        deq.nearest_inverse({"type": Q6_K}, 1)


def test_shape_and_type_errors():
    deq, qu = OPS["dequant_ggml"], OPS["quantize_ggml"]
    with pytest.raises(
        OpError,
        match=re.escape(
            "dequant_ggml type=q8_0 takes uint8 rows of whole 34-byte blocks, got a uint8 tensor of shape [2, 35]"
        ),
    ):
        deq.infer({"type": Q8_0}, [TensorInfo((2, 35), "uint8")])
    with pytest.raises(OpError, match="got a float32 tensor"):
        deq.infer({"type": Q8_0}, [TensorInfo((2, 34), "float32")])
    with pytest.raises(
        OpError, match=re.escape("rows of shape [2, 40] are not a whole number of blocks of 32 values")
    ):
        qu.infer({"type": Q8_0}, [TensorInfo((2, 40), "float32")])
    with pytest.raises(OpError, match="quantize_ggml takes floating-point values, got a int8 tensor"):
        qu.infer({"type": Q8_0}, [TensorInfo((2, 32), "int8")])
    for t in (0, 1, 30):  # f32, f16, bf16: not block types
        with pytest.raises(
            OpError, match=f"dequant_ggml cannot dequantize GGML {ggml.GGML_TYPES[t]} \\({t}\\)"
        ):
            deq.check({"type": t})
    with pytest.raises(OpError, match="quantize_ggml cannot quantize to GGML q4_k"):
        qu.check({"type": Q4_K})
    with pytest.raises(OpError, match="unknown type 99"):
        deq.check({"type": 99})


def test_without_gguf_the_ops_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setitem(sys.modules, "gguf.quants", None)
    assert ggml.row_bytes("q8_0", 64) == 68  # the table needs no gguf-py, nor do compiling and binding
    plan = convspec.compile(
        parse_spec("spec s\nconvert q = {p:path}.q -> {p}.w = dequant_ggml(q, type=8)\n", "s.cspec")
    )
    assert plan.bind({"m.q": ((2, 68), "uint8")}).plan is plan
    with pytest.raises(ConvspecError, match="need the gguf package") as e:
        OPS["dequant_ggml"].apply({"type": Q8_0}, [torch.zeros(1, 34, dtype=torch.uint8)])
    assert e.value.hint == "pip install 'convspec[gguf]'"


def test_on_meta_nothing_is_computed(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    (out,) = OPS["dequant_ggml"].apply(
        {"type": Q4_K}, [torch.empty(3, 288, dtype=torch.uint8, device="meta")]
    )
    assert out.device.type == "meta" and out.shape == (3, 512) and out.dtype == torch.float32


@pytest.mark.parametrize("t", [Q4_0, Q8_0, Q4_K, Q6_K])
def test_dequant_is_transformers_own_gguf_dequantization(t):
    """transformers 5.23 dequantizes GGUF blocks with its own torch kernels: the same bits."""
    tdequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    if t in (Q4_0, Q8_0):
        data = np.random.default_rng(t).standard_normal((4, 256)).astype(np.float32)
        blocks = quants.quantize(data, GGMLQuantizationType(t))
    else:
        blocks = _k_blocks(t, 4, t + 1)
    out = _dequant(t, blocks)
    theirs = tdequant.dequantize(torch.from_numpy(blocks), t).reshape(out.shape)
    assert torch.equal(_bits(out), _bits(theirs))


def test_gguf_is_an_extra_pinned_with_the_tests():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    assert extras["gguf"] == ["gguf==0.19.0"]
    assert "convspec[gguf]" in extras["test"] and "accelerate==1.15.0" in extras["test"]
    pins = (root / "constraints.txt").read_text(encoding="utf-8").splitlines()
    assert "gguf==0.19.0" in pins and "accelerate==1.15.0" in pins
    from importlib.metadata import version

    assert version("gguf") == "0.19.0"  # the version the type table above was checked against
