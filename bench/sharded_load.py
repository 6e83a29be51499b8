"""Issue 16: each rank reads only its shards, against the full-read-then-narrow way every peer loads.

Two checkpoints in their original layout, converted on load: bench/load_convert.py's Mixtral (8
large experts, `--gib`) and bench/deepseek_layout.py's DeepSeek-V3 (64 small experts, `--ds-gib`).
World 1, 2 and 4 on gloo (processes on this machine); each rank loads its shards: experts over the
ranks (expert parallel), attention, dense MLP and embeddings colwise, o_proj and dense down_proj
rowwise, norms, routers and the low-rank attention inputs replicated. Contenders, per rank:

- `convspec`: `convspec.sharded.load_sharded` (one row per `--code NAME=PATH` tree, e.g.
  `--code base=/tmp/main --code new=.` for before/after a change);
- `baseline`: every converted tensor whole (`plan.stream`), then this rank's narrow of it, kept;
- `transformers`: `from_pretrained(..., tp_plan="auto")` on the same gloo group (`--transformers`;
  it needs `accelerate`, `--accelerate DIR` adds a folder holding it to that peer's path). Its own
  plan shards experts inside each expert, not over them; it reads through mmap, so its bytes and
  read calls are not counted.

Per rank (medians over the ranks of one run; with `--repeat N`, the run of the lowest median wall
time of N, in rotating order): bytes read, read calls (byte runs; one per tensor for
the baseline), wall time (after imports and compiling, from a barrier) and the CPU time of the
rank's threads, peak RSS, and what the load added to the RSS (VmHWM reset at the barrier) beside
what the rank keeps (its shard) and its largest tensor shard. Ratios are against the baseline of
the same world. Targets, for the last convspec tree: bytes within 5% of the ideal share (sharded
bytes / world + replicated bytes), RSS added under the shard plus the largest tensor shard (and 8
MiB of the interpreter's own), wall time falling with the world size. Exits 1 if one is missed.

`--device cuda --backend nccl` runs the same on a machine with GPUs (one rank per GPU; the shards
end on the GPU, timed to a synchronize); without CUDA it stops with one message. `--dry` makes and
binds the checkpoints and prints each world's ideal share and placements, running no rank;
`--only baseline,transformers` runs only those contenders.

    python bench/sharded_load.py [--models mixtral,deepseek] [--gib 2] [--ds-gib 1] [--worlds 1,2,4]
        [--code NAME=PATH ...] [--transformers [--accelerate DIR]] [--device cuda --backend nccl]
        [--repeat N] [--only CONTENDERS] [--dry] [--keep DIR]
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

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
SPECS = {"mixtral": "mixtral", "deepseek": "deepseek_v3"}
SLACK = 8 << 20  # RSS a load may add beyond the data: the allocator's and the interpreter's own growth

WORKER = r"""
import json, os, sys, time
from datetime import timedelta
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

src, out, how, spec, bench, device, backend, tag = sys.argv[1:9]
sys.path.insert(0, bench)
from sharded_load import placement


def status(field):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) * 1024


torch.set_num_threads(1)
dist.init_process_group(backend, timeout=timedelta(seconds=600))
rank, world = dist.get_rank(), dist.get_world_size()
if device == "cuda":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
mesh = init_device_mesh(device, (world,))
from torch.distributed.tensor import DTensor, Shard

DTensor.from_local(torch.zeros(world), mesh, [Shard(0)], run_check=False)  # torch's lazy imports
if how != "transformers":
    import convspec
    from convspec.sharded import load_sharded, local_region, placements_of

    plan = convspec.compile(spec, config=f"{src}/config.json")
else:
    from transformers import AutoModelForCausalLM
dist.barrier()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM from here: what the load adds
base = status("VmRSS:")
start, cpu = time.perf_counter(), time.process_time()
read = calls = None
if how == "convspec":
    tensors, stats = load_sharded(plan, src, mesh, placement)
    local = {k: t.to_local().to(device) for k, t in tensors.items()}
    read, calls = stats.bytes, stats.runs
