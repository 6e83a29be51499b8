"""The GGUF oracle harness: tiny seeded transformers models per GGUF architecture, their tensors as
llama.cpp's convert_hf_to_gguf.py writes them (in numpy, names from gguf-py's TensorNameMap as
transformers' get_gguf_hf_weights_map finds them), and a GGUF file written by gguf-py's own GGUFWriter.
transformers loading that file (`from_pretrained(dir, gguf_file=...)`) is the oracle convspec's GGUF
reader and writer are checked against. Needs transformers, gguf and accelerate."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from convspec import ggufmeta

# Per GGUF arch: the transformers config of a tiny model (2 layers, hidden 64, vocab 128, GQA where
# the arch has it). Sizes transformers does not read back from GGUF metadata keep their defaults
# where the weights' shapes depend on them (named in the comments).
_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256
)
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2)
_MROPE = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "mrope_section": [2, 1, 1],
    "mrope_interleaved": True,
}
TINY: dict[str, dict] = {
    "llama": dict(
        _COMMON, **_ATTN, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False
    ),
    "qwen2": dict(_COMMON, **_ATTN, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # head_dim: transformers reads no key_length for qwen3, so the tiny model has the default 128
    "qwen3": dict(_COMMON, **_ATTN, head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2moe": dict(
        _COMMON,
        **_ATTN,
        num_experts=4,
        num_experts_per_tok=2,
        # transformers does not read these from GGUF: its defaults (1408, 5632) are the tiny model's
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        tie_word_embeddings=False,
    ),
    "qwen3moe": dict(
        _COMMON,
        **_ATTN,
        head_dim=16,  # qwen3_moe reads attention.key_length
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=768,  # transformers does not read it from GGUF: its default
        norm_topk_prob=True,  # transformers' GGUF default (GGUF_CONFIG_DEFAULTS_MAPPING)
        tie_word_embeddings=False,
    ),
    "gemma2": dict(_COMMON, **_ATTN, head_dim=16, sliding_window=64, tie_word_embeddings=True),
    "gemma3": dict(_COMMON, **_ATTN, head_dim=16, sliding_window=64, tie_word_embeddings=True),
    "phi3": dict(
        _COMMON,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "mamba": dict(
        vocab_size=128,
        hidden_size=64,
        state_size=16,
        num_hidden_layers=2,
        conv_kernel=4,
        expand=2,
        intermediate_size=128,
        time_step_rank=4,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    ),
    "bloom": dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-5),
    # n_positions: transformers reads context_length into n_ctx, so wpe keeps the default 1024 rows
    "gpt2": dict(
        vocab_size=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        layer_norm_epsilon=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "starcoder2": dict(_COMMON, **_ATTN, norm_epsilon=1e-5, tie_word_embeddings=True, use_bias=True),
    "stablelm": dict(_COMMON, **_ATTN, layer_norm_eps=1e-5, tie_word_embeddings=False),
    # multi-query (one kv head): llama.cpp's qkv regrouping is then the identity, which transformers
    # relies on (it has no falcon tensor processor); layer_norm_epsilon is not read back: the default
    "falcon": dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "lfm2": dict(
        _COMMON,
        **_ATTN,
        num_hidden_layers=3,
        layer_types=["conv", "full_attention", "conv"],
        block_auto_adjust_ff_dim=False,
        norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "minimax-m2": dict(
        _COMMON,
        **_ATTN,
        intermediate_size=32,
        head_dim=16,
        rotary_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    ),
    "qwen35": dict(
        _COMMON,
        **_ATTN,
        head_dim=16,
        linear_num_key_heads=2,
        # three value heads per key head, which llama.cpp tiles: (2, 3) is no involution, so the
        # direction of the reorder is tested (with two per key head, tiling is its own inverse)
        linear_num_value_heads=6,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention"],
        rope_parameters=_MROPE,
        tie_word_embeddings=False,
    ),
    "qwen35moe": dict(
        _COMMON,
        **_ATTN,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention"],
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        rope_parameters=_MROPE,
        tie_word_embeddings=False,
    ),
    # gated-gelu (transformers sets is_gated_act for every GGUF t5); shared embedding untied from lm_head
    "t5": dict(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    ),
    "gpt-oss": dict(
        _COMMON,
        **_ATTN,
        intermediate_size=32,
        head_dim=64,  # transformers reads no key_length for gpt_oss: its default
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=64,
        tie_word_embeddings=False,
    ),
    "nemotron": dict(_COMMON, **_ATTN, head_dim=16, norm_eps=1e-5, tie_word_embeddings=False),
}


# the architectures whose tiny model transformers loads back from a GGUF file (tests/test_gguf_oracle.py)
LOADED = [
    "llama",
    "qwen2",
    "qwen3",
    "qwen2moe",
    "qwen3moe",
    "gemma2",
    "gemma3",
    "phi3",
    "mamba",
    "bloom",
    "gpt2",
    "starcoder2",
    "stablelm",
    "nemotron",
    "falcon",
    "lfm2",
    "minimax-m2",
    "qwen35",
    "qwen35moe",
    "t5",
]


def tiny_config(gguf_arch: str):
    """The transformers config of this arch's tiny model."""
    from transformers import AutoConfig

    return AutoConfig.for_model(ggufmeta.model_type(gguf_arch), **TINY[gguf_arch])


