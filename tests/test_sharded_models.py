"""Sharded loading (issue 16) on more architectures than tiny Mixtral: Qwen2-MoE, DeepSeek-V3, Phi-3's
fused GQA qkv split by `split_qkv`, and Kimi-K2.5's vision wqkv (chunked, rows re-ordered per head by
`permute_rope`), each a tiny ORIGINAL-layout checkpoint in 3 files. On 2 and 4 gloo processes, with
tensor parallel (colwise Shard(0), rowwise Shard(-1)), expert parallel (Shard(0) of the stacked experts)
and both on a 2 x 2 mesh, every rank's local shard is bit-identical to the full load narrowed to it.

A counting reader (tests/helpers/read_count.py) logs every byte the ranks get from the files through
`os.pread`/`os.preadv` and maps it back onto the headers and tensors: each rank reads its shards, the
replicated tensors and the files' headers (8 bytes + the JSON of each file, once: the only overhead),
nothing else; no rank reads a whole sharded tensor. A rank whose copy lacks a file makes every rank
raise the same error naming that rank and the file, before any tensor byte is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.distributed import run_workers
from helpers.read_count import ReadLog, attribute, headers_of
from helpers.tiny_checkpoints import ARCHITECTURES, KIMI_HEAD_DIM
from safetensors import safe_open

import convspec
from convspec.io.checkpoint import Checkpoint
from convspec.regions import read_regions

TESTS = Path(__file__).resolve().parent

WORKER = r"""
import json, os, sys
from datetime import timedelta

out, tests, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, tests)
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard

import convspec
import convspec.regions
from convspec.errors import ConvspecError
from convspec.regions import read_regions
from convspec.sharded import load_sharded, local_region, placements_of
from helpers.read_count import ReadLog, attribute, headers_of

COL = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias",
       "q_b_proj.weight", "kv_b_proj.weight", "gate_proj.weight", "up_proj.weight")
ROW = ("o_proj.weight", "down_proj.weight", "attn.proj.weight")


def placement(mode, key):
    # tp: everything column/row parallel, the experts' inner dims too; ep: experts over the ranks, the
    # attention and dense MLPs tensor parallel; 2d: experts over mesh dim 0, rows/columns over dim 1
    gate_up, down = key.endswith("experts.gate_up_proj"), key.endswith("experts.down_proj")
    if mode == "2d":
        if gate_up or down:
            return [Shard(0), Shard(1) if gate_up else Shard(-1)]
        if key.endswith(COL):
            return [Replicate(), Shard(0)]
        return [Replicate(), Shard(-1)] if key.endswith(ROW) else [Replicate(), Replicate()]
    if gate_up or down:
        return "experts" if mode == "ep" else [Shard(1) if gate_up else Shard(2)]
    if key.endswith(COL):
        return "colwise"
    return "rowwise" if key.endswith(ROW) else None


LOG = ReadLog()
_read = convspec.regions.RegionReader.read


def tagged(self, target, region=None):  # which converted tensor the reads below are for
    LOG.tag = target
    try:
        return _read(self, target, region)
    finally:
        LOG.tag = None


convspec.regions.RegionReader.read = tagged


def by_tag(reads, headers):
    tags = {t for t, *_ in reads}
    return {t: attribute([r for r in reads if r[0] == t], headers) for t in tags}


def run(job, mesh, rank):
    src = job["src"].format(rank=rank)
    plan = convspec.compile(job["spec"], config=f"{src}/config.json")
    headers = headers_of(src)
    LOG.reads.clear()
    LOG.install()
    try:
        tensors, stats = load_sharded(plan, src, mesh, lambda k: placement(job["mode"], k))
    except ConvspecError as exc:
        got = attribute(LOG.reads, headers)
        return {"error": str(exc), "data": got.data, "header": got.header}
    finally:
        LOG.uninstall()
    reads = list(LOG.reads)
    LOG.reads.clear()
    LOG.install()  # the footprint of each whole converted tensor: which source bytes make it
    try:
        read_regions(plan, src, {k: None for k in tensors})
    finally:
        LOG.uninstall()
    whole = by_tag(LOG.reads, headers)
    mine = by_tag(reads, headers)
    total = attribute(reads, headers)
    full = plan.load(src)
    targets = {}
    for key, t in tensors.items():
        shape = tuple(full[key].shape)
        placed = placements_of(placement(job["mode"], key), len(shape))
        region = local_region(shape, mesh, placed)
        want = full[key][tuple(slice(a, b) for a, b in region)].contiguous()
        local = t.to_local()
        same = tuple(t.shape) == shape and local.dtype == want.dtype and local.shape == want.shape
        same = same and torch.equal(local.contiguous().view(torch.uint8), want.view(torch.uint8))
        got, foot = mine.get(key), whole[key]
        targets[key] = {
            "same": same,
            "sharded": any(isinstance(p, Shard) for p in placed),
            "shape": list(shape),
            "region": [list(r) for r in region],
            "local": want.numel() * want.element_size(),
            "full": full[key].numel() * full[key].element_size(),
            "read": got.data if got else 0,
            "covered": sum(got.covered.values()) if got else 0,
            "footprint": sum(foot.covered.values()),
        }
    return {
        "stats": [stats.bytes, stats.runs, stats.wider],
        "data": total.data, "header": total.header, "stray": total.stray, "calls": total.calls,
        "untagged": attribute([x for x in reads if x[0] is None], headers).data,
        "headers_size": sum(base for base, _ in headers.values()),
        "targets": targets,
    }


dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
results = {}
try:
    for name, job in jobs.items():
        mesh = init_device_mesh("cpu", (2, world // 2) if job["mode"] == "2d" else (world,))
        results[name] = run(job, mesh, rank)
finally:
    dist.destroy_process_group()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(results, f)
"""

MODES = {2: ("tp", "ep"), 4: ("tp", "ep", "2d")}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    root = tmp_path_factory.mktemp("models")
    return {name: (spec, make(root / name)) for name, (spec, make) in ARCHITECTURES.items()}


def _jobs(sources, modes) -> dict[str, dict]:
    return {
        f"{name}/{mode}": {"spec": spec, "src": str(src), "mode": mode}
        for name, (spec, src) in sources.items()
        for mode in modes
    }


@pytest.fixture(scope="module", params=[2, 4])
def loaded(request, sources, tmp_path_factory):
    """Every architecture in every mode, in one worker run per world size (processes start slowly)."""
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    return world, run_workers(WORKER, world, out, TESTS, json.dumps(_jobs(sources, MODES[world])))


def _inexact(name: str, mode: str, world: int) -> bool:
    """Kimi's q and k rows re-ordered per head: 4 ranks' shards of 3 rows cut through its 6-row heads."""
    return name == "kimi_wqkv" and world == 4 and mode != "2d"


def test_every_rank_holds_the_full_load_narrowed_to_its_shard(loaded):
    world, results = loaded
    for rank, jobs in enumerate(results):
        for job, r in jobs.items():
            assert "error" not in r, (rank, job, r)
            bad = [k for k, t in r["targets"].items() if not t["same"]]
            assert bad == [], (rank, job, bad)
            assert any(t["sharded"] for t in r["targets"].values()), job


def test_each_rank_reads_its_shards_the_replicated_tensors_and_the_headers_only(loaded):
    """The stated overhead is the files' headers, each read once (8 bytes of length, then the JSON):
    no other byte outside a tensor is read. Where every map is exact, each converted tensor costs
    exactly its shard's bytes, which for the 1-D meshes is 1/world of every sharded tensor."""
    world, results = loaded
    for rank, jobs in enumerate(results):
        for job, r in jobs.items():
            name, mode = job.split("/")
            assert r["header"] == r["headers_size"] and r["stray"] == 0, (rank, job)
            assert r["untagged"] == 0  # every data byte was read for one converted tensor
            assert r["stats"][0] == r["data"]  # ReadStats counts what reached the files
            targets = r["targets"].values()
            local = sum(t["local"] for t in targets)
            if _inexact(name, mode, world):
                assert r["data"] > local and r["stats"][2] > 0, (rank, job)
                continue
            assert r["stats"][2] == 0, (rank, job)  # ReadStats.wider: every map exact
            assert r["data"] == local, (rank, job)
            for t in targets:
                assert t["read"] == t["local"], (rank, job, t)
            if mode != "2d":  # the share of the issue: 1/world of the sharded bytes + the replicated ones
                sharded = sum(t["full"] for t in targets if t["sharded"])
                replicated = sum(t["full"] for t in targets if not t["sharded"])
                assert r["data"] == sharded // world + replicated, (rank, job)


def test_no_rank_reads_a_whole_sharded_tensor(loaded):
    """The source bytes a rank read for a sharded tensor cover less than the bytes that make the whole
    tensor (its footprint, found by reading it whole through the same counting reader)."""
    world, results = loaded
    for rank, jobs in enumerate(results):
        for job, r in jobs.items():
            for key, t in r["targets"].items():
                if t["sharded"]:
                    assert t["covered"] < t["footprint"] and t["read"] < t["full"], (rank, job, key, t)
                else:
                    assert t["covered"] == t["footprint"] == t["full"], (rank, job, key, t)


def test_a_map_that_is_not_exact_is_counted_and_reads_the_heads_it_cuts(loaded):
    """Kimi's q/k rows re-ordered per head (permute_rope) on 4 ranks: each rank's 3 rows lie inside one
    6-row head, which is read whole and narrowed: twice the shard, still half of the tensor, and
    the result is right (the first test). Phi-3's k/v split on 4 ranks cuts its 4-row kv heads too,
    but a split maps any rows exactly: nothing read beyond the shard."""
    world, results = loaded
    if world != 4:
        pytest.skip("on 2 ranks every shard is whole heads")
    for rank, jobs in enumerate(results):
        for mode in ("tp", "ep"):
            r = jobs[f"kimi_wqkv/{mode}"]
            wider = {k: t for k, t in r["targets"].items() if k.endswith(("q_proj.weight", "q_proj.bias",
                                                                           "k_proj.weight", "k_proj.bias"))}  # fmt: skip
            assert r["stats"][2] == len(wider) == 8, (rank, mode)  # 2 blocks x q, k x weight, bias
            for key, t in wider.items():
                row = t["full"] // t["shape"][0]
                assert t["local"] == 3 * row and t["read"] == KIMI_HEAD_DIM * row, (rank, key, t)
            extra = sum(t["read"] - t["local"] for t in wider.values())
            assert r["data"] == sum(t["local"] for t in r["targets"].values()) + extra
            phi = jobs[f"phi3_qkv/{mode}"]["targets"]
            k = phi["model.layers.0.self_attn.k_proj.weight"]
            assert k["region"][0][1] - k["region"][0][0] == 2 and k["read"] == k["local"]


# ---- bad input ------------------------------------------------------------------------------------


def test_a_rank_whose_files_are_missing_is_one_error_on_every_rank(sources, tmp_path):
    """Rank 1's copy of the checkpoint lacks one of its 3 files: every rank raises one error that
    names rank 1 and the file, before any tensor byte is read on any rank."""
    import json

    spec, src = sources["qwen2_moe"]
    for rank in (0, 1):
        shutil.copytree(src, tmp_path / f"src{rank}")
    missing = "model-00002-of-00003.safetensors"
    (tmp_path / "src1" / missing).unlink()
    jobs = {"missing": {"spec": spec, "src": str(tmp_path / "src{rank}"), "mode": "ep"}}
    out = tmp_path / "out"
    out.mkdir()
    results = [r["missing"] for r in run_workers(WORKER, 2, out, TESTS, json.dumps(jobs))]
    assert all("error" in r for r in results), results
    assert results[0]["error"] == results[1]["error"], results  # one error, the same on every rank
    assert "rank 1" in results[0]["error"] and missing in results[0]["error"], results
    assert [r["data"] for r in results] == [0, 0]  # no tensor byte read: headers only


def test_the_counting_reader_sees_every_byte_convspec_reads(sources):
    """The counter itself, in one process: the bytes it logs for a region read are ReadStats' bytes,
    all inside the right tensor; a whole-tensor `Checkpoint.get` (one preadv) is seen too; and the
    header bytes are exactly 8 + the JSON of each of the 3 files."""
    spec, src = sources["deepseek_v3"]
    plan = convspec.compile(spec, config=src / "config.json")
    headers = headers_of(src)
    assert len(headers) == 3
    key = "model.layers.1.mlp.experts.down_proj"  # [4 experts, 16, 8]: experts 1 and 2
    log = ReadLog().install()
    try:
        _, stats = read_regions(plan, src, {key: ((1, 3), (0, 16), (0, 8))})
        got = attribute(log.reads, headers)
        log.reads.clear()
        Checkpoint(src).get("lm_head.weight")
        whole = attribute(log.reads, headers)
    finally:
        log.uninstall()
    assert got.data == stats.bytes == 2 * 16 * 8 * 2 and got.stray == 0
    assert set(got.covered) == {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in (1, 2)}
    assert got.header == sum(base for base, _ in headers.values())
    assert whole.covered == {"lm_head.weight": 32 * 16 * 2} and whole.data == 32 * 16 * 2


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3", "phi3_qkv"])
def test_the_tiny_checkpoints_have_the_keys_and_shapes_transformers_saves(sources, tmp_path, name):
    """The hand-made ORIGINAL layouts are the real ones: transformers' `save_pretrained` of a model of
    the same config writes the same keys with the same shapes."""
    transformers = pytest.importorskip("transformers")
    _, src = sources[name]
    config = json.loads((src / "config.json").read_text())
    config.pop("architectures")
    conf = transformers.AutoConfig.for_model(
        config.pop("model_type"),
        **config,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    transformers.AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path)

    def shapes(d: Path) -> dict[str, list[int]]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                out.update({k: st.get_slice(k).get_shape() for k in st.keys()})  # noqa: SIM118
        return out

    mine = shapes(src)
    assert len(mine) >= 15 and mine == shapes(tmp_path)
