"""The ops on LoRA factors (convspec/ops/lowrank.py): block_diag / unblock_diag, share / same, flatten /
unflatten and no_low_rank: shapes, every refusal with its message, values against plain torch, and
each op undone by its inverse bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.tensors import bit_equal, random_tensor
from hypothesis import given, settings
from hypothesis import strategies as st

from convspec.ops import OPS, NotInvertible, OpError, TensorInfo

MERGE_HINT = "merge the adapter into the base model and convert the merged weights"
SETTINGS = settings(max_examples=40, deadline=None)


def _info(*shape, dtype="float32"):
    return TensorInfo(tuple(shape), dtype)


def _message(name, p, ins, *, apply=False) -> OpError:
    """The OpError op `name` raises (infer, or apply on tensors), checked first by `check`."""
    op = OPS[name]
    with pytest.raises(OpError) as exc:
        op.check(p)
        op.apply(p, ins) if apply else op.infer(p, ins)
    return exc.value


def _round_trip(name, p, ins):
    """op then its inverse gives back the inputs bit for bit; the inverse's infer agrees."""
    op = OPS[name]
    outs = op.apply(p, ins)
    assert op.infer(p, [TensorInfo.of(t) for t in ins]) == [TensorInfo.of(t) for t in outs]
    inv_name, inv_p = op.inverse(p, len(ins))
    inv = OPS[inv_name]
    inv.check(inv_p)
    back = inv.apply(inv_p, outs)
    assert inv.infer(inv_p, [TensorInfo.of(t) for t in outs]) == [TensorInfo.of(t) for t in ins]
    assert len(back) == len(ins) and all(bit_equal(a, b) for a, b in zip(back, ins, strict=True))
    return outs


# ---- block_diag ----------------------------------------------------------------------------------


def test_block_diag_shapes():
    op = OPS["block_diag"]
    assert op.infer({"dim": -2}, [_info(2, 3), _info(4, 3)]) == [_info(6, 6)]
    assert op.infer({"dim": -1, "sizes": [1, 5]}, [_info(3, 1), _info(3, 5)]) == [_info(6, 6)]
    assert op.infer({"dim": -2, "equal": True}, [_info(5, 2, 3, dtype="bfloat16")] * 3) == [
        _info(5, 6, 9, dtype="bfloat16")
    ]


@pytest.mark.parametrize(
    ("p", "ins", "message"),
    [
        ({"dim": 0}, [_info(2, 3)] * 2, "dim=0: the sizes describe one of the last two dims, -2 or -1"),
        ({"dim": -2}, [_info(3), _info(3)], "block_diag takes tensors of two dims or more, not [3]"),
        (
            {"dim": -2},
            [_info(2, 2, 3), _info(3, 2, 3)],
            "block_diag of tensors whose leading dims differ: [2, 2, 3], [3, 2, 3]",
        ),
        (
            {"dim": -2},
            [_info(2, 3), _info(4, 2)],
            "block_diag needs parts of one rank (dim -1), these have [3, 2]: "
            "the inverse could not tell where each part's rank ends",
        ),
        (
            {"dim": -1},
            [_info(3, 2), _info(2, 2)],
            "block_diag needs parts of one rank (dim -2), these have [3, 2]: "
            "the inverse could not tell where each part's rank ends",
        ),
        (
            {"dim": -2, "sizes": [2, 2]},
            [_info(2, 3), _info(4, 3)],
            "block_diag declares sizes=[2, 2] but the parts have sizes [2, 4]",
        ),
        (
            {"dim": -2, "equal": True},
            [_info(2, 3), _info(4, 3)],
            "block_diag declares equal=true but the parts have sizes [2, 4]",
        ),
        (
            {"dim": -2},
            [_info(2, 3), _info(2, 3, dtype="bfloat16")],
            "block_diag over tensors of different dtypes: bfloat16, float32",
        ),
    ],
)
def test_block_diag_refusals(p, ins, message):
    assert _message("block_diag", p, ins).message == message


def test_block_diag_is_torch_block_diag():
    a, b, c = torch.randn(2, 3), torch.randn(4, 3), torch.randn(1, 3)
    (out,) = OPS["block_diag"].apply({"dim": -2}, [a, b, c])
    assert torch.equal(out, torch.block_diag(a, b, c))
    batched = [torch.randn(5, 2, 3), torch.randn(5, 4, 3)]
    (out,) = OPS["block_diag"].apply({"dim": -2}, batched)
    assert torch.equal(out, torch.stack([torch.block_diag(batched[0][e], batched[1][e]) for e in range(5)]))


