"""Benchmarks 2-4 (issue 5): loading, converting to disk, and peak memory, on a Mixtral checkpoint.

The script writes a Mixtral-layout checkpoint of about 2 GiB (bf16, 8 experts, per-expert w1/w2/w3
tensors as the original release stores them) and one twice its size, then measures, side by side:

2. loading into converted tensors in memory: `plan.load` vs transformers `from_pretrained` into
   MixtralForCausalLM (target: >= 2x faster) and `safetensors.torch.load_file` of the same files
   with no conversion, the floor (target: within 1.25x of it);
3. `convspec convert` (the CLI, whole process) vs `cp -r` of the same directory, page cache warm
   (target: within 1.5x);
4. peak RSS of `convspec convert` on both checkpoints (target: at most largest group x 2 + 300 MiB,
   and not growing with the checkpoint), with transformers' `from_pretrained` peak beside it.

Every figure comes from this one run; the script exits 1 if a target is missed.

    python bench/load_convert.py [--gib 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20
TARGET_VS_TRANSFORMERS = 2.0
TARGET_VS_LOAD_FILE = 1.25
TARGET_VS_CP = 1.5
SLACK = 300 * MiB


def mixtral_config(layers: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def layers_for(gib: float) -> int:
    """Layers for a checkpoint of about `gib` GiB: each layer is ~181 MB, embeddings ~131 MB."""
    return max(1, round((gib * GiB - 131e6) / 181e6))


def write_checkpoint(d: Path, layers: int, shard_bytes: int = 1 << 30) -> dict:
    """The original Mixtral layout (what transformers reverts its model to), random bf16, sharded."""
    import transformers

    return write_original(d, mixtral_config(layers), transformers.MixtralForCausalLM, shard_bytes)


def write_original(d: Path, config, model_class, shard_bytes: int) -> dict:
    """The original layout of `model_class(config)` (what transformers reverts the model to), random
    bf16 from one pool, in shards of about `shard_bytes` with an index; its bytes and key count."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    from convspec.io.writer import write_file

    with torch.device("meta"):
        model = model_class(config)
    original = revert_weight_conversion(model, model.state_dict())
    d.mkdir(parents=True)
    config.save_pretrained(d)
    pool = torch.randint(-(2**14), 2**14, (64 * MiB,), dtype=torch.int16).view(torch.bfloat16)
    shards, cur, size = [], {}, 0
    for k in sorted(original):
        n = original[k].numel()
        at = hash(k) % (len(pool) - n) if n < len(pool) else 0
        cur[k] = pool[at : at + n].clone().reshape(original[k].shape)
        size += 2 * n
        if size >= shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(d / name, part)
        weight_map.update(dict.fromkeys(part, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"bytes": sum(f.stat().st_size for f in d.glob("*.safetensors")), "keys": len(original)}


def warm(d: Path) -> None:
    """Read every file once so that every measurement sees a warm page cache."""
    for f in d.iterdir():
        with open(f, "rb") as fh:
            while fh.read(64 * MiB):
                pass


def timed(fn) -> tuple[float, object]:
    gc.collect()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


PEAK = """
import atexit, os, runpy, sys

def report():  # VmHWM: the peak RSS of this process's memory since exec, read before it ends
    with open("/proc/self/status") as f:
        peak = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    with open(os.environ["PEAK_FILE"], "w") as f:
        f.write(peak)

atexit.register(report)
sys.argv = sys.argv[1:]
if sys.argv[0] == "-c":
    sys.argv = sys.argv[1:]
    exec(compile(sys.argv[0], "<child>", "exec"))
else:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_measured(cmd: list[str], peak: bool = False) -> tuple[float, int]:
    """Wall time of a child process, and with `peak` its peak RSS in bytes. (The rusage of a child
    counts the parent's pages it held between fork and exec, so the child reports VmHWM itself.)"""
    env = dict(os.environ)
    if peak:
        fd, env["PEAK_FILE"] = tempfile.mkstemp()
        os.close(fd)
        cmd = [cmd[0], "-c", PEAK, *(cmd[2:] if cmd[1] == "-m" else cmd[1:])]
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.decode()}")
    if not peak:
        return wall, 0
    kib = int(Path(env["PEAK_FILE"]).read_text())
    os.unlink(env["PEAK_FILE"])
    return wall, kib * 1024


FROM_PRETRAINED = (
    "import sys, torch, transformers; "
    "transformers.MixtralForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--gib", type=float, default=2.0, help="size of the first checkpoint (the second is twice it)"
    )
    ap.add_argument(
        "--keep", type=Path, help="write the checkpoints here and keep them (default: a temp dir)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of each contender (the best counts)")
    args = ap.parse_args()

    import torch
    import transformers
    from safetensors.torch import load_file

    import convspec
    from convspec.blocks import block_runs
    from convspec.io.checkpoint import Checkpoint

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="convspec-bench-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    small, big = root / "mixtral-small", root / "mixtral-big"
    try:
        for d, gib in ((small, args.gib), (big, 2 * args.gib)):
            if not d.exists():
                info = write_checkpoint(d, layers_for(gib))
                print(f"wrote {d.name}: {info['keys']} tensors, {info['bytes'] / GiB:.2f} GiB")
        size = sum(f.stat().st_size for f in small.glob("*.safetensors"))
        warm(small)
        plan = convspec.compile("mixtral")
        bound = plan.bind(Checkpoint(small).layout)
        group = max(sum(i.nbytes for i in g.outputs.values()) for g in bound.groups)
        print(
            f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}"
        )
        print(f"checkpoint: {size / GiB:.2f} GiB, largest group {group / MiB:.0f} MiB\n")

        # ---- 2. loading -------------------------------------------------------------------
        # This VM's first touch of fresh memory varies from run to run several-fold, so each
        # contender runs `repeat` times, interleaved, and the best time of each is compared.
        files = sorted(small.glob("*.safetensors"))

        def lazy():  # tensors that map the files: no byte is read until used
            return {k: v for f in files for k, v in load_file(str(f)).items()}

        def floor():  # the same, each tensor then copied into its own memory, as a load must end
            return {k: v.clone() for f in files for k, v in load_file(str(f)).items()}

        def fused():  # the converted tensors' fresh memory, filled with the same bytes from the maps
            maps = lazy()
            out = {dst: maps[src].clone() for src, dst in bound.passthrough.items()}
            for g in bound.groups:
                runs = block_runs(bound, g)
                for k, info in g.outputs.items():
                    t = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
                    view = t.view(-1).view(torch.uint8)
                    for s, a, b, n in runs[k]:
                        view[b : b + n].copy_(maps[s].view(-1).view(torch.uint8)[a : a + n])
                    out[k] = t
            return out

        def ours():
            return plan.load(small)

        def theirs():
            return transformers.MixtralForCausalLM.from_pretrained(small, dtype=torch.bfloat16)

        best: dict[str, float] = {}
        n_out = n_hf = 0
        contenders = [("lazy", lazy), ("floor", floor), ("fused", fused), ("ours", ours), ("theirs", theirs)]
        for r in range(args.repeat):  # the order rotates, so no contender always follows the same one
            for name, fn in contenders[r % 5 :] + contenders[: r % 5]:
                t, out = timed(fn)
                best[name] = min(best.get(name, t), t)
                if name == "ours":
                    n_out = len(out)
                if name == "theirs":
                    n_hf = len(out.state_dict())
                del out
                gc.collect()
        assert n_out == n_hf, "convspec and transformers load different key sets"
        vs_hf, vs_floor = best["theirs"] / best["ours"], best["ours"] / best["floor"]
        print(f"2. loading into converted tensors (in-process, warm cache, best of {args.repeat})")
        for label, name in (
            ("safetensors load_file, lazy (no byte read)", "lazy"),
            ("safetensors load_file + clone (the floor)", "floor"),
            ("the same bytes into the fused shapes", "fused"),
            ("convspec plan.load", "ours"),
            ("transformers from_pretrained", "theirs"),
        ):
            print(f"   {label:44s} {best[name]:6.2f} s  {size / GiB / best[name]:7.2f} GiB/s")
        print(
            f"   convspec is {vs_hf:.2f}x faster than from_pretrained (target >= {TARGET_VS_TRANSFORMERS}x)"
        )
        print(f"   convspec takes {vs_floor:.2f}x the floor's time (target <= {TARGET_VS_LOAD_FILE}x)")
        print(f"   convspec takes {best['ours'] / best['fused']:.2f}x the time of filling the fused shapes\n")

        # ---- 3. converting to disk ----------------------------------------------------------
        out_dir, copied = root / "converted", root / "copied"
        cli = [
            sys.executable,
            "-m",
            "convspec.cli",
            "convert",
            "mixtral",
            str(small),
            str(out_dir),
            "--overwrite",
        ]
        cp = ["cp", "-r", str(small), str(copied)]
        cp_sync = ["sh", "-c", f"cp -r {small} {copied} && sync -f {copied}/*"]
        times: dict[str, float] = {}
        rss_small = 0
        commands = [("convert", cli), ("cp", cp), ("cp_sync", cp_sync)]
        for r in range(args.repeat):
            for name, cmd in commands[r % 3 :] + commands[: r % 3]:
                shutil.rmtree(copied, ignore_errors=True)
                os.sync()  # earlier writes are not flushed inside the next measurement
                t, rss = run_measured(cmd, peak=name == "convert")
                times[name] = min(times.get(name, t), t)
                if name == "convert":
                    rss_small = max(rss_small, rss)
        shutil.rmtree(copied, ignore_errors=True)
        written = Checkpoint(out_dir).layout
        assert {k: (i.shape, i.dtype) for k, i in written.items()} == bound.outputs, (
            "convert wrote other tensors"
        )
        vs_cp = times["convert"] / times["cp"]
        print(f"3. converting to disk (whole process, warm cache, best of {args.repeat})")
        print(f"   convspec convert (fsyncs its output): {times['convert']:6.2f} s")
        print(f"   cp -r:                                {times['cp']:6.2f} s")
        print(f"   cp -r, then sync of the copies:       {times['cp_sync']:6.2f} s")
        print(
            f"   convspec takes {vs_cp:.2f}x cp -r's time (target <= {TARGET_VS_CP}x); "
            f"{times['convert'] / times['cp_sync']:.2f}x cp -r + sync\n"
        )

        # ---- 4. memory ----------------------------------------------------------------------
        warm(big)
        os.sync()
        _, rss_big = run_measured(cli[:5] + [str(big), str(out_dir), "--overwrite"], peak=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        _, hf_small = run_measured([sys.executable, "-c", FROM_PRETRAINED, str(small)], peak=True)
        _, hf_big = run_measured([sys.executable, "-c", FROM_PRETRAINED, str(big)], peak=True)
        big_size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
        bound_rss = 2 * group + SLACK
        print("4. peak RSS")
        print(
            f"   convspec convert, {size / GiB:.1f} GiB: {rss_small / MiB:6.0f} MiB   "
            f"{big_size / GiB:.1f} GiB: {rss_big / MiB:6.0f} MiB   (bound {bound_rss / MiB:.0f} MiB)"
        )
        print(
            f"   transformers from_pretrained:   {hf_small / MiB:6.0f} MiB            {hf_big / MiB:6.0f} MiB"
        )
        grows = rss_big - rss_small
        print(
            f"   convspec's peak grows {grows / MiB:+.0f} MiB when the checkpoint doubles; "
            f"transformers' grows {(hf_big - hf_small) / MiB:+.0f} MiB\n"
        )

        print("5. GPU: not measured here (run the device script where a GPU is lent)\n")
        ok = {
            "load vs from_pretrained": vs_hf >= TARGET_VS_TRANSFORMERS,
            "load vs load_file": vs_floor <= TARGET_VS_LOAD_FILE,
            "convert vs cp -r": vs_cp <= TARGET_VS_CP,
            "peak RSS bounded": max(rss_small, rss_big) <= bound_rss and grows < group,
        }
        for name, met in ok.items():
            print(f"   {'met' if met else 'MISSED'}: {name}")
        return 0 if all(ok.values()) else 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
