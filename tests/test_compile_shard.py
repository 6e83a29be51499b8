"""`convspec compile SPEC --against DIR --shard tp=N,ep=N` (issue 16): transformers' tp and ep plans
as placements, each rank's region as DTensor cuts it, and each rank's bytes and read calls counted
from headers only: the same as a real region read of the same shards, and as `load_sharded` reads
on a gloo mesh. No data is read; a bad shard or one that does not divide is one error, exit 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

import convspec
from convspec.cli import main
from convspec.dtypes import ITEMSIZE
from convspec.errors import ConvspecError
from convspec.io.checkpoint import Checkpoint
from convspec.io.writer import write_file
from convspec.ops.slicing import SliceMap
from convspec.regions import RegionReader
from convspec.shardplan import (
    CountingReader,
    coords_of,
    parse_shard,
    placements_for,
    rank_blocks,
    rank_io,
    shard_report,
)
from convspec.streaming import bind_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from helpers.distributed import run_workers  # noqa: E402
from make_tiny_mixtral import make  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARDS = ["tp=2", "ep=2", "tp=2,ep=2"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard") / "tiny"
    make(d, layers=2, experts=4)
    return d


@pytest.fixture(scope="module")
def bound(src):
    plan = convspec.compile("mixtral", config=str(src / "config.json"))
    return bind_checkpoint(plan, Checkpoint(src))


# ---- the shard spec and the placements ---------------------------------------------------------


def test_a_shard_spec_names_each_axis_once_in_mesh_order():
    assert parse_shard("tp=4") == {"tp": 4}
    assert parse_shard("ep=2") == {"ep": 2}
    assert list(parse_shard("tp=2, ep=3").items()) == [("ep", 3), ("tp", 2)]  # the mesh is (ep, tp)


@pytest.mark.parametrize(
    "text, why",
    [
        ("dp=2", "unknown axis 'dp'"),
        ("tp=0", "tp=0 is not a positive whole number"),
        ("tp=-2", "is not a positive whole number"),
        ("tp=two", "is not a positive whole number"),
        ("tp=00", "tp=00 is not a positive whole number"),
        ("tp=" + "9" * 5000, "a mesh of more than 131,072 ranks"),  # no int of 5000 digits
        ("ep=512,tp=512", "a mesh of more than 131,072 ranks"),
        ("x" * 5000 + "=2", "unknown axis 'xxxx"),
        ("tp=2,tp=4", "tp is given twice"),
        ("tp", "'tp' is not AXIS=N"),
        ("", "is not AXIS=N"),
    ],
)
def test_a_bad_shard_spec_says_what_is_wrong(text, why):
    with pytest.raises(ConvspecError, match="bad shard") as exc:
        parse_shard(text)
    assert why in exc.value.message
    assert len(exc.value.message) < 200  # a huge shard text is shown cut short


def test_placements_follow_transformers_styles(bound):
    tp = placements_for(bound, "mixtral", "tp=2")
    assert (tp.mesh_shape, tp.mesh_dim_names) == ((2,), ("tp",))
    p = tp.placements
    assert p["model.layers.0.self_attn.q_proj.weight"] == (Shard(0),)  # colwise: output features
    assert p["model.layers.0.self_attn.o_proj.weight"] == (Shard(1),)  # rowwise: input features
    assert p["model.layers.0.mlp.experts.down_proj"] == (Shard(2),)  # rowwise on the stacked experts
    assert p["model.embed_tokens.weight"] == (Shard(0),)  # vocabulary parallel, as transformers adds it
    assert p["lm_head.weight"] == p["model.norm.weight"] == (Replicate(),)
    # packed_colwise: a part of gate and a part of up, DTensor's strided shard as transformers makes it
    assert p["model.layers.0.mlp.experts.gate_up_proj"] == (_StridedShard(1, split_factor=2),)
    assert tp.reasons == {}

    ep = placements_for(bound, "mixtral", "ep=2").placements
    assert (
        ep["model.layers.1.mlp.experts.gate_up_proj"]
        == ep["model.layers.1.mlp.experts.down_proj"]
        == (Shard(0),)
    )
    assert ep["model.layers.0.self_attn.q_proj.weight"] == (Replicate(),)  # no tp axis: whole

    both = placements_for(bound, "mixtral", "tp=2,ep=2")
    assert both.mesh_dim_names == ("ep", "tp") and both.reasons == {}
    # the ep plan names the experts, so transformers drops their tp rules: whole experts on the ep dim
    assert both.placements["model.layers.0.mlp.experts.gate_up_proj"] == (Shard(0), Replicate())
    assert both.placements["model.layers.0.self_attn.q_proj.weight"] == (Replicate(), Shard(0))


def test_a_model_type_without_the_plan_is_refused(bound):
    with pytest.raises(ConvspecError, match="no ep plan for model type 'llama'"):
        placements_for(bound, "llama", "ep=2")
    with pytest.raises(ConvspecError, match="no tp plan for model type 'no_such_model'"):
        placements_for(bound, "no_such_model", "tp=2")


@pytest.mark.parametrize(
    "shape, mesh, placements",
    [
        ((8, 6), (2,), (Shard(0),)),
        ((8, 6), (3,), (Shard(1),)),
        ((4, 96, 32), (2, 2), (Shard(0), Shard(1))),
        ((4, 32, 48), (2, 2), (Shard(0), Replicate())),
        ((16, 8), (2, 4), (Shard(0), Shard(0))),  # two mesh dims cutting one tensor dim
        ((5,), (2, 3), (Replicate(), Replicate())),
    ],
)
def test_each_rank_region_is_the_one_dtensor_computes(shape, mesh, placements):
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    for rank in range(math.prod(mesh)):
        coords = coords_of(rank, mesh)
        size, offset = _compute_local_shape_and_global_offset(shape, mesh, list(coords), placements)
        want = tuple((o, o + s) for o, s in zip(offset, size, strict=True))
        assert rank_blocks(shape, mesh, placements, coords) == (want,)


def test_ranks_are_numbered_row_major_as_init_device_mesh_does():
    assert [coords_of(r, (2, 3)) for r in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_overrides_place_what_they_match_before_the_plans(bound):
    overrides = {
        "*.gate_up_proj": ["experts", 1],  # one per mesh dim: a style, or a tensor dim
        r"re:.*\.o_proj\.weight": "replicate",
        "model.embed_tokens.weight": "grouped_gemm",  # an ep style goes on the ep dim
    }
    p = placements_for(bound, "mixtral", "tp=2,ep=2", overrides).placements
    assert p["model.layers.1.mlp.experts.gate_up_proj"] == (Shard(0), Shard(1))
    assert p["model.layers.0.self_attn.o_proj.weight"] == (Replicate(), Replicate())
    assert p["model.embed_tokens.weight"] == (Shard(0), Replicate())
    assert p["model.layers.0.self_attn.q_proj.weight"] == (Replicate(), Shard(0))  # the plan's
    # a model type transformers has no plan for is placed by the overrides alone
    alone = placements_for(bound, "no_such_model", "tp=2", {"*.q_proj.weight": "colwise"}).placements
    assert alone["model.layers.0.self_attn.q_proj.weight"] == (Shard(0),)
    assert alone["model.layers.0.self_attn.o_proj.weight"] == (Replicate(),)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"*": "nope"}, "placement 'nope' of '*' is not a style"),
        ({"*": [0, 0]}, "names 2 mesh dim(s) for a mesh of 1 (tp)"),
        ({"re:(": 0}, "is not a regex"),
        ({"*": -1}, "is not a style"),
    ],
)
def test_a_bad_override_is_refused(bound, overrides, message):
    with pytest.raises(ConvspecError) as exc:
        placements_for(bound, "mixtral", "tp=2", overrides)
    assert message in exc.value.message


# ---- what each rank reads ----------------------------------------------------------------------


@pytest.mark.parametrize("shard", SHARDS)
def test_counted_reads_are_the_real_reads_of_the_same_shards(src, bound, shard):
    """Counted from headers, each rank's bytes and read calls are those of a real region read of its
    shards (what `load_sharded` does on that rank), and its bytes the size of its regions."""
    placed = placements_for(bound, "mixtral", shard)
    ranks = rank_io(bound, placed)
    assert len(ranks) == math.prod(placed.mesh_shape)
    for r in ranks:
        real = RegionReader(bound, Checkpoint(src))
        ideal = 0
        for target, p in placed.placements.items():
            shape, dtype = bound.outputs[target]
            for region in rank_blocks(shape, placed.mesh_shape, p, r.coords):
                real.read(target, region)
                ideal += math.prod(b - a for a, b in region) * ITEMSIZE[dtype]
        assert (r.stats.bytes, r.stats.runs) == (real.stats.bytes, real.stats.runs)
        assert r.stats.bytes == ideal and r.wider == {}  # the tiny Mixtral's maps are all exact


@pytest.mark.parametrize("shard", SHARDS)
def test_across_ranks_each_tensor_is_read_once_per_replica(bound, shard):
    """Summed over ranks, a tensor is read as many times as the mesh holds copies of it: once per
    rank where it is whole, once per replica of its shards where it is cut."""
    placed = placements_for(bound, "mixtral", shard)
    world = math.prod(placed.mesh_shape)
    want = 0
    for target, p in placed.placements.items():
        shape, dtype = bound.outputs[target]
        cuts = math.prod(
            n for n, x in zip(placed.mesh_shape, p, strict=True) if isinstance(x, (Shard, _StridedShard))
        )
        want += math.prod(shape) * ITEMSIZE[dtype] * world // cuts
    assert sum(r.stats.bytes for r in rank_io(bound, placed)) == want


def test_an_op_that_cannot_map_the_shard_is_named_with_its_target(tmp_path):
    """A rank's rows that cut through a rope head are read as the whole head and narrowed: the
    report names the target and the op."""
    d = tmp_path / "rope"
    d.mkdir()
    write_file(d / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": torch.ones(16, 8)})
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    spec = tmp_path / "rope.yaml"
    spec.write_text(
        'spec: rope\nmodel_types: [llama]\nrules:\n  - convert:\n      q: "{p:path}.q_proj.weight"\n'
        '    to:\n      "{p}.q_proj.weight": permute_rope(q, heads=2)\n'
    )
    plan = convspec.compile(str(spec), config=str(d / "config.json"))
    report = shard_report(bind_checkpoint(plan, Checkpoint(d)), "llama", "tp=4")  # 4 rows: half a head
    key = "model.layers.0.self_attn.q_proj.weight"
    assert all(r.wider == {key: ["permute_rope"]} for r in report.ranks)
    assert all(r.stats.bytes == 8 * 8 * 4 for r in report.ranks)  # the whole head of 8 rows
    assert "permute_rope" in report.fallbacks()[key]


def test_every_op_maps_a_slice_on_meta_tensors(bound):
    """The counting reader runs each slice map on meta tensors: every built-in op gives the shape and
    dtype it gives on data (`test_slice_maps.CASES` holds a case of each)."""
    from test_slice_maps import CASES, _dtypes

    from convspec.ops import OPS, TensorInfo
    from convspec.ops.slicing import finish, take

    refusing = {"no_low_rank"}  # refuses whatever it is given: it has no slice to map
    assert {name for name, _, _ in CASES} >= {
        n for n, op in OPS.items() if type(op).__module__.startswith("convspec.") and n not in refusing
    }
    reader = CountingReader(bound)
    for name, params, shapes in CASES:
        dtypes = _dtypes(name, shapes)  # the dtypes the op takes (dequant_ggml: uint8 bytes)
        infos = [TensorInfo(tuple(s), d) for s, d in zip(shapes, dtypes, strict=True)]
        xs = [torch.zeros(s, dtype=getattr(torch, d)) for s, d in zip(shapes, dtypes, strict=True)]
        for k, out in enumerate(OPS[name].apply(params, xs)):
            region = tuple((0, (n + 1) // 2) for n in out.shape)
            m = OPS[name].slice_map(params, infos, k, region)
            real = [
                torch.cat([take(x, r) for r in rs], m.join) if rs else None
                for x, rs in zip(xs, m.reads, strict=True)
            ]
            meta = [None if x is None else x.to("meta") for x in real]
            got, want = reader.finish(m, meta), finish(m, real)
            assert (got.device.type, got.shape, got.dtype) == ("meta", want.shape, want.dtype), name


def test_an_op_without_a_meta_kernel_runs_on_empty_memory(bound):
    class NoMeta:
        name = "no_meta"

        def apply(self, p, ins):
            if ins[0].device.type == "meta":
                raise NotImplementedError("no meta kernel")
            return [ins[0] * 2]

    m = SliceMap(reads=((((0, 4), (0, 2)),),), op=NoMeta(), params={})
    got = CountingReader(bound).finish(m, [torch.empty(4, 2, device="meta", dtype=torch.bfloat16)])
    assert (got.device.type, tuple(got.shape), got.dtype) == ("meta", (4, 2), torch.bfloat16)


# ---- the command line --------------------------------------------------------------------------


def _no_reads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("compile --shard read tensor data")

    monkeypatch.setattr(Checkpoint, "read_many", refuse)
    monkeypatch.setattr(Checkpoint, "assemble", refuse)


@pytest.mark.parametrize("shard", SHARDS)
def test_compile_shard_prints_each_rank_from_headers_only(src, bound, shard, capsys, monkeypatch):
    _no_reads(monkeypatch)
    assert main(["compile", "mixtral", "--against", str(src), "--shard", shard]) == 0
    out = capsys.readouterr().out
    placed = placements_for(bound, "mixtral", shard)
    for r in rank_io(bound, placed):
        assert f"{r.stats.bytes:,}" in out and f"{r.stats.runs:,}" in out
    assert "no target is read wider than its shard" in out  # packed gate/up too: each half's part
    assert main(["compile", "mixtral", "--against", str(src), "--shard", shard, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mesh"] == parse_shard(shard) and len(data["ranks"]) == math.prod(placed.mesh_shape)
    assert [r["bytes"] for r in data["ranks"]] == [r.stats.bytes for r in rank_io(bound, placed)]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("shard", ["tp=0", "dp=2", "tp=2,tp=2", "tp2"])
def test_a_bad_shard_is_one_error_exit_2(src, shard, capsys, monkeypatch):
    _no_reads(monkeypatch)
    assert main(["compile", "mixtral", "--against", str(src), "--shard", shard]) == 2
    assert "bad shard" in _one_error(capsys)


def test_a_shard_that_does_not_divide_is_the_load_sharded_error(src, bound, capsys, monkeypatch):
    """The embedding's 128 rows (vocabulary parallel) do not divide by 3: said as `load_sharded` says it,
    for the first target that does not fit."""
    from convspec.sharded import _check_fits

    class Mesh:  # what _check_fits asks of a mesh
        ndim = 1

        def size(self, dim):
            return 3

    with pytest.raises(ConvspecError) as want:
        _check_fits("model.embed_tokens.weight", (128, 32), Mesh(), (Shard(0),))
    _no_reads(monkeypatch)
    assert main(["compile", "mixtral", "--against", str(src), "--shard", "tp=3"]) == 2
    assert _one_error(capsys) == f"error: {want.value.message}"


def test_shard_needs_a_checkpoint(capsys):
    assert main(["compile", "mixtral", "--shard", "tp=2"]) == 2
    assert "--shard" in _one_error(capsys)


def test_a_placements_file_overrides_the_plans(src, tmp_path, capsys, monkeypatch):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"*.gate_up_proj": ["experts", 1]}))
    argv = ["compile", "mixtral", "--against", str(src), "--shard", "tp=2,ep=2", "--placements", str(good)]
    _no_reads(monkeypatch)
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["placements"]["model.layers.0.mlp.experts.gate_up_proj"] == ["Shard(dim=0)", "Shard(dim=1)"]
    for text, message in [
        ("{", "invalid JSON"),
        ("[1]", "a JSON object"),
        ('{"*": "nope"}', "is not a style"),
        ('{"*": "colwise", "*": "rowwise"}', "is given twice"),
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ]:
        good.write_text(text)
        assert main(argv) == 2
        assert message in _one_error(capsys)
    assert main([*argv[:4], "--placements", str(good)]) == 2  # without --shard
    assert "--placements" in _one_error(capsys)


# ---- on a real mesh ----------------------------------------------------------------------------

WORKER = r"""
import json, os, sys
from datetime import timedelta
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import convspec
from convspec.io.checkpoint import Checkpoint
from convspec.sharded import load_sharded
from convspec.shardplan import placements_for
from convspec.streaming import bind_checkpoint