def test_block_diag_is_lora_of_a_fused_weight():
    """B block-diagonal and the A's stacked along the rank: the product is the B_i @ A_i stacked along
    the rows (PEFT's fused form of q, k, v)."""
    bs = [torch.randn(s, 2, dtype=torch.float64) for s in (3, 1, 4)]
    as_ = [torch.randn(2, 5, dtype=torch.float64) for _ in bs]
    (b,) = OPS["block_diag"].apply({"dim": -2, "sizes": [3, 1, 4]}, bs)
    (a,) = OPS["cat"].apply({"dim": 0}, as_)
    torch.testing.assert_close(b @ a, torch.cat([x @ y for x, y in zip(bs, as_, strict=True)]))


@pytest.mark.parametrize("dim", [-2, -1])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_block_diag_inverse_is_exact(dim, lead):
    sizes = [2, 0, 3]
    ins = [
        random_tensor((*lead, s, 2) if dim == -2 else (*lead, 2, s), "bfloat16", i)
        for i, s in enumerate(sizes)
    ]
    _round_trip("block_diag", {"dim": dim, "sizes": sizes, "equal": False}, ins)
    eq = [random_tensor((*lead, 2, 2), "float8_e4m3fn", i) for i in range(3)]  # NaNs and -0.0 included
    _round_trip("block_diag", {"dim": dim, "sizes": None, "equal": True}, eq)


def test_block_diag_without_sizes_has_no_inverse():
    with pytest.raises(NotInvertible, match=r"needs the part sizes: sizes=\[...\] or equal=true"):
        OPS["block_diag"].inverse({"dim": -2, "sizes": None, "equal": False}, 2)
    assert OPS["block_diag"].inverse({"dim": -1, "sizes": [1, 2], "equal": False}, 2) == (
        "unblock_diag",
        {"dim": -1, "n": 2, "sizes": [1, 2]},
    )


# ---- unblock_diag --------------------------------------------------------------------------------


def test_unblock_diag_shapes():
    op = OPS["unblock_diag"]
    assert op.infer({"n": 2, "dim": -2, "sizes": [1, 3]}, [_info(4, 6)]) == [_info(1, 3), _info(3, 3)]
    assert op.infer({"n": 3, "dim": -1}, [_info(2, 6, 3)]) == [_info(2, 2, 1)] * 3


@pytest.mark.parametrize(
    ("p", "ins", "message"),
    [
        ({"n": 0}, [_info(2, 2)], "unblock_diag n=0 must be at least 1"),
        ({"n": 2, "sizes": [1, 2, 3]}, [_info(6, 4)], "unblock_diag sizes=[1, 2, 3] for n=2 parts"),
        ({"n": 2, "dim": 1}, [_info(2, 2)], "dim=1: the sizes describe one of the last two dims, -2 or -1"),
        ({"n": 2}, [_info(4)], "unblock_diag takes tensors of two dims or more, not [4]"),
        ({"n": 2}, [_info(5, 4)], "unblock_diag: dim -2 of [5, 4] is not 2 equal parts"),
        ({"n": 2}, [_info(4, 5)], "unblock_diag: dim -1 of [4, 5] is not 2 equal parts"),
        ({"n": 2, "dim": -1}, [_info(3, 4)], "unblock_diag: dim -2 of [3, 4] is not 2 equal parts"),
        (
            {"n": 2, "sizes": [1, 2]},
            [_info(4, 4)],
            "unblock_diag sizes [1, 2] add up to 3, not dim -2 of [4, 4]",
        ),
    ],
)
def test_unblock_diag_refusals(p, ins, message):
    assert _message("unblock_diag", p, ins).message == message


def test_unblock_diag_refuses_a_tensor_that_is_not_block_diagonal():
    x = torch.block_diag(torch.ones(2, 2), torch.ones(2, 2))
    x[0, 3] = -7.0  # part 1's rows in part 2's columns: the parts were trained together
    err = _message("unblock_diag", {"n": 2, "dim": -2}, [x], apply=True)
    assert err.message == (
        "the tensor of shape [4, 4] is not block diagonal in 2 parts (largest value off the diagonal: 7): "
        "its parts were trained together, so they cannot be split into the adapters of separate weights"
    )
    assert err.hint == MERGE_HINT


