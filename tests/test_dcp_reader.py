"""The torch.distributed.checkpoint reader (issue 16): `dcp.load` through `ConvspecReader` loads an
original-layout checkpoint as its converted layout, into plain tensors on one process and into
DTensor shards on 2 and 4 gloo processes (each with a timeout and its process group torn down).
Every loaded tensor equals `plan.load` (narrowed to the shard); each rank reads exactly the source
bytes of its shards and of the replicated tensors; the metadata is made from headers alone."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import convspec
from convspec.errors import ConvspecError
from convspec.integrations.dcp import ConvspecReader
from convspec.io.checkpoint import Checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from helpers.distributed import run_workers  # noqa: E402
from make_tiny_mixtral import make  # noqa: E402

WORKER = r"""
import json, sys
from datetime import timedelta
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import convspec
from convspec.integrations.dcp import ConvspecReader
from convspec.io.checkpoint import Checkpoint
from convspec.ops.slicing import strides
from convspec.sharded import local_region
from tests.helpers.placements import mixtral_placement

out, src = sys.argv[1], sys.argv[2]
READ = [0]  # bytes asked of the checkpoint's files, by anything
_read_many = Checkpoint.read_many


def counted(self, reads):
    READ[0] += sum(len(v) for _, _, v in reads)
    return _read_many(self, reads)


def load(plan, full, mesh, two_d):
    state, placed, expected = {}, {}, 0
    for key, t in full.items():
        places = mixtral_placement(key, two_d)
        region = local_region(tuple(t.shape), mesh, places)
        local = torch.full([b - a for a, b in region], -7, dtype=t.dtype)  # nothing to keep
        state[key] = DTensor.from_local(local, mesh, places, run_check=False, shape=t.shape,
                                        stride=strides(tuple(t.shape)))
        placed[key] = state[key].placements  # as DTensor normalizes them (Shard(-1) to the last dim)
        expected += local.numel() * local.element_size()
    reader = ConvspecReader(plan, src)
    reader.check(state)
    before = READ[0]
    dcp.load(state, storage_reader=reader)
    bad = []
    for key, t in full.items():
        region = local_region(tuple(t.shape), mesh, mixtral_placement(key, two_d))
        want = t[tuple(slice(a, b) for a, b in region)]
        got = state[key]
        if not isinstance(got, DTensor) or got.placements != placed[key] or \
                not got.to_local().equal(want):
            bad.append(key)
    s = reader.stats
    return {"bad": bad, "read": READ[0] - before, "stats": [s.bytes, s.runs, s.wider],
            "expected": expected, "keys": len(state)}


dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
try:
    plan = convspec.compile("mixtral", config=f"{src}/config.json")
    full = plan.load(src)
    Checkpoint.read_many = counted
    result = {"1d": load(plan, full, init_device_mesh("cpu", (world,)), False)}
    if world == 4:
        result["2d"] = load(plan, full, init_device_mesh("cpu", (2, 2)), True)
finally:
    dist.destroy_process_group()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("dcp") / "tiny"
    make(d, layers=2, experts=4)
    return d


@pytest.fixture(scope="module")
def plan(src):
    return convspec.compile("mixtral", config=f"{src}/config.json")


@pytest.fixture
def reads(monkeypatch):
    """Bytes asked of any checkpoint's files from now on."""
    count = [0]
    read_many = Checkpoint.read_many

    def counted(self, reads):
        count[0] += sum(len(v) for _, _, v in reads)
        return read_many(self, reads)

    monkeypatch.setattr(Checkpoint, "read_many", counted)
    return count


def _load_one_process(state: dict, reader: ConvspecReader) -> None:
    with warnings.catch_warnings():  # DCP warns that it assumes one process, as asked
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)


