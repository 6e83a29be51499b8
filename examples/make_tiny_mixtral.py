"""Write a small Mixtral-layout checkpoint (random weights, per-expert w1/w2/w3) and its config.json.

The layout is the one Mixtral releases use on disk; sizes are tiny so it runs anywhere.
Usage: python examples/make_tiny_mixtral.py OUT_DIR [--layers N] [--experts N] [--seed N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from convspec.io.writer import write_file

CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def make(out: Path, layers: int = 2, experts: int = 4, seed: int = 0, dtype: str = "bfloat16") -> dict:
    """Create the checkpoint directory and return its config."""
    import torch  # after convspec, which quiets torch's warning where numpy is absent

    g = torch.Generator().manual_seed(seed)
    cfg = dict(CONFIG, num_hidden_layers=layers, num_local_experts=experts)
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(getattr(torch, dtype))

    sd = {
        "model.embed_tokens.weight": w(cfg["vocab_size"], h),
        "model.norm.weight": w(h),
        "lm_head.weight": w(cfg["vocab_size"], h),
    }
    for layer in range(layers):
        p = f"model.layers.{layer}"
        sd[f"{p}.input_layernorm.weight"] = w(h)
        sd[f"{p}.post_attention_layernorm.weight"] = w(h)
        sd[f"{p}.self_attn.q_proj.weight"] = w(q, h)
        sd[f"{p}.self_attn.k_proj.weight"] = w(kv, h)
        sd[f"{p}.self_attn.v_proj.weight"] = w(kv, h)
        sd[f"{p}.self_attn.o_proj.weight"] = w(h, q)
        sd[f"{p}.block_sparse_moe.gate.weight"] = w(experts, h)
        for e in range(experts):
            sd[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = w(i, h)
            sd[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = w(h, i)
            sd[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = w(i, h)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "model.safetensors", dict(sorted(sd.items())))  # convspec's writer: no numpy needed
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
    print(f"wrote a Mixtral-layout checkpoint ({a.layers} layers, {a.experts} experts) to {a.out}")


if __name__ == "__main__":
    main()