def test_unblock_diag_compares_bits_off_the_diagonal():
    """A -0.0 off the diagonal is no zero block_diag writes (its inverse could not give it back), and
    a float8 tensor is checked as well (torch has no count_nonzero for float8)."""
    x = torch.block_diag(torch.ones(2, 2), torch.ones(2, 2))
    x[3, 0] = -0.0
    assert "not block diagonal in 2 parts" in _message("unblock_diag", {"n": 2}, [x], apply=True).message
    f8 = torch.block_diag(torch.ones(1, 2), torch.ones(1, 2)).to(torch.float8_e4m3fn)
    assert [t.shape for t in OPS["unblock_diag"].apply({"n": 2}, [f8])] == [(1, 2)] * 2
    f8[0, 3] = 1.0
    assert "largest value off the diagonal: 1" in _message("unblock_diag", {"n": 2}, [f8], apply=True).message


def test_unblock_diag_takes_torch_block_diag_apart():
    parts = [torch.randn(3, 2), torch.randn(1, 2), torch.randn(2, 2)]
    out = OPS["unblock_diag"].apply({"n": 3, "dim": -2, "sizes": [3, 1, 2]}, [torch.block_diag(*parts)])
    assert all(torch.equal(a, b) and a.is_contiguous() for a, b in zip(out, parts, strict=True))


def test_unblock_diag_runs_on_meta():
    out = OPS["unblock_diag"].apply({"n": 2, "dim": -1}, [torch.empty(3, 4, 6, device="meta")])
    assert [(t.device.type, tuple(t.shape)) for t in out] == [("meta", (3, 2, 3))] * 2


@pytest.mark.parametrize("dim", [-2, -1])
def test_unblock_diag_inverse_is_exact(dim):
    parts = [random_tensor((3, 2, 2), "float16", i, finite=True) for i in range(3)]
    (x,) = OPS["block_diag"].apply({"dim": dim}, parts)
    for sizes in (None, [2, 2, 2]):
        _round_trip("unblock_diag", {"n": 3, "dim": dim, "sizes": sizes}, [x])
    assert OPS["unblock_diag"].inverse({"n": 3, "dim": dim, "sizes": None}, 1) == (
        "block_diag",
        {"dim": dim, "sizes": None, "equal": True},
    )


@SETTINGS
@given(
    lead=st.lists(st.integers(1, 3), max_size=2),
    dim=st.sampled_from([-2, -1]),
    rank=st.integers(1, 3),
    sizes=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    seed=st.integers(0, 2**31),
)
def test_block_diag_then_unblock_diag_property(lead, dim, rank, sizes, seed):
    shapes = [(*lead, s, rank) if dim == -2 else (*lead, rank, s) for s in sizes]
    ins = [random_tensor(s, "float32", seed + i) for i, s in enumerate(shapes)]
    outs = OPS["block_diag"].apply({"dim": dim}, ins)
    back = OPS["unblock_diag"].apply({"n": len(sizes), "dim": dim, "sizes": sizes}, outs)
    assert all(bit_equal(a, b) for a, b in zip(back, ins, strict=True))
    batch = math.prod(lead)
    rows, cols = (sum(sizes), rank * len(sizes)) if dim == -2 else (rank * len(sizes), sum(sizes))
    x = outs[0].reshape(batch, rows, cols)
    for e in range(batch):  # each batch member is torch's block_diag of its parts
        assert bit_equal(x[e], torch.block_diag(*(t.reshape(batch, *t.shape[-2:])[e] for t in ins)))


# ---- share / same --------------------------------------------------------------------------------


def test_share_is_the_same_tensor_n_times():
    x = torch.randn(2, 3)
    assert OPS["share"].infer({"n": 3}, [TensorInfo.of(x)]) == [TensorInfo.of(x)] * 3
    outs = OPS["share"].apply({"n": 3}, [x])
    assert all(torch.equal(t, x) for t in outs)
    # copies, not one tensor three times: safetensors' save_file refuses tensors that share memory
    assert len({t.data_ptr() for t in outs}) == 3
    assert OPS["share"].n_outputs({"n": 3}) == 3
    assert _message("share", {"n": 0}, [_info(2)]).message == "share n=0 must be at least 1"
    outs = _round_trip("share", {"n": 2}, [random_tensor((3, 2), "bfloat16", 0)])  # NaNs included
    assert len(outs) == 2
    assert OPS["share"].inverse({"n": 4}, 1) == ("same", {})


def test_same_takes_equal_tensors():
    x = random_tensor((3, 2), "float32", 1)  # random bits: NaNs of any payload, -0.0
    (out,) = OPS["same"].apply({}, [x, x.clone(), x.clone()])
    assert bit_equal(out, x)
    assert OPS["same"].inverse({}, 3) == ("share", {"n": 3})
    _round_trip("same", {}, [x, x.clone()])


