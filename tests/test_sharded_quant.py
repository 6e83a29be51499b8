"""Sharded loading of FP8 block-quantized checkpoints (issue 17, part 7): each scale grid is placed as
its weight, so a TP/EP slice of a weight comes with the matching slice of its grid; a shard that cuts a
block is refused at bind on every rank, before any data is read, naming the shard and block sizes; a
dequantizing plan reads only the blocks (and scales) of each rank's shard. gloo workers on this
machine, each with a timeout and its process group torn down; tiny DeepSeek-V3-style checkpoints made
here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.distributed import run_workers
from safetensors.torch import save_file
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

import convspec
from convspec.companions import scale_grids
from convspec.errors import ConvspecError
from convspec.io.checkpoint import Checkpoint
from convspec.sharded import check_placed
from convspec.shardplan import _Mesh, placements_for, shard_report
from convspec.streaming import bind_checkpoint
from tests.helpers.quantized import quantize_fp8_block

H, FF, E = 64, 32, 4  # hidden, intermediate (per expert), experts


def write_fp8(d: Path, block: int = 16) -> Path:
    """A tiny DeepSeek-V3 in the published FP8 layout: a dense MLP (layer 0), per-expert and shared
    expert linears (layer 1), each with its `weight_scale_inv`, and a bf16 embedding."""
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    sd = {}

    def linear(name: str, rows: int, cols: int) -> None:
        sd[f"{name}.weight"], sd[f"{name}.weight_scale_inv"] = quantize_fp8_block(
            torch.randn(rows, cols), (block, block)
        )

    for proj, (rows, cols) in {"gate_proj": (FF, H), "up_proj": (FF, H), "down_proj": (H, FF)}.items():
        linear(f"model.layers.0.mlp.{proj}", rows, cols)
        linear(f"model.layers.1.mlp.shared_experts.{proj}", rows, cols)
        for e in range(E):
            linear(f"model.layers.1.mlp.experts.{e}.{proj}", rows, cols)
    linear("model.layers.1.self_attn.kv_a_proj_with_mqa", 48, H)
    sd["model.embed_tokens.weight"] = torch.randn(32, H).bfloat16()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "model_type": "deepseek_v3",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [block, block]},
    }
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_fp8(tmp_path_factory.mktemp("fp8") / "tiny")


@pytest.fixture(scope="module")
def bound(src):
    plan = convspec.compile("deepseek_v3", config=str(src / "config.json"))
    return bind_checkpoint(plan, Checkpoint(src))


GATE_UP = "model.layers.1.mlp.experts.gate_up_proj"
DOWN = "model.layers.1.mlp.experts.down_proj"
DENSE_DOWN = "model.layers.0.mlp.down_proj.weight"
DENSE_GATE = "model.layers.0.mlp.gate_proj.weight"


# ---- placements and the bind check, from headers only ------------------------------------------


def test_each_scale_grid_is_placed_as_its_weight(bound):
    grids = scale_grids(bound.plan, bound.outputs)
    assert grids[f"{GATE_UP}_scale_inv"] == (GATE_UP, (16, 16))
    assert len(grids) == 9  # every FP8 weight the conversion writes has its grid
    for shard in ("tp=2", "ep=2", "tp=2,ep=2"):
        placed = placements_for(bound, "deepseek_v3", shard)
        for grid, (weight, _) in grids.items():
            assert placed.placements[grid] == placed.placements[weight], (shard, grid)
    tp = placements_for(bound, "deepseek_v3", "tp=2").placements
    assert tp[f"{GATE_UP}_scale_inv"] == (_StridedShard(1, split_factor=2),)  # packed gate/up halves
    assert tp[f"{DOWN}_scale_inv"] == (Shard(2),) and tp[f"{DENSE_GATE}_scale_inv"] == (Shard(0),)
    ep = placements_for(bound, "deepseek_v3", "ep=2").placements
    assert ep[f"{GATE_UP}_scale_inv"] == (Shard(0),)  # whole experts, not the module's own style


def test_an_override_naming_a_grid_places_it_as_the_override_says(bound):
    placed = placements_for(bound, "deepseek_v3", "tp=2", {f"{DENSE_GATE}_scale_inv": "replicate"})
    assert placed.placements[f"{DENSE_GATE}_scale_inv"] == (Replicate(),)
    with pytest.raises(ConvspecError) as exc:
        shard_report(bound, "deepseek_v3", "tp=2", {f"{DENSE_GATE}_scale_inv": "replicate"})
    assert exc.value.message.startswith(f"{DENSE_GATE}_scale_inv: placed [Replicate()]")
    assert f"its weight {DENSE_GATE} (placed [Shard(dim=0)])" in exc.value.message
    assert "follows its weight" in exc.value.hint


def test_a_shard_that_cuts_a_block_is_refused_with_both_sizes(bound):
    message = (  # the dense down_proj's 32 columns in 4: 8 a rank, half a block
        f"{DENSE_DOWN}: tp=4 gives each rank 8 columns of dim 1, which cuts the blocks of 16 columns "
        "its scale grid has one scale per"
    )
    with pytest.raises(ConvspecError) as exc:
        shard_report(bound, "deepseek_v3", "tp=4")
    assert exc.value.message == message
    assert (
        exc.value.hint
        == "use a tp size whose shards are whole blocks of 16, or dequantize (plan.dequantize(), --dequantize)"
    )


@pytest.mark.parametrize(
    "placement, message",
    [
        ([Shard(1)], "w: tp=4 gives each rank 8 rows of dim 1, which cuts the blocks of 16 rows"),
        (
            [_StridedShard(1, split_factor=2)],
            "w: tp=4 gives each rank 4 rows of dim 1 in each of its 2 packed parts",
        ),
        ([Shard(2)], "w: tp=4 gives each rank 12 columns of dim 2, which cuts the blocks of 16 columns"),
    ],
)
def test_the_refusal_names_the_mesh_dim_the_shard_and_the_block(bound, placement, message):
    mesh = _Mesh((4,), ("tp",))
    shapes = {"w": (4, 32, 48), "w_scale_inv": (4, 2, 3)}
    with pytest.raises(ConvspecError) as exc:
        check_placed(bound.plan, shapes, {"w": (mesh, placement), "w_scale_inv": (mesh, placement)})
    assert exc.value.message.startswith(message)


def test_whole_blocks_pass_and_a_ragged_last_block_passes_where_its_dim_is_whole(bound):
    mesh = _Mesh((2,), None)
    # 40 columns (the last block ragged), whole on each rank: fine; cut in two, 20 a rank: refused
    shapes = {"w": (64, 40), "w_scale_inv": (4, 3)}
    check_placed(bound.plan, shapes, {"w": (mesh, [Shard(0)]), "w_scale_inv": (mesh, [Shard(0)])})
    with pytest.raises(ConvspecError, match=r"w: a mesh dim of 2 gives each rank 20 columns of dim 1"):
        check_placed(bound.plan, shapes, {"w": (mesh, [Shard(1)]), "w_scale_inv": (mesh, [Shard(1)])})


def test_a_grid_read_whole_beside_a_sharded_weight_is_refused(bound):
    mesh = _Mesh((2,), ("tp",))
    shapes = {"w": (64, 32), "w_scale_inv": (4, 2)}
    with pytest.raises(ConvspecError) as exc:
        check_placed(bound.plan, shapes, {"w": (mesh, [Shard(0)]), "w_scale_inv": None})
    assert (
        exc.value.message
        == "w_scale_inv is read whole on every rank, where its weight w is placed [Shard(dim=0)]"
    )
    check_placed(bound.plan, shapes, {"w": None, "w_scale_inv": None})  # both whole: nothing to check


# ---- on a gloo mesh ----------------------------------------------------------------------------

WORKER = r"""
import json, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

