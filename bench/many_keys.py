"""Benchmark 6 (issue 15): the hot path on many small tensors, a DeepSeek-V3-shaped checkpoint.

transformers' `deepseek_v3` layout (61 layers, 256 experts, reverted to the original per-expert
keys: about 45,000 keys) with every dim shrunk so that the checkpoint is ~190 MB of random bf16 in
181 shards. Every figure is one fresh process, and each contender runs `--repeat` times in rotating
order; the medians are compared and the spread (max/min - 1) is printed as the noise:

- load: `plan.load` vs `safetensors.torch.load_file` + `clone` vs plain `os.preadv` of the same
  bytes, key by key (time inside the process, after imports and compile);
- convert: `convspec convert` (the CLI, whole process, fsyncs) vs `cp -r && sync`, with its peak
  RSS and whether torch was imported;
- `convspec compile deepseek_v3 --against` (whole process);
- `Plan.save` of the loaded state dict: what it adds to the peak RSS, against the streaming
  `convspec.streaming.save_state_dict` where the code has it.

Each code tree is byte-compiled first, as pip installs it. `--code NAME=PATH` (repeatable) runs the
convspec measurements with `PYTHONPATH=PATH`, so the code before and after a change are measured
side by side in one run. Exits 1 when the last code misses a target.

`--mixtral GIB` measures the same on bench/load_convert.py's Mixtral checkpoint (large tensors) instead.

    python bench/many_keys.py [--code base=/tmp/base --code new=.] [--scale 0.25] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
SHARDS = 181
TARGET_LOAD = 1.2  # x load_file + clone
TARGET_CONVERT = 2.0  # x cp -r && sync
TARGET_COMPILE_S = 0.6

LOAD = """
import json, sys, time
import torch  # imported before the clock starts, as the peer's `from safetensors.torch import ...` does
import convspec
plan = convspec.compile(sys.argv[2], config=sys.argv[1] + "/config.json")
t = time.perf_counter()
out = plan.load(sys.argv[1])
print(json.dumps({"s": time.perf_counter() - t, "n": len(out), "at": convspec.__file__}))
"""

LOAD_FILE = """
import glob, json, sys, time
from safetensors.torch import load_file
t = time.perf_counter()
out = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    out.update((k, v.clone()) for k, v in load_file(f).items())
print(json.dumps({"s": time.perf_counter() - t, "n": len(out)}))
"""

PREAD = """
import glob, json, os, struct, sys, time
t = time.perf_counter()
out = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    fd = os.open(f, os.O_RDONLY)
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    head = json.loads(os.pread(fd, n, 8))
    head.pop("__metadata__", None)
    for k, e in head.items():
        a, b = e["data_offsets"]
        buf = bytearray(b - a)
        os.preadv(fd, [buf], 8 + n + a)
        out[k] = buf
    os.close(fd)
print(json.dumps({"s": time.perf_counter() - t, "n": len(out)}))
"""

SAVE = """
import glob, json, os, sys, time
import convspec
from safetensors.torch import load_file

def status(field):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) * 1024

src, dst, how, spec = sys.argv[1:5]
plan = convspec.compile(spec, config=src + "/config.json")
sd = {}
for f in sorted(glob.glob(src + "/*.safetensors")):
    sd.update((k, v.clone()) for k, v in load_file(f).items())
plan.apply({k: v[:0] if v.dim() else v for k, v in list(sd.items())[:8]})  # warm the op code
import gc; gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
base = status("VmRSS:")
t = time.perf_counter()
if how == "stream":
    from convspec.streaming import save_state_dict
    files = save_state_dict(plan, sd, dst, "5GB", False)
else:
    files = plan.save(sd, dst)
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "added": status("VmHWM:") - base, "files": len(files), "at": convspec.__file__}))
"""

# runs the CLI, then says whether torch was imported on the way, and its own peak RSS (VmHWM: wait4's
# maxrss can count the parent's memory at the fork)
CLI = """
import atexit, json, os, runpy, sys

def report():
    with open("/proc/self/status") as f:
        peak = int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
    with open(os.environ["TORCH_FILE"], "w") as f:
        json.dump({"torch": "torch" in sys.modules, "peak": peak}, f)

