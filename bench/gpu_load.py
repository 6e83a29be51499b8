"""Benchmark 5 (issue 5, only where a GPU is lent): loading straight to CUDA.

The Mixtral checkpoint of bench/load_convert.py (about 2 GiB, bf16, 8 experts), loaded into
converted tensors on `cuda` by `plan.load(device="cuda")` and by transformers' `from_pretrained`
with `device_map="cuda"`, page cache warm; each is checked against the other bit for bit and its
GB/s printed. There is no target: the figures go into docs/benchmarks.md. Without CUDA it says so
and exits 0.

    python bench/gpu_load.py [--gib 2] [--keep DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_convert import GiB, layers_for, warm, write_checkpoint  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--keep", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: benchmark 5 skipped")
        return 0
    import transformers

    import convspec

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="convspec-gpu-")) if args.keep is None else args.keep
    d = root / "mixtral-small"
    try:
        if not d.exists():
            write_checkpoint(d, layers_for(args.gib))
        warm(d)
        size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        plan = convspec.compile("mixtral")

        def ours():
            out = plan.load(d, device="cuda")
            torch.cuda.synchronize()
            return out

        def theirs():
            model = transformers.MixtralForCausalLM.from_pretrained(
                d, dtype=torch.bfloat16, device_map="cuda"
            )
            torch.cuda.synchronize()
            return model

        best: dict[str, float] = {}
        for r in range(args.repeat):
            for name, fn in [("ours", ours), ("theirs", theirs)][r % 2 :] + [
                ("ours", ours),
                ("theirs", theirs),
            ][: r % 2]:
                gc.collect()
                torch.cuda.empty_cache()
                t = time.perf_counter()
                out = fn()
                best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
                del out
        mine = plan.load(d, device="cuda")
        sd = transformers.MixtralForCausalLM.from_pretrained(
            d, dtype=torch.bfloat16, device_map="cuda"
        ).state_dict()
        same = all(torch.equal(mine[k].view(torch.uint8), sd[k].view(torch.uint8)) for k in mine)
        print(
            f"device: {torch.cuda.get_device_name()}; checkpoint {size / GiB:.2f} GiB; best of {args.repeat}"
        )
        print(
            f"convspec plan.load(device='cuda'):       {best['ours']:6.2f} s  {size / 1e9 / best['ours']:6.2f} GB/s"
        )
        print(
            f"transformers from_pretrained(cuda):      {best['theirs']:6.2f} s  {size / 1e9 / best['theirs']:6.2f} GB/s"
        )
        print(f"ratio: convspec is {best['theirs'] / best['ours']:.2f}x; tensors bit-identical: {same}")
        return 0 if same else 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
