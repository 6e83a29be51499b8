"""Tiny ORIGINAL-layout checkpoints (the key names real releases use on disk) for the sharded-load tests
of issue 16, written without transformers: random bf16 weights of a few hundred bytes to 1.5 KB each,
every dim a tensor or expert parallel shard cuts divisible by 2 and 4, split over several files with
an index (as real checkpoints are) so the reads can be followed file by file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from convspec.io.writer import write_file

# shared attention sizes: 4 query heads, 2 key/value heads (GQA) of head_dim 4
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, EXPERTS = 16, 4, 2, 4, 32, 4


def write_checkpoint(out: Path, sd: dict[str, torch.Tensor], config: dict, files: int = 3) -> Path:
    """`sd` as `files` safetensors files (keys in sorted order, cut into runs of near-equal count) with a
    model.safetensors.index.json, and config.json."""
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    per = -(-len(keys) // files)
    weight_map = {}
    for i in range(files):
        name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per : (i + 1) * per]}
        write_file(out / name, part)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


class _Weights:
    """Random bf16 tensors from one seeded generator, so a checkpoint is the same on every run."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g).to(dtype)


def _experts(w: _Weights, p: str, inter: int) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down projections, as Qwen2-MoE and DeepSeek-V3 store them."""
    sd = {}
    for e in range(EXPERTS):
        sd[f"{p}.mlp.experts.{e}.gate_proj.weight"] = w(inter, HIDDEN)
        sd[f"{p}.mlp.experts.{e}.up_proj.weight"] = w(inter, HIDDEN)
        sd[f"{p}.mlp.experts.{e}.down_proj.weight"] = w(HIDDEN, inter)
    return sd


def _mlp(w: _Weights, p: str, inter: int) -> dict[str, torch.Tensor]:
    return {
        f"{p}.gate_proj.weight": w(inter, HIDDEN),
        f"{p}.up_proj.weight": w(inter, HIDDEN),
        f"{p}.down_proj.weight": w(HIDDEN, inter),
    }


def _model(w: _Weights) -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": w(VOCAB, HIDDEN),
        "model.norm.weight": w(HIDDEN),
        "lm_head.weight": w(VOCAB, HIDDEN),
    }


def _norms(w: _Weights, p: str) -> dict[str, torch.Tensor]:
    return {f"{p}.input_layernorm.weight": w(HIDDEN), f"{p}.post_attention_layernorm.weight": w(HIDDEN)}


def qwen2_moe(out: Path, files: int = 3) -> Path:
    """Qwen2-MoE: q/k/v with biases (GQA), per-expert MLPs, a shared expert and its gate; 2 layers."""
    w, q, kv = _Weights(2), HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    sd = _model(w)
    for layer in range(2):
        p = f"model.layers.{layer}"
        sd |= _norms(w, p)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            sd[f"{p}.self_attn.{name}.weight"] = w(rows, HIDDEN)
            sd[f"{p}.self_attn.{name}.bias"] = w(rows)
        sd[f"{p}.self_attn.o_proj.weight"] = w(HIDDEN, q)
        sd[f"{p}.mlp.gate.weight"] = w(EXPERTS, HIDDEN)
        sd |= _experts(w, p, 8)
        sd |= _mlp(w, f"{p}.mlp.shared_expert", 12)
        sd[f"{p}.mlp.shared_expert_gate.weight"] = w(1, HIDDEN)
    config = dict(
        model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], hidden_size=HIDDEN,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
        intermediate_size=20, moe_intermediate_size=8, shared_expert_intermediate_size=12,
        num_experts=EXPERTS, num_experts_per_tok=2,
    )  # fmt: skip
    return write_checkpoint(out, sd, config, files)


def deepseek_v3(out: Path, files: int = 3) -> Path:
    """DeepSeek-V3: multi-head latent attention (q_a/q_b, kv_a_proj_with_mqa/kv_b), layer 0 a dense MLP,
    layer 1 routed experts, a shared expert and the router's fp32 correction bias."""
    w = _Weights(3)
    nope, rope, v, q_lora, kv_lora = 4, 4, 4, 12, 8
    sd = _model(w)
    for layer in range(2):
        p = f"model.layers.{layer}"
        sd |= _norms(w, p)
        a = f"{p}.self_attn"
        sd[f"{a}.q_a_proj.weight"] = w(q_lora, HIDDEN)
        sd[f"{a}.q_a_layernorm.weight"] = w(q_lora)
        sd[f"{a}.q_b_proj.weight"] = w(HEADS * (nope + rope), q_lora)
        sd[f"{a}.kv_a_proj_with_mqa.weight"] = w(kv_lora + rope, HIDDEN)
        sd[f"{a}.kv_a_layernorm.weight"] = w(kv_lora)
        sd[f"{a}.kv_b_proj.weight"] = w(HEADS * (nope + v), kv_lora)
        sd[f"{a}.o_proj.weight"] = w(HIDDEN, HEADS * v)
        if layer == 0:
            sd |= _mlp(w, f"{p}.mlp", 24)
            continue
        sd[f"{p}.mlp.gate.weight"] = w(EXPERTS, HIDDEN)
        sd[f"{p}.mlp.gate.e_score_correction_bias"] = w(EXPERTS, dtype=torch.float32)
        sd |= _experts(w, p, 8)
        sd |= _mlp(w, f"{p}.mlp.shared_experts", 8)
    config = dict(
        model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_size=HIDDEN,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
        intermediate_size=24, moe_intermediate_size=8, n_routed_experts=EXPERTS, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=kv_lora,
        q_lora_rank=q_lora, qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=v,
    )  # fmt: skip
    return write_checkpoint(out, sd, config, files)


