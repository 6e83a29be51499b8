"""`convspec check`: every lint rule fires on a minimal bad spec and stays silent on the built-ins."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from convspec import api
from convspec.cli import main
from convspec.compile.compiler import pattern_of
from convspec.compile.patterns import (
    Unknown,
    _matches,
    _segment_simple,
    intersection_witness,
    meet,
    witness,
)
from convspec.lint import RULES, check_spec, key_shapes
from convspec.ops import TensorInfo
from convspec.spec.parse import parse_template
from convspec.spec.source import Embedded, Source

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from make_tiny_mixtral import make  # noqa: E402

HEAD = "spec: t\nrules:\n"


def spec_file(tmp_path: Path, rules: str, name: str = "t.yaml") -> str:
    path = tmp_path / name
    path.write_text(HEAD + rules)
    return str(path)


def codes(report) -> list[str]:
    return [f.code for f in report.findings]


def only(report, code: str):
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, report.text()
    return found[0]


def bf16(*shape: int) -> TensorInfo:
    return TensorInfo(tuple(shape), "bfloat16")


# ---- errors ------------------------------------------------------------------------------------


def test_E001_a_spec_that_does_not_parse(tmp_path):
    path = spec_file(tmp_path, "  - rename: {p:path}.a\n    to: b\n")
    f = only(check_spec(path), "E001")
    assert (f.file, f.line) == (path, 3)
    assert f.severity == "error"


def test_E002_a_failed_compiler_check(tmp_path):
    path = spec_file(tmp_path, '  - convert:\n      x: "{p:path}.w"\n    to:\n      "{p}.v": frobnicate(x)\n')
    f = only(check_spec(path), "E002")
    assert "unknown op 'frobnicate'" in f.message
    assert f.line == 6


def test_E101_overlapping_converts_name_a_key_both_claim(tmp_path):
    path = spec_file(
        tmp_path,
        '  - convert:\n      a: "{p:path}.experts.{e:int}.w1.weight"\n    to: "{p}.w1"\n    ops: [stack(e)]\n'
        '  - convert:\n      b: "{p:path}.{e:int}.w1.weight"\n    to: "{p}.w1b"\n    ops: [stack(e)]\n',
    )
    report = check_spec(path)
    f = only(report, "E101")
    assert "rules 1 and 2 can both claim the key" in f.message
    assert f.line == 8  # the second rule's input
    assert "experts.0.w1.weight" in f.message


def test_E101_reports_every_overlap_not_just_the_first(tmp_path):
    conv = '  - convert:\n      {n}: "{{p:path}}.{w}"\n    to: "{{p}}.{n}"\n    ops: [stack(e)]\n'
    path = spec_file(
        tmp_path,
        conv.format(n="a", w="experts.{e:int}.w1")
        + conv.format(n="b", w="{e:int}.w1")
        + conv.format(n="c", w="experts.{e:int}.w2")
        + conv.format(n="d", w="{e:int}.w2"),
    )
    found = [f.message[:17] for f in check_spec(path).findings]
    assert found == ["rules 1 and 2 can", "rules 3 and 4 can"]


def test_E102_an_input_bound_but_never_used(tmp_path):
    path = spec_file(
        tmp_path,
        '  - convert:\n      a: "{p:path}.a"\n      b: "{p:path}.b"\n    to:\n      "{p}.c": cast(a, dtype=float32)\n',
    )
    f = only(check_spec(path), "E102")
    assert "input 'b' is never used" in f.message


def test_E102_a_rename_that_drops_a_capture(tmp_path):
    path = spec_file(tmp_path, '  - rename: "{p:path}.{i:int}.w"\n    to: "{p}.w"\n')
    assert "rename drops capture {i}" in only(check_spec(path), "E102").message


def test_E103_a_checkpoint_that_does_not_fit():
    layout = {f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight": bf16(4, 2) for e in (0, 2)}
    layout |= {f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight": bf16(4, 2) for e in (0, 2)}
    report = check_spec("mixtral", layout=layout, checkpoint="ckpt")
    errors = [f for f in report.findings if f.code == "E103"]
    assert errors and "e=1 is missing" in errors[0].message
    assert errors[0].file == "specs/mixtral.yaml"  # the rule that cannot bind


# ---- warnings ----------------------------------------------------------------------------------


def test_W201_a_rename_shadowed_by_an_earlier_general_one(tmp_path):
    path = spec_file(
        tmp_path,
        '  - rename: "{p:path}.attn.{rest:path}"\n    to: "{p}.self_attn.{rest}"\n'
        '  - rename: "model.attn.qkv.weight"\n    to: "model.self_attn.qkv_proj.weight"\n',
    )
    f = only(check_spec(path), "W201")
    assert f.line == 5
    assert "rule 2 (rename) can never see a key: rule 1 (rename) claims every key" in f.message


def test_W201_a_convert_shadowed_by_a_drop(tmp_path):
    path = spec_file(
        tmp_path,
        '  - drop: "{p:path}.rotary.{x}"\n'
        '  - convert:\n      a: "{p:path}.rotary.inv_freq"\n    to:\n      "{p}.freq": cast(a, dtype=float32, from=float32)\n',
    )
    assert "rule 1 (drop) claims" in only(check_spec(path), "W201").message


def test_W201_keys_made_by_an_earlier_rename_keep_a_rule_alive(tmp_path):
    path = spec_file(
        tmp_path,
        '  - rename: "{p:path}.old.{x}"\n    to: "{p}.mid.{x}"\n'
        '  - drop: "{p:path}.mid.{x}"\n'
        '  - rename: "{p:path}.mid.w"\n    to: "{p}.new.w"\n',
    )
    # rule 3 is shadowed for every key: those rule 1 makes go to rule 2 as well
    assert only(check_spec(path), "W201").line == 6
    alive = spec_file(
        tmp_path,
        '  - drop: "{p:path}.mid.{x}"\n  - rename: "{p:path}.old.{x}"\n    to: "{p}.mid.{x}"\n'
        '  - rename: "{p:path}.mid.w"\n    to: "{p}.new.w"\n',
        "alive.yaml",
    )
    assert "W201" not in codes(check_spec(alive))


def test_W202_a_rename_whose_every_key_is_renamed_again(tmp_path):
    path = spec_file(
        tmp_path,
        '  - rename: "{p:path}.fc1.{rest:path}"\n    to: "{p}.mlp.up.{rest}"\n'
        '  - rename: "{p:path}.mlp.up.{rest:path}"\n    to: "{p}.mlp.up_proj.{rest}"\n'
        '  - rename: "{p:path}.mlp.up.{rest:path}"\n    to: "{p}.never.{rest}"\n',
    )
    # rule 2 also sees the checkpoint's own `.mlp.up.` keys, so it is a second layer, not a chain
    assert "W202" not in codes(check_spec(path))
    chain = spec_file(
        tmp_path,
        '  - drop: "{p:path}.mlp.up.{rest:path}"\n'
        '  - rename: "{p:path}.fc1.{rest:path}"\n    to: "{p}.mlp.up.{rest}"\n'
        '  - rename: "{p:path}.mlp.up.{rest:path}"\n    to: "{p}.mlp.up_proj.{rest}"\n',
        "chain.yaml",
    )
    f = only(check_spec(chain), "W202")
    assert "every key rule 2 makes ({p}.mlp.up.{rest}) is renamed again by rule 3" in f.message
    assert f.line == 4


def test_W202_a_rename_undone_by_a_later_one(tmp_path):
    path = spec_file(
        tmp_path,
        '  - rename: "{p:path}.a.{r:path}"\n    to: "{p}.b.{r}"\n'
        '  - rename: "{p:path}.b.{r:path}"\n    to: "{p}.a.{r}"\n',
    )
    assert "renames every key rule 1 makes back" in only(check_spec(path), "W202").message


def test_W203_a_rename_to_itself(tmp_path):
    path = spec_file(tmp_path, '  - rename: "{p:path}.w"\n    to: "{p}.w"\n')
    assert only(check_spec(path), "W203").message == "rule 1 renames {p:path}.w to itself"


def test_W204_a_drop_and_a_narrowing_cast_are_lossy(tmp_path):
    path = spec_file(
        tmp_path,
        '  - drop: "{p:path}.inv_freq"\n'
        '  - convert:\n      a: "{p:path}.w"\n    to:\n      "{p}.v": cast(a, dtype=bfloat16, from=float32)\n',
    )
    found = [f for f in check_spec(path).findings if f.code == "W204"]
    assert [f.line for f in found] == [3, 7]
    assert "loses information" in found[1].message and "cast" in found[1].message


def test_W205_an_op_with_no_inverse(tmp_path):
    path = spec_file(
        tmp_path, '  - convert:\n      a: "{p:path}.w"\n    to:\n      "{p}.v": cast(a, dtype=bfloat16)\n'
    )
    f = only(check_spec(path), "W205")
    assert "needs the input dtype: add from=" in f.message
    assert f.line == 6 and f.severity == "warning"


def test_W206_a_rule_no_checkpoint_key_reaches_with_the_reason(tmp_path):
    # the convert expects `mlp.experts`, but the rename that makes them runs after it
    path = spec_file(
        tmp_path,
        '  - convert:\n      gate: "{p:path}.mlp.experts.{e:int}.w1.weight"\n    to: "{p}.mlp.experts.gate"\n'
        "    ops: [stack(e)]\n"
        '  - rename: "{p:path}.block_sparse_moe.{rest:path}"\n    to: "{p}.mlp.{rest}"\n',
    )
    layout = {
        f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight": bf16(4, 2) for i in (0, 1) for e in (0, 1)
    }
    f = only(check_spec(path, layout=layout, checkpoint="ckpt"), "W206")
    assert f.line == 3
    assert "move rule 1 after rule 2" in f.hint
    assert (
        "model.layers.0.block_sparse_moe.experts.0.w1.weight -> model.layers.0.mlp.experts.0.w1.weight"
        in f.hint
    )


def test_W206_an_include_is_dead_as_a_whole_not_rule_by_rule(tmp_path):
    path = spec_file(tmp_path, "  - include: mixtral\n    under: [text_model, model.text]\n")
    layout = {f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight": bf16(4, 2) for e in (0, 1)}
    f = only(check_spec(path, layout=layout, checkpoint="ckpt"), "W206")
    assert f.message == "no key of the checkpoint reaches any rule of include mixtral (6 rules)"
    assert f.line == 3
    moved = {f"text_model.{k}": v for k, v in layout.items()}
    assert "W206" not in codes(check_spec(path, layout=moved, checkpoint="ckpt"))  # one prefix reached


def test_W206_is_not_repeated_for_a_rule_W201_already_shows_unreachable(tmp_path):
    path = spec_file(
        tmp_path,
        '  - rename: "{p:path}.attn.{rest:path}"\n    to: "{p}.self_attn.{rest}"\n'
        '  - rename: "model.attn.qkv.weight"\n    to: "model.self_attn.qkv_proj.weight"\n',
    )
    report = check_spec(path, layout={"model.attn.qkv.weight": bf16(6, 2)}, checkpoint="ckpt")
    assert codes(report) == ["W201"]


def test_W207_a_rename_whose_inverse_never_runs(tmp_path):
    # forward: the specific prefix first, then the general one; backward the general one runs
    # first and sends layer keys to transformer.layers.N
    path = spec_file(
        tmp_path,
        '  - rename: "transformer.h.{i:int}.{rest:path}"\n    to: "model.layers.{i}.{rest}"\n'
        '  - rename: "transformer.{rest:path}"\n    to: "model.{rest}"\n',
    )
    f = only(check_spec(path), "W207")
    assert f.message == (
        "saving back never undoes rule 1: on the way back the inverse of rule 2 takes every key "
        "it makes (model.layers.{i}.{rest}) first"
    )
    assert f.line == 3 and "rename the common part first" in f.hint
    fixed = spec_file(
        tmp_path,
        '  - rename: "transformer.{rest:path}"\n    to: "model.{rest}"\n'
        '  - rename: "model.h.{i:int}.{rest:path}"\n    to: "model.layers.{i}.{rest}"\n',
        "fixed.yaml",
    )
    assert codes(check_spec(fixed)) == []


def test_W207_two_renames_to_one_name_suggest_an_alias(tmp_path):
    path = spec_file(
        tmp_path,
        '  - rename: "model.vit.{r:path}"\n    to: "model.vision_tower.{r}"\n'
        '  - rename: "vit.{r:path}"\n    to: "model.vision_tower.{r}"\n',
    )
    assert "make rule 1 an alias" in only(check_spec(path), "W207").hint
    aliased = spec_file(
        tmp_path,
        '  - alias: "model.vit.{r:path}"\n    to: "model.vision_tower.{r}"\n'
        '  - rename: "vit.{r:path}"\n    to: "model.vision_tower.{r}"\n',
        "aliased.yaml",
    )
    assert codes(check_spec(aliased)) == []


def test_a_key_already_in_the_target_layout_is_counted_not_warned_about():
    # it passes through, and saving back writes it in the original layout: no W207
    report = check_spec("mixtral", layout={"model.layers.0.mlp.gate.weight": bf16(4, 2)}, checkpoint="ckpt")
    assert "W207" not in codes(report) and report.coverage["already"] == 1
    assert "1 unclaimed (1 of them in the target layout already)" in report.text()


QUANT = "quantization:\n  scheme: fp8_blocks\n  block: [16, 16]\n"
GATE = '      gate: "{p:path}.experts.{e:int}.gate_proj.weight"\n'
GATE_SCALE = '      gs: "{p:path}.experts.{e:int}.gate_proj.weight_scale_inv"'
SCALE_RULE = (
    "  - convert:\n" + GATE_SCALE + "NOQA\n    to:\n" + '      "{p}.experts.g_scale_inv": stack(gs, over=e)\n'
)
WEIGHT_RULE = "  - convert:\n" + GATE + '    to:\n      "{p}.experts.g": stack(gate, over=e)\n'
CSPEC_SCALE = (
    "spec t\nquantization fp8_blocks block [16, 16]\n\n"
    "convert gate = {p:path}.experts.{e:int}.gate_proj.weight -> {p}.experts.g = stack(gate, over=e)\n"
    "convert gs = {p:path}.experts.{e:int}.gate_proj.weight_scale_inv"
    " -> {p}.experts.g_scale_inv = stack(gs, over=e)NOQA\n"
)


def quant_spec(tmp_path: Path, rules: str, name: str = "q.yaml", quant: str = QUANT) -> str:
    path = tmp_path / name
    path.write_text("spec: t\n" + quant + "rules:\n" + rules)
    return str(path)


@pytest.mark.parametrize("syntax", ["yaml", "cspec"])
def test_W208_a_convert_that_binds_a_scale_by_hand(tmp_path, syntax):
    if syntax == "yaml":
        path = quant_spec(tmp_path, WEIGHT_RULE + SCALE_RULE.replace("NOQA", ""))
        line, col = 11, 7
    else:
        path = tmp_path / "q.cspec"
        path.write_text(CSPEC_SCALE.replace("NOQA", ""))
        path, line, col = str(path), 5, 9
    report = check_spec(path)
    f = only(report, "W208")
    assert f.message.startswith(
        "rule 2 binds input gs = {p:path}.experts.{e:int}.gate_proj.weight_scale_inv, a companion of the "
        "fp8_blocks quantization"
    )
    assert f.hint == "drop the input: companions follow their weights (docs/quantization.md)"
    assert (f.line, f.col, f.severity) == (line, col, "warning")
    assert "E101" in codes(report)  # the weight's rule binds the same scales already


def test_W208_when_the_scale_rule_is_the_weight_rule_the_plan_fails_and_W208_says_why(tmp_path):
    rule = "  - convert:\n" + GATE + GATE_SCALE + '\n    to:\n      "{p}.experts.g": stack(gate, over=e)\n'
    rule += '      "{p}.experts.g_scale_inv": stack(gs, over=e)\n'
    report = check_spec(quant_spec(tmp_path, rule))
    assert codes(report) == ["E002", "W208"]
    assert "written twice" in report.findings[0].message


def test_W208_needs_a_quantization_from_the_spec_an_include_or_the_config(tmp_path):
    rules = SCALE_RULE.replace("NOQA", "")
    assert "W208" not in codes(check_spec(quant_spec(tmp_path, rules, quant="")))  # no quantization
    quant_spec(tmp_path, '  - drop: "{p:path}.unused"\n', name="base.yaml")
    included = quant_spec(tmp_path, "  - include: base\n" + rules, name="inc.yaml", quant="")
    assert only(check_spec(included), "W208").line == 5
    fp8 = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
    plain = quant_spec(tmp_path, rules, name="plain.yaml", quant="")
    assert only(check_spec(plain, config=fp8), "W208").line == 4


def test_W208_a_rule_that_dequantizes_may_bind_its_scales(tmp_path):
    rule = "  - convert:\n" + GATE + GATE_SCALE + "\n    to:\n"
    rule += '      "{p}.experts.g": stack(dequant_fp8(gate, gs), over=e)\n'
    assert codes(check_spec(quant_spec(tmp_path, rule))) == ["W209"]


def test_W208_against_a_quantized_checkpoint_takes_the_quantization_from_its_config(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.quantized import write_deepseek_v3_fp8

    ckpt = tmp_path / "ds"
    write_deepseek_v3_fp8(ckpt, layers=2, experts=2)
    rule = "  - convert:\n" + '      s: "{p:path}.mlp.experts.{e:int}.up_proj.weight_scale_inv"\n'
    rule += '    to:\n      "{p}.mlp.experts.up_proj_scale_inv": stack(s, over=e)\n'
    path = quant_spec(tmp_path, rule, quant="")
    assert main(["check", path]) == 0
    assert capsys.readouterr().out == f"{path}: no problems\n"  # no quantization without its config
    assert main(["check", path, "--against", str(ckpt), "--select", "W208"]) == 0
    out = capsys.readouterr().out
    assert f"{path}:4:7: W208 rule 1 binds input s = " in out


def test_W208_noqa_on_the_input_line_silences_it(tmp_path):
    yaml = quant_spec(tmp_path, WEIGHT_RULE + SCALE_RULE.replace("NOQA", "  # noqa: W208"))
    assert "W208" not in codes(check_spec(yaml))
    other = quant_spec(tmp_path, WEIGHT_RULE + SCALE_RULE.replace("NOQA", "  # noqa: W204"), "o.yaml")
    assert "W208" in codes(check_spec(other))
    cspec = tmp_path / "q.cspec"
    cspec.write_text(CSPEC_SCALE.replace("NOQA", "  # noqa: W208"))
    assert "W208" not in codes(check_spec(str(cspec)))


@pytest.mark.parametrize("syntax", ["yaml", "cspec"])
def test_W209_a_rule_that_dequantizes_is_W209_not_W204(tmp_path, syntax):
    if syntax == "yaml":
        rule = "  - convert:\n" + GATE + GATE_SCALE + "\n    to:\n"
        rule += '      "{p}.experts.g": stack(dequant_fp8(gate, gs), over=e)\n'
        path, line = quant_spec(tmp_path, rule), 10
    else:
        p = tmp_path / "q.cspec"
        p.write_text(
            "spec t\nquantization fp8_blocks block [16, 16]\n\n"
            "convert gate = {p:path}.experts.{e:int}.gate_proj.weight,\n"
            "        gs   = {p:path}.experts.{e:int}.gate_proj.weight_scale_inv\n"
            "     -> {p}.experts.g = stack(dequant_fp8(gate, gs), over=e)\n"
        )
        path, line = str(p), 6
    report = check_spec(path)
    assert codes(report) == ["W209"]  # W204 (lossy-rule) would say it too: W209 is the specific one
    f = report.findings[0]
    assert f.message.startswith("rule 1 dequantizes (%1 = dequant_fp8(gate, gs, dtype=bfloat16))")
    assert f.message.endswith(": the plan cannot save back")
    assert f.hint == (
        "keep the weights quantized (their scales follow them) and dequantize at load time "
        "with --dequantize / dequantize=True"
    )
    assert f.line == line


def test_W209_once_per_rule_and_other_rules_keep_W204(tmp_path):
    rule = '  - drop: "{p:path}.inv_freq"\n  - convert:\n' + GATE + GATE_SCALE + "\n"
    rule += '      up: "{p:path}.experts.{e:int}.up_proj.weight"\n'
    rule += '      us: "{p:path}.experts.{e:int}.up_proj.weight_scale_inv"\n    to:\n'
    rule += '      "{p}.experts.g": stack(dequant_fp8(gate, gs), over=e)\n'
    rule += '      "{p}.experts.u": stack(dequant_fp8(up, us, dtype=float32), over=e)\n'
    report = check_spec(quant_spec(tmp_path, rule))
    assert only(report, "W209").line == 13  # the first dequantizing op of the rule
    assert {f.line for f in report.findings if f.code == "W204"} == {6}  # the drop's, not the rule's
    noqa = quant_spec(tmp_path, rule.replace("gs), over=e)", "gs), over=e)  # noqa: W209"), "n.yaml")
    assert set(codes(check_spec(noqa))) == {"W204"}


def test_the_companion_rules_a_quantization_derives_are_not_linted_again(tmp_path):
    # a full-name drop and rename derive the same for `..._scale_inv`: one W204, and no W206 for the
    # derived rename that no key of a checkpoint without that scale reaches
    rules = '  - drop: "{p:path}.gate.bias"\n  - rename: "{p:path}.norm.weight"\n    to: "{p}.ln.weight"\n'
    fp8 = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
    layout = {"m.gate.bias": bf16(4), "m.norm.weight": bf16(4)}
    report = check_spec(spec_file(tmp_path, rules), config=fp8, layout=layout, checkpoint="ckpt")
    assert codes(report) == ["W204"] and report.findings[0].line == 3


def test_I301_unclaimed_keys_grouped_by_shape():
    layout = {f"model.layers.{i}.input_layernorm.weight": bf16(2) for i in range(32)}
    layout["lm_head.weight"] = bf16(3, 2)
    report = check_spec("mixtral", layout=layout, checkpoint="ckpt")
    lines = [f.message for f in report.findings if f.code == "I301"]
    assert lines[0].startswith(
        "no rule claims model.layers.{0..31}.input_layernorm.weight (32 keys, [2] bfloat16)"
    )
    assert lines[1].startswith("no rule claims lm_head.weight (1 key, [3, 2] bfloat16)")
    assert report.coverage["unmatched"] == 33 and not report.errors
    assert "ckpt: 0 of 33 keys claimed (0.0%)" in report.text()


def test_every_rule_has_a_test_here():
    text = Path(__file__).read_text()
    for code in RULES:
        assert f"def test_{code}_" in text, code


# ---- the pieces ----------------------------------------------------------------------------------


def tpl(text: str):
    return pattern_of(parse_template(text, Embedded(Source(text, "t"), 1, 1))).typed({})


def test_witness_respects_unless_and_reports_none_when_covered():
    a, b = tpl("{p:path}.w"), tpl("x.{q:path}")
    assert witness([a], [(b, ())]) is not None
    assert witness([tpl("x.y.w")], [(b, ())]) is None
    assert witness([tpl("x.y.w")], [(b, (tpl("x.y.{z}"),))]) == "x.y.w"


def test_witness_gives_up_past_its_limit():
    with pytest.raises(Unknown):
        witness([tpl("{p:path}.a.b.c.d")], [(tpl("{q:path}.a.b.c.d"), ())], limit=5)


def test_key_shapes_folds_numbers_into_ranges_and_lists():
    keys = [f"m.layers.{i}.experts.{e}.w" for i in range(3) for e in (0, 1, 5)] + ["m.layers.7.x"]
    shapes = key_shapes(keys)
    assert [(s.text, s.count) for s in shapes] == [
        ("m.layers.{0..2}.experts.{0,1,5}.w", 9),
        ("m.layers.7.x", 1),
    ]
    assert shapes[0].example == "m.layers.0.experts.0.w"


def test_key_shapes_fold_whole_segments_only_and_only_exact_products():
    keys = ["m.0.experts.0.w1", "m.0.experts.0.w3", "m.1.experts.0.w1", "m.1.experts.0.w3"]
    assert [s.text for s in key_shapes(keys)] == ["m.{0,1}.experts.0.w1", "m.{0,1}.experts.0.w3"]
    ragged = ["a.0.b.0", "a.0.b.1", "a.1.b.0"]  # not layers x experts: no template claims a.1.b.1
    assert [(s.text, s.count) for s in key_shapes(ragged)] == [("a.0.b.{0,1}", 2), ("a.1.b.0", 1)]


def test_key_shapes_names_the_rule_the_keys_nearly_match():
    plan = api.compile("mixtral")
    (shape,) = key_shapes([f"model.layers.{i}.mlp.experts.0.w1.weights" for i in range(2)], plan)
    assert shape.closest == "rule 2 {p:path}.mlp.experts.{e:int}.w1.weight"


# ---- suppression, selection and the command line -------------------------------------------------


def test_noqa_on_the_rule_line_silences_that_code_only(tmp_path):
    path = spec_file(
        tmp_path, '  - drop: "{p:path}.inv_freq"  # noqa: W204\n  - rename: "{p:path}.w"\n    to: "{p}.w"\n'
    )
    assert codes(check_spec(path)) == ["W203"]
    bare = spec_file(tmp_path, '  - drop: "{p:path}.inv_freq"  # noqa\n', "bare.yaml")
    assert codes(check_spec(bare)) == []


def test_noqa_on_an_op_line_of_a_convert_silences_the_finding_placed_there(tmp_path):
    rule = (
        '  - convert:\n      a: "{p:path}.w"\n    to:\n      "{p}.v": cast(a, dtype=bfloat16, from=float32)'
    )
    assert codes(check_spec(spec_file(tmp_path, rule + "\n"))) == ["W204"]
    assert codes(check_spec(spec_file(tmp_path, rule + "  # noqa: W204\n", "n.yaml"))) == []


def test_select_and_ignore_filter_by_code_prefix(tmp_path):
    path = spec_file(tmp_path, '  - drop: "{p:path}.inv_freq"\n  - rename: "{p:path}.w"\n    to: "{p}.w"\n')
    assert codes(check_spec(path, select=("W203",))) == ["W203"]
    assert codes(check_spec(path, ignore=("W2",))) == []


def test_cli_prints_one_line_per_finding_and_exits_1_on_errors(tmp_path, capsys):
    bad = spec_file(tmp_path, '  - rename: "{p:path}.{i:int}.w"\n    to: "{p}.w"\n', "bad.yaml")
    warn = spec_file(tmp_path, '  - rename: "{p:path}.w"\n    to: "{p}.w"\n', "warn.yaml")
    assert main(["check", bad]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{bad}:4:10: E102 rename drops capture {{i}}")
    assert out[-1] == f"{bad}: 1 error"
    assert "\033[" not in "".join(out)  # no colour off a terminal
    assert main(["check", warn]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{warn}: 1 warning"


def test_cli_json_lists_findings_with_locations(tmp_path, capsys):
    warn = spec_file(tmp_path, '  - rename: "{p:path}.w"\n    to: "{p}.w"\n')
    assert main(["check", warn, "mixtral", "--json"]) == 0
    (a, b) = json.loads(capsys.readouterr().out)
    assert a["findings"][0] | {"message": ""} == {
        "code": "W203",
        "rule": "identity-rename",
        "severity": "warning",
        "message": "",
        "file": warn,
        "line": 3,
        "col": 5,
        "hint": "remove it",
    }
    assert b["spec"] == "mixtral" and b["counts"] == {"error": 0, "warning": 0, "info": 0}


def test_cli_against_a_checkpoint_reports_coverage(tmp_path, capsys):
    ckpt = tmp_path / "tiny"
    make(ckpt, layers=2, experts=4)
    assert main(["check", "mixtral", "--against", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert (
        f"{ckpt}: I301 no rule claims model.layers.{{0,1}}.self_attn.q_proj.weight (2 keys, [32, 32] bfloat16)"
        in out
    )
    assert "keys claimed" in out and "24 converted" in out


def test_cli_a_missing_spec_is_a_usage_error_exit_2(capsys):
    assert main(["check", "no_such_spec.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_builtin_spec_is_clean():
    dirty = {}
    for name in api.spec_names():
        report = check_spec(name)
        if report.findings:
            dirty[name] = [f.text() for f in report.findings]
    assert dirty == {}


# ---- the segment-wise meet agrees with the automata ---------------------------------------------

_SEGMENT = st.sampled_from(
    [
        "a",
        "b",
        "ab",
        "0",
        "1",
        "01",
        "10",
        "{S:seg}",
        "{S:int}",
        "{S:path}",
        "{S:path?}",
        "w{S:int}",
        "{S:int}b",
    ]
)


@st.composite
def templates(draw) -> str:
    segments = draw(st.lists(_SEGMENT, min_size=1, max_size=5))
    return ".".join(s.replace("S", f"c{i}") for i, s in enumerate(segments))


@settings(max_examples=300, deadline=None)
@given(templates(), templates())
def test_meet_agrees_with_the_automata(a, b):
    pa, pb = tpl(a), tpl(b)
    assert meet(pa, pb) == (intersection_witness(pa, pb) is not None)


def test_E103_a_spec_that_needs_a_config_to_bind_says_how_to_give_one(tmp_path):
    layout = {"model.layers.0.self_attn.qkv_proj.weight": bf16(64, 32)}
    f = only(check_spec("split_qkv", layout=layout, checkpoint="ckpt"), "E103")
    assert "needs config.num_attention_heads, but no config was given" in f.message
    assert "--config FILE" in f.hint and f.file == "specs/split_qkv.yaml"


_WHOLE_SEGMENT = st.sampled_from(
    ["a", "b", "ab", "0", "1", "01", "10", "{S:seg}", "{S:int}", "{S:path}", "{S:path?}"]
)


@st.composite
def whole_segment_templates(draw) -> str:
    segments = draw(st.lists(_WHOLE_SEGMENT, min_size=1, max_size=4))
    return ".".join(s.replace("S", f"c{i}") for i, s in enumerate(segments))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(whole_segment_templates(), min_size=1, max_size=2),
    st.lists(
        st.tuples(whole_segment_templates(), st.lists(whole_segment_templates(), max_size=1)), max_size=3
    ),
)
def test_the_segment_search_agrees_with_the_character_search(must, avoid):
    must_p = [tpl(t) for t in must]
    avoid_p = [(tpl(a), tuple(tpl(u) for u in us)) for a, us in avoid]
    everything = [*must_p, *(q for a, us in avoid_p for q in (a, *us))]
    assume(all(_segment_simple(p) for p in everything))  # the others go to the character search
    by_seg = witness(must_p, avoid_p, by_segment=True)
    by_char = witness(must_p, avoid_p, by_segment=False)
    assert (by_seg is None) == (by_char is None)
    if by_seg is not None:  # and what it found is a real witness
        assert all(_matches(p, by_seg) for p in must_p)
        assert not any(_matches(a, by_seg) and not any(_matches(u, by_seg) for u in us) for a, us in avoid_p)
