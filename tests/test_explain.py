"""`convspec explain`: the life of one key through a plan, with and without a checkpoint layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import convspec
from convspec.cli import main
from convspec.errors import ConvspecError
from convspec.explain import explain, explanation_text
from convspec.ops import TensorInfo
from convspec.routing import route_one
from convspec.spec import parse_spec
from convspec.style import Style

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from make_tiny_mixtral import make  # noqa: E402

W1 = "model.layers.0.block_sparse_moe.experts.3.w1.weight"

# where the rules live in the built-in specs (looked up, so editing a spec's header moves nothing here)
MIXTRAL_2 = convspec.compile("mixtral").rules[1].where
GTE_1 = convspec.compile("gte").rules[0].where
NOMIC_3 = convspec.compile("nomic_bert").rules[2].where


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny-mixtral"
    make(d, layers=2, experts=11)
    return d


@pytest.fixture(scope="module")
def mixtral():
    return convspec.compile("mixtral")


def _moe_layout(experts=range(11), inputs=("w1", "w2", "w3")) -> dict[str, TensorInfo]:
    """A Mixtral-layout checkpoint's headers: two layers, per-expert w1/w2/w3 [48, 32] / [32, 48]."""
    out = {"model.norm.weight": TensorInfo((32,), "bfloat16")}
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe"
        out[f"{p}.gate.weight"] = TensorInfo((len(experts), 32), "bfloat16")
        for e in experts:
            for w in inputs:
                out[f"{p}.experts.{e}.{w}.weight"] = TensorInfo(
                    (32, 48) if w == "w2" else (48, 32), "bfloat16"
                )
    return out


def _plan(text: str) -> convspec.Plan:
    return convspec.compile(parse_spec("spec t\n" + text + "\n", "t.cspec"))


# ---- a stacked key ---------------------------------------------------------------------------


def test_stacked_key_without_a_layout_shows_the_group_patterns(mixtral):
    e = explain(mixtral, W1)
    assert [(r.rule.index, r.before, r.after) for r in e.renames] == [
        (0, W1, "model.layers.0.mlp.experts.3.w1.weight")
    ]
    assert (e.claim, e.rule.index, e.input) == ("convert", 1, "gate")
    assert e.captures == {"p": "model.layers.0", "e": "3"}
    assert e.group == {"p": "model.layers.0"}
    assert [(m.input, m.key) for m in e.members] == [
        ("gate", "model.layers.0.mlp.experts.{e}.w1.weight"),
        ("up", "model.layers.0.mlp.experts.{e}.w3.weight"),
    ]
    assert [(o.value, o.final, o.info) for o in e.outputs] == [
        ("%3", "model.layers.0.mlp.experts.gate_up_proj", None)
    ]
    text = explanation_text(e)
    assert f"claimed by rule 2 (convert, {MIXTRAL_2})" in text
    assert "captures  p=model.layers.0, e=3" in text
    assert "  %3 = cat(%1, %2, dim=1, equal=true)\n" in text


def test_stacked_key_with_a_layout_binds_its_group(mixtral):
    e = explain(mixtral, W1, _moe_layout())
    assert e.info == TensorInfo((48, 32), "bfloat16")
    assert len(e.members) == 22 and {m.input for m in e.members} == {"gate", "up"}
    assert e.members[10].key == "model.layers.0.block_sparse_moe.experts.10.w1.weight"  # numeric order
    assert e.values["%1"] == {(): TensorInfo((11, 48, 32), "bfloat16")}
    assert [(o.final, o.info) for o in e.outputs] == [
        ("model.layers.0.mlp.experts.gate_up_proj", TensorInfo((11, 96, 32), "bfloat16"))
    ]
    text = explanation_text(e)
    assert "group p=model.layers.0 (22 keys of the checkpoint):" in text
    assert (
        "  gate  model.layers.0.block_sparse_moe.experts.{0..10}.w1.weight  [11 x [48, 32] bfloat16]\n"
        in text
    )
    assert "%3 = cat(%1, %2, dim=1, equal=true)       [11, 96, 32] bfloat16" in text
    assert "  %3  model.layers.0.mlp.experts.gate_up_proj  [11, 96, 32] bfloat16" in text
    assert "experts.4.w1" not in text  # eleven experts are one line, not eleven


