"""Tiny seeded models and PEFT LoRA adapters made on them, saved to a folder, for the adapter tests:
a base checkpoint (weights + the converted model's config.json) and an adapter PEFT made on the
same layout. Original layouts that transformers has no class for (per-expert MoE, Meta's llama) get
a module tree of plain Linear/Embedding modules with their names, so PEFT adapts them as it would
the original model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

R, ALPHA = 2, 4  # every adapter's rank and alpha (scaling 2): factors large enough to change logits
EMBEDDINGS = ("embed_tokens", "tok_embeddings")  # the modules of these names are nn.Embedding
IDS = torch.tensor([[1, 5, 9, 3, 7, 30, 2, 11], [4, 4, 17, 8, 0, 21, 6, 13]])  # a fixed input

_ATTN = dict(
    vocab_size=32,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class Tiny:
    """A tiny model's base checkpoint in one layout and a PEFT adapter made on that layout."""

    base: Path  # model.safetensors + config.json (the transformers config of the model)
    adapter: Path  # adapter_model.safetensors + adapter_config.json, as PEFT saved them
    state: dict[str, torch.Tensor]  # the base weights, as saved
    config: object  # the transformers config the base's config.json holds


def skeleton(state: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree holding `state`: a Linear for each 2-D weight (with its bias where it has one;
    an Embedding under an embedding's name), bare parameters for the rest. PEFT adapts it under the
    checkpoint's names."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = value
    root = nn.Module()
    for name, params in modules.items():
        *path, owner = name.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        weight = params.get("weight")
        if weight is not None and weight.dim() == 2 and owner in EMBEDDINGS:
            module = nn.Embedding(*weight.shape)
        elif weight is not None and weight.dim() == 2:
            module = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in params)
        else:
            module = nn.Module()
        parent.add_module(owner, module)
        for leaf, value in params.items():
            module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    return root


def make_adapter(model: nn.Module, dst: Path, targets: list[str], seed: int, **lora) -> Path:
    """A PEFT LoRA adapter of `model` on `targets`, with random non-zero A and B (seeded), saved
    to `dst` (the model keeps its own weights: the adapter is made on a copy of nothing else)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False, **lora)
    get_peft_model(model, config).save_pretrained(str(dst))
    return dst


def save_base(state: dict[str, torch.Tensor], config, dst: Path) -> Path:
    """A base checkpoint: the weights in one file and the model's config.json beside them."""
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    config.save_pretrained(str(dst))
    return dst


def model_with(cls, config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh transformers model holding exactly `state` (every parameter, no conversion on load)."""
    model = cls(config).eval()
    model.load_state_dict(state, strict=True)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _saved_original(cls, config, tmp: Path, seed: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A seeded transformers model and its checkpoint as `save_pretrained` writes it: transformers
    reverts its own conversion on saving, so the file is in the ORIGINAL (per-expert) layout."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.save_pretrained(str(tmp))
    return model, load_file(str(tmp / "model.safetensors"))


def mixtral(tmp: Path) -> tuple[Tiny, nn.Module]:
    """Per-expert Mixtral (block_sparse_moe.experts.{e}.w1/w2/w3) and an adapter on its experts,
    attention and embedding; with the transformers v5 model (fused experts) it came from."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**_ATTN, intermediate_size=8, num_local_experts=3, num_experts_per_tok=2)
    model, state = _saved_original(MixtralForCausalLM, config, tmp / "base", seed=0)
    adapter = make_adapter(skeleton(state), tmp / "adapter", ["w1", "w2", "w3", *ATTENTION], seed=1)
    return Tiny(tmp / "base", adapter, state, config), model


def qwen2_moe(tmp: Path) -> tuple[Tiny, nn.Module]:
    """Per-expert Qwen2-MoE (mlp.experts.{e}.gate_proj/up_proj/down_proj, a shared expert beside) and
    an adapter on the experts and attention (the shared expert's projections excluded)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        **_ATTN,
        intermediate_size=20,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=12,
        num_experts=3,
        num_experts_per_tok=2,
    )
    model, state = _saved_original(Qwen2MoeForCausalLM, config, tmp / "base", seed=0)
    shared = [f"shared_expert.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    targets = ["gate_proj", "up_proj", "down_proj", *ATTENTION]
    adapter = make_adapter(skeleton(state), tmp / "adapter", targets, seed=1, exclude_modules=shared)
    return Tiny(tmp / "base", adapter, state, config), model


# Phi-3 and Llama configured to compute one function: default rope over the whole head, one norm eps,
# silu, no biases, no sliding window; Phi-3's gate_up_proj is gate rows then up rows, as Llama's
# gate_proj and up_proj.
_SAME = dict(_ATTN, intermediate_size=24, hidden_act="silu", rope_parameters={"rope_type": "default"})


def phi3_config():
    from transformers import Phi3Config

    return Phi3Config(**_SAME, sliding_window=None)


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(**_SAME, attention_bias=False, mlp_bias=False, head_dim=4)


def phi3(tmp: Path) -> Tiny:
    """Phi-3 (fused qkv_proj and gate_up_proj) and an adapter on every projection."""
    from transformers import Phi3ForCausalLM

    config = phi3_config()
    _, state = _saved_original(Phi3ForCausalLM, config, tmp / "base", seed=0)
    model = model_with(Phi3ForCausalLM, config, state)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    adapter = make_adapter(model, tmp / "adapter", targets, seed=1)
    return Tiny(tmp / "base", adapter, state, config)


def llama(tmp: Path) -> Tiny:
    """Llama (separate q/k/v and gate/up) and an adapter on every projection, each its own A."""
    from transformers import LlamaForCausalLM

    config = llama_config()
    _, state = _saved_original(LlamaForCausalLM, config, tmp / "base", seed=0)
    model = model_with(LlamaForCausalLM, config, state)
    targets = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]
    adapter = make_adapter(model, tmp / "adapter", targets, seed=1)
    return Tiny(tmp / "base", adapter, state, config)


def split_phi3(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Phi-3 weights as Llama's, by hand (the oracle of the fixture spec): qkv_proj split by the
    heads' sizes, gate_up_proj cut in two halves."""
    d = config.hidden_size // config.num_attention_heads
    sizes = [config.num_attention_heads * d, config.num_key_value_heads * d, config.num_key_value_heads * d]
    out = {}
    for key, value in state.items():
        if key.endswith("self_attn.qkv_proj.weight"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), torch.split(value, sizes), strict=True):
                out[key.replace("qkv_proj", name)] = part.clone()
        elif key.endswith("mlp.gate_up_proj.weight"):
            gate, up = value.chunk(2)
            out[key.replace("gate_up_proj", "gate_proj")] = gate.clone()
            out[key.replace("gate_up_proj", "up_proj")] = up.clone()
        else:
            out[key] = value
    return out


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rope rows to transformers' halves: `permute` of transformers'
    convert_llama_weights_to_hf.py (transformers 4.x; the script is not shipped in 5.x), verbatim."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `hf_permute`: transformers' halves back to Meta's interleaved rows."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


META = {  # Meta's llama names -> transformers' ({i}: the layer)
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def meta_to_hf(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Meta llama weights as transformers', by hand (the oracle of the fixture spec): renamed, and
    wq / wk permuted with transformers' own `permute` (query heads, key-value heads)."""
    out = {}
    for key, value in state.items():
        module = key.rpartition(".")[0]
        if module.startswith("layers."):
            _, i, rest = module.split(".", 2)
            name = f"model.layers.{i}.{META[rest]}"
            if rest == "attention.wq":
                value = hf_permute(value, config.num_attention_heads)
            elif rest == "attention.wk":
                value = hf_permute(value, config.num_key_value_heads)
        else:
            name = META[module]
        out[f"{name}.weight"] = value
    return out


def meta_llama(tmp: Path) -> Tiny:
    """Meta's original llama layout (layers.{i}.attention.wq ..., q/k rows in Meta's interleaved rope
    order) from a seeded transformers Llama, and an adapter on every projection, the embedding and
    the output."""
    from transformers import LlamaForCausalLM

    config = llama_config()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).state_dict()
    back = {v: k for k, v in META.items()}
    state = {}
    for key, value in hf.items():
        module = key.rpartition(".")[0]
        if module.startswith("model.layers."):
            _, _, i, rest = module.split(".", 3)
            name = f"layers.{i}.{back[rest]}"
            if rest == "self_attn.q_proj":
                value = meta_permute(value, config.num_attention_heads)
            elif rest == "self_attn.k_proj":
                value = meta_permute(value, config.num_key_value_heads)
        else:
            name = back[module]
        state[f"{name}.weight"] = value.clone()
    save_base(state, config, tmp / "base")
    targets = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "tok_embeddings", "output"]
    adapter = make_adapter(skeleton(state), tmp / "adapter", targets, seed=1)
    return Tiny(tmp / "base", adapter, state, config)


def merged(state: dict[str, torch.Tensor], adapter: Path) -> dict[str, torch.Tensor]:
    """`state` with the adapter merged in by PEFT (W + s * B @ A), on the skeleton of its layout."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(skeleton(state), str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def merged64(state: dict[str, torch.Tensor], adapter: Path, cls=None, config=None) -> dict[str, torch.Tensor]:
    """`state` with the adapter merged in by PEFT in float64 (the float32 factors widen exactly), on
    the transformers model `cls` (PEFT nests a module's parameter adapters in the model's parameter
    order) or, with none, on the skeleton of the layout."""
    from peft import PeftModel

    state = {k: v.to(torch.float64) for k, v in state.items()}
    if cls is None:
        model = skeleton(state)
    else:
        model = cls(config).to(torch.float64).eval()
        model.load_state_dict(state, strict=True)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
