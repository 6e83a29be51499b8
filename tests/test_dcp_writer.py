"""Saving through torch.distributed.checkpoint back to the original layout (issue 16): a state dict in
the converted layout, as DTensors sharded over 2 and 4 gloo processes (experts, colwise, rowwise, a
2-D mesh of EP x TP), saved with `ConvspecWriter`, is byte for byte what one process writes with
`plan.inverse().save` of the full state dict. A rank that fails leaves no directory and no hang."""

from __future__ import annotations

import filecmp
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

import convspec
from convspec.errors import ConvspecError
from convspec.io.checkpoint import Checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from helpers.distributed import run_workers  # noqa: E402
from make_tiny_mixtral import make  # noqa: E402

dcp = pytest.importorskip("torch.distributed.checkpoint")
from convspec.integrations.dcp_writer import ConvspecWriter  # noqa: E402

SHARD = 20_000  # bytes: the tiny checkpoint (108 kB) comes out as 6 files and an index

WORKER = r"""
import json, sys, warnings
from datetime import timedelta
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard

import convspec
from convspec.integrations.dcp_writer import ConvspecWriter
from convspec.sharded import load_sharded
from tests.helpers.placements import mixtral_placement

out, src, dst, mode, shard = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
warnings.simplefilter("ignore")
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
result = {}
try:
    mesh = init_device_mesh("cpu", (2, world // 2) if mode == "2d" else (world,))
    plan = convspec.compile("mixtral", config=f"{src}/config.json")

    def placement(key):  # replicated ones: DCP's dedup gives each to one rank
        return mixtral_placement(key, mode == "2d")

    tensors, _ = load_sharded(plan, src, mesh, placement)
    dcp.save(tensors, storage_writer=ConvspecWriter(plan, f"{dst}/saved", max_shard_size=shard))
    result["saved"] = True
    import convspec.integrations.dcp_writer as w

    w.ElementIds.byte_runs = lambda self, target: None  # every chunk placed by element ids, as a computing group's
    dcp.save(tensors, storage_writer=ConvspecWriter(plan, f"{dst}/by_ids", max_shard_size=shard))
    if mode == "1d":  # a computing group (a cast, a transpose), each rank half the columns
        from torch.distributed.tensor import distribute_tensor

        cast_plan = convspec.compile(f"{dst}/s.cspec")
        full = cast_plan.load(f"{dst}/cast_src")
        placed = {k: distribute_tensor(t, mesh, [Shard(t.dim() - 1)]) for k, t in full.items()}
        dcp.save(placed, storage_writer=ConvspecWriter(cast_plan, f"{dst}/cast", max_shard_size=40))
    if mode == "1d":  # then a save during which rank 1 fails
        from torch.distributed.checkpoint.api import CheckpointException

        def broken(*args):
            raise RuntimeError("disk full on rank 1")

        if rank == 1:
            w.write_chunks = broken
        writer = ConvspecWriter(plan, f"{dst}/failed", max_shard_size=shard)
        try:
            dcp.save(tensors, storage_writer=writer)
        except CheckpointException as exc:
            writer.abort()  # DCP calls no writer method when a rank fails: the caller drops or aborts it
            result["failed"] = str(exc)[-2000:]
finally:
    dist.destroy_process_group()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Mixtral checkpoint, and what one process saves of it through the inverse plan."""
    root = tmp_path_factory.mktemp("dcpwrite")
    make(root / "tiny", layers=2, experts=4)
    plan = convspec.compile("mixtral", config=f"{root / 'tiny'}/config.json")
    plan.inverse().save(plan.load(root / "tiny"), root / "ref", max_shard_size=SHARD)
    return root / "tiny", root / "ref"


def same_files(a: Path, b: Path) -> list[str]:
    """The files of `a`, after checking `b` holds the same names with the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    assert sorted(p.name for p in b.iterdir()) == names
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in names), "bytes differ"
    return names


def same_tensors(a: Path, b: Path) -> None:
    """Every tensor of checkpoint `a` in checkpoint `b`, with the same bits."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    assert sorted(ca.entries) == sorted(cb.entries)
    for key in ca.entries:
        x, y = ca.get(key), cb.get(key)
        assert x.dtype == y.dtype and x.view(torch.uint8).equal(y.view(torch.uint8)), key


@pytest.mark.parametrize(("world", "mode"), [(2, "1d"), (4, "2d")])
def test_each_rank_writes_its_chunks_and_the_files_are_those_one_process_writes(tiny, tmp_path, world, mode):
    """On 2 ranks, a second save during which rank 1 fails follows: every rank gets the error, no
    directory is left (nor its temporary, once the coordinator's writer is gone), nothing hangs."""
    src, ref = tiny
    if mode == "1d":
        cast_case(tmp_path)
    results = run_workers(WORKER, world, tmp_path, src, tmp_path, mode, SHARD)
    assert all(r["saved"] for r in results)
    names = same_files(ref, tmp_path / "saved")
    assert len(names) == 7 and "model.safetensors.index.json" in names
    same_files(ref, tmp_path / "by_ids")
    same_tensors(src, tmp_path / "saved")  # the original checkpoint, tensor for tensor (ordered otherwise)
    if mode == "1d":
        same_files(tmp_path / "cast_ref", tmp_path / "cast")
        assert all("RuntimeError: disk full on rank 1" in r["failed"] for r in results)
        assert not (tmp_path / "failed").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def _save(state_dict, writer) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ...": one process, as meant
        dcp.save(state_dict, storage_writer=writer)


