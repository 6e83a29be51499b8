"""`Op.low_rank` is algebra: for a weight W = L @ R (LoRA's B @ A; its transpose where `Factors.swapped`),
the op on W equals the product of its factors after the ops `OnFactors` names (None: the factor kept,
shared by every output, or the same one in every input), for every op that has a counterpart and every
legal parameter; the others, and the illegal parameters, raise NoLowRank."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convspec.ops import OPS, Factors, NoLowRank, OnFactors

LEAD = (4, 2)  # the leading dims of a 3-D (expert stack) or 4-D weight
ROWS, COLS, RANK = 12, 8, 3
FACTORS = [Factors(2), Factors(2, True), Factors(3), Factors(3, True), Factors(4)]
# ops whose low_rank says what they do to the factors; every other op refuses
FOLLOWS = {
    "stack",
    "unstack",
    "cat",
    "split",
    "chunk",
    "transpose",
    "permute",
    "permute_rope",
    "unpermute_rope",
    "interleave",
    "deinterleave",
    "regroup_heads",
    "cast",
}


def _shape(f: Factors, rows: int = ROWS, cols: int = COLS) -> tuple[int, ...]:
    return (*LEAD[: f.ndim - 2], rows, cols)


def _product(left: torch.Tensor, right: torch.Tensor, f: Factors) -> torch.Tensor:
    w = left @ right
    return w.transpose(-2, -1) if f.swapped else w


def _factors(f: Factors, shape, rank: int, gen, integer: bool):
    """Random L, R whose product (transposed where `f.swapped`) has `shape`: small integers (every
    sum exact in float64, so any order of summing gives the same bits) or normal floats."""
    m, n = (shape[-1], shape[-2]) if f.swapped else (shape[-2], shape[-1])
    lead = tuple(shape[:-2])

    def draw(*s):
        if integer:
            return torch.randint(-4, 5, s, generator=gen).to(torch.float64)
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    return draw(*lead, m, rank), draw(*lead, rank, n)


def _run(name: str, p: dict, values: list[torch.Tensor]) -> list[torch.Tensor]:
    """An op on its inputs as the interpreter runs it: an unstack of k inputs (parts=k) one by one."""
    op = OPS[name]
    if op.expands:
        return [t for v in values for t in op.apply(p, [v])]
    return op.apply(p, values)


def _side(on, values: list[torch.Tensor], n_out: int) -> list[torch.Tensor]:
    """One factor's values through `on`, as convspec/compile/lora.py's `side` writes them."""
    if on is not None:
        return _run(on[0], on[1], values)
    if len(values) == n_out:
        return values
    if len(values) == 1:
        return OPS["share"].apply({"n": n_out}, values)
    return OPS["same"].apply({}, values)


def _check(
    name: str, p: dict, fs: list[Factors], shapes: list[tuple], integer: bool, seed: int = 0, rank: int = RANK
):
    """The op on W against its factors' ops; `fs` are what low_rank is given (one per input value:
    a stack's collection is one), `shapes` the weights' shapes (a stack: its members')."""
    gen = torch.Generator().manual_seed(seed)
    members = fs * len(shapes) if len(fs) == 1 else fs
    pairs = [_factors(f, s, rank, gen, integer) for f, s in zip(members, shapes, strict=True)]
    ws = [_product(a, b, f) for (a, b), f in zip(pairs, members, strict=True)]
    on = OPS[name].low_rank(dict(p), list(fs))
    assert isinstance(on, OnFactors)
    want = _run(name, p, ws)
    lefts = _side(on.left, [a for a, _ in pairs], len(want))
    rights = _side(on.right, [b for _, b in pairs], len(want))
    outs = on.outs * len(want) if len(on.outs) == 1 else on.outs
    assert len(lefts) == len(rights) == len(outs) == len(want)
    rank = rank * len(pairs) if on.joins_ranks else rank
    for left, right, f, w in zip(lefts, rights, outs, want, strict=True):
        assert left.ndim == right.ndim == f.ndim == w.ndim
        assert left.shape[-1] == right.shape[-2] == rank
        got = _product(left, right, f).to(w.dtype)  # a cast keeps the factors' dtype: the product is cast
        if w.dtype != torch.float64 and not integer:  # a cast: the factors round apart from W
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
        elif integer:
            assert torch.equal(got, w), (name, p, f)
        else:
            torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)


def _dims(n: int):
    return range(-n, n)


