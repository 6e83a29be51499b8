"""Sharded loading on torch.distributed (issue 16): several processes on this machine (gloo, CPU),
each with a timeout and its process group torn down. Every rank's local shard of every converted
tensor equals the full load narrowed to it, and each rank reads exactly the bytes of its shards
(plus the replicated tensors): never a whole sharded tensor. A placement that does not divide is one
clear error on every rank, before any data is read."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from helpers.distributed import run_workers  # noqa: E402
from make_tiny_mixtral import make  # noqa: E402
from torch.distributed.tensor import Replicate, Shard  # noqa: E402
from torch.distributed.tensor.placement_types import _StridedShard  # noqa: E402

from convspec.errors import ConvspecError  # noqa: E402
from convspec.sharded import _check_fits, local_blocks  # noqa: E402
from convspec.shardplan import _Mesh  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys
from datetime import timedelta
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard

import convspec
from convspec.errors import ConvspecError
from convspec.sharded import load_sharded, local_region, placements_of
from tests.helpers.placements import mixtral_placement

out, src, mode = sys.argv[1], sys.argv[2], sys.argv[3]
from convspec.io.checkpoint import Checkpoint

READ = [0]  # bytes asked of the checkpoint's files, by anything
_read_many = Checkpoint.read_many


def counted(self, reads):
    READ[0] += sum(len(v) for _, _, v in reads)
    return _read_many(self, reads)


Checkpoint.read_many = counted
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
result = {}
try:
    mesh = init_device_mesh("cpu", (2, world // 2) if mode == "2d" else (world,))
    plan = convspec.compile("mixtral", config=f"{src}/config.json")

    def placement(key):
        if mode == "bad" and key == "lm_head.weight":
            return [Shard(1), Shard(0)]  # two placements for a 1-D mesh
        return mixtral_placement(key, mode == "2d")

    tensors, stats = load_sharded(plan, src, mesh, placement)
    full = plan.load(src)
    bad, expected = [], 0
    for key, t in tensors.items():
        region = local_region(tuple(full[key].shape), mesh, placements_of(placement(key), full[key].ndim))
        want = full[key][tuple(slice(a, b) for a, b in region)]
        local = t.to_local()
        if tuple(t.shape) != tuple(full[key].shape) or not local.equal(want):
            bad.append(key)
        expected += want.numel() * want.element_size()
    result = {"bad": bad, "bytes": stats.bytes, "expected": expected, "wider": stats.wider,
              "keys": len(tensors)}
except ConvspecError as exc:
    result = {"error": exc.message, "read": READ[0]}
finally:
    dist.destroy_process_group()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded") / "tiny"
    make(d, layers=2, experts=4)
    return d


def _run(world: int, src: Path, out: Path, mode: str = "good") -> list[dict]:
    return run_workers(WORKER, world, out, src, mode)


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_holds_its_shards_and_reads_only_their_bytes(src, tmp_path, world):
    results = _run(world, src, tmp_path)
    full_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    for r in results:
        assert r["bad"] == [] and r["keys"] == 21
        assert r["wider"] == 0
        assert r["bytes"] == r["expected"]  # exactly its shards and the replicated tensors
        assert r["bytes"] < full_bytes * 0.8  # most of the checkpoint is sharded, not read by all


def test_a_two_dimensional_mesh_places_experts_and_rows_at_once(src, tmp_path):
    results = _run(4, src, tmp_path, mode="2d")
    for r in results:
        assert r["bad"] == [] and r["keys"] == 21 and r["wider"] == 0
        assert r["bytes"] == r["expected"]


def test_a_placement_that_does_not_fit_the_mesh_is_one_error_on_every_rank(src, tmp_path):
    results = _run(2, src, tmp_path, mode="bad")
    assert [r.get("error") for r in results] == ["lm_head.weight: 2 placement(s) for a mesh of 1 dims"] * 2
    assert all(r["read"] == 0 for r in results)  # refused before any data was read


def test_a_shard_that_does_not_divide_is_one_error_on_every_rank(src, tmp_path):
    results = _run(3, src, tmp_path)  # 4 experts over 3 ranks
    message = "does not divide into 3 shards"
    assert all(message in r.get("error", "") for r in results), results
    assert all(r["read"] == 0 for r in results)


INTO = r"""
import json, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import convspec
from tests.helpers.placements import model_holding


def same(t, want):  # a DTensor's local shard against the full tensor cut as torch's placements cut it
    mesh = t.device_mesh
    for n, p, c in zip(mesh.shape, t.placements, mesh.get_coordinate()):
        if not p.is_replicate():
            want = p._split_tensor(want, n, with_padding=False)[0][c]
    return t.to_local().equal(want)

