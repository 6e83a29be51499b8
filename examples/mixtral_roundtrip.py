"""The main job on the bundled example: make a tiny Mixtral checkpoint, show the plan bound to its headers,
convert it on disk to transformers' fused layout, load it into MixtralForCausalLM (if transformers is
installed), and convert it back, checking every tensor bit for bit.

Usage: python examples/mixtral_roundtrip.py [WORK_DIR]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from make_tiny_mixtral import make  # noqa: E402

import convspec  # noqa: E402
from convspec import render  # noqa: E402
from convspec.io.safetensors import read_layout  # noqa: E402


def _load_dir(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main(work: Path) -> int:
    import torch  # here, after convspec, which quiets torch's warning where numpy is not installed

    ckpt, fused, back = work / "tiny-mixtral", work / "tiny-mixtral-fused", work / "tiny-mixtral-back"
    for d in (ckpt, fused, back):
        shutil.rmtree(d, ignore_errors=True)
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

    r = convspec.convert("mixtral", ckpt, fused, max_shard_size="64KB")
    print(f"3. converted on disk: {r.tensors} tensors in {len(r.files)} shards to {fused}")

    try:
        import transformers
    except ImportError:
        print("4. transformers is not installed: skipped loading into MixtralForCausalLM")
    else:
        config = transformers.MixtralConfig.from_pretrained(ckpt)
        with torch.device("meta"):
            model = transformers.MixtralForCausalLM(config)
        report = plan.load_into(model, ckpt, strict=True)
        same_as_hf = all(torch.equal(model.state_dict()[k], v) for k, v in _load_dir(fused).items())
        print(
            f"4. loaded into transformers' MixtralForCausalLM: {report}, "
            f"{'identical to' if same_as_hf else 'DIFFERENT from'} the converted files"
        )

    convspec.convert("mixtral", fused, back, reverse=True)
    source, returned = _load_dir(ckpt), _load_dir(back)
    same = sorted(returned) == sorted(source) and all(torch.equal(returned[k], source[k]) for k in source)
    print(
        f"5. converted back with the inverse plan: {len(returned)} tensors, "
        f"{'bit-exact' if same else 'MISMATCH'} against the source"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("examples/_work")))
