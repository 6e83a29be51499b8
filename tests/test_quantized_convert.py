"""Quantized checkpoints through a conversion (issue 17): each weight's companions follow it through
the same ops, kept bit for bit (and the original file comes back byte for byte), or dequantized with
transformers' numerics; every companion problem is one clear error from headers, nothing written."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convspec
from convspec.cli import main
from convspec.errors import BindError, NotInvertibleError
from convspec.ops import OPS
from tests.helpers.quantized import (
    transformers_dequantized,
    write_compressed_fp8,
    write_deepseek_v3_fp8,
    write_gpt_oss_mxfp4,
    write_qwen3_moe_fp8,
)

WRITERS = {
    "deepseek_v3": write_deepseek_v3_fp8,  # kv_a_proj_with_mqa of 2.5 blocks: a ragged grid
    "qwen3_moe": write_qwen3_moe_fp8,
    "gpt_oss": write_gpt_oss_mxfp4,
    "compressed": write_compressed_fp8,
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {name: make(root / name) for name, make in WRITERS.items()}


def model_type(d: Path) -> str:
    return json.loads((d / "config.json").read_text())["model_type"]


def headers(d: Path) -> dict[str, tuple[list[int], str]]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: (h.get_slice(k).get_shape(), h.get_slice(k).get_dtype()) for k in h.keys()})
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# ---- keep quantized ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(WRITERS))
def test_keep_quantized_round_trip_gives_the_original_file_byte_for_byte(written, name, tmp_path):
    src = written[name].dir
    spec = model_type(src)
    assert main(["convert", spec, str(src), str(tmp_path / "out"), "--quiet"]) == 0
    assert main(["convert", spec, str(tmp_path / "out"), str(tmp_path / "back"), "--reverse", "--quiet"]) == 0
    assert filecmp.cmp(src / "model.safetensors", tmp_path / "back" / "model.safetensors", shallow=False)


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe"])
def test_fused_experts_keep_fp8_with_their_grids_stacked_and_joined(written, name, tmp_path):
    w = written[name]
    assert main(["convert", model_type(w.dir), str(w.dir), str(tmp_path / "out"), "--quiet"]) == 0
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    layer = 1  # a MoE layer in both
    pre = f"model.layers.{layer}.mlp.experts"
    experts = 1 + max(int(k.split(".")[5]) for k in w.tensors if k.startswith(f"{pre}."))
    grid = {
        n: torch.stack([w.tensors[f"{pre}.{e}.{n}.weight_scale_inv"] for e in range(experts)])
        for n in ("gate_proj", "up_proj", "down_proj")
    }
    fp8 = {
        n: torch.stack([w.tensors[f"{pre}.{e}.{n}.weight"] for e in range(experts)])
        for n in ("gate_proj", "up_proj", "down_proj")
    }
    assert out[f"{pre}.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert torch.equal(
        bits(out[f"{pre}.gate_up_proj"]), bits(torch.cat([fp8["gate_proj"], fp8["up_proj"]], 1))
    )
    assert torch.equal(
        out[f"{pre}.gate_up_proj_scale_inv"], torch.cat([grid["gate_proj"], grid["up_proj"]], 1)
    )
    assert torch.equal(out[f"{pre}.down_proj_scale_inv"], grid["down_proj"])
    weights = {k for k in out if not k.endswith("_scale_inv")}
    assert {k.removesuffix("_scale_inv") for k in out if k.endswith("_scale_inv")} <= weights  # no orphan


def test_the_compiled_plan_shows_each_companion_beside_its_weight(written, capsys):
    src = written["deepseek_v3"].dir
    assert main(["compile", "deepseek_v3", "--against", str(src)]) == 0
    out = capsys.readouterr().out
    assert "in   gate.scale = {p:path}.mlp.experts.{e:int}.gate_proj.weight_scale_inv" in out
    assert "op   %6 = cat(%4, %5, dim=1, equal=true)" in out
    assert "out  {p}.mlp.experts.gate_up_proj_scale_inv = %6" in out
    assert "out  model.layers.1.mlp.experts.gate_up_proj_scale_inv" in out


def test_a_plan_and_its_quantization_survive_json(written):
    plan = convspec.compile("deepseek_v3", config=written["deepseek_v3"].dir / "config.json")
    back = convspec.Plan.from_json(plan.to_json())
    assert back == plan and back.quant.block == (16, 16)
    back.check()
    assert back.dequantize() == plan.dequantize()


def test_renames_by_full_name_carry_their_companions(tmp_path):
    spec = tmp_path / "ren.yaml"
    spec.write_text(
        "spec: ren\nquantization:\n  scheme: fp8_blocks\n  block: [16, 16]\nrules:\n"
        '  - rename: "{p:path}.w1.weight"\n    to: "{p}.gate_proj.weight"\n'
        '  - drop: "{p:path}.w9.weight"\n'
    )
    q = torch.zeros(32, 32).to(torch.float8_e4m3fn)
    s = torch.ones(2, 2)
    layout = {"a.w1.weight": q, "a.w1.weight_scale_inv": s, "a.w9.weight": q, "a.w9.weight_scale_inv": s}
    out = convspec.compile(spec).apply(layout)
    assert sorted(out) == ["a.gate_proj.weight", "a.gate_proj.weight_scale_inv"]


# ---- dequantize -------------------------------------------------------------------------------


def test_a_dequantizing_plan_is_lossy_and_refuses_its_inverse_with_the_reason(written):
    plan = convspec.compile("qwen3_moe", config=written["qwen3_moe"].config, dequantize=True)
    with pytest.raises(NotInvertibleError, match="dequant_fp8 dequantizes an FP8 weight .* quantize op"):
        plan.inverse()
    assert plan.inverse_error is not None and plan.quant.dequantize == "bfloat16"


def test_the_fused_layout_dequantizes_into_the_original_layout_too(written, tmp_path):
    """--reverse --dequantize: the inverse plan (fused FP8 -> per-expert FP8), dequantized."""
    w = written["qwen3_moe"]
    assert main(["convert", "qwen3_moe", str(w.dir), str(tmp_path / "fused"), "--quiet"]) == 0
    args = ["convert", "qwen3_moe", str(tmp_path / "fused"), str(tmp_path / "x"), "--reverse", "--dequantize"]
    assert main([*args, "--quiet"]) == 0
    forward = load_file(str(w.dir / "model.safetensors"))
    back = load_file(str(tmp_path / "x" / "model.safetensors"))
    assert not any(k.endswith("_scale_inv") for k in back)
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert back[key].dtype == torch.bfloat16
    (direct,) = OPS["dequant_fp8"].apply({"dtype": "bfloat16"}, [forward[key], forward[key + "_scale_inv"]])
    assert torch.equal(bits(back[key]), bits(direct))


def test_casting_kept_quantized_weights_is_refused(written, tmp_path, capsys):
    src = written["deepseek_v3"].dir
    assert main(["convert", "deepseek_v3", str(src), str(tmp_path / "x"), "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "casting to bfloat16 would change quantized weights without their scales" in err
    assert "--dequantize" in err
    assert not (tmp_path / "x").exists()


def test_the_dequantized_output_config_no_longer_says_quantized(written, tmp_path):
    src = written["qwen3_moe"].dir
    assert main(["convert", "qwen3_moe", str(src), str(tmp_path / "out"), "--dequantize", "--quiet"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    assert {d for _, d in headers(tmp_path / "out").values()} <= {"BF16", "F32"}


# ---- headers-only checks ----------------------------------------------------------------------


def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint at `src` with its tensors changed by `edit(dict)`."""
    dst.mkdir()
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