elif how == "baseline":  # the peers' way: every tensor whole, then this rank's narrow of it
    local, read, calls = {}, 0, 0
    for key, t in plan.stream(src):
        region = local_region(tuple(t.shape), mesh, placements_of(placement(key), t.ndim))
        local[key] = t[tuple(slice(a, b) for a, b in region)].to(device, copy=True)
        read += t.numel() * t.element_size()
        calls += 1
        del t
else:
    model = AutoModelForCausalLM.from_pretrained(src, tp_plan="auto", dtype=torch.bfloat16)
    local = {k: getattr(p, "to_local", lambda p=p: p)() for k, p in model.state_dict().items()}
if device == "cuda":
    torch.cuda.synchronize()
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
sizes = [t.numel() * t.element_size() for t in local.values()]
figures = {"read": read, "calls": calls, "seconds": seconds, "cpu": cpu, "held": sum(sizes),
           "largest": max(sizes), "peak": status("VmHWM:"), "added": status("VmHWM:") - base,
           "at": sys.modules["convspec"].__file__ if "convspec" in sys.modules else None}
if device == "cuda":
    figures["gpu_peak"] = torch.cuda.max_memory_allocated()
dist.barrier()
dist.destroy_process_group()
with open(f"{out}/{tag}-{world}-{rank}.json", "w") as f:
    json.dump(figures, f)
sys.stdout.flush()
os._exit(0)  # no exit finalizers: torch + gloo abort in them now and then, after destroy_process_group
"""


def placement(key: str):
    """Experts over the ranks; attention, dense MLP and embeddings colwise, o_proj and the dense
    down_proj rowwise; the rest (norms, routers, low-rank attention inputs) replicated."""
    if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return "experts"
    colwise = ("q_proj", "k_proj", "v_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj")
    if key.endswith(tuple(f"{c}.weight" for c in colwise)) or key.endswith(
        ("embed_tokens.weight", "lm_head.weight")
    ):
        return "colwise"
    if key.endswith(("o_proj.weight", "down_proj.weight")):
        return "rowwise"
    return None


def run(world: int, how: str, tag: str, model: str, src: Path, out: Path, args, path: str) -> list[dict]:
    """One world of ranks, each a fresh process: their figures, or a string saying why they failed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": path},
            **{"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)},
        }
        argv = [src, out, how, SPECS[model], BENCH, args.device, args.backend, tag]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, *map(str, argv)],
                env=env,
                cwd="/",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode:
            lines = [x for x in err.splitlines() if x.strip() and not x.startswith(" ")]
            errors.append(lines[-1] if lines else f"exit {p.returncode}")
    if errors:
        return errors[0]
    got = [json.loads((out / f"{tag}-{world}-{r}.json").read_text()) for r in range(world)]
    if how != "transformers" and not all(g.pop("at").startswith(path) for g in got):
        return f"a rank imported convspec from outside {path}"
    for g in got:
        g.pop("at", None)
    return got


def ideal(model: str, src: Path, world: int) -> float:
    """Bytes a rank must read: its share of the sharded tensors, and every replicated one."""
    import convspec
    from convspec.io.checkpoint import Checkpoint
    from convspec.ops import TensorInfo

    plan = convspec.compile(SPECS[model], config=src / "config.json")
    outputs = plan.bind(Checkpoint(src).layout).outputs
    total = 0.0
    for key, (shape, dtype) in outputs.items():
        n = TensorInfo(shape, dtype).nbytes
        total += n if placement(key) is None else n / world
    return total


def make(model: str, src: Path, args) -> None:
    """The checkpoint, written once (kept with --keep)."""
    if (src / "config.json").exists():
        return
    if model == "mixtral":
        from load_convert import layers_for, write_checkpoint

        write_checkpoint(src, layers_for(args.gib))
    else:
        import deepseek_layout

        deepseek_layout.write_checkpoint(src, deepseek_layout.layers_for(args.ds_gib))