def _exact_norm_values(n: int, gen: torch.Generator) -> torch.Tensor:
    """Norm weights on a 2**-10 grid in (-1, 1): `w + 1` and back is exact in float32, so a
    bit-for-bit comparison tests the layout, not rounding near 1.0."""
    return torch.randint(-1000, 1000, (n,), generator=gen).float() / 1024


def _exact_exp_values(shape, gen: torch.Generator) -> torch.Tensor:
    """Values x in [-2, 2] with log(exp(x)) == x in float32, numpy's or torch's exp then numpy's or
    torch's log (A_log, stored as -exp(A_log)): bit-for-bit comparisons then test the layout."""
    flat = torch.empty(int(np.prod(shape)))
    filled = 0
    while filled < flat.numel():
        x = torch.rand(4 * flat.numel(), generator=gen) * 4 - 2
        exps = (torch.exp(x), torch.from_numpy(np.exp(x.numpy())))  # either library's exp, then either log
        ok = torch.ones_like(x, dtype=torch.bool)
        for e in exps:
            ok &= (torch.log(e) == x) & torch.from_numpy(np.log(e.numpy()) == x.numpy())
        take = x[ok][: flat.numel() - filled]
        flat[filled : filled + take.numel()] = take
        filled += take.numel()
    return flat.reshape(shape)


def auto_class(gguf_arch: str):
    """AutoModelForCausalLM, or AutoModelForSeq2SeqLM for t5."""
    import transformers

    return transformers.AutoModelForSeq2SeqLM if gguf_arch == "t5" else transformers.AutoModelForCausalLM