out, src = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
try:
    plan = convspec.compile("mixtral", config=f"{src}/config.json")
    full = plan.load(src)
    mesh = init_device_mesh("cpu", (world,))

    # a model whose parameters are the converted keys, some of them DTensors as parallelize_module makes
    def value(key, t):
        value = torch.zeros_like(t)
        if key.endswith("experts.gate_up_proj"):
            return distribute_tensor(value, mesh, [Shard(0)])
        if key.endswith("o_proj.weight"):
            return distribute_tensor(value, mesh, [Shard(1)])
        return value

    model = model_holding(full, value)

    report = plan.load_into(model, src)
    bad, sharded = [], 0
    for key, p in model.named_parameters():
        if isinstance(p, DTensor):
            sharded += 1
            if not same(p, full[key]):
                bad.append(key)
        elif not p.equal(full[key]):
            bad.append(key)

    loaded = plan.load(src, shard={k: "experts" for k in full if k.endswith("experts.down_proj")})
    by_plan = [k for k, t in loaded.items() if isinstance(t, DTensor) and not same(t, full[k])]
    by_tp = plan.load(src, shard="tp=2")  # placed as transformers' tp plan for mixtral places them
    tp_bad = [k for k, t in by_tp.items() if not same(t, full[k])]
    cut = sorted({str(p) for t in by_tp.values() for p in t.placements if p.is_shard()})
    result = {"ok": report.ok, "bad": bad, "sharded": sharded, "by_plan": by_plan,
              "placed": sum(isinstance(t, DTensor) for t in loaded.values()),
              "tp_bad": tp_bad, "tp_cut": cut, "tp_read": by_tp.stats.bytes < loaded.stats.bytes}
finally:
    dist.destroy_process_group()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
"""


def test_a_model_with_dtensor_parameters_is_filled_shard_by_shard(src, tmp_path):
    for r in run_workers(INTO, 2, tmp_path, src):
        assert r == {
            "ok": True,
            "bad": [],
            "sharded": 4,
            "by_plan": [],
            "placed": 21,
            "tp_bad": [],
            "tp_cut": ["S(0)", "S(1)", "S(2)"],
            "tp_read": True,
        }


@pytest.mark.parametrize(
    "sizes, placements",
    [
        ((2,), [_StridedShard(1, split_factor=2)]),  # packed gate/up: a part of each half
        ((4,), [_StridedShard(1, split_factor=2)]),
        ((2,), [_StridedShard(1, split_factor=4)]),
        ((2, 2), [Shard(0), _StridedShard(1, split_factor=2)]),
        ((2, 2), [_StridedShard(1, split_factor=2), Shard(0)]),
        ((2, 2), [Shard(1), Shard(1)]),
        ((3,), [Shard(2)]),
        ((2, 3), [Replicate(), Shard(2)]),
    ],
)
def test_local_blocks_are_what_torch_placements_cut(sizes, placements):
    t = torch.arange(4 * 8 * 3).reshape(4, 8, 3)
    for coords in itertools.product(*(range(n) for n in sizes)):
        want = t
        for n, p, c in zip(sizes, placements, coords, strict=True):
            if not p.is_replicate():
                want = p._split_tensor(want, n, with_padding=False)[0][c]
        blocks = local_blocks(t.shape, sizes, coords, placements)
        got = torch.empty_like(want)
        for region, at in blocks:
            got[tuple(slice(o, o + b - a) for o, (a, b) in zip(at, region, strict=True))] = t[
                tuple(slice(a, b) for a, b in region)
            ]
        assert got.equal(want), (sizes, placements, coords)
        assert len(blocks) == math.prod(p.split_factor for p in placements if isinstance(p, _StridedShard))


def test_a_strided_shard_with_another_cut_on_its_dim_is_refused():
    with pytest.raises(ConvspecError, match="a strided shard .* with another placement on the same dim"):
        _check_fits("w", (4, 8), _Mesh((2, 2)), [Shard(1), _StridedShard(1, split_factor=2)])
    with pytest.raises(ConvspecError, match=r"does not divide into 2 shards of each of 2 parts"):
        _check_fits("w", (4, 6), _Mesh((2,)), [_StridedShard(1, split_factor=2)])


@pytest.mark.parametrize("shard", ["tp=2", {"model.embed_tokens.weight": "colwise"}])
def test_a_sharded_load_outside_a_distributed_job_is_one_clear_error(src, shard, monkeypatch):
    import convspec

    monkeypatch.delenv("RANK", raising=False)
    plan = convspec.compile("mixtral", config=f"{src}/config.json")
    with pytest.raises(ConvspecError, match="needs a torch.distributed job, and there is none") as exc:
        plan.load(src, shard=shard)
    assert "torchrun" in exc.value.hint
