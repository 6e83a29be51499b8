"""Tiny quantized checkpoints in the layouts their families are published in (DeepSeek-V3 and Qwen3-MoE
block FP8, gpt-oss MXFP4, compressed-tensors FP8), quantized here from seeded bf16 weights so a test
knows every scale; and transformers 5.23's dequantized load of such a directory, the oracle of issue 17.

The quantizers are this module's own (the tests must not depend on convspec's): a test that compares
convspec with transformers needs both to read the same files, and nothing else."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_BLOCK = 32  # MXFP4 values sharing one E8M0 exponent (16 bytes)


@dataclass
class Written:
    """A checkpoint written here: its directory, config, the bf16 weights it was quantized from (published
    names, published orientation), each companion (`...weight_scale_inv`, `..._scales`, ...) and the
    exact dequantization of each quantized weight by its own (ceil) block grid."""

    dir: Path
    config: dict
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    dequantized: dict[str, torch.Tensor] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


# ---- quantizers -----------------------------------------------------------------------------------


def _grid_expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """A per-block scale grid spread over the weight's elements (the last block of a ragged dim cut short)."""
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[: shape[0], : shape[1]]


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's FP8: float8_e4m3fn values and a float32 `weight_scale_inv` of amax / 448 per block,
    a grid of ceil(rows / b0) x ceil(cols / b1) (a ragged last block has its own amax)."""
    rows, cols = w.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    amax = padded.abs().reshape(grid[0], block[0], grid[1], block[1]).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w.float() / _grid_expand(scale, (rows, cols), block)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale


def dequantize_fp8_block(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The exact float32 value of a block-FP8 weight by its own block size (ceil grid)."""
    return q.float() * _grid_expand(scale, tuple(q.shape), block)