EXPERT = "model.layers.1.mlp.experts.2.up_proj"
HOSTILE = {
    "missing": (lambda sd: sd.pop(f"{EXPERT}.weight_scale_inv"), f"{EXPERT}.weight is a quantized weight"),
    "orphan": (
        lambda sd: sd.update({"model.layers.1.mlp.experts.9.up_proj.weight_scale_inv": torch.ones(2, 2)}),
        "model.layers.1.mlp.experts.9.up_proj.weight_scale_inv is a companion of "
        "model.layers.1.mlp.experts.9.up_proj.weight, which the checkpoint lacks",
    ),
    "grid": (
        lambda sd: sd.update({f"{EXPERT}.weight_scale_inv": torch.ones(1, 1)}),
        f"{EXPERT}.weight_scale_inv has the grid [1, 1], not",
    ),
    "dtype": (
        lambda sd: sd.update({f"{EXPERT}.weight_scale_inv": sd[f"{EXPERT}.weight_scale_inv"].half()}),
        f"{EXPERT}.weight_scale_inv is float16: a fp8_blocks scale is one of float32, bfloat16",
    ),
    "weight dtype": (
        lambda sd: sd.update({f"{EXPERT}.weight": sd[f"{EXPERT}.weight"].float()}),
        f"{EXPERT}.weight has the scale {EXPERT}.weight_scale_inv but is float32, not float8_e4m3fn",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("dequantize", [False, True])
def test_each_companion_problem_is_one_clear_error_before_anything_is_written(
    written, case, dequantize, tmp_path, capsys
):
    edit, message = HOSTILE[case]
    src = _edited(written["qwen3_moe"].dir, tmp_path / "src", edit)
    args = ["convert", "qwen3_moe", str(src), str(tmp_path / "out")] + (
        ["--dequantize"] if dequantize else []
    )
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and "nothing was read or written" in err
    assert not (tmp_path / "out").exists()


def test_a_cat_of_parts_that_are_not_whole_blocks_is_refused_naming_the_part(written):
    """Experts of 24 rows in blocks of 16 have good grids (2 rows each), but gate and up joined would
    put up's first 8 rows in gate's last block: the grid cannot follow."""
    plan = convspec.compile("qwen3_moe", config=written["qwen3_moe"].config)
    layout = {}
    for e in range(2):
        for n in ("gate_proj", "up_proj"):
            key = f"model.layers.0.mlp.experts.{e}.{n}.weight"
            layout[key] = ((24, 32), "float8_e4m3fn")
            layout[key + "_scale_inv"] = ((2, 2), "float32")
    with pytest.raises(BindError) as exc:
        plan.bind(layout)
    assert "cat: part 0 has 24 along dim 1, not a whole number of blocks of 16" in str(exc.value)
    assert "keys: model.layers.0.mlp.experts.0.gate_proj.weight" in str(exc.value)
    with pytest.raises(BindError) as exc:  # the dequantizing plan joins FP8 blocks too, then dequantizes
        plan.dequantize().bind(layout)
    assert "not a whole number of blocks of 16" in str(exc.value)
    assert "write the rule with dequant_fp8 on each weight to dequantize them first" in str(exc.value)


def test_without_a_quantization_the_scales_of_converted_weights_are_not_left_behind(written):
    layout = {k: (tuple(t.shape), str(t.dtype)[6:]) for k, t in written["deepseek_v3"].tensors.items()}
    with pytest.raises(BindError) as exc:
        convspec.compile("deepseek_v3").bind(layout)  # no config: no quantization
    msg = str(exc.value)
    assert "is a quantized weight (float8_e4m3fn) with the scale" in msg
    assert "but the plan qwen2_moe has no quantization" in msg


def test_an_op_the_scales_cannot_follow_is_a_compile_error_naming_the_rule(tmp_path):
    spec = tmp_path / "rope.yaml"
    spec.write_text(
        "spec: rope\nquantization:\n  scheme: fp8_blocks\nrules:\n  - convert:\n"
        '      q: "{p:path}.wq.weight"\n    to:\n      "{p}.q_proj.weight": permute_rope(q, heads=4)\n'
    )
    with pytest.raises(convspec.errors.CompileError) as exc:
        convspec.compile(spec)
    assert "rule 1 (convert): permute_rope moves values inside the blocks of a quantized weight" in str(
        exc.value
    )
    assert "dequantize" in str(exc.value.hint)


# ---- dequantized: transformers' numerics ----------------------------------------------------------

ORACLE = {
    "deepseek_v3": (write_deepseek_v3_fp8, {"qk_rope_head_dim": 16}),  # whole blocks: transformers loads it
    "qwen3_moe": (write_qwen3_moe_fp8, {}),
    "gpt_oss": (write_gpt_oss_mxfp4, {}),
    "compressed": (write_compressed_fp8, {}),
}


@pytest.mark.parametrize("name", list(ORACLE))
def test_the_dequantized_load_is_transformers_dequantized_load_bit_for_bit(name, tmp_path):
    make, kwargs = ORACLE[name]
    w = make(tmp_path / name, **kwargs)
    plan = convspec.compile(model_type(w.dir), config=w.dir / "config.json")
    ours = dict(plan.load(w.dir, dequantize=True))
    theirs = transformers_dequantized(w.dir)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and torch.equal(bits(ours[key]), bits(t)), key


def test_a_ragged_grid_dequantizes_by_the_true_block_where_transformers_refuses(written):
    """DeepSeek-V3's kv_a_proj_with_mqa (here 40 rows in blocks of 16: a grid of 3) dequantizes as
    DeepSeek's own weight_dequant does: each row by its block's scale."""
    w = written["deepseek_v3"]
    plan = convspec.compile("deepseek_v3", config=w.dir / "config.json")
    ours = dict(plan.load(w.dir, dequantize=True))
    for key in (k for k in w.dequantized if "kv_a_proj_with_mqa" in k):
        assert w.tensors[key].shape[0] % 16  # ragged indeed
        assert torch.equal(bits(ours[key]), bits(w.dequantized[key].to(torch.bfloat16))), key
    with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
        transformers_dequantized(
            w.dir
        )  # its Fp8Dequantize: "Weight shape (40, 32) not divisible by scale grid (3, 2)"


def test_a_quantization_declared_by_an_included_spec_applies_and_the_spec_overrides_the_config(tmp_path):
    (tmp_path / "fp8.cspec").write_text("spec fp8\nquantization fp8_blocks block [32, 32]\n")
    (tmp_path / "model.yaml").write_text(
        "spec: model\nrules:\n  - include: fp8\n  - convert:\n"
        '      w: "{p:path}.experts.{e:int}.w"\n    to:\n      "{p}.w": stack(w, over=e)\n'
    )
    plan = convspec.compile(
        tmp_path / "model.yaml", config={"quantization_config": {"quant_method": "mxfp4"}}
    )
    assert (plan.quant.scheme, plan.quant.block) == ("fp8_blocks", (32, 32))
    assert [p.text for _, p in plan.rules[0].outputs] == ["{p:path}.w", "{p:path}.w_scale_inv"]


def test_a_cast_of_a_quantized_weight_is_refused_for_what_it_would_do(tmp_path):
    spec = tmp_path / "castq.yaml"
    spec.write_text(
        "spec: castq\nquantization:\n  scheme: fp8_blocks\nrules:\n  - convert:\n"
        '      w: "{p:path}.w"\n    to:\n      "{p}.v": cast(w, dtype=bfloat16)\n'
    )
    with pytest.raises(convspec.errors.CompileError) as exc:
        convspec.compile(spec)
    assert "cast would change a quantized weight's values without its scales" in str(exc.value)
