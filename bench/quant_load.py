"""Benchmark 8 (issue 17): loading a DeepSeek-V3 FP8 checkpoint, kept FP8 and dequantized to bf16.

A DeepSeek-V3-layout checkpoint as deepseek-ai publishes it (per-expert FP8 weights, a float32
`weight_scale_inv` of 128 x 128 blocks beside every linear), about 1.3 GB in 4 shards, made here by
tests/helpers/quantized.py. Each load runs in a fresh process, timed inside it (imports excluded) and
its peak RSS taken from the kernel; the median of `--repeat` runs is shown:

- the plain read of the same bytes (every shard file read into memory),
- convspec `plan.load(src)`: fused experts, FP8 kept with their fused scale grids,
- convspec `plan.load(src, dequantize=True)`: fused and dequantized to bfloat16,
- transformers 5.23 `from_pretrained(..., quantization_config=FineGrainedFP8Config(dequantize=True))`,
  the peer, whose state dict is the same tensors (checked bit for bit before timing).

Every dim is a whole number of blocks (`kv_lora_rank` 512 and a rope head of 128 make
`kv_a_proj_with_mqa` 640 rows): transformers cannot dequantize the published 576 rows, and reads a
grid that does not divide with the wrong block (docs/quantization.md).

    python bench/quant_load.py [--dir DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fresh import run_job

ROOT = Path(__file__).resolve().parent.parent
SIZES = dict(
    hidden_size=2048, intermediate_size=8192, moe_intermediate_size=1536, num_attention_heads=16,
    num_key_value_heads=16, q_lora_rank=1024, qk_nope_head_dim=128, v_head_dim=128, vocab_size=32000,
)  # fmt: skip
MODES = ("read", "kept", "dequantized", "transformers")


def make(d: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.helpers.quantized import write_deepseek_v3_fp8

    write_deepseek_v3_fp8(
        d,
        layers=4,
        experts=32,
        block=128,
        kv_lora_rank=512,
        qk_rope_head_dim=128,
        files=4,
        keep=False,
        **SIZES,
    )


def load(mode: str, d: Path) -> dict:
    """The state dict one mode loads (what is timed)."""
    import torch

    if mode == "read":  # every byte of every shard into memory, nothing else
        out = {}
        for f in d.glob("*.safetensors"):
            buf = bytearray(f.stat().st_size)
            with open(f, "rb") as fh:
                fh.readinto(buf)
            out[f.name] = torch.frombuffer(buf, dtype=torch.uint8)
        return out
    if mode == "transformers":
        sys.path.insert(0, str(ROOT))
        import transformers

        from tests.helpers.quantized import transformers_dequantized

        transformers.utils.logging.disable_progress_bar()
        return transformers_dequantized(d, torch.bfloat16)
    import convspec

    plan = convspec.compile("deepseek_v3", config=d / "config.json")
    return dict(plan.load(d, dequantize=mode == "dequantized"))


def one(mode: str, d: Path) -> None:
    """Run in a child: load once, print the seconds it took."""
    import torch  # noqa: F401 - imported before the clock starts, as in every mode

    if mode == "transformers":
        import transformers  # noqa: F401
    else:
        import convspec  # noqa: F401
    t = time.perf_counter()
    sd = load(mode, d)
    took = time.perf_counter() - t
    print(
        json.dumps(
            {"s": took, "tensors": len(sd), "bytes": sum(v.numel() * v.element_size() for v in sd.values())}
        )
    )


def compare(d: Path) -> None:
    """Run in a child: convspec's dequantized load against transformers', every tensor bit for bit."""
    import torch

    ours, theirs = load("dequantized", d), load("transformers", d)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:5]

    def raw(t):
        return t.contiguous().view(-1).view(torch.uint8)

    bad = [k for k in ours if ours[k].dtype != theirs[k].dtype or not raw(ours[k]).equal(raw(theirs[k]))]
    assert not bad, bad[:5]
    print(f"{len(ours)} tensors, bit for bit")


def run(mode: str, d: Path) -> tuple[float, float, dict]:
    """(seconds, peak RSS in GiB, what it printed) of one load in a fresh process."""
    return run_job(__file__, ["--one", mode, "--dir", str(d)])


def same(d: Path) -> str:
    """The comparison, in a child of its own: this process stays small, and its children's peak RSS
    (which starts from this process's, forked) is theirs."""
    res = subprocess.run(
        [sys.executable, __file__, "--compare", "--dir", str(d)], capture_output=True, text=True, check=True
    )
    return res.stdout.strip().splitlines()[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/convspec-bench-fp8"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one, args.dir)
        return 0
    if args.compare:
        compare(args.dir)
        return 0
    if not (args.dir / "config.json").exists():
        make(args.dir)
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors"))
    print(
        f"checkpoint: {size / 1e9:.2f} GB in {len(list(args.dir.glob('*.safetensors')))} shards at {args.dir}"
    )
    print(f"convspec dequantized == transformers dequantized: {same(args.dir)}")
    run("read", args.dir)  # the page cache warm for every mode
    rows = {}
    for _ in range(args.repeat):
        for mode in MODES:  # interleaved: a slow moment of the machine falls on every mode alike
            rows.setdefault(mode, []).append(run(mode, args.dir))
    peer_s = statistics.median(r[0] for r in rows["transformers"])
    peer_rss = statistics.median(r[1] for r in rows["transformers"])
    print(f"{'load':<34}{'seconds':>9}{'peak RSS GiB':>14}{'time / peer':>13}{'RSS / peer':>12}")
    for mode in MODES:
        s = statistics.median(r[0] for r in rows[mode])
        rss = statistics.median(r[1] for r in rows[mode])
        got = rows[mode][0][2]
        label = {
            "read": "plain read of the files",
            "kept": "convspec, fused, FP8 kept",
            "dequantized": "convspec, fused, dequantized bf16",
            "transformers": "transformers, dequantize=True",
        }[mode]
        print(
            f"{label:<34}{s:>9.2f}{rss:>14.2f}{s / peer_s:>13.2f}{rss / peer_rss:>12.2f}   ({got['tensors']} tensors)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