def quantize_fp8_rows(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors FP8: one float32 scale per output row (`[rows, 1]`) or per tensor (`[1]`)."""
    amax = w.float().abs().amax(dim=1, keepdim=True) if per_channel else w.float().abs().amax().reshape(1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's MXFP4 of `w` `[..., rows, cols]`: blocks uint8 `[..., rows, cols/32, 16]` (two e2m1 values a
    byte, the even element in the low nibble) and E8M0 scales uint8 `[..., rows, cols/32]` (exponent + 127),
    each block's exponent the smallest that keeps its amax within 6 (FP4's largest)."""
    *lead, rows, cols = w.shape
    x = w.float().reshape(*lead, rows, cols // MX_BLOCK, MX_BLOCK)
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(2.0**-126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    values = torch.tensor(FP4_VALUES)
    scaled = x / torch.exp2(exp)
    nibble = (scaled.unsqueeze(-1) - values).abs().argmin(dim=-1).to(torch.uint8)  # nearest, +0 before -0
    blocks = nibble[..., 0::2] | (nibble[..., 1::2] << 4)
    return blocks.contiguous(), (exp.squeeze(-1) + 127).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The exact float32 value of MXFP4 blocks, in their own orientation `[..., rows, cols]`."""
    lut = torch.tensor(FP4_VALUES)
    vals = torch.stack([lut[(blocks & 0xF).long()], lut[(blocks >> 4).long()]], dim=-1).flatten(-2)
    vals = vals * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return vals.flatten(-2)


# ---- writing --------------------------------------------------------------------------------------


def write_safetensors(out: Path, sd: dict[str, torch.Tensor], config: dict, files: int = 1) -> Path:
    """`sd` with `safetensors.torch.save_file`: one model.safetensors, or `files` shards (keys sorted, cut
    into runs) with a model.safetensors.index.json; and config.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if files <= 1:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    keys, weight_map = sorted(sd), {}
    per = -(-len(keys) // files)
    for i in range(files):
        name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _config(model_type: str, arch: str, quantization: dict, **kwargs) -> dict:
    """transformers' own config class for `model_type`, as `to_dict` writes it, with the published
    `quantization_config` and `architectures`."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **kwargs).to_dict()
    config.update(architectures=[arch], quantization_config=quantization, dtype="bfloat16")
    return config


def _published_bf16(config: dict, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Seeded bf16 weights under the keys the published checkpoint uses, one at a time: transformers'
    model built on the meta device gives every name and shape; its fused experts (`mlp.experts.gate_up_proj`
    `[E, 2I, H]`, `down_proj` `[E, H, I]`) are written per expert, as DeepSeek-V3 and Qwen3-MoE publish them."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.5).to(torch.bfloat16)

    for name, p in _meta_state(config).items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base, (e, two_i, h) = name.removesuffix("gate_up_proj"), p.shape
            for i in range(e):
                yield f"{base}{i}.gate_proj.weight", rand(two_i // 2, h)
                yield f"{base}{i}.up_proj.weight", rand(two_i // 2, h)
        elif name.endswith("mlp.experts.down_proj"):
            base = name.removesuffix("down_proj")
            for i in range(p.shape[0]):
                yield f"{base}{i}.down_proj.weight", rand(*p.shape[1:])
        elif name.endswith("e_score_correction_bias"):
            yield name, torch.randn(*p.shape, generator=g)  # float32, as DeepSeek-V3 publishes it
        else:
            yield name, rand(*p.shape)


def _config_kwargs(config: dict) -> dict:
    skip = {"transformers_version", "architectures", "quantization_config", "model_type", "dtype"}
    return {k: v for k, v in config.items() if k not in skip}


# the 2-D weights that stay bf16 in every published FP8 checkpoint: embeddings, the head, MoE routers
_KEEP_BF16 = re.compile(r"(embed_tokens|lm_head|mlp\.gate|mlp\.router)\.weight$")


def _write_block_fp8(
    out: Path, config: dict, seed: int, block: int, files: int, keep: bool = True
) -> Written:
    """Quantize every 2-D weight but the kept ones to block FP8 with a `weight_scale_inv` beside it; with
    `keep=False` the originals and dequantized values are not kept (a checkpoint of gigabytes)."""
    written = Written(out, config)
    for name, w in _published_bf16(config, seed):
        if keep:
            written.originals[name] = w
        if w.ndim != 2 or _KEEP_BF16.search(name):
            written.tensors[name] = w
            continue
        q, scale = quantize_fp8_block(w, (block, block))
        companion = f"{name}_scale_inv"
        written.tensors[name], written.tensors[companion] = q, scale
        written.scales[companion] = scale
        if keep:
            written.dequantized[name] = dequantize_fp8_block(q, scale, (block, block))
    write_safetensors(out, written.tensors, config, files)
    return written


def write_deepseek_v3_fp8(
    out: Path,
    layers: int = 2,
    experts: int = 4,
    block: int = 16,
    kv_lora_rank: int = 32,
    qk_rope_head_dim: int = 8,
    seed: int = 0,
    files: int = 1,
    keep: bool = True,
    **sizes: int,
) -> Written:
    """DeepSeek-V3 as deepseek-ai publishes it: per-expert `mlp.experts.E.{gate,up,down}_proj.weight` and
    every attention/MLP linear float8_e4m3fn with a float32 `weight_scale_inv` (grid ceil(dim / block));
    embeddings, head, norms and router bf16, `e_score_correction_bias` float32; layer 0 dense.
    `kv_a_proj_with_mqa` has kv_lora_rank + qk_rope_head_dim rows (40 by default: 2.5 blocks of 16, as
    the real 576 are 4.5 blocks of 128). The published MTP layer (model.layers.61) is left out.
    `sizes` override the config's other dims (hidden_size=2048, ... for a benchmark's checkpoint of
    gigabytes, with `keep=False`)."""
    quant = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
    quant["weight_block_size"] = [block, block]
    dims = dict(
        vocab_size=4 * block, hidden_size=2 * block, intermediate_size=3 * block, moe_intermediate_size=block,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=2 * block, qk_nope_head_dim=block,
        v_head_dim=block,
    )  # fmt: skip
    config = _config(
        "deepseek_v3", "DeepseekV3ForCausalLM", quant, **(dims | sizes), num_hidden_layers=layers,
        n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
    )  # fmt: skip
    return _write_block_fp8(out, config, seed, block, files, keep)


def write_qwen3_moe_fp8(
    out: Path, layers: int = 2, experts: int = 4, block: int = 16, seed: int = 1, files: int = 1
) -> Written:
    """Qwen3-MoE as Qwen/Qwen3-30B-A3B-FP8 is published: per-expert weights and q/k/v/o float8_e4m3fn with
    float32 `weight_scale_inv`; router `mlp.gate`, q/k norms, embeddings, head bf16; quantization_config
    `fp8`/`e4m3`/dynamic with `weight_block_size` [block, block] ([128, 128] in the published one)."""
    quant = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
    quant["weight_block_size"] = [block, block]
    config = _config(
        "qwen3_moe", "Qwen3MoeForCausalLM", quant, vocab_size=4 * block, hidden_size=2 * block,
        intermediate_size=3 * block, moe_intermediate_size=block, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=block, num_experts=experts,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    return _write_block_fp8(out, config, seed, block, files)


def write_gpt_oss_mxfp4(
    out: Path, layers: int = 2, experts: int = 4, hidden: int = 64, seed: int = 2, files: int = 1
) -> Written:
    """gpt-oss as openai publishes it: `mlp.experts.gate_up_proj_blocks` uint8 `[E, 2I, H/32, 16]` with
    `_scales` uint8 `[E, 2I, H/32]`, `down_proj_blocks` `[E, H, I/32, 16]` / `_scales`, bf16 expert biases,
    router, attention (with biases and `sinks`); the `originals` of the experts are `[E, out, in]`
    (gate and up rows interleaved, as gpt-oss stores them), the transpose of transformers' parameter."""
    quant = {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4",
    }  # fmt: skip
    config = _config(
        "gpt_oss", "GptOssForCausalLM", quant, vocab_size=64, hidden_size=hidden, intermediate_size=hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 4,
        num_local_experts=experts, num_experts_per_tok=2,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    written = Written(out, config)
    for name, p in _meta_state(config).items():
        w = (torch.randn(*p.shape, generator=g) * 0.5).to(torch.bfloat16)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = w.transpose(1, 2).contiguous()  # published orientation [E, out, in]
            blocks, scales = quantize_mxfp4(w)
            written.originals[name] = w
            written.tensors[f"{name}_blocks"], written.tensors[f"{name}_scales"] = blocks, scales
            written.scales[f"{name}_scales"] = scales
            written.dequantized[name] = dequantize_mxfp4(blocks, scales)
        else:
            written.originals[name] = written.tensors[name] = w
    write_safetensors(out, written.tensors, config, files)
    return written


def _meta_state(config: dict) -> dict[str, torch.Tensor]:
    import transformers

    cfg = transformers.AutoConfig.for_model(config["model_type"], **_config_kwargs(config))
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg).state_dict()


def compressed_tensors_config(per_channel: bool = True, static_input: bool = True) -> dict:
    """The `quantization_config` llm-compressor publishes for FP8 (e.g. RedHatAI's `-FP8` models)."""

    def args(strategy: str, dynamic: bool) -> dict:
        return {
            "actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": None, "num_bits": 8,
            "observer": "minmax", "observer_kwargs": {}, "strategy": strategy, "symmetric": True, "type": "float",
        }  # fmt: skip

    inputs = args("tensor", False) if static_input else args("token", True)
    weights = args("channel" if per_channel else "tensor", False)
    group = {
        "input_activations": inputs,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": weights,
    }
    return {
        "config_groups": {"group_0": group}, "format": "float-quantized", "global_compression_ratio": None,
        "ignore": ["lm_head"], "kv_cache_scheme": None, "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }  # fmt: skip


def write_compressed_fp8(
    out: Path,
    model_type: str = "qwen3",
    layers: int = 2,
    per_channel: bool = True,
    static_input: bool = True,
    seed: int = 3,
    files: int = 1,
) -> Written:
    """A llama- or qwen3-shaped model in compressed-tensors' FP8 layout: every Linear but lm_head has a
    float8_e4m3fn `weight`, a float32 `weight_scale` (`[rows, 1]` per channel, `[1]` per tensor) and, for
    a static activation scheme, a float32 `input_scale` `[1]`; the rest bf16."""
    arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    config = _config(
        model_type, arch, compressed_tensors_config(per_channel, static_input), vocab_size=64, hidden_size=32,
        intermediate_size=48, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    written = Written(out, config)
    for name, p in _meta_state(config).items():
        w = (torch.randn(*p.shape, generator=g) * 0.5).to(torch.bfloat16)
        written.originals[name] = w
        if w.ndim != 2 or _KEEP_BF16.search(name):
            written.tensors[name] = w
            continue
        q, scale = quantize_fp8_rows(w, per_channel)
        written.tensors[name] = q
        written.tensors[name + "_scale"] = written.scales[name + "_scale"] = scale
        written.dequantized[name] = q.float() * scale
        if static_input:
            inp = (torch.rand(1, generator=g) + 0.5) / FP8_MAX
            written.tensors[name.removesuffix("weight") + "input_scale"] = inp
    write_safetensors(out, written.tensors, config, files)
    return written


# ---- the oracle: transformers 5.23's dequantized load -----------------------------------------------


def transformers_dequantized(path: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """transformers' own state dict of the checkpoint at `path` loaded with dequantization, in its fused
    layout (`mlp.experts.gate_up_proj` ...), on CPU. Which path by `quant_method`:

    - `fp8`: `AutoModelForCausalLM.from_pretrained(path, quantization_config=FineGrainedFP8Config(
      dequantize=True))`, the real load (`Fp8Dequantize` first in each converter, then the model's
      conversion mapping). Its `validate_environment` asks for `accelerate` before it looks at
      `dequantize` though nothing on that path uses it, so where accelerate is missing that one check is
      patched out. transformers derives the block from the grid (`rows // grid_rows`): a dim that is
      not a whole number of blocks (DeepSeek-V3's kv_a_proj_with_mqa, 576 rows at 128) raises there.
    - `mxfp4`: `from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True))`, as is.
    - `compressed-tensors`: the quantizer needs the `compressed-tensors` package, not installable here,
      so `_compressed_fp8_by_ops` runs transformers' own `CompressedTensorsDequantize` on the tensors."""
    config = json.loads((Path(path) / "config.json").read_text())
    method = config.get("quantization_config", {}).get("quant_method")
    if method == "compressed-tensors":
        return _compressed_fp8_by_ops(Path(path), dtype)
    import transformers

    if method == "fp8":
        quant = transformers.FineGrainedFP8Config(dequantize=True)
    elif method == "mxfp4":
        quant = transformers.Mxfp4Config(dequantize=True)
    else:
        raise ValueError(f"no oracle for quant_method {method!r}")
    with _accelerate_check_skipped():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, dtype=dtype
        )
    return {k: v.detach() for k, v in model.state_dict().items()}


class _accelerate_check_skipped:
    """Makes FineGrainedFP8HfQuantizer.validate_environment's accelerate check pass while it runs, only
    where accelerate is not installed (with `dequantize=True` the load never imports it)."""

    def __enter__(self):
        import importlib.util

        from transformers.quantizers import quantizer_finegrained_fp8 as mod

        self.mod, self.saved = mod, mod.is_accelerate_available
        if importlib.util.find_spec("accelerate") is None:
            mod.is_accelerate_available = lambda *a, **k: True
        return self

    def __exit__(self, *exc):
        self.mod.is_accelerate_available = self.saved


def _compressed_fp8_by_ops(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """transformers' `CompressedTensorsDequantize` on each (`weight`, `weight_scale`) pair, through its FP8
    branch (`(weight.float() * scale.float()).to(dtype)`, the one that needs no compressed-tensors
    package; its dense branch calls compressed-tensors' `FloatQuantizationCompressor`, which computes
    `weight.to(scale.dtype) * scale` then `.to(dtype)`: the same for float32 scales). Other tensors are
    cast to `dtype` as from_pretrained does; `input_scale` (activations) is dropped, as a dense model has
    no parameter for it. Only model types with no conversion mapping (llama, qwen3): names unchanged."""
    from types import SimpleNamespace

    from safetensors.torch import load_file
    from transformers.integrations.compressed_tensors import CompressedTensorsDequantize

    config = json.loads((path / "config.json").read_text())
    groups = {
        name: SimpleNamespace(targets=g["targets"], weights=SimpleNamespace(**g["weights"]), format=None)
        for name, g in config["quantization_config"]["config_groups"].items()
    }
    ct = SimpleNamespace(config_groups=groups, format=config["quantization_config"]["format"])
    op = CompressedTensorsDequantize(SimpleNamespace(compressor=SimpleNamespace(quantization_config=ct)))
    sd: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        sd.update(load_file(file))
    out = {}
    stand_in = SimpleNamespace(get_parameter=lambda _n: torch.empty(0, dtype=dtype))
    with _compressed_tensors_importable():
        for name, t in sd.items():
            if name.endswith(("weight_scale", "input_scale")):
                continue
            if f"{name}_scale" not in sd:
                out[name] = t.to(dtype)
                continue
            inputs = {name: [t], f"{name}_scale": [sd[f"{name}_scale"]]}
            res = op.convert(
                inputs, source_patterns=[], target_patterns=[], full_layer_name=name, model=stand_in
            )
            out[name] = res[name][0]
    return out


def _compressed_tensors_importable():
    """`CompressedTensorsDequantize.convert` imports compressed-tensors' `BaseCompressor` on entry, though
    its FP8 branch never uses it: where the package is missing, a stand-in module that refuses any use."""
    import importlib.util
    import sys
    from contextlib import nullcontext
    from types import ModuleType
    from unittest import mock

    if importlib.util.find_spec("compressed_tensors") is not None:
        return nullcontext()

    class BaseCompressor:
        def __getattr__(self, name):
            raise RuntimeError("compressed-tensors is not installed")

        @classmethod
        def get_value_from_registry(cls, name):
            raise RuntimeError("compressed-tensors is not installed: only the FP8 branch runs here")

    pkg, sub = ModuleType("compressed_tensors"), ModuleType("compressed_tensors.compressors")
    sub.BaseCompressor, pkg.compressors = BaseCompressor, sub
    return mock.patch.dict(sys.modules, {"compressed_tensors": pkg, "compressed_tensors.compressors": sub})
