"""Write a PEFT LoRA adapter of a per-expert Mixtral checkpoint (the layout Mixtral releases use):
random non-zero A and B on every expert's w1/w2/w3 and on the attention's q_proj/v_proj, as PEFT
saves them (adapter_model.safetensors + adapter_config.json). Needs peft (`pip install peft`).
Usage: python examples/make_tiny_mixtral_adapter.py BASE_DIR OUT_DIR [--rank N] [--seed N]
(BASE_DIR: a checkpoint of examples/make_tiny_mixtral.py, whose config.json sizes the adapter)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def per_expert_mixtral(cfg: dict):
    """The module tree of a per-expert Mixtral checkpoint (names and Linear shapes, no forward)."""
    from torch import nn

    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def tree(**children) -> nn.Module:
        m = nn.Module()
        for name, child in children.items():
            setattr(m, name, child)
        return m

    def linear(n_in: int, n_out: int) -> nn.Linear:
        return nn.Linear(n_in, n_out, bias=False)

    def expert() -> nn.Module:
        return tree(w1=linear(h, i), w2=linear(i, h), w3=linear(h, i))

    def layer() -> nn.Module:
        attn = tree(q_proj=linear(h, q), k_proj=linear(h, kv), v_proj=linear(h, kv), o_proj=linear(q, h))
        experts = nn.ModuleList(expert() for _ in range(cfg["num_local_experts"]))
        moe = tree(gate=linear(h, cfg["num_local_experts"]), experts=experts)
        return tree(self_attn=attn, block_sparse_moe=moe)

    layers = nn.ModuleList(layer() for _ in range(cfg["num_hidden_layers"]))
    return tree(model=tree(layers=layers))


def make(base: Path, out: Path, rank: int = 4, seed: int = 0) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = json.loads((base / "config.json").read_text())
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["w1", "w2", "w3", "q_proj", "v_proj"],
        init_lora_weights=False,  # random B too: an adapter as if trained
    )
    model = get_peft_model(per_expert_mixtral(cfg), config)
    model.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    make(a.base, a.out, a.rank, a.seed)
    print(f"wrote a LoRA adapter (rank {a.rank}) of {a.base} to {a.out}")


if __name__ == "__main__":
    main()
