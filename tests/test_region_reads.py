"""Reading a region of a converted tensor (issue 16): the region equals the full conversion narrowed,
for the shards tensor and expert parallelism take (rows, columns, experts) and random ones, forward
and back; and where every op maps the region exactly, exactly its bytes are read from the source."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import convspec
from convspec.errors import ConvspecError
from convspec.ops.slicing import take
from convspec.regions import read_regions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from make_tiny_mixtral import make  # noqa: E402


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    d = tmp_path_factory.mktemp("regions") / "tiny"
    make(d, layers=2, experts=4)
    plan = convspec.compile("mixtral", config=d / "config.json")
    return d, plan, dict(plan.load(d))


def _shards(shape, rng: random.Random):
    """The regions ranks take: halves and quarters along each dim (rows, columns, experts), and a
    few random ones."""
    full = [(0, s) for s in shape]
    for dim, size in enumerate(shape):
        for world in (2, 4):
            if size % world == 0:
                step = size // world
                for r in range(world):
                    yield tuple(full[:dim] + [(r * step, (r + 1) * step)] + full[dim + 1 :])
    for _ in range(3):
        region = []
        for size in shape:
            a = rng.randrange(size + 1)
            region.append((a, rng.randrange(a, size + 1)))
        yield tuple(region)


def _nbytes(region, t: torch.Tensor) -> int:
    n = t.element_size()
    for a, b in region:
        n *= b - a
    return n


def test_every_shard_of_every_target_is_the_full_load_narrowed_and_reads_only_its_bytes(mixtral):
    d, plan, full = mixtral
    rng = random.Random(16)
    for target, t in full.items():
        regions = list(_shards(tuple(t.shape), rng))
        for region in regions:
            got, stats = read_regions(plan, d, {target: region})
            assert torch.equal(got[target], take(t, region)), (target, region)
            assert stats.wider == 0  # stack, cat and renames map every region exactly
            assert stats.bytes == _nbytes(region, t), (target, region)


def test_an_expert_parallel_shard_reads_its_experts_only(mixtral):
    d, plan, full = mixtral
    target = "model.layers.1.mlp.experts.gate_up_proj"
    got, stats = read_regions(
        plan, d, {target: ((2, 4), (0, full[target].shape[1]), (0, full[target].shape[2]))}
    )
    assert torch.equal(got[target], full[target][2:4])
    assert stats.bytes == full[target][2:4].numel() * full[target].element_size()
    assert stats.runs == 4  # w1 and w3 of experts 2 and 3, each one contiguous read


def test_the_inverse_reads_regions_of_the_original_keys_from_the_converted_checkpoint(mixtral, tmp_path):
    d, plan, _ = mixtral
    convspec.convert("mixtral", d, tmp_path / "fused")
    back = plan.inverse()
    original = dict(back.load(tmp_path / "fused"))
    rng = random.Random(61)
    for target, t in original.items():
        for region in _shards(tuple(t.shape), rng):
            got, stats = read_regions(back, tmp_path / "fused", {target: region})
            assert torch.equal(got[target], take(t, region)), (target, region)
            assert stats.wider == 0 and stats.bytes == _nbytes(region, t)


@pytest.fixture(scope="module")
def fused_qkv(tmp_path_factory):
    """q, k, v in Meta's rope order, fused into one qkv with the rows of each head permuted (GQA)."""
    d = tmp_path_factory.mktemp("qkv")
    heads, kv_heads, head_dim, hidden = 4, 2, 4, 6
    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(2):
        for name, rows in (
            ("wq", heads * head_dim),
            ("wk", kv_heads * head_dim),
            ("wv", kv_heads * head_dim),
        ):
            state[f"layers.{layer}.{name}.weight"] = torch.randn(rows, hidden, generator=g)
    save_file(state, str(d / "model.safetensors"))
    spec = convspec.spec.parse_spec(
        "spec qkv\n"
        "convert q = {p:path}.wq.weight, k = {p:path}.wk.weight, v = {p:path}.wv.weight\n"
        f"  -> {{p}}.qkv_proj.weight = cat(permute_rope(q, heads={heads}), permute_rope(k, heads={kv_heads}), v)\n"
    )
    plan = convspec.compile(spec)
    return d, plan, dict(plan.load(d)), head_dim


def test_rows_of_whole_heads_read_exactly_and_rows_through_a_head_read_the_heads_they_touch(fused_qkv):
    d, plan, full, head_dim = fused_qkv
    target = "layers.1.qkv_proj.weight"
    t = full[target]
    rng = random.Random(7)
    for region in _shards(tuple(t.shape), rng):
        got, stats = read_regions(plan, d, {target: region})
        assert torch.equal(got[target], take(t, region)), region
    aligned = ((head_dim, 5 * head_dim), (0, t.shape[1]))  # heads 1..3 of q and head 0 of k
    got, stats = read_regions(plan, d, {target: aligned})
    assert stats.wider == 0 and stats.bytes == _nbytes(aligned, t)
    through = ((head_dim + 1, 2 * head_dim + 1), (0, t.shape[1]))  # cuts heads 1 and 2 of q
    got, stats = read_regions(plan, d, {target: through})
    assert torch.equal(got[target], take(t, through))
    assert stats.wider == 1 and stats.bytes == _nbytes(((0, 2 * head_dim), (0, t.shape[1])), t)


def test_a_region_outside_the_tensor_or_an_unknown_key_is_refused(mixtral):
    d, plan, full = mixtral
    target = "model.layers.0.mlp.experts.down_proj"
    with pytest.raises(ConvspecError, match="is not inside"):
        read_regions(plan, d, {target: ((0, 99), (0, 1), (0, 1))})
    with pytest.raises(ConvspecError, match="is not inside"):
        read_regions(plan, d, {target: ((0, 1),)})
    with pytest.raises(ConvspecError, match="is not inside"):
        read_regions(plan, d, {target: (("0", "1"), (0, 1), (0, 1))})
    with pytest.raises(ConvspecError, match=r"region \[\[0, 1\], .*\.\.\.\] is not inside"):
        read_regions(plan, d, {target: ((0, 1),) * 100_000})  # shown cut short
    with pytest.raises(ConvspecError, match="not a key of the converted checkpoint"):
        read_regions(plan, d, {"model.nothing.weight": None})
