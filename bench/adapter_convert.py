"""Benchmark 10 (issue 19): a Mixtral-8x7B-shaped LoRA adapter, per-expert -> fused (PEFT's layout for
transformers 5) and back.

The adapter (rank 16 on every expert's w1/w2/w3 and on q_proj/v_proj, hidden 4096, intermediate
14336, 8 experts, bfloat16, `--layers` of Mixtral's 32) is written here with PEFT's names and config.
Each job runs in a fresh process, timed inside it (imports excluded) with its peak RSS from the
kernel; the median of `--repeat` runs is shown:

- `cp` of adapter_model.safetensors (the bytes alone, read and written),
- convspec `convert mixtral ADAPTER OUT`: per-expert -> fused, a file written atomically,
- convspec `convert mixtral OUT BACK --reverse`: the way back (PEFT has none),
- PEFT 0.21 `convert_peft_adapter_state_dict_for_transformers`, the peer, which converts a loaded
  state dict for a transformers-5 Mixtral when PEFT loads the adapter (checked equal to convspec's
  output tensor for tensor before timing), and the same with the file read and the result written
  with `safetensors.torch.save_file` (what `convert` does).

    python bench/adapter_convert.py [--dir DIR] [--layers 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fresh import run_job

HIDDEN, INTER, EXPERTS, RANK, HEADS, KV = 4096, 14336, 8, 16, 32, 8
MODES = ("cp", "to_fused", "back", "peft", "peft_files")
# the parent stays small: a child's peak RSS (wait4) counts what it forked from, so the equality
# check, which holds both adapters, runs in a process of its own too
LABELS = {
    "cp": "cp adapter_model.safetensors",
    "to_fused": "convspec per-expert -> fused",
    "back": "convspec fused -> per-expert",
    "peft": "PEFT conversion (in memory)",
    "peft_files": "PEFT read + convert + save_file",
}


def mixtral_config(layers: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
        num_key_value_heads=KV, num_local_experts=EXPERTS, vocab_size=32000,
    )  # fmt: skip


def make(d: Path, layers: int) -> None:
    """The adapter: adapter_model.safetensors of seeded bfloat16 factors, and PEFT's config."""
    import torch

    from convspec.io.writer import write_file

    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    sd = {}
    for i in range(layers):
        p = f"base_model.model.model.layers.{i}"
        for name, (o, n) in {"q_proj": (HIDDEN, HIDDEN), "v_proj": (KV * 128, HIDDEN)}.items():
            sd[f"{p}.self_attn.{name}.lora_A.weight"], sd[f"{p}.self_attn.{name}.lora_B.weight"] = (
                t(RANK, n),
                t(o, RANK),
            )
        for e in range(EXPERTS):
            x = f"{p}.block_sparse_moe.experts.{e}"
            for w, (o, n) in {"w1": (INTER, HIDDEN), "w2": (HIDDEN, INTER), "w3": (INTER, HIDDEN)}.items():
                sd[f"{x}.{w}.lora_A.weight"], sd[f"{x}.{w}.lora_B.weight"] = t(RANK, n), t(o, RANK)
    (d / "adapter").mkdir(parents=True, exist_ok=True)
    write_file(d / "adapter" / "adapter_model.safetensors", sd, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["w1", "w2", "w3", "q_proj", "v_proj"],
        "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None, "use_dora": False,
        "use_rslora": False, "fan_in_fan_out": False, "lora_dropout": 0.0, "bias": "none", "task_type": None,
    }  # fmt: skip
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def peft_convert(d: Path, layers: int, sd: dict) -> dict:
    import torch
    from peft import LoraConfig
    from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers
    from transformers import MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(mixtral_config(layers))
    config = LoraConfig.from_pretrained(d / "adapter")
    return convert_peft_adapter_state_dict_for_transformers(model, config, sd)