def tiny_model(gguf_arch: str, dtype: torch.dtype = torch.float32):
    """The tiny model, every parameter seeded-random (norms too, on an exact grid)."""
    torch.manual_seed(0)
    model = auto_class(gguf_arch).from_config(tiny_config(gguf_arch), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(_exact_exp_values(p.shape, gen))
            elif p.ndim == 1 and ("norm" in name or "ln_" in name):
                p.copy_(_exact_norm_values(p.numel(), gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.to(dtype).eval()


def _name_map(gguf_arch: str, n_layers: int):
    import gguf

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
    return gguf.get_tensor_name_map(arch, n_layers)


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp LlamaModel.permute: rope rows from HF's halves to GGML's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bloom_qkv(w: np.ndarray, n_head: int, n_embd: int) -> np.ndarray:
    """llama.cpp BloomModel: per-head interleaved q,k,v rows -> all q, then all k, then all v."""
    head = n_embd // n_head
    parts = w.reshape(n_head, 3, head, *w.shape[1:])
    return np.concatenate([parts[:, i].reshape(n_head * head, *w.shape[1:]) for i in range(3)], axis=0)


def _experts(sd: dict, gguf_arch: str, out: dict) -> None:
    """Fused HF experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) -> ffn_{gate,up,down}_exps."""
    for name in list(sd):
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if not m:
            continue
        w = sd.pop(name)
        if m[2] == "down_proj":
            out[f"blk.{m[1]}.ffn_down_exps.weight"] = w
        else:
            half = w.shape[1] // 2
            out[f"blk.{m[1]}.ffn_gate_exps.weight"] = np.ascontiguousarray(w[:, :half])
            out[f"blk.{m[1]}.ffn_up_exps.weight"] = np.ascontiguousarray(w[:, half:])


def _tile(w: np.ndarray, cfg, head_dim: int = 1, offset: int = 0, axis: int = 0) -> np.ndarray:
    """Qwen3.5's value heads from grouped by key head (HF) to tiled (llama.cpp), past `offset` rows
    of `axis`: v0k0 v1k0 v0k1 v1k1 -> v0k0 v0k1 v1k0 v1k1 (transformers' TiledToGroupedRows undoes it)."""
    k = cfg.linear_num_key_heads
    r = cfg.linear_num_value_heads // k
    w = np.moveaxis(w, axis, 0)
    tail = w[offset:]
    tail = tail.reshape(k, r, head_dim, *tail.shape[1:]).swapaxes(0, 1).reshape(tail.shape)
    return np.ascontiguousarray(np.moveaxis(np.concatenate([w[:offset], tail]), 0, axis))


_QWEN35_OFFSET_NORMS = (
    "attn_norm.weight",
    "post_attention_norm.weight",
    "attn_q_norm.weight",
    "attn_k_norm.weight",
)


def _qwen35(gname: str, w: np.ndarray, cfg) -> np.ndarray:
    """llama.cpp's Qwen3.5 converter: `w + 1` norms (not ssm_norm), -exp(A_log), squeezed conv1d,
    value heads tiled on every tensor indexed by them."""
    vdim = cfg.linear_value_head_dim
    qk_rows = 2 * cfg.linear_key_head_dim * cfg.linear_num_key_heads
    if gname == "output_norm.weight" or gname.endswith(_QWEN35_OFFSET_NORMS):
        return _f32(w) + np.float32(1)
    if gname.endswith("ssm_a"):
        return _tile(-np.exp(_f32(w)), cfg)  # in float32, as ssm_a is stored
    if gname.endswith(("ssm_dt.bias", "ssm_alpha.weight", "ssm_beta.weight")):
        return _tile(w, cfg)
    if gname.endswith("attn_gate.weight"):
        return _tile(w, cfg, vdim)
    if gname.endswith("attn_qkv.weight"):
        return _tile(w, cfg, vdim, offset=qk_rows)
    if gname.endswith("ssm_conv1d.weight"):
        return _tile(w.squeeze(1), cfg, vdim, offset=qk_rows)
    if gname.endswith("ssm_out.weight"):
        return _tile(w, cfg, vdim, axis=1)
    if gname.endswith("ffn_gate_inp_shexp.weight"):
        return w.reshape(-1)
    return w


def _gpt_oss_experts(sd: dict, out: dict) -> None:
    """llama.cpp's GptOssModel: gate_up_proj [E, H, 2I] (gate and up interleaved) -> ffn_gate_exps and
    ffn_up_exps [E, I, H]; down_proj [E, I, H] -> ffn_down_exps [E, H, I]; their biases alike."""
    for name in list(sd):
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?", name)
        if not m:
            continue
        w, blk, bias = sd.pop(name), f"blk.{m[1]}", ".bias" if m[3] else ".weight"
        if m[2] == "down_proj":
            out[f"{blk}.ffn_down_exps{bias}"] = w if m[3] else np.ascontiguousarray(w.swapaxes(-1, -2))
            continue
        w = w if m[3] else w.swapaxes(-1, -2)  # [E, 2I, H], or the bias [E, 2I]
        gate, up = (w[..., ::2], w[..., 1::2]) if m[3] else (w[:, ::2], w[:, 1::2])
        out[f"{blk}.ffn_gate_exps{bias}"] = np.ascontiguousarray(gate)
        out[f"{blk}.ffn_up_exps{bias}"] = np.ascontiguousarray(up)


def _value_transform(gguf_arch: str, gname: str, w: np.ndarray, cfg) -> np.ndarray:
    """convert_hf_to_gguf.py's modify_tensors for one tensor, by arch."""
    if gguf_arch in ("qwen35", "qwen35moe"):
        return _qwen35(gname, w, cfg)
    if gguf_arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
        kv = cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads
        return _permute(w, cfg.num_attention_heads, kv)
    if gguf_arch in ("gemma2", "gemma3", "nemotron") and gname.endswith("norm.weight"):
        return _f32(w) + np.float32(1)  # in float32: norms are stored F32
    if gguf_arch == "mamba" and gname.endswith("ssm_a"):
        return -np.exp(_f32(w))  # in float32, as ssm_a is stored
    if (gguf_arch == "mamba" and gname.endswith("ssm_conv1d.weight")) or gname.endswith(
        "shortconv.conv.weight"
    ):
        return w.squeeze(1)
    if gguf_arch == "bloom" and ".attn_qkv." in gname:
        return _bloom_qkv(w, cfg.n_head, cfg.hidden_size)
    if gguf_arch == "gpt2" and gname.endswith(
        ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
    ):
        return np.ascontiguousarray(w.T)
    if gguf_arch == "qwen2moe" and gname.endswith("ffn_gate_inp_shexp.weight"):
        return w.reshape(-1)  # stored 1-D; transformers adds the leading 1 back
    return w


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the raw bits, as gguf-py writes BF16
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.detach().contiguous().numpy()


def gguf_tensors(model, gguf_arch: str) -> dict[str, np.ndarray]:
    """The model's tensors under their GGUF names, transformed as llama.cpp's converter does."""
    cfg = model.config
    sd = {k: _numpy(v) for k, v in model.state_dict().items()}
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    names = _name_map(gguf_arch, n_layers)
    out: dict[str, np.ndarray] = {}
    if gguf_arch == "gpt-oss":
        _gpt_oss_experts(sd, out)
    _experts(sd, gguf_arch, out)
    for hf_name, w in sd.items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")) or "rotary_emb" in hf_name:
            continue
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if m := re.fullmatch(r"model\.layers\.(\d+)\.linear_attn\.dt_bias", hf_name):
            out[f"blk.{m[1]}.ssm_dt.bias"] = _value_transform(gguf_arch, "ssm_dt.bias", w, cfg)
            continue
        if m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.e_score_correction_bias", hf_name):
            out[f"blk.{m[1]}.exp_probs_b.bias"] = w  # minimax-m2's routing bias
            continue
        base, suffix = (
            (hf_name.rsplit(".", 1) + [""])[:2] if hf_name.endswith((".weight", ".bias")) else (hf_name, "")
        )
        # as transformers' get_gguf_hf_weights_map recurses into children: bloom's names are BloomModel's
        gname = names.get_name(base) or (names.get_name(base.split(".", 1)[1]) if "." in base else None)
        if gname is None:
            raise KeyError(f"gguf-py's TensorNameMap for {gguf_arch} has no name for {hf_name}")
        gname = gname + ("." + suffix if suffix else ".weight" if gname.endswith("attn_sinks") else "")
        out[gname] = _value_transform(gguf_arch, gname, w, cfg)
    if gguf_arch in ("bloom", "gpt2") and "output.weight" not in out:
        out["output.weight"] = out["token_embd.weight"]  # llama.cpp writes the tied output for these
    return out


# tensors llama.cpp's converter keeps in float32 whatever the output type (besides every 1-D tensor)
ALWAYS_F32 = (
    "ffn_gate_inp.weight",
    "ssm_conv1d.weight",
    "shortconv.conv.weight",
    "ssm_a",
    "ssm_d",
    "attn_rel_b.weight",
    "position_embd.weight",
    "token_types.weight",
)


def _f32(w: np.ndarray) -> np.ndarray:
    """float32 values of a float array, or of bfloat16 bits held as uint16."""
    if w.dtype == np.uint16:
        return (w.astype(np.uint32) << 16).view(np.float32)
    return w.astype(np.float32)


def write_gguf_with_gguf_py(
    path: str | Path, gguf_arch: str, tensors: dict[str, np.ndarray], metadata: dict, qtype: str | None = None
) -> Path:
    """Write a GGUF file with gguf-py's GGUFWriter. `metadata` is ggufmeta's `{key: (type, value)}`
    (general.architecture is the writer's own). qtype "Q8_0" quantizes 2-D tensors with
    gguf.quants.quantize as llama.cpp does; 1-D tensors stay F32."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    adders = {
        "u8": writer.add_uint8,
        "i8": writer.add_int8,
        "u16": writer.add_uint16,
        "i16": writer.add_int16,
        "u32": writer.add_uint32,
        "i32": writer.add_int32,
        "u64": writer.add_uint64,
        "i64": writer.add_int64,
        "f32": writer.add_float32,
        "f64": writer.add_float64,
        "bool": writer.add_bool,
        "str": writer.add_string,
    }
    subtypes = {
        "i32": gguf.GGUFValueType.INT32,
        "u32": gguf.GGUFValueType.UINT32,
        "f32": gguf.GGUFValueType.FLOAT32,
    }
    for key, (type_, value) in metadata.items():
        if key == "general.architecture":
            continue
        if type_.startswith("arr:"):
            sub = subtypes.get(type_[4:])
            writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=sub)
        else:
            adders[type_](key, value)
    for name, w in tensors.items():
        if qtype is not None and w.ndim >= 2 and not name.endswith(ALWAYS_F32):
            q = getattr(gguf.GGMLQuantizationType, qtype)
            if (
                w.shape[-1] % gguf.GGML_QUANT_SIZES[q][0]
            ):  # rows not whole blocks: llama.cpp falls back to F16
                writer.add_tensor(name, _f32(w).astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(_f32(w), q), raw_dtype=q)
        elif w.ndim <= 1 or name.endswith(ALWAYS_F32):  # llama.cpp keeps these F32
            writer.add_tensor(name, _f32(w))
        elif w.dtype == np.uint16:  # bfloat16 bits
            writer.add_tensor(name, w, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_gguf(tmp: Path, gguf_arch: str, dtype: torch.dtype = torch.float32, qtype: str | None = None):
    """(model, path): the tiny model and its GGUF file written by gguf-py, with ggufmeta's metadata."""
    model = tiny_model(gguf_arch, dtype)
    tensors = gguf_tensors(model, gguf_arch)
    metadata = ggufmeta.metadata_from_config(model.config.to_dict(), tensors)
    path = write_gguf_with_gguf_py(Path(tmp) / f"{gguf_arch}.gguf", gguf_arch, tensors, metadata, qtype)
    return model, path