atexit.register(report)
sys.argv = ["convspec", *sys.argv[1:]]
runpy.run_module("convspec.cli", run_name="__main__", alter_sys=True)
"""


def small_deepseek(scale: float):
    """The DeepSeek-V3 config with every width shrunk: same keys, ~190 MB * scale of bf16."""
    import transformers

    experts = max(8, round(256 * scale))
    return transformers.AutoConfig.for_model(
        "deepseek_v3",
        vocab_size=2048,
        hidden_size=96,
        intermediate_size=192,
        moe_intermediate_size=20,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=experts,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        dtype="bfloat16",
    )


def write_checkpoint(d: Path, scale: float) -> dict:
    import torch
    import transformers
    from transformers.core_model_loading import revert_weight_conversion

    from convspec.io.writer import write_file

    config = small_deepseek(scale)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    original = revert_weight_conversion(model, model.state_dict())
    d.mkdir(parents=True)
    config.save_pretrained(d)
    pool = torch.randint(-(2**14), 2**14, (16 * MiB,), dtype=torch.int16).view(torch.bfloat16)
    keys = sorted(original)
    per = -(-len(keys) // SHARDS)
    weight_map = {}
    for s in range(SHARDS):
        part = keys[s * per : (s + 1) * per]
        name = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {}
        for k in part:
            n, shape = original[k].numel(), original[k].shape
            at = hash(k) % (len(pool) - n)
            tensors[k] = pool[at : at + n].clone().reshape(shape).to(original[k].dtype)
        write_file(d / name, tensors)
        weight_map.update(dict.fromkeys(part, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"bytes": sum(f.stat().st_size for f in d.glob("*.safetensors")), "keys": len(keys)}


def warm(d: Path) -> None:
    """Every file read once (in pieces: the children must not inherit a large parent)."""
    for f in d.iterdir():
        with open(f, "rb") as fh:
            while fh.read(64 * MiB):
                pass


def run_rss(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Wall time, peak RSS (bytes, wait4's rusage of this process alone) and stdout of one fresh
    process. It runs in `/`: run in a source tree, `python -c`/`-m` would import that tree's convspec
    before PYTHONPATH's."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed ({p.returncode}):\n{err.decode()[-2000:]}")
    return dt, usage.ru_maxrss * 1024, out.decode()


def child(code: str, script: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": code}
    _, _, out = run_rss([sys.executable, "-c", script, *args], env)
    got = json.loads(out.strip().splitlines()[-1])
    assert got.get("at", code).startswith(code), f"{got['at']} is not under {code}"
    return got


class Samples(dict):
    def add(self, name: str, value: float) -> None:
        self.setdefault(name, []).append(value)

    def med(self, name: str) -> float:
        return statistics.median(self[name])

    def noise(self, name: str) -> str:
        v = self[name]
        return f"+-{(max(v) / min(v) - 1) * 50:.0f}%" if len(v) > 1 and min(v) > 0 else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", action="append", default=[], help="NAME=PATH of a convspec tree")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 256 experts (size)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="keep the checkpoint in this directory between runs")
    ap.add_argument("--skip", default="", help="comma-separated: load,convert,compile,save")
    ap.add_argument("--mixtral", type=float, help="instead: bench/load_convert.py's Mixtral of this many GiB")
    ap.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # only write the checkpoint there
    args = ap.parse_args()
    if args.build:
        if args.mixtral:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from load_convert import layers_for
            from load_convert import write_checkpoint as write_mixtral

            write_mixtral(args.build, layers_for(args.mixtral))
        else:
            write_checkpoint(args.build, args.scale)
        return 0
    here = str(Path(__file__).resolve().parent.parent)
    codes = dict(c.split("=", 1) for c in args.code) or {"this": here}
    codes = {k: str(Path(v).resolve()) for k, v in codes.items()}
    for code in codes.values():  # as pip installs it: byte-compiled, whatever PYTHONDONTWRITEBYTECODE says
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(code) / "convspec")], check=True)
    skip = set(filter(None, args.skip.split(",")))

    tmp = Path(tempfile.mkdtemp(prefix="convspec-bench-", dir=args.keep.parent if args.keep else None))
    src = args.keep or tmp / "src"
    try:
        if not (src / "config.json").exists():  # built by a child: a forked child inherits our peak RSS
            build = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--build",
                str(src),
                "--scale",
                str(args.scale),
            ]
            env = {**os.environ, "PYTHONPATH": next(iter(codes.values()))}
            subprocess.run(
                build + (["--mixtral", str(args.mixtral)] if args.mixtral else []), env=env, check=True
            )
        info = {"bytes": sum(f.stat().st_size for f in src.glob("*.safetensors"))}
        n_keys = len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
        shards = len(
            set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values())
        )
        spec = "mixtral" if args.mixtral else "deepseek_v3"
        print(f"checkpoint ({spec}): {n_keys:,} keys in {shards} shards, {info['bytes'] / 1e6:.0f} MB (bf16)")
        warm(src)
        s = Samples()
        torch_seen: dict[str, str] = {}
        dst = tmp / "dst"
        for r in range(args.repeat):
            order = list(codes.items())
            order = order[r % len(order) :] + order[: r % len(order)]
            if "load" not in skip:
                s.add("load_file + clone", child(here, LOAD_FILE, str(src))["s"])
                s.add("pread", child(here, PREAD, str(src))["s"])
                for name, code in order:
                    s.add(f"load {name}", child(code, LOAD, str(src), spec)["s"])
            if "convert" not in skip:
                dt, _, _ = run_rss(["sh", "-c", f"cp -r {src} {dst} && sync"])
                s.add("cp -r && sync", dt)
                shutil.rmtree(dst)
                for name, code in order:
                    flag = tmp / "torch"
                    env = {**os.environ, "PYTHONPATH": code, "TORCH_FILE": str(flag)}
                    cmd = [sys.executable, "-c", CLI, "convert", spec, str(src), str(dst)]
                    dt, _, _ = run_rss(cmd, env)
                    seen = json.loads(flag.read_text())
                    s.add(f"convert {name}", dt)
                    s.add(f"convert rss {name}", seen["peak"])
                    torch_seen[name] = str(seen["torch"])
                    shutil.rmtree(dst)
            if "compile" not in skip:
                for name, code in order:
                    env = {**os.environ, "PYTHONPATH": code}
                    cmd = [sys.executable, "-m", "convspec.cli", "compile", spec, "--against", str(src)]
                    s.add(f"compile {name}", run_rss(cmd, env)[0])
            if "save" not in skip:
                for name, code in order:
                    hows = ["plan"] + (
                        ["stream"]
                        if (Path(code) / "convspec/streaming.py").read_text().count("def save_state_dict")
                        else []
                    )
                    for how in hows:
                        got = child(code, SAVE, str(src), str(dst), how, spec)
                        s.add(f"save {how} {name}", got["s"])
                        s.add(f"save {how} added {name}", got["added"])
                        shutil.rmtree(dst)
        return report(s, codes, torch_seen, n_keys, skip, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(s: Samples, codes: dict, torch_seen: dict, n_keys: int, skip: set, spec: str) -> int:
    ok = True
    last = list(codes)[-1]
    print(f"medians of {len(next(iter(s.values())))} fresh processes each; +-: half the max/min spread")
    if "load" not in skip:
        floor, pread = s.med("load_file + clone"), s.med("pread")
        print("load (in the process, after imports and compile)")
        print(f"  safetensors load_file + clone   {floor:6.3f} s {s.noise('load_file + clone'):>6}")
        print(f"  os.preadv of the same bytes     {pread:6.3f} s {s.noise('pread'):>6}")
        for name in codes:
            t = s.med(f"load {name}")
            print(
                f"  convspec plan.load [{name:>5}]    {t:6.3f} s {s.noise(f'load {name}'):>6}   "
                f"{t / floor:.2f}x load_file+clone, {t / pread:.2f}x pread, {t / n_keys * 1e6:.1f} us/key"
            )
        ok &= s.med(f"load {last}") <= TARGET_LOAD * floor
        print(f"  target: <= {TARGET_LOAD}x load_file + clone")
    if "convert" not in skip:
        cp = s.med("cp -r && sync")
        print("convert (whole process)")
        print(f"  cp -r && sync                   {cp:6.3f} s {s.noise('cp -r && sync'):>6}")
        for name in codes:
            t = s.med(f"convert {name}")
            rss = s.med(f"convert rss {name}") / MiB
            print(
                f"  convspec convert [{name:>5}]      {t:6.3f} s {s.noise(f'convert {name}'):>6}   "
                f"{t / cp:.2f}x cp, peak {rss:.0f} MiB, torch imported: {torch_seen[name]}"
            )
        ok &= s.med(f"convert {last}") <= TARGET_CONVERT * cp
        print(f"  target: <= {TARGET_CONVERT}x cp -r && sync, no torch import")
    if "compile" not in skip:
        print(f"compile {spec} --against (whole process)")
        for name in codes:
            print(
                f"  [{name:>5}]                         {s.med(f'compile {name}'):6.3f} s "
                f"{s.noise(f'compile {name}'):>6}"
            )
        ok &= s.med(f"compile {last}") < TARGET_COMPILE_S
        print(f"  target: < {TARGET_COMPILE_S} s")
    if "save" not in skip:
        print("saving the loaded state dict (added to the peak RSS while saving)")
        for name in codes:
            for how in ("plan", "stream"):
                if f"save {how} {name}" in s:
                    what = "Plan.save      " if how == "plan" else "save_state_dict"
                    print(
                        f"  {what} [{name:>5}]        {s.med(f'save {how} {name}'):6.3f} s "
                        f"{s.noise(f'save {how} {name}'):>6}   +{s.med(f'save {how} added {name}') / MiB:.0f} MiB"
                    )
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
