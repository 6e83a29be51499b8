"""The main job on the bundled example: make a tiny Mixtral checkpoint, show the plan bound to it,
convert it to transformers' fused layout, and convert back, checking every tensor bit for bit.

Usage: python examples/mixtral_roundtrip.py [WORK_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from make_tiny_mixtral import make  # noqa: E402

import convspec  # noqa: E402
from convspec import render  # noqa: E402
from convspec.io.safetensors import read_layout  # noqa: E402


def main(work: Path) -> int:
    ckpt = work / "tiny-mixtral"
    make(ckpt)
    print(f"1. wrote a Mixtral-layout checkpoint to {ckpt}")

    plan = convspec.compile("mixtral", config=ckpt / "config.json")
    layout = {k: (e.shape, e.dtype) for k, e in read_layout(ckpt).items()}
    bound = plan.bind(layout)
    print(
        f"2. bound the mixtral plan to its headers: {len(bound.groups)} groups, "
        f"{len(layout)} keys in -> {len(bound.outputs)} keys out (no tensor data read)"
    )
    print()
    print(render.bound_text(bound))
    print()

    source = load_file(str(ckpt / "model.safetensors"))
    converted = plan.apply(source)
    fused = converted["model.layers.0.mlp.experts.gate_up_proj"]
    print(f"3. converted: model.layers.0.mlp.experts.gate_up_proj {list(fused.shape)} {fused.dtype}")

    back = plan.inverse().apply(converted)
    same = sorted(back) == sorted(source) and all(torch.equal(back[k], source[k]) for k in source)
    print(
        f"4. converted back with the inverse plan: {len(back)} tensors, "
        f"{'bit-exact' if same else 'MISMATCH'} against the source"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("examples/_work")))