out, src, shard = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
try:
    plan = convspec.compile("mixtral", config=f"{src}/config.json")
    placed = placements_for(bind_checkpoint(plan, Checkpoint(src)), "mixtral", shard)
    mesh = init_device_mesh("cpu", placed.mesh_shape, mesh_dim_names=placed.mesh_dim_names)
    tensors, stats = load_sharded(plan, src, mesh, placed.placements)
    result = {"bytes": stats.bytes, "runs": stats.runs, "coords": mesh.get_coordinate()}
finally:
    dist.destroy_process_group()
with open(f"{out}/rank{os.environ['RANK']}.json", "w") as f:
    json.dump(result, f)
"""


def test_load_sharded_reads_what_compile_shard_counted(src, bound, tmp_path):
    """On a 2x2 gloo mesh (ep, tp), every rank's `load_sharded` reads exactly the bytes and read
    calls `compile --shard tp=2,ep=2` counted for it from the headers."""
    got = run_workers(WORKER, 4, tmp_path, src, "tp=2,ep=2")
    counted = rank_io(bound, placements_for(bound, "mixtral", "tp=2,ep=2"))
    assert [(g["bytes"], g["runs"], tuple(g["coords"])) for g in got] == [
        (r.stats.bytes, r.stats.runs, r.coords) for r in counted
    ]


# ---- the bundled plans -------------------------------------------------------------------------


def test_the_bundled_plans_are_what_transformers_says():
    """convspec/hf/tp_plans.json is regenerated by `python tools/tp_plans.py`, never edited by hand."""
    pytest.importorskip("transformers")
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "tp_plans.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_compile_shard_places_each_scale_grid_as_its_weight(tmp_path, capsys, monkeypatch):
    """A DeepSeek-V3 FP8 checkpoint: every `weight_scale_inv` is placed as its weight (listed in the
    JSON), and a tp size that cuts a block is the bind error, exit 2 (issue 17)."""
    from test_sharded_quant import write_fp8

    src = write_fp8(tmp_path / "fp8")
    _no_reads(monkeypatch)
    assert main(["compile", "deepseek_v3", "--against", str(src), "--shard", "tp=2"]) == 0
    assert "scale grids placed as their weights: 9 of 9" in capsys.readouterr().out
    assert main(["compile", "deepseek_v3", "--against", str(src), "--shard", "tp=2", "--json"]) == 0
    placed = json.loads(capsys.readouterr().out)["placements"]
    grids = [k for k in placed if k.endswith("_scale_inv")]
    assert len(grids) == 9 and all(placed[g] == placed[g.removesuffix("_scale_inv")] for g in grids)
    assert placed["model.layers.1.mlp.experts.gate_up_proj_scale_inv"] == ["_StridedShard(dim=1, sf=2)"]
    assert main(["compile", "deepseek_v3", "--against", str(src), "--shard", "tp=4"]) == 2
    assert _one_error(capsys).startswith(
        "error: model.layers.0.mlp.down_proj.weight: tp=4 gives each rank 8 columns of dim 1, which cuts "
        "the blocks of 16 columns"
    )