def row(name: str, med: dict, want: float) -> str:
    read = (
        f"{med['read'] / 1e6:8.1f} MB ({med['read'] / want:4.2f}x ideal)  {med['calls']:6.0f} calls"
        if med["read"] is not None
        else f"{'n/a (mmap)':>27s}  {'n/a':>12s}"
    )
    return (
        f"    {name:16s} {read}  {med['seconds']:7.3f} s (cpu {med['cpu']:6.3f} s)  peak {med['peak'] / 2**20:6.0f} MiB  "
        f"added {med['added'] / 2**20:6.0f} MiB  shard {med['held'] / 2**20:6.0f} MiB  "
        f"largest {med['largest'] / 2**20:5.0f} MiB"
    )


def median(rs: list[dict]) -> dict:
    return {k: None if rs[0][k] is None else statistics.median(r[k] for r in rs) for k in rs[0]}


def bench_model(model: str, src: Path, tmp: Path, args, codes: dict) -> list[str]:
    """Every world and contender on one checkpoint; the targets the last convspec tree misses."""
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(
        f"{model} ({SPECS[model]}): {size / 1e6:.0f} MB; per rank: medians over the ranks of a run"
        + (f", the fastest of {args.repeat}" if args.repeat > 1 else "")
    )
    last, missed, times = list(codes)[-1], [], []
    contenders = [("baseline", "baseline", codes[last])]
    contenders += [(f"convspec {n}", "convspec", p) for n, p in codes.items()]
    if args.transformers:
        contenders.append(
            ("transformers tp", "transformers", os.pathsep.join([*args.accelerate, codes[last]]))
        )
    if args.only:
        contenders = [c for c in contenders if c[1] in args.only.split(",")]
    for world in map(int, args.worlds.split(",")):
        want = ideal(model, src, world)
        print(f"  world {world}: ideal share {want / 1e6:.1f} MB per rank")
        got = measure(world, contenders, model, src, tmp, args)
        for name, med in got.items():
            print(row(name, med, want) if isinstance(med, dict) else f"    {name:16s} did not run: {med}")
        got = {k: v for k, v in got.items() if isinstance(v, dict)}
        base = got.get("baseline")
        for name, med in got.items():
            if name != "baseline" and base:
                ratios = [
                    f"time {med['seconds'] / base['seconds']:.2f}x",
                    f"added RSS {_ratio(med, base, 'added')}",
                ]
                if med["read"] is not None:
                    ratios.insert(0, f"bytes {med['read'] / base['read']:.2f}x")
                print(f"    {name} / baseline: {', '.join(ratios)}")
        mine = got.get(f"convspec {last}")
        if mine is None:
            missed.append(f"{model} world {world}: convspec did not run")
            continue
        if mine["read"] > 1.05 * want:
            missed.append(f"{model} world {world}: bytes {mine['read'] / want:.2f}x the ideal share")
        if mine["added"] > mine["held"] + mine["largest"] + SLACK:
            missed.append(
                f"{model} world {world}: RSS added exceeds the shard + the largest tensor shard + 8 MiB"
            )
        if times and mine["seconds"] >= times[-1]:
            missed.append(
                f"{model} world {world}: wall time {mine['seconds']:.3f} s, not under {times[-1]:.3f} s"
            )
        times.append(mine["seconds"])
    return missed


def measure(world: int, contenders: list, model: str, src: Path, tmp: Path, args) -> dict:
    """Each contender's per-rank medians (or why it did not run): `--repeat` runs each, in rotating
    order, keeping the run of the lowest median wall time (this machine's noise is one-sided)."""
    got: dict = {}
    for rep in range(args.repeat):
        shift = rep % len(contenders)
        for name, how, path in contenders[shift:] + contenders[:shift]:
            if isinstance(got.get(name), str):
                continue
            rs = run(world, how, name.replace(" ", "_"), model, src, tmp, args, path)
            if isinstance(rs, str):
                got[name] = rs
            elif name not in got or median(rs)["seconds"] < got[name]["seconds"]:
                got[name] = median(rs)
    return {name: got[name] for name, _, _ in contenders}


