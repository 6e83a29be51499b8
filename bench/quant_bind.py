"""Bind of the full-size DeepSeek-V3 layout as it is published: FP8 (issue 17).

transformers' `deepseek_v3` default config on the meta device, reverted to the original per-expert
layout (bench/bind_speed.py), then made the published FP8 layout: every linear `*_proj.weight` (and
`kv_a_proj_with_mqa`) float8_e4m3fn with a float32 `weight_scale_inv` grid of ceil(dim / 128) beside
it. The FP8 plan binds it: each weight's scale joins its group, its grid is checked from headers, the
fused grids are inferred. Timed against the same bind of the bf16 layout, and as a whole `convspec
compile deepseek_v3 --against DIR` of 163 sparse shards.

    python bench/quant_bind.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bind_speed import SHARDS, best_of, compile_seconds, deepseek_layouts, write_sparse_shards  # noqa: E402

BLOCK = (128, 128)
TARGET_S = 1.0  # the bound on binding the full-size FP8 layout
QUANTIZED = ("_proj.weight", "_mqa.weight")  # the linears DeepSeek-V3 publishes in FP8


def fp8_layout(layout: dict, block: tuple[int, int] = BLOCK) -> dict:
    """The published FP8 layout of a bf16 one: each linear weight float8_e4m3fn with its scale grid."""
    out = {}
    for key, (shape, dtype) in layout.items():
        if key.endswith(QUANTIZED) and len(shape) == 2:
            out[key] = (shape, "float8_e4m3fn")
            out[key + "_scale_inv"] = ((-(-shape[0] // block[0]), -(-shape[1] // block[1])), "float32")
        else:
            out[key] = (shape, dtype)
    return out


def fp8_config(config) -> dict:
    """The config with the published quantization_config."""
    quant = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    return {**config.to_dict(), "quantization_config": quant}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import json

    import convspec
    from convspec.io.checkpoint import Checkpoint

    _, config, bf16 = deepseek_layouts()
    layout = fp8_layout(bf16)
    plain = convspec.compile("deepseek_v3", config=config.to_dict())
    plan = convspec.compile("deepseek_v3", config=fp8_config(config))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "config.json").write_text(json.dumps(fp8_config(config)))
        write_sparse_shards(layout, d, SHARDS)
        read = Checkpoint(d).layout
        bound = plan.bind(read)
        grids = sum(k.endswith("_scale_inv") for k in bound.outputs)
        t_fp8 = best_of(lambda: plan.bind(read), args.repeat)
        t_bf16 = best_of(lambda: plain.bind(bf16), args.repeat)
        t_cli = compile_seconds(d, args.repeat)
        if t_cli is None:
            return 1
    print(
        f"keys: {len(layout):,} published FP8 ({len(bf16):,} without the scales) -> {len(bound.outputs):,} ({grids:,} grids)"
    )
    print(f"bind, FP8 layout with its companions: {t_fp8 * 1e3:8.1f} ms (target < {TARGET_S:.0f} s)")
    print(
        f"bind, the bf16 layout:                {t_bf16 * 1e3:8.1f} ms  (FP8 / bf16: {t_fp8 / t_bf16:.2f}x)"
    )
    print(f"`convspec compile deepseek_v3 --against` ({SHARDS} FP8 shards, whole process): {t_cli:.2f} s")
    ok = t_fp8 < TARGET_S
    print("target met" if ok else "target NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