def test_same_refuses_tensors_that_differ():
    err = _message("same", {}, [_info(2, 3), _info(3, 2)])
    assert err.message == "same of tensors that differ: [2, 3] float32, [3, 2] float32"
    err = _message("same", {}, [_info(2, 3), _info(2, 3, dtype="float16")])
    assert err.message == "same of tensors that differ: [2, 3] float32, [2, 3] float16"
    a = torch.randn(2, 3)
    b = a.clone()
    b[1, 2] += 1
    err = _message("same", {}, [a, a.clone(), b], apply=True)
    assert err.message == (
        "the parts do not share one factor: part 3 differs from part 1 "
        "(the weights were adapted separately, so they cannot be joined with one A)"
    )
    assert err.hint == MERGE_HINT


def test_same_compares_bits():
    """0.0 and -0.0 are equal numbers but not one factor; a NaN is the same as itself."""
    err = _message("same", {}, [torch.zeros(2), -torch.zeros(2)], apply=True)
    assert "part 2 differs from part 1" in err.message
    nan = torch.tensor([float("nan"), 1.0])
    assert bit_equal(OPS["same"].apply({}, [nan, nan.clone()])[0], nan)


def test_same_runs_on_meta():
    x = torch.empty(2, 3, device="meta")
    assert OPS["same"].apply({}, [x, x])[0].device.type == "meta"


# ---- flatten / unflatten -------------------------------------------------------------------------


def test_flatten_shapes_and_values():
    op = OPS["flatten"]
    assert op.infer({"dim": 0, "sizes": [2, 3]}, [_info(2, 3, 4)]) == [_info(6, 4)]
    assert op.infer({"dim": 1, "sizes": [-1, 4]}, [_info(2, 3, 4)]) == [_info(2, 12)]
    assert op.infer({"dim": 0, "sizes": [2, -1, 4]}, [_info(2, 3, 4)]) == [_info(24)]
    x = torch.randn(2, 3, 4, 5)
    (out,) = op.apply({"dim": 1, "sizes": [3, 4]}, [x])
    assert torch.equal(out, x.reshape(2, 12, 5)) and out.is_contiguous()


@pytest.mark.parametrize("name", ["flatten", "unflatten"])
@pytest.mark.parametrize(
    ("p", "why"),
    [
        ({"sizes": [6]}, "{name} sizes=[6]: two sizes or more, each positive, one -1 at most"),
        ({"sizes": [-1, -1]}, "{name} sizes=[-1, -1]: two sizes or more, each positive, one -1 at most"),
        ({"sizes": [2, 0]}, "{name} sizes=[2, 0]: two sizes or more, each positive, one -1 at most"),
        ({"sizes": [-2, 3]}, "{name} sizes=[-2, 3]: two sizes or more, each positive, one -1 at most"),
        ({"dim": 2, "sizes": [2, 3]}, "{name} dim=2 is out of range for a tensor with 2 dims"),
        ({"dim": -1, "sizes": [2, 3]}, "{name} dim=-1 is out of range for a tensor with 2 dims"),
    ],
)
def test_flatten_and_unflatten_size_rules(name, p, why):
    assert _message(name, p, [_info(6, 4)]).message == why.format(name=name)


@pytest.mark.parametrize(
    ("p", "shape", "message"),
    [
        (
            {"dim": 0, "sizes": [2, 4]},
            (2, 3, 4),
            "flatten declares sizes=[2, 4] at dim 0, the input is [2, 3, 4]",
        ),
        (
            {"dim": 1, "sizes": [3, 4, 1]},
            (2, 3, 4),
            "flatten declares sizes=[3, 4, 1] at dim 1, the input is [2, 3, 4]",
        ),
        (
            {"dim": 1, "sizes": [-1, 5]},
            (2, 3, 4),
            "flatten declares sizes=[-1, 5] at dim 1, the input is [2, 3, 4]",
        ),
    ],
)
def test_flatten_checks_the_declared_sizes(p, shape, message):
    assert _message("flatten", p, [_info(*shape)]).message == message