def _ratio(med: dict, base: dict, key: str) -> str:
    return f"{med[key] / base[key]:.2f}x" if base[key] else "n/a"


def dry(model: str, src: Path, args) -> None:
    """What a run would do, without running a rank: the ideal shares and the placements, checked."""
    import convspec
    from convspec.io.checkpoint import Checkpoint

    plan = convspec.compile(SPECS[model], config=src / "config.json")
    outputs = plan.bind(Checkpoint(src).layout).outputs
    styles: dict[str, int] = {}
    for key, (shape, _) in outputs.items():
        style = placement(key) or "replicate"
        styles[style] = styles.get(style, 0) + 1
        for world in map(int, args.worlds.split(",")):
            dim = {"experts": 0, "colwise": 0, "rowwise": -1}.get(style)
            if dim is not None and shape[dim] % world:
                raise SystemExit(f"{model}: {key} {list(shape)} does not divide over {world} ranks")
    shares = ", ".join(f"world {w}: {ideal(model, src, int(w)) / 1e6:.1f} MB" for w in args.worlds.split(","))
    print(f"{model}: {len(outputs)} targets {dict(sorted(styles.items()))}; ideal share per rank {shares}")
    print(f"  would run on {args.device} ({args.backend}): baseline, convspec {' '.join(args.code_names)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral,deepseek")
    ap.add_argument("--gib", type=float, default=2.0, help="size of the Mixtral checkpoint")
    ap.add_argument("--ds-gib", type=float, default=1.0, help="size of the DeepSeek-V3 checkpoint")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--code", action="append", default=[], help="NAME=PATH of a convspec tree (repeatable)")
    ap.add_argument("--transformers", action="store_true", help="add transformers' tp_plan load as a peer")
    ap.add_argument("--accelerate", action="append", default=[], help="a folder holding accelerate")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each contender; the fastest is kept")
    ap.add_argument("--only", help="run only these of baseline,convspec,transformers")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default=None, help="gloo (default on cpu) or nccl (default on cuda)")
    ap.add_argument("--dry", action="store_true", help="make and check the set-up, run no rank")
    ap.add_argument("--keep", type=Path, help="a folder to keep the checkpoints in (one per model)")
    args = ap.parse_args()
    sys.path.insert(1, str(ROOT))  # this tree's convspec for the set-up; each rank imports its --code's
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    codes = dict(c.split("=", 1) for c in args.code) or {"this": str(ROOT)}
    codes = {k: str(Path(v).resolve()) for k, v in codes.items()}
    args.code_names = list(codes)
    if args.device == "cuda" and not args.dry:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < max(map(int, args.worlds.split(","))):
            print(
                f"--device cuda needs a GPU per rank: this machine has {torch.cuda.device_count()} "
                f"(torch.cuda.is_available() is {torch.cuda.is_available()}); run with --device cpu, "
                "or --dry to check the set-up",
                file=sys.stderr,
            )
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="convspec-sharded-"))
    missed = []
    for model in args.models.split(","):
        src = (args.keep or tmp) / model
        make(model, src, args)
        if args.dry:
            dry(model, src, args)
            continue
        for code in codes.values():  # as pip installs it: byte-compiled
            subprocess.run([sys.executable, "-m", "compileall", "-q", f"{code}/convspec"], check=True)
        from load_convert import warm

        warm(src)
        missed += bench_model(model, src, tmp, args, codes)
    if args.dry:
        return 0
    print("targets met" if not missed else "targets NOT met:\n  " + "\n  ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
