"""Write a small DeepSeek-V3-layout checkpoint as deepseek-ai publishes it: FP8 e4m3 weights with a
float32 `weight_scale_inv` of one scale per block beside every linear, per-expert MoE weights, and a
config.json whose `quantization_config` says so. Random weights, quantized here; sizes are tiny.

`kv_a_proj_with_mqa` has 40 rows in blocks of 16: its grid is ceil(40 / 16) = 3 rows, as the real
one's 576 rows in blocks of 128 have 5.

Usage: python examples/make_tiny_deepseek_fp8.py OUT_DIR [--layers N] [--experts N] [--seed N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from convspec.io.writer import write_file
from convspec.ops.quant import quantize_fp8_blocks

BLOCK = 16
CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_attention_heads": 2,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
    },
}


def linears(cfg: dict, layer: int) -> dict[str, tuple[int, int]]:
    """The FP8 linears of one layer, as (rows, cols)."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    att = f"model.layers.{layer}.self_attn"
    out = {
        f"{att}.q_a_proj": (cfg["q_lora_rank"], h),
        f"{att}.q_b_proj": (heads * qk, cfg["q_lora_rank"]),
        f"{att}.kv_a_proj_with_mqa": (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], h),
        f"{att}.kv_b_proj": (heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"]),
        f"{att}.o_proj": (h, heads * cfg["v_head_dim"]),
    }
    mlp = f"model.layers.{layer}.mlp"
    if layer < cfg["first_k_dense_replace"]:
        sizes = {mlp: cfg["intermediate_size"]}
    else:
        i = cfg["moe_intermediate_size"]
        sizes = {f"{mlp}.experts.{e}": i for e in range(cfg["n_routed_experts"])}
        sizes[f"{mlp}.shared_experts"] = i * cfg["n_shared_experts"]
    for pre, i in sizes.items():
        out |= {f"{pre}.gate_proj": (i, h), f"{pre}.up_proj": (i, h), f"{pre}.down_proj": (h, i)}
    return out


def make(out: Path, layers: int = 2, experts: int = 4, seed: int = 0) -> dict:
    """Create the checkpoint directory and return its config."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = dict(CONFIG, num_hidden_layers=layers, n_routed_experts=experts)
    h = cfg["hidden_size"]
    sd = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], h, generator=g).bfloat16()}
    for layer in range(layers):
        for name, shape in linears(cfg, layer).items():
            q, s = quantize_fp8_blocks(torch.randn(*shape, generator=g) / 4, (BLOCK, BLOCK))
            sd[f"{name}.weight"], sd[f"{name}.weight_scale_inv"] = q, s
        pre = f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"{pre}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
        if layer >= cfg["first_k_dense_replace"]:
            sd[f"{pre}.mlp.gate.weight"] = torch.randn(experts, h, generator=g).bfloat16()
            sd[f"{pre}.mlp.gate.e_score_correction_bias"] = torch.zeros(experts)
    sd["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    sd["lm_head.weight"] = torch.randn(cfg["vocab_size"], h, generator=g).bfloat16()
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "model.safetensors", sd)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    make(a.out, a.layers, a.experts, a.seed)
    print(f"wrote a tiny FP8 DeepSeek-V3 checkpoint to {a.out}")


if __name__ == "__main__":
    main()
