"""Issue 16: each rank reads only its shards, against the full-read-then-narrow way every peer loads.

On bench/load_convert.py's Mixtral checkpoint (original per-expert layout, converted to fused
experts), world 1, 2 and 4 on gloo (processes on this machine), each rank loads its shards: experts
over the ranks (expert parallel), attention and embeddings colwise, o_proj rowwise, norms replicated.
Per rank: bytes read, byte runs read (one tensor each for the baseline), wall time (after imports and compiling, from a barrier) and peak
RSS, for `convspec.sharded.load_sharded` and for the baseline, which loads every converted tensor
whole (`plan.load`) and keeps its narrow. Prints the figures; exits 1 if bytes per rank are not
within 5% of the ideal share (sharded bytes / world + replicated bytes).

    python bench/sharded_load.py [--gib 0.5] [--worlds 1,2,4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_convert import layers_for, warm, write_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time
from datetime import timedelta
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard

import convspec
from convspec.sharded import load_sharded, local_region, placements_of

src, out, how, bench = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, bench)
from sharded_load import placement

torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=timedelta(seconds=300))
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
plan = convspec.compile("mixtral", config=f"{src}/config.json")



dist.barrier()
start = time.perf_counter()
if how == "convspec":
    tensors, stats = load_sharded(plan, src, mesh, placement)
    local = {k: t.to_local() for k, t in tensors.items()}
    read, calls = stats.bytes, stats.runs
else:  # the peers' way: every tensor whole, then this rank's narrow of it
    local, read, calls = {}, 0, 0
    for key, t in plan.stream(src):
        region = local_region(tuple(t.shape), mesh, placements_of(placement(key), t.ndim))
        local[key] = t[tuple(slice(a, b) for a, b in region)].clone()
        read += t.numel() * t.element_size()
        calls += 1
        del t
seconds = time.perf_counter() - start
held = sum(t.numel() * t.element_size() for t in local.values())
# VmHWM: this process's own peak (ru_maxrss would count the parent's memory at the fork)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
dist.barrier()
dist.destroy_process_group()
with open(f"{out}/{how}-{world}-{rank}.json", "w") as f:
    json.dump({"read": read, "calls": calls, "seconds": seconds, "held": held, "peak": peak}, f)
"""


def placement(key: str):
    """Experts over the ranks; attention and embeddings colwise, o_proj rowwise; the rest replicated."""
    if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return "experts"
    if key.endswith(
        ("q_proj.weight", "k_proj.weight", "v_proj.weight", "embed_tokens.weight", "lm_head.weight")
    ):
        return "colwise"
    if key.endswith("o_proj.weight"):
        return "rowwise"
    return None


def run(world: int, how: str, src: Path, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "PYTHONPATH": str(ROOT),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(src), str(out), how, str(Path(__file__).resolve().parent)],
                env=env,
                cwd="/",
            )
        )
    for p in procs:
        p.wait(timeout=900)
        if p.returncode:
            raise SystemExit(f"a {how} rank of world {world} failed")
    return [json.loads((out / f"{how}-{world}-{r}.json").read_text()) for r in range(world)]


def ideal(src: Path, world: int) -> float:
    """Bytes a rank must read: its share of the sharded tensors, and every replicated one."""
    import convspec
    from convspec.io.checkpoint import Checkpoint
    from convspec.ops import TensorInfo

    plan = convspec.compile("mixtral", config=src / "config.json")
    outputs = plan.bind(Checkpoint(src).layout).outputs
    total = 0.0
    for key, (shape, dtype) in outputs.items():
        n = TensorInfo(shape, dtype).nbytes
        total += n if placement(key) is None else n / world
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=0.5)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--keep", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="convspec-sharded-"))
    src = args.keep or tmp / "src"
    if not (src / "config.json").exists():
        write_checkpoint(src, layers_for(args.gib))
    warm(src)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"checkpoint (mixtral): {size / 1e6:.0f} MB; per rank: medians over the ranks of one run each")
    ok = True
    for world in map(int, args.worlds.split(",")):
        want = ideal(src, world)
        for how in ("baseline", "convspec"):
            rs = run(world, how, src, tmp)
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            ratio = med["read"] / want
            print(
                f"  world {world} {how:9s} read {med['read'] / 1e6:8.1f} MB ({ratio:5.2f}x ideal "
                f"{want / 1e6:.1f} MB)  runs {med['calls']:6.0f}  {med['seconds']:6.3f} s  "
                f"peak RSS {med['peak'] / 2**20:6.0f} MiB  shard held {med['held'] / 2**20:6.0f} MiB"
            )
            if how == "convspec" and ratio > 1.05:
                ok = False
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