def test_unflatten_shapes_and_values():
    op = OPS["unflatten"]
    assert op.infer({"dim": 0, "sizes": [2, 3]}, [_info(6, 4)]) == [_info(2, 3, 4)]
    assert op.infer({"dim": 1, "sizes": [-1, 2]}, [_info(3, 8)]) == [_info(3, 4, 2)]
    assert op.infer({"dim": 0, "sizes": [2, -1, 2]}, [_info(12)]) == [_info(2, 3, 2)]
    x = torch.randn(3, 8)
    (out,) = op.apply({"dim": 1, "sizes": [-1, 2]}, [x])
    assert torch.equal(out, x.reshape(3, 4, 2))


def test_unflatten_checks_the_sizes():
    err = _message("unflatten", {"dim": 0, "sizes": [2, -1]}, [_info(7, 2)])
    assert err.message == "unflatten: 7 (of [7, 2]) is not a multiple of 2 (sizes=[2, -1])"
    err = _message("unflatten", {"dim": 0, "sizes": [2, 2]}, [_info(6)])
    assert err.message == "unflatten sizes=[2, 2] hold 4 elements, the dim has 6 ([6])"
    err = _message("unflatten", {"dim": 0, "sizes": [2, 2]}, [torch.zeros(6)], apply=True)
    assert err.message == "unflatten sizes=[2, 2] hold 4 elements, the dim has 6 ([6])"


@pytest.mark.parametrize(
    ("name", "p", "shape"),
    [
        ("flatten", {"dim": 0, "sizes": [2, 3]}, (2, 3, 4)),
        ("flatten", {"dim": 1, "sizes": [-1, 4]}, (2, 3, 4)),
        ("flatten", {"dim": 0, "sizes": [2, 3, -1]}, (2, 3, 4)),
        ("unflatten", {"dim": 0, "sizes": [-1, 2]}, (6, 4)),
        ("unflatten", {"dim": 2, "sizes": [2, 2, 1]}, (3, 2, 4)),
    ],
)
def test_flatten_and_unflatten_inverses_are_exact(name, p, shape):
    _round_trip(name, p, [random_tensor(shape, "float8_e5m2", 7)])


def test_peft_flattens_an_expert_stack_so():
    """PEFT's ParamWrapper keeps the A's of E experts as [E * r, in] and the B's as [out, r * E]: the
    adapter plan unflattens them (convspec/compile/lora.py), and flattens them back."""
    e, r, rows, cols = 3, 2, 5, 4
    a, b = torch.randn(e * r, cols), torch.randn(rows, r * e)
    (a3,) = OPS["unflatten"].apply({"dim": 0, "sizes": [-1, r]}, [a])
    (b3,) = OPS["unflatten"].apply({"dim": 1, "sizes": [r, -1]}, [b])
    assert a3.shape == (e, r, cols) and torch.equal(a3[1], a[r : 2 * r])
    assert b3.shape == (rows, r, e) and torch.equal(b3[:, :, 1], b[:, 1::e])
    assert torch.equal(OPS["flatten"].apply({"dim": 0, "sizes": [-1, r]}, [a3])[0], a)


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    data=st.data(),
    seed=st.integers(0, 2**31),
)
def test_unflatten_then_flatten_property(shape, data, seed):
    dim = data.draw(st.integers(0, len(shape) - 1))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=2, max_size=3))
    shape[dim] = math.prod(sizes)
    declared = list(sizes)
    if data.draw(st.booleans()):
        declared[data.draw(st.integers(0, len(sizes) - 1))] = -1
    x = random_tensor(shape, "float32", seed)
    (y,) = OPS["unflatten"].apply({"dim": dim, "sizes": declared}, [x])
    assert y.shape == (*shape[:dim], *sizes, *shape[dim + 1 :])
    assert bit_equal(y, x.reshape(y.shape))
    (back,) = OPS["flatten"].apply({"dim": dim, "sizes": declared}, [y])
    assert bit_equal(back, x)


# ---- no_low_rank ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ins", [[], [_info(2, 3)], [_info(4, 2), _info(2, 5)]])
def test_no_low_rank_refuses_whatever_it_is_given(ins):
    op = OPS["no_low_rank"]
    err = _message("no_low_rank", {"op": "log_neg"}, ins)
    assert err.message == "the adapter of this weight cannot be converted: LoRA factors cannot follow log_neg"
    assert err.hint == (
        "merge the adapter into the base model (PEFT merge_and_unload) and convert the merged weights"
    )
    tensors = [torch.zeros(i.shape) for i in ins]
    assert _message("no_low_rank", {"op": "log_neg"}, tensors, apply=True).message == err.message
    assert op.n_outputs({"op": "log_neg"}) is None
    assert op.inverse({"op": "log_neg"}, len(ins)) == ("no_low_rank", {"op": "log_neg"})
