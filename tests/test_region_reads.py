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
from convspec.blocks import Run
from convspec.errors import ConvspecError
from convspec.io.checkpoint import Checkpoint
from convspec.ops.slicing import take
from convspec.regions import RegionReader, cut_runs, read_regions
from convspec.streaming import bind_checkpoint

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


def _readers(plan, d):
    """Two readers of one checkpoint: the byte-run path where it applies, and the walk alone."""
    ckpt = Checkpoint(d)
    bound = bind_checkpoint(plan, ckpt)
    fast, walk = RegionReader(bound, ckpt), RegionReader(bound, ckpt)
    walk.by_runs = False
    return bound, fast, walk


def _qwen2_moe(d) -> None:
    """Per-expert gate/up/down of 6 experts, as DeepSeek-V3 and Qwen2-MoE store them (the
    `qwen2_moe` spec, which `deepseek_v3` names)."""
    g = torch.Generator().manual_seed(2)
    sizes = {"gate_proj": (10, 6), "up_proj": (10, 6), "down_proj": (6, 10)}
    state = {
        f"model.layers.{layer}.mlp.experts.{e}.{name}.weight": torch.randn(*shape, generator=g)
        for layer in range(2)
        for e in range(6)
        for name, shape in sizes.items()
    }
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))


@pytest.mark.parametrize("case", ["mixtral", "mixtral inverse", "qwen2_moe", "qwen2_moe inverse"])
def test_a_block_move_target_is_read_from_its_byte_runs_bit_for_bit_as_the_walk_reads_it(
    mixtral, tmp_path, case
):
    d, plan, _ = mixtral
    if case.startswith("qwen2_moe"):
        d, plan = tmp_path / "qwen", convspec.compile("qwen2_moe")
        _qwen2_moe(d)
    if case.endswith("inverse"):  # unstack and split: the per-expert keys, from the fused checkpoint
        convspec.convert(case.split()[0], d, tmp_path / "fused")
        d, plan = tmp_path / "fused", plan.inverse()
    bound, fast, walk = _readers(plan, d)
    moved = [t for t in bound.outputs if t not in fast._source_of]  # the targets a group makes
    assert moved
    rng = random.Random(1616)
    for target in moved:
        shape = bound.outputs[target][0]
        for region in [*_shards(shape, rng), *(_random_region(shape, rng) for _ in range(8))]:
            (fb, fr, taken), (wb, wr) = _count(fast), _count(walk)[:2]
            got, want = fast.read(target, region), walk.read(target, region)
            assert got.dtype == want.dtype and torch.equal(got, want), (target, region)
            if all(a < b for a, b in region):
                assert fast.by_runs_reads == taken + 1  # taken: no walk, no stack or cat
                assert fast.stats.bytes - fb == walk.stats.bytes - wb, (target, region)
                assert fast.stats.runs - fr == walk.stats.runs - wr, (target, region)
    assert walk.by_runs_reads == 0 and fast.stats.wider == walk.stats.wider == 0


def test_a_subclass_that_reads_something_else_than_values_gets_the_walk(mixtral):
    d, plan, full = mixtral

    class Traced(RegionReader):
        def finish(self, m, read):
            return super().finish(m, read)

    ckpt = Checkpoint(d)
    reader = Traced(bind_checkpoint(plan, ckpt), ckpt)
    target = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(reader.read(target), full[target])
    assert reader.by_runs_reads == 0
    assert reader.stats.bytes == full[target].numel() * full[target].element_size()


def test_runs_cut_to_a_region_land_in_the_regions_own_buffer_and_join_where_contiguous():
    # a (4, 2) int8 target: rows 0-1 from "a" (contiguous), rows 2-3 from "b" at offset 10
    runs = [Run("a", 0, 0, 4), Run("b", 10, 4, 4)]
    assert cut_runs(runs, (4, 2), ((1, 3), (0, 2)), 1) == [Run("a", 2, 0, 2), Run("b", 10, 2, 2)]
    assert cut_runs(runs, (4, 2), ((0, 2), (1, 2)), 1) == [Run("a", 1, 0, 1), Run("a", 3, 1, 1)]
    assert cut_runs(runs, (4, 2), ((0, 4), (0, 2)), 1) == runs
    # one source in two runs that happen to meet: one read
    assert cut_runs([Run("a", 0, 0, 2), Run("a", 2, 2, 2)], (2, 2), ((0, 2), (0, 2)), 1) == [
        Run("a", 0, 0, 4)
    ]


def _count(reader: RegionReader) -> tuple[int, int, int]:
    return reader.stats.bytes, reader.stats.runs, reader.by_runs_reads


def _random_region(shape, rng: random.Random):
    region = []
    for size in shape:
        a = rng.randrange(size)
        region.append((a, rng.randrange(a + 1, size + 1)))
    return tuple(region)


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
