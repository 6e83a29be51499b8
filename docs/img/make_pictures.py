"""Regenerate every picture under docs/img, so that none goes stale when a spec or the drawing changes.

Run from anywhere: python docs/img/make_pictures.py (needs graphviz: `dot`, or graphviz-pure).
"""

# What each picture is, and where it is shown:
#   mixtral-plan.svg, mixtral-plan.png  README.md, docs/usage.md: the mixtral spec bound to the tiny
#                                       checkpoint of examples/make_tiny_mixtral.py (2 layers, 8 experts)
#   qwen2_moe-60-layers.svg             specs/qwen2_moe.yaml bound to the headers of a 60-layer,
#                                       64-expert checkpoint that exists nowhere (a layout dict): the
#                                       picture has the same size for 2 layers or 60
#   orca-plan.svg                       docs/authoring.md step 11, by the command that step shows

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "img"
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "examples" / "authoring")]

from make_checkpoint import make as make_orca  # noqa: E402
from make_tiny_mixtral import make as make_mixtral  # noqa: E402

import convspec  # noqa: E402
from convspec import cli, dot  # noqa: E402
from convspec.ops import TensorInfo  # noqa: E402
from convspec.pictures import render_dot  # noqa: E402


def qwen2_moe_layout(layers: int = 60, experts: int = 64, h: int = 2048, i: int = 1408) -> dict:
    """A Qwen1.5-MoE-style checkpoint's headers, no tensors: drawing 60 layers needs no 69 GiB checkpoint."""
    bf = "bfloat16"
    out = {
        "model.embed_tokens.weight": TensorInfo((151936, h), bf),
        "model.norm.weight": TensorInfo((h,), bf),
        "lm_head.weight": TensorInfo((151936, h), bf),
    }
    for layer in range(layers):
        p = f"model.layers.{layer}"
        for name, shape in [
            ("input_layernorm.weight", (h,)),
            ("post_attention_layernorm.weight", (h,)),
            *[(f"self_attn.{n}_proj.weight", (h, h)) for n in "qkv"],
            *[(f"self_attn.{n}_proj.bias", (h,)) for n in "qkv"],
            ("self_attn.o_proj.weight", (h, h)),
            ("mlp.gate.weight", (experts, h)),
            ("mlp.shared_expert.gate_proj.weight", (4 * i, h)),
            ("mlp.shared_expert.up_proj.weight", (4 * i, h)),
            ("mlp.shared_expert.down_proj.weight", (h, 4 * i)),
            ("mlp.shared_expert_gate.weight", (1, h)),
        ]:
            out[f"{p}.{name}"] = TensorInfo(shape, bf)
        for e in range(experts):  # the keys specs/qwen2_moe.yaml converts
            out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = TensorInfo((i, h), bf)
            out[f"{p}.mlp.experts.{e}.up_proj.weight"] = TensorInfo((i, h), bf)
            out[f"{p}.mlp.experts.{e}.down_proj.weight"] = TensorInfo((h, i), bf)
    return out


def compile_picture(spec: str, checkpoint: Path, out: Path, *more: str) -> None:
    """`convspec compile SPEC --against DIR --format svg|png -o OUT`, the command the docs show."""
    args = [spec, "--against", str(checkpoint), "--format", out.suffix[1:], *more, "-o", str(out)]
    if cli.main(["compile", *args]) != 0:
        raise SystemExit(f"convspec compile {' '.join(args)} failed")
    print(f"wrote {out}")


def main(out: Path = OUT) -> None:
    """Draw every picture into `out` (tests/test_authoring.py draws them elsewhere to compare)."""
    os.chdir(ROOT)  # the pictures cite spec files by the path they were compiled from
    with tempfile.TemporaryDirectory() as tmp:
        tiny, orca = Path(tmp) / "tiny", Path(tmp) / "orca"
        make_mixtral(tiny, layers=2, experts=8)
        compile_picture("mixtral", tiny, out / "mixtral-plan.svg")
        compile_picture("mixtral", tiny, out / "mixtral-plan.png")
        make_orca(orca)
        compile_picture(
            "examples/authoring/orca.yaml", orca, out / "orca-plan.svg", "--group", "11:p=model.layers.0"
        )
    qwen = out / "qwen2_moe-60-layers.svg"
    qwen.write_bytes(render_dot(dot.bound_dot(convspec.compile("qwen2_moe").bind(qwen2_moe_layout())), "svg"))
    print(f"wrote {qwen}")


if __name__ == "__main__":
    main()