def test_one_process_loads_plain_tensors_bit_for_bit(src, plan, reads):
    full = plan.load(src)
    state = {k: torch.full(t.shape, -7, dtype=t.dtype) for k, t in full.items()}
    reader = ConvspecReader(plan, src)
    reads[0] = 0
    _load_one_process(state, reader)
    assert state.keys() == full.keys()
    for k, t in full.items():
        assert state[k].dtype == t.dtype and state[k].view(torch.uint8).equal(t.view(torch.uint8)), k
    tensor_bytes = sum(t.numel() * t.element_size() for t in full.values())
    assert reader.stats.bytes == reads[0] == tensor_bytes  # each source byte once, nothing else
    assert reader.stats.wider == 0


def test_read_metadata_reads_headers_only(src, plan, reads):
    reader = ConvspecReader(plan, src)
    meta = reader.read_metadata()
    assert reads[0] == 0
    full = plan.load(src)
    assert meta.state_dict_metadata.keys() == full.keys()
    for k, md in meta.state_dict_metadata.items():
        assert md.size == full[k].shape and md.properties.dtype == full[k].dtype
        assert [(c.offsets, c.sizes) for c in md.chunks] == [(torch.Size([0] * full[k].ndim), full[k].shape)]


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_loads_its_dtensor_shards_reading_only_their_bytes(src, tmp_path, world):
    results = run_workers(WORKER, world, tmp_path, src)
    full_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    for r in results:
        for mode in ["1d", "2d"] if world == 4 else ["1d"]:
            m = r[mode]
            assert m["bad"] == [] and m["keys"] == 21, m
            # DCP's planner asks each rank for exactly its local shards (one chunk each, the stored
            # chunk being the whole tensor): its shards and the replicated tensors, never more
            assert m["read"] == m["stats"][0] == m["expected"], m
            assert m["stats"][2] == 0 and m["read"] < full_bytes * 0.8


def test_a_state_dict_the_checkpoint_cannot_fill_is_one_clear_error(src, plan, reads):
    reader = ConvspecReader(plan, src)
    full = plan.load(src)
    reads[0] = 0
    original = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    with pytest.raises(ConvspecError, match=f"{original} is not in the converted layout") as exc:
        reader.check({original: torch.empty(48, 32)})
    assert "is a key of the original checkpoint" in exc.value.hint
    state = {"model.norm.weigth": torch.empty(32)}
    with pytest.raises(ConvspecError) as exc:
        reader.check(state)
    assert exc.value.hint == "did you mean model.norm.weight?"
    state = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in full.items()}
    state["model.norm.weight"] = torch.empty(5)
    with pytest.raises(ConvspecError, match=r"model.norm.weight has shape \[5\]; the checkpoint's is \[32\]"):
        reader.check(state)
    assert reads[0] == 0  # refused before any data was read
    # what dcp.load itself says of the same state dict: its planner's error, wrapped (no data read)
    with pytest.raises(dcp.api.CheckpointException) as wrapped:
        _load_one_process(state, reader)
    assert "Size mismatch between saved torch.Size([32]) and current: torch.Size([5])" in str(wrapped.value)
    assert reads[0] == 0


def test_a_checkpoint_the_plan_does_not_fit_is_refused_on_construction(tmp_path, plan):
    with pytest.raises(ConvspecError):
        ConvspecReader(plan, tmp_path)  # no safetensors here


def test_a_non_tensor_item_is_refused(src, plan):
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import _create_read_item_for_byteio

    reader = ConvspecReader(plan, src)
    item = _create_read_item_for_byteio(MetadataIndex("x"), 0, MetadataIndex("x"), 0, 0)
    with pytest.raises(ConvspecError, match="non-tensor value"):
        reader.read_data(LoadPlan([item]), None)


def test_a_checkpoint_id_given_to_dcp_load_names_the_checkpoint_read(src, plan, tmp_path):
    other = tmp_path / "other"
    make(other, layers=2, experts=4, seed=1)
    assert ConvspecReader.validate_checkpoint_id(other)
    assert not ConvspecReader.validate_checkpoint_id(tmp_path)  # no safetensors file in it
    want = plan.load(other)
    state = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in want.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=other, storage_reader=ConvspecReader(plan, src), no_dist=True)
    assert all(state[k].equal(t) for k, t in want.items())