def _legal_cases():
    """(op, params, factors given, weight shapes): every legal parameter choice on every weight form."""
    for f in FACTORS:
        shape, n = _shape(f), f.ndim
        for d in _dims(n):
            size = shape[d % n]
            yield "split", {"dim": d, "sizes": [1, size - 1]}, [f], [shape]
            yield "split", {"dim": d, "sizes": [size]}, [f], [shape]
            yield "chunk", {"n": 2, "dim": d}, [f], [shape]
            for name in ("interleave", "deinterleave"):
                yield name, {"dim": d, "parts": 2}, [f], [shape]
            groups = 2
            yield (
                "regroup_heads",
                {"groups": groups, "size": size // 2, "rows": 1, "dim": d, "offset": 0},
                [f],
                [shape],
            )
            if size == ROWS:  # 12 = 2 kept + 5 groups of 2
                yield (
                    "regroup_heads",
                    {"groups": 5, "size": 2, "rows": 1, "dim": d, "offset": 2},
                    [f],
                    [shape],
                )
            if size == COLS:
                yield (
                    "regroup_heads",
                    {"groups": 2, "size": 2, "rows": 2, "dim": d, "offset": 0},
                    [f],
                    [shape],
                )
            parts = [tuple(k if i == d % n else s for i, s in enumerate(shape)) for k in (1, 3, 2)]
            yield "cat", {"dim": d, "sizes": None, "equal": False}, [f] * 3, parts
            yield "cat", {"dim": d, "sizes": [1, 3, 2], "equal": False}, [f] * 3, parts
            yield "cat", {"dim": d, "sizes": None, "equal": True}, [f] * 2, [shape, shape]
        for d in range(-(n + 1), n - 1):  # the new dim among the leading ones
            if d % (n + 1) <= n - 2:
                yield "stack", {"over": "e", "dim": d, "parts": 1}, [f], [shape] * 3
        for d in range(n - 2):
            yield "unstack", {"over": "e", "dim": d, "parts": 1}, [f], [shape]
            yield "unstack", {"over": "e", "dim": d - n, "parts": 2}, [f] * 2, [shape] * 2
        for a, b in itertools.product(_dims(n), repeat=2):
            if {a % n, b % n} == {n - 2, n - 1} or max(a % n, b % n) < n - 2:
                yield "transpose", {"dim0": a, "dim1": b}, [f], [shape]
        for dims in itertools.permutations(range(n)):
            if set(dims[n - 2 :]) == {n - 2, n - 1}:
                yield "permute", {"dims": list(dims)}, [f], [shape]
        yield "cast", {"dtype": "float32", "from": "float64"}, [f], [shape]
        yield "cast", {"dtype": "float64", "from": None}, [f], [shape]
    for name in ("permute_rope", "unpermute_rope"):
        for heads in (1, 2, 3):
            yield name, {"heads": heads}, [Factors(2)], [_shape(Factors(2))]


LEGAL = list(_legal_cases())


def _id(case) -> str:
    name, p, fs, _ = case
    form = f"{fs[0].ndim}d{'T' if fs[0].swapped else ''}"
    return f"{name}-{form}-" + ",".join(f"{k}={v}" for k, v in p.items() if k != "over")


@pytest.mark.parametrize("integer", [True, False], ids=["exact", "float"])
@pytest.mark.parametrize("case", LEGAL, ids=[_id(c) for c in LEGAL])
def test_an_op_on_the_factors_is_the_op_on_the_weight(case, integer):
    name, p, fs, shapes = case
    _check(name, p, fs, shapes, integer)


def test_every_legal_case_is_tried():
    """Each op that follows the factors has cases on rows, on columns and (3-D) on a leading dim."""
    assert {c[0] for c in LEGAL} == FOLLOWS
    joins = [OPS["cat"].low_rank(p, fs).joins_ranks for name, p, fs, _ in LEGAL if name == "cat"]
    assert any(joins) and not all(joins)  # along the rows or columns: a join; a leading dim: not


def test_cat_along_the_rows_is_peft_fused_form():
    """B block-diagonal (its part sizes kept for the inverse), the A's stacked along the rank."""
    on = OPS["cat"].low_rank({"dim": 0, "sizes": [4, 2], "equal": False}, [Factors(2)] * 2)
    assert on == OnFactors(
        ("block_diag", {"dim": -2, "sizes": [4, 2], "equal": False}),
        ("cat", {"dim": 0, "equal": True}),
        (Factors(2),),
        True,
        ("cat", {"dim": 0, "sizes": [4, 2], "equal": False}),  # DoRA's magnitudes: one per row, joined
    )
    on = OPS["cat"].low_rank({"dim": 1, "sizes": None, "equal": True}, [Factors(2, True)] * 2)
    assert on.left[0] == "block_diag" and on.joins_ranks  # a transposed weight's columns are L's rows


def test_split_along_the_rows_shares_the_a():
    on = OPS["split"].low_rank({"dim": 0, "sizes": [2, 2]}, [Factors(2)])
    assert on.left == ("split", {"dim": 0, "sizes": [2, 2]}) and on.right is None
    on = OPS["chunk"].low_rank({"n": 2, "dim": -1}, [Factors(3)])
    assert on.left is None and on.right == ("chunk", {"n": 2, "dim": 2})


def test_transposing_the_last_two_dims_swaps_the_factors_roles():
    on = OPS["transpose"].low_rank({"dim0": 0, "dim1": 1}, [Factors(2)])
    assert on == OnFactors(None, None, (Factors(2, True),), rows=False)  # DoRA: rows become columns
    on = OPS["permute"].low_rank({"dims": [0, 2, 1]}, [Factors(3, True)])
    assert on.outs == (Factors(3, False),)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), swapped=st.booleans(), rank=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_random_shapes_and_ranks(data, swapped, rank, seed):
    """cat, split, chunk, stack and permute on weights of random shapes, forms and ranks."""
    shape = data.draw(st.lists(st.integers(1, 5), min_size=2, max_size=4))
    n = len(shape)
    f = Factors(n, swapped)
    d = data.draw(st.integers(-n, n - 1))
    name = data.draw(st.sampled_from(["cat", "split", "chunk", "stack", "permute"]))
    if name == "cat":
        sizes = data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=4))
        shapes = [tuple(k if i == d % n else s for i, s in enumerate(shape)) for k in sizes]
        case = "cat", {"dim": d, "sizes": sizes, "equal": False}, [f] * len(sizes), shapes
    elif name == "split":
        sizes = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=4))
        shape[d % n] = sum(sizes)
        case = "split", {"dim": d, "sizes": sizes}, [f], [tuple(shape)]
    elif name == "chunk":
        k = data.draw(st.integers(1, 3))
        shape[d % n] *= k
        case = "chunk", {"n": k, "dim": d}, [f], [tuple(shape)]
    elif name == "stack":
        d = data.draw(st.integers(-(n + 1), n - 2))
        case = (
            "stack",
            {"over": "e", "dim": d, "parts": 1},
            [f],
            [tuple(shape)] * data.draw(st.integers(1, 3)),
        )
    else:
        lead = list(data.draw(st.permutations(range(n - 2))))
        case = "permute", {"dims": lead + data.draw(st.permutations([n - 2, n - 1]))}, [f], [tuple(shape)]
    name, p, fs, shapes = case
    if name == "stack" and d % (n + 1) > n - 2:
        with pytest.raises(NoLowRank):
            OPS[name].low_rank(p, fs)
        return
    _check(name, p, fs, shapes, integer=True, seed=seed, rank=rank)
    _check(name, p, fs, shapes, integer=False, seed=seed, rank=rank)


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(set(OPS) - FOLLOWS))
def test_an_op_without_a_low_rank_counterpart_refuses(name):
    with pytest.raises(NoLowRank, match=f"{name} has no counterpart on low-rank factors"):
        OPS[name].low_rank({}, [Factors(2)])