import convspec
from convspec.errors import ConvspecError
from convspec.io.checkpoint import Checkpoint
from tests.helpers.placements import model_holding

out, src, mode = sys.argv[1], sys.argv[2], sys.argv[3]
READ = [0]  # bytes asked of the checkpoint's files, by anything
_read_many = Checkpoint.read_many


def counted(self, reads):
    READ[0] += sum(len(v) for _, _, v in reads)
    return _read_many(self, reads)


Checkpoint.read_many = counted


def bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def same(t, want):  # a DTensor's local shard against the full tensor cut as torch's placements cut it
    mesh = t.device_mesh
    for n, p, c in zip(mesh.shape, t.placements, mesh.get_coordinate()):
        if not p.is_replicate():
            want = p._split_tensor(want, n, with_padding=False)[0][c]
    local = t.to_local()
    return local.dtype == want.dtype and local.shape == want.shape and bits(local).equal(bits(want.contiguous()))


def check(loaded, full):
    bad = [k for k, t in loaded.items() if not (same(t, full[k]) if isinstance(t, DTensor) else bits(t).equal(bits(full[k])))]
    placed = {k: [repr(p) for p in t.placements] for k, t in loaded.items() if isinstance(t, DTensor)}
    return {"bad": bad, "keys": len(loaded), "placed": placed, "bytes": loaded.stats.bytes}


dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
result = {}
try:
    plan = convspec.compile("deepseek_v3", config=f"{src}/config.json")
    if mode == "cut":
        try:
            plan.load(src, shard="tp=2")
            result = {"error": None}
        except ConvspecError as exc:
            result = {"error": exc.message, "hint": exc.hint, "read": READ[0]}
    elif mode.startswith("dict"):
        full = plan.load(src)
        gate_up, down = "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"
        shard = {gate_up: [_StridedShard(1, split_factor=2)], down: "experts",
                 "model.layers.0.mlp.gate_proj.weight": "colwise", "model.layers.0.mlp.down_proj.weight": "rowwise"}
        result = check(plan.load(src, shard=shard), full)
        # a model whose parameters are the converted keys, the experts' down_proj and its grid DTensors
        # placed by the model: `load_into` fills each rank's shards, the grid's as the model places it
        mesh = init_device_mesh("cpu", (world,))
        def value(key, t):
            if not key.startswith(down):
                return torch.zeros_like(t)
            local = torch.zeros_like(t).chunk(world)[rank].contiguous()
            return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=t.shape, stride=t.stride())

        model = model_holding(full, value)
        report = plan.load_into(model, src)
        params = dict(model.named_parameters())
        result["into"] = report.ok and all(
            same(p, full[k]) if isinstance(p, DTensor) else bits(p).equal(bits(full[k])) for k, p in params.items()
        )
        result["into_placed"] = sorted(k for k, p in params.items() if isinstance(p, DTensor))
    else:
        shard = mode.removeprefix("deq:")
        if mode.startswith("deq:"):
            kept = plan.load(src, shard=shard)  # the same shards kept quantized: their bytes, scales with them
            plan = plan.dequantize()
        full = plan.load(src)
        result = check(plan.load(src, shard=shard), full)
        if mode.startswith("deq:"):
            result["kept_bytes"] = kept.stats.bytes
finally:
    dist.destroy_process_group()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
"""


def _grids_as_weights(placed: dict) -> bool:
    grids = {k for k in placed if k.endswith("_scale_inv")}
    return bool(grids) and all(placed[g] == placed[g.removesuffix("_scale_inv")] for g in grids)


@pytest.mark.parametrize("shard, world", [("tp=2", 2), ("ep=2", 2), ("tp=2,ep=2", 4)])
def test_each_rank_holds_its_weight_shard_and_the_matching_scales(src, tmp_path, shard, world):
    total = (src / "model.safetensors").stat().st_size
    for r in run_workers(WORKER, world, tmp_path, src, shard):
        assert r["bad"] == [] and r["keys"] == 19
        assert _grids_as_weights(r["placed"])
        assert r["bytes"] < total * 0.7


def test_explicit_placements_by_key_bring_their_grids(src, tmp_path):
    for r in run_workers(WORKER, 2, tmp_path, src, "dict"):
        assert r["bad"] == [] and r["into"] is True
        assert r["into_placed"] == [DOWN, f"{DOWN}_scale_inv"]
        p = r["placed"]
        assert p["model.layers.1.mlp.experts.gate_up_proj_scale_inv"] == ["_StridedShard(dim=1, sf=2)"]
        assert p["model.layers.1.mlp.experts.down_proj_scale_inv"] == ["Shard(dim=0)"]
        assert p["model.layers.0.mlp.down_proj.weight_scale_inv"] == ["Shard(dim=1)"]
        assert p["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == ["Replicate()"]


def test_a_shard_that_cuts_a_block_is_one_error_on_every_rank_before_any_read(tmp_path):
    src = write_fp8(tmp_path / "b32", block=32)  # tp=2 gives the dense down_proj 16 of 32 columns
    results = run_workers(WORKER, 2, tmp_path, src, "cut")
    want = (
        f"{DENSE_DOWN}: tp=2 gives each rank 16 columns of dim 1, which cuts the blocks of 32 columns "
        "its scale grid has one scale per"
    )
    assert [r["error"] for r in results] == [want, want]
    assert all(r["read"] == 0 for r in results)


@pytest.mark.parametrize("shard", ["tp=2", "ep=2"])
def test_a_dequantized_shard_is_the_slice_of_the_whole_and_reads_only_its_blocks(src, tmp_path, shard):
    total = (src / "model.safetensors").stat().st_size
    for r in run_workers(WORKER, 2, tmp_path, src, f"deq:{shard}"):
        assert r["bad"] == [] and r["keys"] == 10
        assert r["bytes"] == r["kept_bytes"]  # the FP8 blocks of its shard and their scales, no more
        assert r["bytes"] < total * 0.7
