"""Write a small checkpoint in a made-up GPT-style MoE layout ("orca") and its own config.json.

docs/authoring.md writes a spec for this layout from scratch; sizes are tiny so it runs anywhere.
Usage: python examples/authoring/make_checkpoint.py OUT_DIR [--layers N] [--experts N] [--seed N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from convspec.io.writer import write_file

CONFIG = {
    "architectures": ["OrcaForCausalLM"],
    "model_type": "orca",
    "vocab_size": 128,
    "n_embd": 32,
    "n_head": 4,
    "n_kv_head": 2,
    "head_dim": 16,
    "n_layer": 4,
    "n_expert": 8,
    "n_expert_per_tok": 2,
    "ffn_dim": 48,
    "n_positions": 256,
    "layer_norm_epsilon": 1e-5,
    "torch_dtype": "bfloat16",
}


def make(out: Path, layers: int = 4, experts: int = 8, seed: int = 0, dtype: str = "bfloat16") -> dict:
    """Create the checkpoint directory and return its config."""
    import torch  # after convspec, which quiets torch's warning where numpy is absent

    g = torch.Generator().manual_seed(seed)
    cfg = dict(CONFIG, n_layer=layers, n_expert=experts)
    h, f, hd = cfg["n_embd"], cfg["ffn_dim"], cfg["head_dim"]
    q, kv = cfg["n_head"] * hd, cfg["n_kv_head"] * hd

    def w(*shape):
        # a fresh tensor each call: safetensors refuses tensors that share memory
        return (torch.randn(*shape, generator=g) * 0.02).to(getattr(torch, dtype)).clone()

    sd = {
        "transformer.wte.weight": w(cfg["vocab_size"], h),
        "transformer.ln_f.weight": w(h),
        "embed_out.weight": w(cfg["vocab_size"], h),
    }
    for layer in range(layers):
        p = f"transformer.h.{layer}"
        sd[f"{p}.ln_1.weight"] = w(h)
        sd[f"{p}.ln_2.weight"] = w(h)
        sd[f"{p}.attn.c_attn.weight"] = w(q + 2 * kv, h)  # q, k, v stacked on dim 0
        sd[f"{p}.attn.c_proj.weight"] = w(h, q)
        sd[f"{p}.moe.router.weight"] = w(experts, h)
        for e in range(experts):
            sd[f"{p}.moe.experts.{e}.gate.weight"] = w(f, h)
            sd[f"{p}.moe.experts.{e}.up.weight"] = w(f, h)
            sd[f"{p}.moe.experts.{e}.down.weight"] = w(h, f)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "model.safetensors", dict(sorted(sd.items())))  # convspec's writer: no numpy needed
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    make(a.out, a.layers, a.experts, a.seed)
    print(f"wrote an orca checkpoint ({a.layers} layers, {a.experts} experts) to {a.out}")


if __name__ == "__main__":
    main()
