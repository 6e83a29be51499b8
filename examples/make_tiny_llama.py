"""Write a small Llama checkpoint as transformers saves it: config.json and one model.safetensors of
seeded random float32 weights (norms around 1), with grouped-query attention (4 query heads, 2 key/value
heads) so that llama.cpp's q/k row permutation differs between q and k. Sizes are tiny.

Usage: python examples/make_tiny_llama.py OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from convspec.io.writer import write_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.mlp.gate_proj.weight": (i, h),
            f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    tensors = {}
    for key, shape in shapes(CONFIG).items():
        t = torch.randn(shape, generator=g) * 0.1
        tensors[key] = t + 1 if key.endswith("norm.weight") else t
    args.out.mkdir(parents=True, exist_ok=True)
    write_file(args.out / "model.safetensors", tensors)
    (args.out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    print(f"wrote {len(tensors)} tensors to {args.out}")


if __name__ == "__main__":
    main()
