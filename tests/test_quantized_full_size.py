"""The full-size DeepSeek-V3 layout as it is published in FP8 (about 90,000 keys: every linear with its
`weight_scale_inv`), built on the meta device from transformers' config, binds: every grid checked
from headers, the fused experts' grids inferred. Its speed is measured in bench/quant_bind.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from quant_bind import fp8_config, fp8_layout  # noqa: E402

import convspec  # noqa: E402
from convspec.errors import BindError  # noqa: E402


@pytest.fixture(scope="module")
def published():
    from bind_speed import deepseek_layouts

    _, config, bf16 = deepseek_layouts()
    return fp8_config(config), fp8_layout(bf16)


def test_the_published_fp8_layout_binds_with_every_grid_in_its_group(published):
    config, layout = published
    assert len(layout) > 90_000
    bound = convspec.compile("deepseek_v3", config=config).bind(layout)
    experts = config["n_routed_experts"]
    rows, cols = 2 * config["moe_intermediate_size"] // 128, config["hidden_size"] // 128
    assert bound.outputs["model.layers.3.mlp.experts.gate_up_proj_scale_inv"] == (
        (experts, rows, cols),
        "float32",
    )
    assert bound.outputs["model.layers.3.mlp.experts.gate_up_proj"][1] == "float8_e4m3fn"
    # a ragged grid passes through with its weight: 576 rows in blocks of 128 have 5 scales
    assert bound.outputs["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"][0] == (5, 56)
    fused = [k for k in bound.outputs if k.endswith("experts.gate_up_proj")]
    assert len(fused) == config["num_hidden_layers"] - config["first_k_dense_replace"]


def test_the_dequantizing_plan_binds_it_to_floats_only(published):
    config, layout = published
    bound = convspec.compile("deepseek_v3", config=config, dequantize=True).bind(layout)
    assert not any(k.endswith("_scale_inv") for k in bound.outputs)
    assert {d for _, d in bound.outputs.values()} == {"bfloat16", "float32"}
    assert bound.outputs["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == ((576, 7168), "bfloat16")


def test_one_wrong_grid_among_ninety_thousand_keys_is_named(published):
    config, layout = published
    key = "model.layers.40.mlp.experts.200.down_proj.weight_scale_inv"
    broken = {**layout, key: ((1, 1), "float32")}
    with pytest.raises(BindError) as exc:
        convspec.compile("deepseek_v3", config=config).bind(broken)
    assert f"{key} has the grid [1, 1], not [56, 16]" in str(exc.value)