def phi3_fused_qkv(out: Path, files: int = 3) -> Path:
    """Phi-3's layout: one fused qkv_proj of GQA sizes (4 query heads, 2 kv heads) that the built-in
    `split_qkv` spec splits into q/k/v by the config, and a fused gate_up_proj it leaves alone."""
    w, q, kv = _Weights(4), HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    sd = _model(w)
    for layer in range(2):
        p = f"model.layers.{layer}"
        sd |= _norms(w, p)
        sd[f"{p}.self_attn.qkv_proj.weight"] = w(q + 2 * kv, HIDDEN)
        sd[f"{p}.self_attn.o_proj.weight"] = w(HIDDEN, q)
        sd[f"{p}.mlp.gate_up_proj.weight"] = w(2 * 24, HIDDEN)
        sd[f"{p}.mlp.down_proj.weight"] = w(HIDDEN, 24)
    config = dict(
        model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB, intermediate_size=24,
    )  # fmt: skip
    return write_checkpoint(out, sd, config, files)


# the Kimi-K2.5 vision tower: 2 heads of head_dim 6, so 4 ranks' row shards (3 rows) cut through heads
KIMI_HEADS, KIMI_HEAD_DIM, KIMI_HIDDEN = 2, 6, 8


def kimi_vision_wqkv(out: Path, files: int = 2) -> Path:
    """Kimi-K2.5's vision tower: a fused wqkv (and bias) that the built-in `kimi_k25_base` spec chunks into
    q/k/v and whose q and k rows it re-orders per head (`permute_rope`); its output projection `wo`."""
    w, d = _Weights(5), KIMI_HEADS * KIMI_HEAD_DIM
    sd = {}
    for block in range(2):
        p = f"vision_tower.encoder.blocks.{block}"
        sd[f"{p}.wqkv.weight"] = w(3 * d, KIMI_HIDDEN)
        sd[f"{p}.wqkv.bias"] = w(3 * d)
        sd[f"{p}.wo.weight"] = w(KIMI_HIDDEN, d)
    config = {"model_type": "kimi_k25", "vision_config": {"num_attention_heads": KIMI_HEADS}}
    return write_checkpoint(out, sd, config, files)


# name -> (the built-in spec or model type it is compiled with, the maker)
ARCHITECTURES = {
    "qwen2_moe": ("qwen2_moe", qwen2_moe),
    "deepseek_v3": ("deepseek_v3", deepseek_v3),
    "phi3_qkv": ("split_qkv", phi3_fused_qkv),
    "kimi_wqkv": ("kimi_k25_base", kimi_vision_wqkv),
}
