"""A DeepSeek-V3-layout checkpoint with many experts for the sharded-load benchmark (issue 16).

transformers' `deepseek_v3` model reverted to the original per-expert keys (`mlp.experts.E.gate_proj`
...; the `deepseek_v3` spec fuses them), with widths shrunk so that a few layers of 64 experts make
about `gib` GiB of random bf16, in shards of 512 MiB with an index. Every width divides by 4, so that
every placement of the benchmark fits 1, 2 and 4 ranks.

    python bench/deepseek_layout.py OUT_DIR [--gib 1] [--experts 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30


def config(layers: int, experts: int = 64, hidden: int = 1024, moe: int = 512, vocab: int = 16384):
    """A deepseek_v3 config: the first layer dense, the others `experts` routed experts and a shared one."""
    import transformers

    return transformers.AutoConfig.for_model(
        "deepseek_v3",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=moe,
        num_hidden_layers=layers,
        first_k_dense_replace=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=hidden // 2,
        kv_lora_rank=hidden // 4,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=experts,
        n_shared_experts=1,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def layers_for(gib: float, experts: int = 64, hidden: int = 1024, moe: int = 512) -> int:
    """Layers for about `gib` GiB: each MoE layer is (experts + 1) x 3 x hidden x moe bf16 and a little
    attention; the embeddings and the dense first layer about 100 MB."""
    per_layer = (experts + 1) * 3 * hidden * moe * 2 + 4 * hidden * hidden
    return max(2, 1 + round((gib * GiB - 100e6) / per_layer))


def write_checkpoint(d: Path, layers: int, shard_bytes: int = 512 * MiB, **widths) -> dict:
    """The original per-expert layout of `config(layers, **widths)`, random bf16, sharded, indexed."""
    import transformers
    from load_convert import write_original  # bench/ is on the path of a bench script

    return write_original(
        d, config(layers, **widths), transformers.AutoModelForCausalLM.from_config, shard_bytes
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--experts", type=int, default=64)
    args = ap.parse_args()
    got = write_checkpoint(args.out, layers_for(args.gib, args.experts), experts=args.experts)
    print(f"{args.out}: {got['keys']} keys, {got['bytes'] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