def test_one_process_writes_what_plan_save_writes(tiny, tmp_path):
    src, ref = tiny
    plan = convspec.compile("mixtral", config=f"{src}/config.json")
    _save(dict(plan.load(src)), ConvspecWriter(plan, tmp_path / "saved", max_shard_size=SHARD))
    same_files(ref, tmp_path / "saved")
    _save(dict(plan.load(src)), ConvspecWriter(plan, tmp_path / "one"))
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]


CAST_SPEC = (
    "spec s\nconvert a = {p:path}.a, b = {p:path}.b\n"
    "  -> {p}.ab = transpose(cat(cast(a, dtype=float32, from=bfloat16), b, dim=0, sizes=[3, 5]))\n"
)


def cast_case(root: Path):
    """A spec that makes a converted tensor of two originals of different dtypes (one widened by a
    cast), then transposed; a checkpoint of it (`cast_src`) and one process's save (`cast_ref`)."""
    from convspec.io.writer import write_file

    (root / "s.cspec").write_text(CAST_SPEC)
    plan = convspec.compile(str(root / "s.cspec"))
    g = torch.Generator().manual_seed(0)
    original = {
        "m.a": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "m.b": torch.randn(5, 4, generator=g),
        "m.c": torch.arange(6, dtype=torch.int32),
    }
    (root / "cast_src").mkdir()
    write_file(root / "cast_src" / "model.safetensors", original)
    plan.inverse().save(plan.load(root / "cast_src"), root / "cast_ref", max_shard_size=40)
    return plan


def test_a_checkpoint_id_given_to_dcp_is_the_destination(tiny, tmp_path):
    src, ref = tiny
    plan = convspec.compile("mixtral", config=f"{src}/config.json")
    writer = ConvspecWriter(plan, tmp_path / "unused", max_shard_size=SHARD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(plan.load(src)), checkpoint_id=tmp_path / "saved", storage_writer=writer)
    same_files(ref, tmp_path / "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_elements_follow_casts_transposes_and_mixed_dtypes(tmp_path):
    """Every element goes back to its own key, in its own dtype (2 ranks, each with half the
    transposed tensor's columns, do the same in the test above)."""
    plan = cast_case(tmp_path)
    _save(dict(plan.load(tmp_path / "cast_src")), ConvspecWriter(plan, tmp_path / "saved", max_shard_size=40))
    assert len(same_files(tmp_path / "cast_ref", tmp_path / "saved")) == 4  # 3 files and the index


def test_a_state_dict_not_in_the_converted_layout_is_refused_before_anything_is_written(tiny, tmp_path):
    src, _ = tiny
    plan = convspec.compile("mixtral", config=f"{src}/config.json")
    state = dict(plan.load(src))
    key = "model.layers.0.mlp.experts.gate_up_proj"
    state[key] = state[key][:, :95]  # the inverse cannot split 95 rows into w1 and w3
    with pytest.raises(CheckpointException, match="is not divisible by 2"):
        _save(state, ConvspecWriter(plan, tmp_path / "saved"))
    assert list(tmp_path.iterdir()) == []


def test_a_key_the_forward_plan_would_rename_is_refused(tiny, tmp_path):
    """An original-layout key in a converted state dict: the inverse passes it through, and the
    forward plan would not make it back, so no element of it can be placed by the forward maps."""
    src, _ = tiny
    plan = convspec.compile("mixtral", config=f"{src}/config.json")
    state = dict(plan.load(src))
    state["model.layers.3.block_sparse_moe.gate.weight"] = state["model.layers.0.mlp.gate.weight"]
    message = "model.layers.3.block_sparse_moe.gate.weight .4, 32. bfloat16: the state dict does not convert"
    with pytest.raises(CheckpointException, match=message):
        _save(state, ConvspecWriter(plan, tmp_path / "saved"))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_destination_is_kept_unless_overwrite(tiny, tmp_path):
    src, ref = tiny
    plan = convspec.compile("mixtral", config=f"{src}/config.json")
    (tmp_path / "saved").mkdir()
    with pytest.raises(CheckpointException, match="already exists"):
        _save(dict(plan.load(src)), ConvspecWriter(plan, tmp_path / "saved", max_shard_size=SHARD))
    assert list((tmp_path / "saved").iterdir()) == []
    _save(
        dict(plan.load(src)), ConvspecWriter(plan, tmp_path / "saved", max_shard_size=SHARD, overwrite=True)
    )
    same_files(ref, tmp_path / "saved")


def test_a_lossy_plan_is_refused_when_the_writer_is_made(tmp_path):
    spec = tmp_path / "s.cspec"
    spec.write_text("spec s\nconvert x = {p:path}.w\n  -> {p}.v = cast(x, dtype=bfloat16, from=float32)\n")
    with pytest.raises(ConvspecError, match="cannot be inverted exactly"):
        ConvspecWriter(convspec.compile(str(spec)), tmp_path / "saved")


def test_a_failed_save_leaves_nothing_once_its_writer_is_dropped(tiny, tmp_path, monkeypatch):
    """DCP calls no writer method when a rank fails: the coordinator's writer removes its temporary
    directory when it is dropped (or at `abort()`)."""
    import gc

    import convspec.integrations.dcp_writer as w

    src, _ = tiny
    plan = convspec.compile("mixtral", config=f"{src}/config.json")

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w, "write_chunks", broken)
    writer = ConvspecWriter(plan, tmp_path / "saved")
    with pytest.raises(CheckpointException, match="No space left on device"):
        _save(dict(plan.load(src)), writer)
    assert [p.name for p in tmp_path.iterdir()] != []  # the temporary, until the writer goes
    del writer
    gc.collect()
    assert list(tmp_path.iterdir()) == []