def job(mode: str, d: Path, layers: int) -> dict:
    """One timed job; its output is removed afterwards by the parent."""
    src = d / "adapter" / "adapter_model.safetensors"
    if mode == "cp":
        subprocess.run(["cp", str(src), str(d / "copy")], check=True)
        return {}
    if mode.startswith("peft"):
        import peft  # noqa: F401  (imports before the clock)
        import transformers  # noqa: F401
        from safetensors.torch import load_file, save_file

        read = time.perf_counter()
        sd = load_file(src)
        start = read if mode == "peft_files" else time.perf_counter()
        out = peft_convert(d, layers, sd)
        if mode == "peft_files":
            save_file({k: v.contiguous() for k, v in out.items()}, str(d / "peft_out.safetensors"))
        return {"s": time.perf_counter() - start}
    import torch  # noqa: F401  (imports before the clock, as for PEFT: convspec imports torch lazily)

    import convspec

    start = time.perf_counter()
    if mode == "to_fused":
        convspec.convert("mixtral", d / "adapter", d / "out")
    else:
        convspec.convert("mixtral", d / "fused", d / "out", reverse=True)
    return {"s": time.perf_counter() - start}


def check(d: Path, layers: int) -> int:
    """convspec's fused adapter == PEFT's conversion, key for key and bit for bit; the way back is the file."""
    import torch
    from safetensors.torch import load_file

    import convspec

    convspec.convert("mixtral", d / "adapter", d / "fused")
    ours = load_file(d / "fused" / "adapter_model.safetensors")
    peft = peft_convert(d, layers, load_file(d / "adapter" / "adapter_model.safetensors"))
    assert set(ours) == set(peft), sorted(set(ours) ^ set(peft))[:4]
    assert all(torch.equal(ours[k], peft[k]) for k in ours)
    convspec.convert("mixtral", d / "fused", d / "back", reverse=True)
    same = (d / "back" / "adapter_model.safetensors").read_bytes() == (
        d / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert same, "the way back is not the original file"
    shutil.rmtree(d / "back")
    return len(ours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/convspec-bench-adapter"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--job", choices=(*MODES, "make", "check"))
    a = ap.parse_args()
    if a.job in ("make", "check"):
        got = make(a.dir, a.layers) if a.job == "make" else check(a.dir, a.layers)
        print(json.dumps({"s": 0, "n": got}))
        return
    if a.job:
        t0 = time.perf_counter()
        got = job(a.job, a.dir, a.layers)
        got.setdefault("s", time.perf_counter() - t0)
        print(json.dumps(got))
        return
    shutil.rmtree(a.dir, ignore_errors=True)
    a.dir.mkdir(parents=True)
    args = ["--dir", str(a.dir), "--layers", str(a.layers), "--job"]
    run_job(__file__, [*args, "make"])
    size = (a.dir / "adapter" / "adapter_model.safetensors").stat().st_size
    print(
        f"adapter: {size / 1e9:.2f} GB, {a.layers} layers x {EXPERTS} experts, rank {RANK}, bfloat16, at {a.dir}"
    )
    n = run_job(__file__, [*args, "check"])[2]["n"]
    print(
        f"convspec per-expert -> fused == PEFT's conversion: {n} tensors, bit for bit; the way back: the same file"
    )
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for _ in range(a.repeat):
        for m in MODES:
            s, rss, _ = run_job(__file__, [*args, m])
            runs[m].append((s, rss))
            for leftover in ("out", "copy", "peft_out.safetensors"):
                p = a.dir / leftover
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    med = {
        m: (statistics.median(s for s, _ in r), statistics.median(x for _, x in r)) for m, r in runs.items()
    }
    print(f"{'job':34}{'seconds':>8}{'peak RSS GiB':>14}{'time / PEFT':>13}{'time / cp':>11}")
    for m in MODES:
        s, rss = med[m]
        print(f"{LABELS[m]:34}{s:8.2f}{rss:14.2f}{s / med['peft'][0]:13.2f}{s / med['cp'][0]:11.2f}")
    shutil.rmtree(a.dir, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    sys.exit(main())
