"""The tiny quantized checkpoints of tests/helpers/quantized.py are in their families' published layouts
(keys, dtypes, scale grids of ceil(dim / block)), and transformers' dequantized load of them (the oracle
of issue 17) runs on CPU and gives its fused names with the values of the checkpoint's own block grid,
except where transformers 5.23 gets a ragged block wrong: pinned here so a change in it is seen."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from helpers.quantized import (  # noqa: E402
    transformers_dequantized,
    write_compressed_fp8,
    write_deepseek_v3_fp8,
    write_gpt_oss_mxfp4,
    write_qwen3_moe_fp8,
)
from safetensors import safe_open  # noqa: E402

BLOCK = 16


def _on_disk(path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key's shape and dtype as the files say, through the index where there is one."""
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None
    out = {}
    for name in files or ["model.safetensors"]:
        with safe_open(str(path / name), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = (tuple(t.shape), t.dtype)
    return out


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return write_deepseek_v3_fp8(tmp_path_factory.mktemp("ds") / "m", block=BLOCK, files=3)


@pytest.fixture(scope="module")
def deepseek_aligned(tmp_path_factory):
    """Every dim a whole number of blocks (rope 16: kv_a_proj_with_mqa has 48 rows), so transformers loads it."""
    return write_deepseek_v3_fp8(tmp_path_factory.mktemp("dsa") / "m", block=BLOCK, qk_rope_head_dim=16)


# DeepSeek-V3's layer-1 keys as its model.safetensors.index.json names them (an MoE layer, 4 experts here)
_DS_ATTN = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
_DS_LINEARS = [f"self_attn.{p}" for p in _DS_ATTN] + [
    f"mlp.{m}.{p}_proj"
    for m in ["shared_experts", *(f"experts.{e}" for e in range(4))]
    for p in ("gate", "up", "down")
]
DS_LAYER1 = {f"model.layers.1.{m}.weight{s}" for m in _DS_LINEARS for s in ("", "_scale_inv")} | {
    f"model.layers.1.{k}"
    for k in [
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_a_layernorm.weight",
        "self_attn.kv_a_layernorm.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
    ]
}  # fmt: skip


def test_deepseek_v3_keys_are_the_published_ones(deepseek):
    disk = _on_disk(deepseek.dir)
    assert {k for k in disk if k.startswith("model.layers.1.")} == DS_LAYER1
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(disk)
    dense = {k for k in disk if k.startswith("model.layers.0.mlp.")}
    assert dense == {
        f"model.layers.0.mlp.{p}_proj.weight{s}" for p in ("gate", "up", "down") for s in ("", "_scale_inv")
    }
    index = json.loads((deepseek.dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(disk) and len(set(index["weight_map"].values())) == 3


@pytest.mark.parametrize("maker", [write_deepseek_v3_fp8, write_qwen3_moe_fp8])
def test_block_fp8_dtypes_and_ceil_grids(tmp_path, maker):
    """Every weight with a `weight_scale_inv` is float8_e4m3fn and its scale float32 of ceil(dim / block);
    everything else bf16 (DeepSeek's router correction bias float32, as published)."""
    written = maker(tmp_path / "m", block=BLOCK)
    disk = _on_disk(written.dir)
    scales = {k for k in disk if k.endswith("_scale_inv")}
    assert scales and all(k.removesuffix("_scale_inv") in disk for k in scales)
    for key, (shape, dtype) in disk.items():
        if key in scales:
            rows, cols = disk[key.removesuffix("_scale_inv")][0]
            assert (shape, dtype) == ((math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)), torch.float32), key
        elif f"{key}_scale_inv" in disk:
            assert dtype == torch.float8_e4m3fn, key
        else:
            want = torch.float32 if key.endswith("e_score_correction_bias") else torch.bfloat16
            assert dtype == want and not key.endswith(("_proj.weight", "_mqa.weight")), key
    quant = written.config["quantization_config"]
    assert quant == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [BLOCK] * 2,
    }


def test_deepseek_has_a_ragged_weight_like_the_published_one(deepseek):
    """kv_a_proj_with_mqa: 40 rows at block 16 (2.5 blocks; the published one is 576 at 128, 4.5 blocks)."""
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert tuple(deepseek.tensors[key].shape) == (40, 2 * BLOCK)
    assert tuple(deepseek.scales[f"{key}_scale_inv"].shape) == (3, 2)


def test_config_is_transformers_own(deepseek):
    import transformers

    config = transformers.AutoConfig.from_pretrained(deepseek.dir)
    assert type(config).__name__ == "DeepseekV3Config"
    assert (config.n_routed_experts, config.first_k_dense_replace, config.q_lora_rank) == (4, 1, 2 * BLOCK)


def test_gpt_oss_mxfp4_layout(tmp_path):
    written = write_gpt_oss_mxfp4(tmp_path / "m", experts=4, hidden=64, files=2)
    disk, e, h, i = _on_disk(written.dir), 4, 64, 64
    p = "model.layers.1.mlp.experts."
    assert disk[p + "gate_up_proj_blocks"] == ((e, 2 * i, h // 32, 16), torch.uint8)
    assert disk[p + "gate_up_proj_scales"] == ((e, 2 * i, h // 32), torch.uint8)
    assert disk[p + "down_proj_blocks"] == ((e, h, i // 32, 16), torch.uint8)
    assert disk[p + "down_proj_scales"] == ((e, h, i // 32), torch.uint8)
    assert disk[p + "gate_up_proj_bias"] == ((e, 2 * i), torch.bfloat16)
    assert disk[p + "down_proj_bias"] == ((e, h), torch.bfloat16)
    assert p + "gate_up_proj" not in disk and p + "down_proj" not in disk
    for key in ["self_attn.sinks", "self_attn.q_proj.bias", "mlp.router.weight", "mlp.router.bias"]:
        assert disk[f"model.layers.1.{key}"][1] == torch.bfloat16
    assert written.config["quantization_config"] == {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4",
    }  # fmt: skip


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("static_input", [True, False])
def test_compressed_tensors_fp8_layout(tmp_path, per_channel, static_input):
    written = write_compressed_fp8(tmp_path / "m", per_channel=per_channel, static_input=static_input)
    disk = _on_disk(written.dir)
    q = "model.layers.0.self_attn.q_proj."
    assert disk[q + "weight"] == ((32, 32), torch.float8_e4m3fn)
    assert disk[q + "weight_scale"] == (((32, 1) if per_channel else (1,)), torch.float32)
    assert (q + "input_scale" in disk) == static_input
    if static_input:
        assert disk[q + "input_scale"] == ((1,), torch.float32)
    assert disk["lm_head.weight"][1] == torch.bfloat16 and "lm_head.weight_scale" not in disk
    quant = written.config["quantization_config"]
    assert (quant["quant_method"], quant["format"], quant["ignore"]) == (
        "compressed-tensors",
        "float-quantized",
        ["lm_head"],
    )
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["type"], weights["num_bits"], weights["strategy"]) == (
        "float",
        8,
        "channel" if per_channel else "tensor",
    )


def test_seeded_checkpoints_are_the_same_bytes(tmp_path):
    a = write_gpt_oss_mxfp4(tmp_path / "a", layers=1)
    b = write_gpt_oss_mxfp4(tmp_path / "b", layers=1)
    assert (a.dir / "model.safetensors").read_bytes() == (b.dir / "model.safetensors").read_bytes()


def _within_fp8(written) -> None:
    """Each element of the exact dequantization within e4m3's rounding of its bf16 original: 2^-4 of its
    size (3 mantissa bits) plus half the subnormal step, at its block's scale."""
    for key, deq in written.dequantized.items():
        orig = written.originals[key].float()
        scale = written.scales.get(f"{key}_scale")  # compressed-tensors: [rows, 1] or [1], broadcasts
        if scale is None:
            grid = written.scales[f"{key}_scale_inv"]
            scale = grid.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[
                : orig.shape[0], : orig.shape[1]
            ]
        assert ((deq - orig).abs() <= orig.abs() * 2**-4 + scale * 2**-10).all(), key


def test_fp8_quantizers_are_faithful(deepseek, tmp_path):
    _within_fp8(deepseek)
    _within_fp8(write_compressed_fp8(tmp_path / "c", per_channel=False))


def test_mxfp4_quantizer_is_faithful(tmp_path):
    """Each element within one unit of its block's exponent (half FP4's widest step, 4 to 6)."""
    written = write_gpt_oss_mxfp4(tmp_path / "m", layers=1)
    for key, deq in written.dequantized.items():
        unit = torch.exp2(written.scales[f"{key}_scales"].float() - 127).repeat_interleave(32, -1)
        assert ((deq - written.originals[key].float()).abs() <= unit).all(), key


def _fused_expected(written, layers: range) -> dict[str, torch.Tensor]:
    """The written checkpoint's exact dequantization in transformers' fused layout: experts stacked,
    gate before up (`[E, 2I, H]`), the other weights by their own name."""
    out = {k: v for k, v in written.dequantized.items() if ".experts." not in k}
    for layer in layers:
        p = f"model.layers.{layer}.mlp.experts."
        n = sum(1 for k in written.dequantized if k.startswith(p) and k.endswith("down_proj.weight"))
        if not n:
            continue
        per = {
            proj: torch.stack([written.dequantized[f"{p}{e}.{proj}_proj.weight"] for e in range(n)])
            for proj in ("gate", "up", "down")
        }
        out[p + "gate_up_proj"] = torch.cat([per["gate"], per["up"]], dim=1)
        out[p + "down_proj"] = per["down"]
    return out


def _model_names(config: dict) -> set[str]:
    import transformers

    kwargs = {
        k: v
        for k, v in config.items()
        if k not in ("quantization_config", "transformers_version", "model_type")
    }
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(config["model_type"], **kwargs)
        )
    return set(model.state_dict())


@pytest.mark.parametrize("maker", ["deepseek", "qwen3_moe"])
def test_fp8_oracle_is_the_checkpoints_own_values_fused(maker, deepseek_aligned, tmp_path):
    """FineGrainedFP8Config(dequantize=True) on CPU: the model's own (fused) names, bf16, each weight equal to
    the exact per-block dequantization rounded once to bf16."""
    written = (
        deepseek_aligned if maker == "deepseek" else write_qwen3_moe_fp8(tmp_path / "q", block=BLOCK, files=2)
    )
    got = transformers_dequantized(written.dir)
    assert set(got) == _model_names(written.config)
    assert "model.layers.1.mlp.experts.gate_up_proj" in got and not any("scale" in k for k in got)
    for key, want in _fused_expected(written, range(2)).items():
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], want.to(torch.bfloat16)), key
    for key, t in got.items():
        if key.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32  # transformers keeps the router bias in float32


def test_mxfp4_oracle(tmp_path):
    """Mxfp4Config(dequantize=True) on CPU: experts `[E, in, out]` (the transpose of gpt-oss's blocks)."""
    written = write_gpt_oss_mxfp4(tmp_path / "m", files=2)
    got = transformers_dequantized(written.dir)
    assert set(got) == _model_names(written.config)
    for key, want in written.dequantized.items():
        assert torch.equal(got[key], want.transpose(1, 2).to(torch.bfloat16)), key
    for key, t in written.tensors.items():
        if key in got:
            assert torch.equal(got[key], t), key


@pytest.mark.parametrize("per_channel", [True, False])
def test_compressed_tensors_oracle(tmp_path, per_channel):
    written = write_compressed_fp8(tmp_path / "m", per_channel=per_channel, files=2)
    got = transformers_dequantized(written.dir)
    assert set(got) == set(written.originals)
    for key, want in written.dequantized.items():
        assert torch.equal(got[key], want.to(torch.bfloat16)), key


def test_transformers_refuses_a_ragged_block_grid(deepseek):
    """transformers 5.23 takes the block from the grid (rows // grid rows): 40 rows over a grid of 3 do
    not divide, and the load fails, as it does for the published kv_a_proj_with_mqa (576 over 5)."""
    with pytest.raises(RuntimeError, match="automatic conversion"):
        transformers_dequantized(deepseek.dir)


def test_transformers_misreads_a_ragged_grid_that_divides(tmp_path):
    """24 rows at block 16 (grid 2): transformers reads blocks of 12, so rows 12-15 get the second
    block's scale. The exact value (the checkpoint's own block) differs there and only there."""
    written = write_deepseek_v3_fp8(tmp_path / "m", block=BLOCK, kv_lora_rank=16, qk_rope_head_dim=8)
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    got = transformers_dequantized(written.dir)[key]
    want = written.dequantized[key].to(torch.bfloat16)
    same = [torch.equal(got[r], want[r]) for r in range(24)]
    assert same == [True] * 12 + [False] * 4 + [True] * 8