def test_the_named_value_ops_refuse():
    named = {"add", "log_neg", "neg_exp", "squeeze", "unsqueeze", "reshape", "quantize_ggml"}
    named |= {n for n in OPS if n.startswith("dequant_")}
    assert named <= set(OPS) - FOLLOWS


def _refusals():
    for f in FACTORS:
        n = f.ndim
        for d in (n - 1, n, -1, -2):  # the new dim among the rows and columns
            yield "stack", {"over": "e", "dim": d, "parts": 1}, [f], "puts the stacked dim inside the rows"
        for d in (n - 2, n - 1, -1, -2):
            yield (
                "unstack",
                {"over": "e", "dim": d, "parts": 1},
                [f],
                "cuts the weight's rows or columns apart",
            )
        for a in range(n - 2):
            for b in (n - 2, n - 1):
                yield "transpose", {"dim0": a, "dim1": b}, [f], "swaps a leading dim with the weight's rows"
        for dims in itertools.permutations(range(n)):
            if set(dims[n - 2 :]) != {n - 2, n - 1}:
                yield "permute", {"dims": list(dims)}, [f], "moves the weight's rows or columns among"
        yield (
            "cat",
            {"dim": 0, "sizes": None, "equal": False},
            [f, f._replace(swapped=not f.swapped)],
            ("joins weights whose factors lie differently"),
        )
        if n > 2:
            yield (
                "unstack",
                {"over": "e", "dim": 0, "parts": 2},
                [f, f._replace(swapped=not f.swapped)],
                ("unstacks weights whose factors lie differently"),
            )
        if f != Factors(2):
            for name in ("permute_rope", "unpermute_rope"):
                yield name, {"heads": 2}, [f], "permutes dim 0, which is not the rows of a 2-D weight here"


REFUSALS = list(_refusals())


@pytest.mark.parametrize(
    ("name", "p", "fs", "why"), REFUSALS, ids=[_id((n, p, fs, None)) for n, p, fs, _ in REFUSALS]
)
def test_a_parameter_the_factors_cannot_follow_refuses(name, p, fs, why):
    with pytest.raises(NoLowRank, match=why):
        OPS[name].low_rank(p, fs)
