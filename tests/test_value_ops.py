"""The value ops for llama.cpp's layouts (convspec/ops/values.py) against a direct torch computation and
transformers 5.23's own GGUF conversion ops, their inverses, and their shape errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers.tensors import bit_equal, random_tensor

from convspec.ops import OPS, NotInvertible, OpError, TensorInfo

gguf_mapping = pytest.importorskip("transformers.integrations.gguf.gguf_conversion_mapping")
HALF = ("float16", "bfloat16")


def _transformers(op, t: torch.Tensor) -> torch.Tensor:
    return op.convert({"w": t}, ["w"], ["w"])["w"]


def _apply(name: str, p: dict, x: torch.Tensor) -> torch.Tensor:
    (out,) = OPS[name].apply(p, [x])
    assert OPS[name].infer(p, [TensorInfo.of(x)]) == [TensorInfo.of(out)]
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_add_is_x_plus_value_in_float32_cast_back(dtype):
    x = random_tensor((64,), dtype, 1)
    wide = x if dtype == "float64" else x.float()
    assert bit_equal(_apply("add", {"value": 1}, x), (wide + 1).to(x.dtype))
    assert bit_equal(_apply("add", {"value": -3}, x), (wide - 3).to(x.dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_add_minus_one_is_transformers_subtract_one(dtype):
    x = random_tensor((4, 16), dtype, 2)
    assert bit_equal(_apply("add", {"value": -1}, x), _transformers(gguf_mapping.SubtractOne(), x))


def test_add_is_lossy_with_add_minus_value_as_nearest_inverse():
    op, p = OPS["add"], {"value": 1}
    assert "lossy" in op.loses(p)
    assert op.nearest_inverse(p, 1) == ("add", {"value": -1})
    with pytest.raises(NotInvertible, match=re.escape(op.loses(p))):
        op.inverse(p, 1)
    tiny = torch.tensor([1e-9, 0.5], dtype=torch.float32)
    back = _apply("add", {"value": -1}, _apply("add", p, tiny))
    assert back[0].item() == 0.0 and back[1].item() == 0.5  # (x + 1) - 1 is not x for tiny x


@pytest.mark.parametrize("dtype", ["int8", "int32", "bool", "uint8"])
def test_value_ops_refuse_integers(dtype):
    for name, p in (("add", {"value": 1}), ("log_neg", {}), ("neg_exp", {})):
        with pytest.raises(OpError, match=f"{name} maps floating-point values, got a {dtype} tensor"):
            OPS[name].infer(p, [TensorInfo((3,), dtype)])


def test_add_refuses_a_value_float32_cannot_hold():
    with pytest.raises(OpError, match=r"add value=16777217 is past 16777216"):
        OPS["add"].check({"value": 2**24 + 1})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_log_neg_is_transformers_log_negate(dtype):
    x = -torch.rand(32).add(0.01).to(getattr(torch, dtype))
    out = _apply("log_neg", {}, x)
    assert bit_equal(out, torch.log(-x.float()).to(x.dtype))
    assert bit_equal(out, _transformers(gguf_mapping.LogNegate(), x))
    assert torch.isnan(_apply("log_neg", {}, torch.tensor([1.0], dtype=getattr(torch, dtype)))).all()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_neg_exp_is_minus_exp(dtype):
    x = torch.randn(32).to(getattr(torch, dtype))
    wide = x if dtype == "float64" else x.float()
    assert bit_equal(_apply("neg_exp", {}, x), (-torch.exp(wide)).to(x.dtype))


def test_log_neg_and_neg_exp_are_each_others_nearest_inverse():
    for name, other in (("log_neg", "neg_exp"), ("neg_exp", "log_neg")):
        assert "lossy" in OPS[name].loses({})
        assert OPS[name].nearest_inverse({}, 1) == (other, {})
        with pytest.raises(NotInvertible):
            OPS[name].inverse({}, 1)
    a_log = torch.randn(16, dtype=torch.float64)
    assert torch.allclose(_apply("log_neg", {}, _apply("neg_exp", {}, a_log)), a_log)


@pytest.mark.parametrize(
    ("shape", "dim"), [((3, 4), 1), ((3, 4), 0), ((3, 4), -1), ((3, 4), 2), ((), 0), ((5,), -2)]
)
def test_unsqueeze_and_squeeze_are_torch_and_exact_inverses(shape, dim):
    x = random_tensor(shape, "bfloat16", 3)
    out = _apply("unsqueeze", {"dim": dim}, x)
    assert bit_equal(out, x.unsqueeze(dim))
    assert OPS["unsqueeze"].loses({"dim": dim}) is None
    name, p = OPS["unsqueeze"].inverse({"dim": dim}, 1)
    assert (name, p) == ("squeeze", {"dim": dim})
    assert bit_equal(_apply(name, p, out), x)
    assert OPS["squeeze"].inverse(p, 1) == ("unsqueeze", {"dim": dim})


def test_unsqueeze_is_transformers_unsqueeze():
    x = random_tensor((6, 4), "float32", 4)
    assert bit_equal(_apply("unsqueeze", {"dim": 1}, x), _transformers(gguf_mapping.Unsqueeze(1), x))


def test_squeeze_refuses_a_dim_that_is_not_1():
    with pytest.raises(OpError, match=r"squeeze dim=1 of a tensor of shape \[6, 4\]: it has size 4, not 1"):
        OPS["squeeze"].infer({"dim": 1}, [TensorInfo((6, 4), "float32")])
    with pytest.raises(OpError, match="squeeze dim=0 of a tensor with no dims"):
        OPS["squeeze"].infer({"dim": 0}, [TensorInfo((), "float32")])
    with pytest.raises(
        OpError, match=r"unsqueeze dim=3 is out of range for a tensor with 2 dims \(a new dim goes at -3..2\)"
    ):
        OPS["unsqueeze"].infer({"dim": 3}, [TensorInfo((6, 4), "float32")])


def _regroup(x, a, b, r, dim=0, offset=0):
    """The reference: the part from `offset` on viewed as [a, b, r] along dim, the first two swapped."""
    head, tail = x.narrow(dim, 0, offset), x.narrow(dim, offset, x.shape[dim] - offset)
    shape = list(tail.shape)
    tail = tail.reshape(shape[:dim] + [a, b, r] + shape[dim + 1 :]).transpose(dim, dim + 1).reshape(shape)
    return torch.cat([head, tail], dim)


@pytest.mark.parametrize(
    ("k_heads", "per_k", "head_dim", "offset"), [(2, 2, 1, 0), (2, 3, 4, 0), (3, 2, 2, 5), (1, 4, 3, 2)]
)
def test_regroup_heads_is_transformers_tiled_to_grouped_rows(k_heads, per_k, head_dim, offset):
    rows = offset + k_heads * per_k * head_dim
    x = torch.randn(rows, 3)
    p = {"groups": per_k, "size": k_heads, "rows": head_dim, "dim": 0, "offset": offset}
    expected = _transformers(gguf_mapping.TiledToGroupedRows(k_heads, per_k, head_dim, offset=offset), x)
    out = _apply("regroup_heads", p, x)
    assert bit_equal(out, expected)
    assert bit_equal(out, _regroup(x, per_k, k_heads, head_dim, 0, offset))


@pytest.mark.parametrize(("k_heads", "per_k", "head_dim"), [(2, 2, 1), (2, 3, 4), (3, 2, 2)])
def test_regroup_heads_on_dim_1_is_transformers_tiled_to_grouped_inputs(k_heads, per_k, head_dim):
    x = torch.randn(5, k_heads * per_k * head_dim)
    p = {"groups": per_k, "size": k_heads, "rows": head_dim, "dim": 1}
    expected = _transformers(gguf_mapping.TiledToGroupedInputs(k_heads, per_k, head_dim), x)
    assert bit_equal(_apply("regroup_heads", p, x), expected)


def test_regroup_heads_is_bloom_qkv_from_gguf():
    """llama.cpp's bloom qkv is [3, n_head, head_dim] rows; transformers reshapes it to HF's [n_head, 3,
    head_dim] with BloomTensorProcessor: regroup_heads(groups=3, size=n_head, rows=head_dim)."""
    from transformers.modeling_gguf_pytorch_utils import BloomTensorProcessor

    n_head, n_embed = 4, 8
    proc = BloomTensorProcessor(config={"n_head": n_head, "hidden_size": n_embed})
    p = {"groups": 3, "size": n_head, "rows": n_embed // n_head}
    w = torch.randn(3 * n_embed, n_embed)
    expected = proc._reverse_reshape_weights(w.numpy(), n_head, n_embed)
    assert np.array_equal(_apply("regroup_heads", p, w).numpy(), expected)
    bias = torch.randn(3 * n_embed)
    assert np.array_equal(
        _apply("regroup_heads", p, bias).numpy(), proc._reverse_reshape_bias(bias.numpy(), n_head, n_embed)
    )


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_regroup_heads_inverse_is_exact(dim):
    x = random_tensor((2 + 12, 12), "float16", 5) if dim == 0 else random_tensor((3, 2 + 12), "float16", 5)
    p = {"groups": 2, "size": 3, "rows": 2, "dim": dim, "offset": 2}
    out = _apply("regroup_heads", p, x)
    assert OPS["regroup_heads"].loses(p) is None
    name, inv = OPS["regroup_heads"].inverse(p, 1)
    assert inv == {"groups": 3, "size": 2, "rows": 2, "dim": dim, "offset": 2}
    assert bit_equal(_apply(name, inv, out), x)
    assert bit_equal(out[..., :2] if dim else out[:2], x[..., :2] if dim else x[:2])  # before offset: kept


def test_regroup_heads_shape_errors():
    op = OPS["regroup_heads"]
    with pytest.raises(
        OpError,
        match=re.escape("dim 0 of [13, 2] minus offset=2 has 11, not groups x size x rows = 2 x 3 x 2 = 12"),
    ):
        op.infer({"groups": 2, "size": 3, "rows": 2, "offset": 2}, [TensorInfo((13, 2), "float32")])
    with pytest.raises(OpError, match="regroup_heads groups=0 must be 1 or more"):
        op.check({"groups": 0, "size": 3})
    with pytest.raises(OpError, match="regroup_heads offset=-1 must be 0 or more"):
        op.check({"groups": 1, "size": 3, "offset": -1})


def test_regroup_heads_moves_whole_rows_as_blocks():
    """Its block move is its permutation of the rows' ids (the byte-copy path)."""
    from convspec.ops import Blocks

    op, p = OPS["regroup_heads"], {"groups": 2, "size": 3, "rows": 1, "dim": 0, "offset": 1}
    moved = op.move_blocks(p, [Blocks((7,), list(range(7)))], 2)
    assert moved == [Blocks((7,), op.apply(p, [torch.arange(7)])[0].tolist())]
    assert op.whole_dims(p, 2) == 1


