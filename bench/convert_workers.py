"""Multi-process convert (issue 16, part 4): wall time of `convspec convert --workers N` for N = 1, 2
(the whole CLI process, worker start-up included), on a generated Mixtral-layout checkpoint of about
200 MB (bf16, the tiny example's layout with larger dims), page cache warm, one run each.

Two conversions: mixtral as is (block moves: file-to-file copies) and with `--dtype float32` (every
tensor computed and cast). Each multi-worker output is checked byte for byte against workers=1.

    python bench/convert_workers.py [--layers 4] [--workers 1,2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
MB = 10**6


def write_checkpoint(d: Path, layers: int) -> int:
    """The tiny example's Mixtral layout with 512-wide layers and 8 experts: ~45 MB a layer."""
    import make_tiny_mixtral as tiny

    tiny.CONFIG = dict(
        tiny.CONFIG,
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1792,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    )
    tiny.make(d, layers=layers, experts=8)
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def warm(d: Path) -> None:
    for f in d.iterdir():
        f.read_bytes()


def convert(src: Path, dst: Path, workers: int, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "convspec.cli", "convert", "mixtral", str(src), str(dst), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run([*cmd, "--workers", str(workers), *extra], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return wall


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="~45 MB each")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (1 is the baseline)")
    ap.add_argument("--keep", type=Path, help="keep the checkpoint in this directory between runs")
    a = ap.parse_args()
    counts = [int(n) for n in a.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="convspec-bench-workers-"))
    try:
        src = a.keep or work / "src"
        size = write_checkpoint(src, a.layers) if not src.exists() else None
        warm(src)
        print(f"checkpoint: {src} ({size / MB:.0f} MB)" if size else f"checkpoint: {src}")
        print(f"cores: {os.cpu_count()}")
        for label, extra in [("copies", []), ("--dtype float32", ["--dtype", "float32"])]:
            first = base = None
            for n in counts:
                dst = work / f"out-{len(extra)}-{n}"
                wall = convert(src, dst, n, extra)
                first, base = first or dst, base or wall
                same = (
                    "" if dst == first else f", bytes {'identical' if same_files(first, dst) else 'DIFFER'}"
                )
                print(
                    f"{label:16s} workers={n}: {wall:6.2f} s  ({wall / base:.2f}x workers={counts[0]}{same})"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