def test_explain_against_a_checkpoint_on_the_command_line(capsys, ckpt):
    assert main(["explain", "mixtral", W1, "--against", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.block_sparse_moe.experts.{0..10}.w3.weight  [11 x [48, 32] bfloat16]" in out
    assert "model.layers.0.mlp.experts.gate_up_proj  [11, 96, 32] bfloat16" in out
    assert "\033[" not in out  # captured output is not a terminal: no colour


def test_a_group_with_a_gap_is_folded_around_it_and_reported(mixtral):
    e = explain(mixtral, W1, _moe_layout(experts=[0, 1, 2, 3, 6, 7]))
    text = explanation_text(e)
    assert "experts.{0..3}.w1.weight  [4 x [48, 32] bfloat16]" in text
    assert "experts.{6..7}.w1.weight  [2 x [48, 32] bfloat16]" in text
    assert len(e.problems) == 1 and "e=4 is missing" in e.problems[0]
    assert f"problem: rule 2 (convert, {MIXTRAL_2}): group p=model.layers.0" in text


def test_a_group_without_one_of_its_inputs_is_reported(mixtral):
    e = explain(mixtral, W1, _moe_layout(inputs=("w1", "w2")))
    assert e.problems == [
        f"rule 2 (convert, {MIXTRAL_2}): group p=model.layers.0 has no 'up' key "
        "(expected model.layers.0.mlp.experts.{e}.w3.weight)"
    ]
    assert [o.final for o in e.outputs] == ["model.layers.0.mlp.experts.gate_up_proj"]


# ---- a split key -----------------------------------------------------------------------------


def test_a_fused_qkv_is_split_with_gqa_sizes_from_the_config():
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "hidden_size": 32}
    plan = convspec.compile("split_qkv", config=cfg)
    key = "model.layers.0.self_attn.qkv_proj.weight"
    layout = {
        key: TensorInfo((64, 32), "float16"),
        "model.layers.0.self_attn.qkv_proj.bias": ((64,), "float16"),
    }
    e = explain(plan, key, layout)
    assert e.group == {"kind": "weight", "p": "model.layers.0"}
    assert [m.key for m in e.members] == [key]  # the bias is a group of its own
    assert [(o.final, o.info.shape) for o in e.outputs] == [
        ("model.layers.0.self_attn.q_proj.weight", (32, 32)),
        ("model.layers.0.self_attn.k_proj.weight", (16, 32)),
        ("model.layers.0.self_attn.v_proj.weight", (16, 32)),
    ]
    assert "%1: [32, 32] float16; %2: [16, 32] float16; %3: [16, 32] float16" in explanation_text(e)


def test_a_split_that_needs_the_config_says_so_instead_of_failing():
    key = "model.layers.0.self_attn.qkv_proj.weight"
    e = explain(convspec.compile("split_qkv"), key, {key: TensorInfo((64, 32), "float16")})
    assert len(e.problems) == 1 and "config.num_attention_heads" in e.problems[0]
    assert [o.final for o in e.outputs][0] == "model.layers.0.self_attn.q_proj.weight"


def test_a_split_key_through_an_alias_and_a_rename():
    """gte: alias `new.` away, rename `encoder.layer` -> `layers`, then chunk the fused qkv in three."""
    plan = convspec.compile("gte")
    key = "new.encoder.layer.0.attention.qkv_proj.weight"
    e = explain(plan, key, {key: TensorInfo((96, 32), "float32")})
    assert [(r.rule.index + 1, r.rule.one_way, r.after) for r in e.renames] == [
        (1, True, "encoder.layer.0.attention.qkv_proj.weight"),
        (2, False, "layers.0.attention.qkv_proj.weight"),
    ]
    assert (e.claim, e.rule.index + 1, e.captures) == ("convert", 7, {"p": "layers.0", "rest": "weight"})
    assert {o.final: o.info.shape for o in e.outputs} == {
        "layers.0.self_attn.q_proj.weight": (32, 32),
        "layers.0.self_attn.k_proj.weight": (32, 32),
        "layers.0.self_attn.v_proj.weight": (32, 32),
    }
    text = explanation_text(e)
    assert f"rule 1 (alias, one-way, {GTE_1}): new.{{r:path}} -> {{r}}" in text
    assert "%1, %2, %3 = chunk(qkv_proj, n=3, dim=0)" in text


# ---- renames, pass-through, drop, route errors -----------------------------------------------


def test_a_chain_of_renames_shows_each_step():
    plan = convspec.compile("nomic_bert")
    key = "encoder.layers.3.attn.out_proj.weight"
    e = explain(plan, key)
    assert [(r.rule.index + 1, r.before, r.after) for r in e.renames] == [
        (1, key, "layers.3.attn.out_proj.weight"),
        (3, "layers.3.attn.out_proj.weight", "layers.3.self_attn.o_proj.weight"),
    ]
    assert e.claim == "pass" and e.final == route_one(plan, key)[1] == "layers.3.self_attn.o_proj.weight"
    text = explanation_text(e)
    assert f"  rule 3 (rename, {NOMIC_3}): {{p:path}}.attn.out_proj.{{rest:seg}} ->" in text
    assert "      layers.3.attn.out_proj.weight\n   -> layers.3.self_attn.o_proj.weight" in text
    assert "no rule claims it: passes through as layers.3.self_attn.o_proj.weight" in text


def test_a_rename_held_back_by_unless_is_shown_and_the_other_layout_noted():
    e = explain(convspec.compile("paddleocr_vl"), "model.language_model.embed.weight")
    (held,) = e.renames
    assert (held.rule.index + 1, held.after, held.unless) == (3, None, "model.language_model.{_r:path?}")
    assert e.claim == "pass" and e.final == "model.language_model.embed.weight"
    assert "matches, but unless model.language_model.{_r:path?} leaves" in explanation_text(e)
    assert len(e.notes) == 1 and "inverse plan claims it" in e.notes[0] and "--reverse" in e.notes[0]


def test_a_key_no_rule_claims_passes_through_unchanged(mixtral):
    e = explain(mixtral, "model.norm.weight", _moe_layout())
    assert (e.claim, e.rule, e.renames, e.final, e.notes) == ("pass", None, [], "model.norm.weight", [])
    text = explanation_text(e)
    assert text.startswith("model.norm.weight through spec mixtral  [32] bfloat16")
    assert "renames:\n  none" in text and "no rule claims it: passes through unchanged" in text


def test_a_dropped_key():
    plan = _plan("rename a.{r:path} -> b.{r}\ndrop {p:path}.rotary_emb.inv_freq")
    e = explain(plan, "a.rotary_emb.inv_freq")
    assert (e.claim, e.rule.index, e.final) == ("drop", 1, "b.rotary_emb.inv_freq")
    assert "dropped by rule 2 (drop, t.cspec:3:1): {p:path}.rotary_emb.inv_freq" in explanation_text(e)
    d = json.loads(json.dumps(e.to_dict()))
    assert (d["claim"]["kind"], d["claim"]["rule"], d["final_key"]) == ("drop", 2, "b.rotary_emb.inv_freq")


def test_a_route_error_says_what_happened():
    plan = _plan("rename {p:path}.q.{i:int} -> {p}.layers.{i-1}.q")
    assert explain(plan, "m.q.2").final == "m.layers.1.q"
    e = explain(plan, "m.q.0")
    assert e.claim == "error" and e.error == route_one(plan, "m.q.0")[1]
    assert "error: rule 1 (rename, t.cspec:2:1): m.q.0: {i-1} is -1 for i=0" in explanation_text(e)
    d = json.loads(json.dumps(e.to_dict()))
    assert d["claim"]["kind"] == "error" and d["claim"]["error"] == e.error and d["outputs"] == []


def test_renames_after_the_convert_apply_to_its_outputs():
    plan = _plan(
        "convert w = {p:path}.wt -> {p}.w = transpose(w)\nrename {p:path}.blk{i:int}.w -> {p}.blocks.{i}.weight"
    )
    e = explain(plan, "m.blk2.wt", {"m.blk2.wt": TensorInfo((3, 5), "float32")})
    (o,) = e.outputs
    assert (o.key, o.final, o.info.shape) == ("m.blk2.w", "m.blocks.2.weight", (5, 3))
    assert [r.rule.index for r in o.renames] == [1]
    assert "m.blk2.w  -> m.blocks.2.weight  (rule 2)  [5, 3] float32" in explanation_text(e)


# ---- errors, --reverse, --json, colour -------------------------------------------------------


def test_a_key_the_checkpoint_lacks_names_close_matches(mixtral):
    with pytest.raises(ConvspecError) as info:
        explain(mixtral, W1.replace("weight", "weigth"), _moe_layout())
    assert info.value.message == f"{W1.replace('weight', 'weigth')} is not in the checkpoint (69 keys)"
    assert info.value.hint.startswith(f"close matches: {W1}")
    with pytest.raises(ConvspecError) as info:
        explain(mixtral, "vision_tower.patch_embed", _moe_layout())
    assert info.value.hint.startswith("no key of the checkpoint is close")


def test_a_key_of_the_target_layout_suggests_reverse(mixtral):
    with pytest.raises(ConvspecError) as info:
        explain(mixtral, "model.layers.0.mlp.experts.gate_up_proj", _moe_layout())
    assert f"inverse plan claims it (rule 2 (convert, {MIXTRAL_2}))" in info.value.message
    assert info.value.hint.startswith("pass --reverse")


def test_cli_errors_exit_2_with_the_hint(capsys, ckpt):
    typo = "model.layers.0.block_sparse_moe.gate.wieght"
    assert main(["explain", "mixtral", typo, "--against", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"error: {typo} is not in the checkpoint (83 keys)" in err
    assert "hint: close matches: model.layers.0.block_sparse_moe.gate.weight" in err
    assert main(["explain", "mixtral", "model.layers.1.mlp.experts.down_proj", "--against", str(ckpt)]) == 2
    assert "pass --reverse" in capsys.readouterr().err


def test_reverse_explains_a_fused_key_into_per_expert_keys(capsys, mixtral):
    assert main(["explain", "mixtral", "model.layers.0.mlp.experts.gate_up_proj", "--reverse"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model.layers.0.mlp.experts.gate_up_proj through the inverse of spec mixtral")
    assert (
        "gate  model.layers.0.mlp.experts.{e}.w1.weight  -> model.layers.0.block_sparse_moe.experts.{e}.w1.weight"
        in out
    )
    inverse = mixtral.inverse()
    layout = mixtral.bind(_moe_layout()).outputs
    e = explain(inverse, "model.layers.1.mlp.experts.gate_up_proj", layout)
    assert len(e.outputs) == 22
    assert e.outputs[0].index == ("0",) and e.outputs[0].info == TensorInfo((48, 32), "bfloat16")
    assert {o.final for o in e.outputs} == {
        k for k in _moe_layout() if "layers.1" in k and ".w2." not in k
    } - {"model.layers.1.block_sparse_moe.gate.weight"}
    assert "experts.{0..10}.w3.weight  (rule 1)  [11 x [48, 32] bfloat16]" in explanation_text(
        e
    )  # the spec's numbering


def test_json_lists_every_key(capsys, ckpt):
    assert main(["explain", "mixtral", W1, "--against", str(ckpt), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["spec"], d["reverse"], d["bound"], d["shape"]) == ("mixtral", False, True, [48, 32])
    assert d["renames"][0]["after"] == "model.layers.0.mlp.experts.3.w1.weight"
    assert d["claim"] == {
        "kind": "convert",
        "rule": 2,
        "where": f"{MIXTRAL_2}",
        "input": "gate",
        "pattern": "{p:path}.mlp.experts.{e:int}.w1.weight",
        "captures": {"p": "model.layers.0", "e": "3"},
        "error": None,
    }
    assert d["group"] == {"p": "model.layers.0"}
    assert len(d["members"]) == 22 and d["members"][3]["key"] == W1 and d["members"][3]["index"] == ["3"]
    assert d["ops"][2]["values"]["%3"] == [{"index": {}, "shape": [11, 96, 32], "dtype": "bfloat16"}]
    assert [(o["final"], o["shape"]) for o in d["outputs"]] == [
        ("model.layers.0.mlp.experts.gate_up_proj", [11, 96, 32])
    ]
    assert d["problems"] == [] and d["notes"] == []


def test_plain_text_has_no_colour_codes_and_a_coloured_style_has_them(mixtral):
    e = explain(mixtral, W1, _moe_layout())
    assert "\033" not in explanation_text(e)
    coloured = explanation_text(e, Style(True))
    assert "\033[36m" + W1 + "\033[0m" in coloured
    # aligned columns count visible characters only
    assert "\033[36mmodel.layers.0.mlp.experts.gate_up_proj\033[0m  [11, 96, 32] bfloat16" in coloured


# ---- quantized checkpoints -------------------------------------------------------------------

FP8 = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
KV = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # no rule of deepseek_v3 claims it
UP = "model.layers.1.mlp.experts.2.up_proj.weight"  # stacked and joined with gate


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.quantized import write_deepseek_v3_fp8

    return write_deepseek_v3_fp8(tmp_path_factory.mktemp("q") / "ds").dir


def test_a_companion_a_convert_binds_says_whose_scale_it_is(capsys, fp8_ckpt):
    assert main(["explain", "deepseek_v3", UP + "_scale_inv", "--against", str(fp8_ckpt)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"companion: the scale of {UP} (fp8_blocks, blocks of [16, 16])"
    assert "  input     up.scale = {p:path}.mlp.experts.{e:int}.up_proj.weight_scale_inv" in lines


def test_a_quantized_weight_names_its_scale_when_the_layout_is_known(capsys, fp8_ckpt):
    assert main(["explain", "deepseek_v3", UP, "--against", str(fp8_ckpt)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == f"quantized: float8_e4m3fn, its scale {UP}_scale_inv"
    e = explain(convspec.compile("deepseek_v3", config=FP8), UP)  # no layout: its dtype is not known
    assert e.quant is None
    assert explanation_text(e).splitlines()[1] == ""


def test_a_pass_through_companion_passes_or_is_dequantized_with_its_weight(capsys, fp8_ckpt):
    assert main(["explain", "deepseek_v3", KV + "_scale_inv", "--against", str(fp8_ckpt)]) == 0
    head = f"companion: the scale of {KV} (fp8_blocks, blocks of [16, 16])"
    assert capsys.readouterr().out.splitlines()[1] == head + ": passes through with its weight"
    args = ["explain", "deepseek_v3", KV + "_scale_inv", "--against", str(fp8_ckpt), "--dequantize"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[1] == head + ": dequantized with its weight (to bfloat16)"
    assert main(["explain", "deepseek_v3", KV, "--against", str(fp8_ckpt), "--dequantize"]) == 0
    out = capsys.readouterr().out.splitlines()[1]
    assert out == f"quantized: float8_e4m3fn, its scale {KV}_scale_inv; dequantized to bfloat16"


def test_a_companion_without_a_layout_and_in_json(capsys, tmp_path):
    plan = convspec.compile("deepseek_v3", config=FP8)
    e = explain(plan, KV + "_scale_inv")
    assert explanation_text(e).splitlines()[1].startswith(f"companion: the scale of {KV} ")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FP8))
    assert main(["explain", "deepseek_v3", KV + "_scale_inv", "--config", str(config), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["quantization"] == {
        "scheme": "fp8_blocks",
        "block": [16, 16],
        "dequantize": None,
        "role": "scale",
        "weight": KV,
        "scale": KV + "_scale_inv",
        "dtype": None,
        "passes": True,
    }
    assert explain(convspec.compile("mixtral"), W1).to_dict()["quantization"] is None


def test_per_tensor_and_mxfp4_companions_are_named_by_their_role():
    plan = convspec.compile(
        "identity", config={"quantization_config": {"quant_method": "compressed-tensors"}}
    )
    q = "model.layers.0.self_attn.q_proj"
    layout = {
        f"{q}.weight": TensorInfo((32, 32), "float8_e4m3fn"),
        f"{q}.weight_scale": TensorInfo((32, 1), "float32"),
        f"{q}.input_scale": TensorInfo((1,), "float32"),
    }
    text = explanation_text(explain(plan, f"{q}.input_scale", layout))
    assert (
        text.splitlines()[1]
        == f"companion: the input_scale of {q}.weight (fp8_tensor): passes through with its weight"
    )
    mx = convspec.compile("identity", config={"quantization_config": {"quant_method": "mxfp4"}})
    k = "model.layers.0.mlp.experts.down_proj"
    layout = {
        f"{k}_blocks": TensorInfo((4, 64, 2, 16), "uint8"),
        f"{k}_scales": TensorInfo((4, 64, 2), "uint8"),
    }
    assert explanation_text(explain(mx, f"{k}_scales", layout)).splitlines()[1] == (
        f"companion: the scale of {k}_blocks (mxfp4): passes through with its weight"
    )
    assert explanation_text(explain(mx, f"{k}_blocks", layout)).splitlines()[1] == (
        f"quantized: uint8, its scale {k}_scales"
    )


@pytest.mark.parametrize(
    "text",
    [
        "spec: t\nquantization:\n  scheme: fp8_blocks\n  block: [8, 8]\nrules:\n"
        '  - rename: "{p:path}.attn.{rest:path}"\n    to: "{p}.self_attn.{rest}"\n',
        "spec t\nquantization fp8_blocks block [8, 8]\n\nrename {p:path}.attn.{rest:path} -> {p}.self_attn.{rest}\n",
    ],
    ids=["yaml", "cspec"],
)
def test_a_spec_of_either_syntax_with_its_own_quantization_section(text):
    plan = convspec.compile(parse_spec(text, "t.yaml" if text.startswith("spec:") else "t.cspec"))
    e = explain(plan, "m.attn.q.weight_scale_inv")
    assert e.final == "m.self_attn.q.weight_scale_inv"
    assert explanation_text(e).splitlines()[1] == (
        "companion: the scale of m.attn.q.weight (fp8_blocks, blocks of [8, 8]): passes through with its weight"
    )


def test_dequantize_without_a_quantization_is_a_usage_error(capsys):
    assert main(["explain", "mixtral", W1, "--dequantize"]) == 2
    assert "has no quantization to dequantize" in capsys.readouterr().err