def test_reshaping_and_regrouping_convert_as_byte_copies(tmp_path):
    """unsqueeze, squeeze and regroup_heads only move whole rows: each group is a block plan (byte
    ranges, blocks.block_runs), a convert gives torch's tensors, and the reverse the source back."""
    from safetensors.torch import load_file, save_file

    import convspec
    from convspec.blocks import block_runs

    sd = {f"l.{i}.conv": torch.randn(2 + 12, 4) for i in range(2)} | {"l.0.a": torch.randn(6, 1, 3)}
    save_file(sd, tmp_path / "src.safetensors")
    spec = tmp_path / "s.cspec"
    spec.write_text(
        "spec s\n"
        "convert w = {p:path}.conv -> {p}.conv1d = unsqueeze(regroup_heads(w, groups=2, size=3, rows=2, "
        "offset=2), dim=1)\n"
        "convert a = {p:path}.a -> {p}.a2 = squeeze(a, dim=1)\n"
    )
    plan = convspec.compile(str(spec))
    bound = plan.bind({k: (tuple(v.shape), "float32") for k, v in sd.items()})
    assert all(block_runs(bound, g, 0) is not None for g in bound.groups)
    convspec.convert(str(spec), tmp_path / "src.safetensors", tmp_path / "out")
    out = {k: v for f in (tmp_path / "out").glob("*.safetensors") for k, v in load_file(f).items()}
    p = {"groups": 2, "size": 3, "rows": 2, "offset": 2}
    for i in range(2):
        assert bit_equal(out[f"l.{i}.conv1d"], _regroup(sd[f"l.{i}.conv"], 2, 3, 2, 0, 2).unsqueeze(1))
        assert bit_equal(
            out[f"l.{i}.conv1d"], OPS["regroup_heads"].apply(p, [sd[f"l.{i}.conv"]])[0].unsqueeze(1)
        )
    assert bit_equal(out["l.0.a2"], sd["l.0.a"][:, 0])
    convspec.convert(str(spec), tmp_path / "out", tmp_path / "back", reverse=True)
    back = {k: v for f in (tmp_path / "back").glob("*.safetensors") for k, v in load_file(f).items()}
    assert sorted(back) == sorted(sd) and all(bit_equal(back[k], sd[k]) for k in sd)


def test_a_regroup_heads_slice_reads_exactly_its_rows():
    """A shard of the grouped rows reads the tiled rows it is made of, joined in order, and nothing
    else; rows contiguous in the input too are one read."""
    op, info = OPS["regroup_heads"], [TensorInfo((2 + 12, 4), "float32")]
    p = {"groups": 2, "size": 3, "rows": 2, "dim": 0, "offset": 2}
    m = op.slice_map(p, info, 0, ((2, 6), (0, 4)))  # output chunks (0, 0), (0, 1): input rows 2..4, 8..10
    assert m.reads == ((((2, 4), (0, 4)), ((8, 10), (0, 4))),) and m.op is None and m.exact
    one = op.slice_map({**p, "groups": 1, "size": 6}, info, 0, ((0, 14), (0, 4)))
    assert one.reads == ((((0, 14), (0, 4)),),)
