"""The `quantization` section in both syntaxes (issue 17): YAML and .cspec give the same IR, `fmt`
writes it back in either (comments kept), both refuse the same mistakes at the same place, and the
JSON schema agrees with the YAML front end."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from convspec.errors import SpecError, SpecSyntaxError, SpecValidationError
from convspec.spec import parse_spec
from convspec.spec.comments import extract_comments
from convspec.spec.emit import to_dsl, to_yaml
from convspec.spec.format import format_text
from convspec.spec.model import ListExpr, Num
from convspec.spec.quant import SCHEMES
from convspec.spec.schema import json_schema
from convspec.spec.yaml_front import TOP_KEYS

YAML = """\
spec: q
quantization:
  scheme: fp8_blocks
  block: config.quantization_config.weight_block_size ?? [128, 128]
  companions:
    "{w}": "{w}_scale_inv"
    "{w}.weight": ["{w}.weight_scale", "{w}.input_scale"]
rules:
  - drop: "{p:path}.rotary_emb.inv_freq"
"""

CSPEC = """\
spec q
quantization fp8_blocks block config.quantization_config.weight_block_size ?? [128, 128]
companion {w} -> {w}_scale_inv
companion {w}.weight -> {w}.weight_scale, {w}.input_scale

drop {p:path}.rotary_emb.inv_freq
"""


def _dump(text: str, file: str) -> dict:
    return parse_spec(text, file).model_dump()


# ---- the same IR from both syntaxes ----------------------------------------------------------


def test_yaml_and_cspec_give_the_same_ir():
    spec = parse_spec(YAML, "q.yaml")
    assert spec.model_dump() == _dump(CSPEC, "q.cspec")
    q = spec.quantization
    assert q.scheme == "fp8_blocks"
    assert [(c.weight, c.companions) for c in q.companions] == [
        ("{w}", ["{w}_scale_inv"]),
        ("{w}.weight", ["{w}.weight_scale", "{w}.input_scale"]),
    ]
    assert q.block.kind == "binop" and q.block.op == "??"


def test_a_yaml_list_block_is_the_list_expression():
    listed = parse_spec("spec: q\nquantization:\n  scheme: fp8_blocks\n  block: [64, 128]\n", "q.yaml")
    written = parse_spec('spec: q\nquantization:\n  scheme: fp8_blocks\n  block: "[64, 128]"\n', "q.yaml")
    dsl = parse_spec("spec q\nquantization fp8_blocks block [64, 128]\n", "q.cspec")
    assert (
        listed.quantization.block.model_dump() == ListExpr(items=[Num(value=64), Num(value=128)]).model_dump()
    )
    assert listed.model_dump() == written.model_dump() == dsl.model_dump()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_parses_without_companions_or_block(scheme):
    a = parse_spec(f"spec: q\nquantization:\n  scheme: {scheme}\n", "q.yaml")
    b = parse_spec(f"spec q\nquantization {scheme}\n", "q.cspec")
    assert a.model_dump() == b.model_dump()
    assert a.quantization.companions == [] and a.quantization.block is None


def test_companion_statements_may_stand_anywhere_after_the_header():
    text = (
        "spec q\ncompanion {w}_blocks -> {w}_scales\ndrop a\nquantization mxfp4\n"
        "convert companion = {p:path}.x -> {p}.y = companion\n"  # the words stay usable as names
    )
    spec = parse_spec(text, "q.cspec")
    assert spec.quantization.companions[0].weight == "{w}_blocks"
    assert len(spec.rules) == 2


def test_no_section_is_none_and_writes_nothing():
    spec = parse_spec("spec q\ndrop a\n", "q.cspec")
    assert spec.quantization is None
    assert "quantization" not in to_yaml(spec) and "quantization" not in to_dsl(spec)


# ---- fmt round trips -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "file"), [(YAML, "q.yaml"), (CSPEC, "q.cspec")])
@pytest.mark.parametrize("to", ["yaml", "cspec"])
def test_fmt_round_trips_both_ways(text, file, to):
    out = format_text(text, file, to=to)
    other = "q.yaml" if to == "yaml" else "q.cspec"
    assert _dump(out, other) == _dump(text, file)
    assert format_text(out, other) == out  # canonical: formatting again changes nothing
    back = format_text(out, other, to="yaml" if file.endswith(".yaml") else "cspec")
    assert back == format_text(text, file)


def test_fmt_writes_the_canonical_forms():
    assert format_text(YAML, "q.yaml", to="cspec") == CSPEC
    assert format_text(CSPEC, "q.cspec", to="yaml") == YAML.replace("spec: q\n", "spec: q\nmodel_types: []\n")


def test_a_list_block_stays_a_list_in_yaml():
    text = "spec: q\nmodel_types: []\nquantization:\n  scheme: fp8_blocks\n  block: [128, 128]\nrules: []\n"
    assert format_text(text, "q.yaml") == text
    assert "quantization fp8_blocks block [128, 128]\n" in format_text(text, "q.yaml", to="cspec")


COMMENTED_YAML = """\
spec: q
# how the FP8 checkpoint stores its scales
quantization:  # DeepSeek-V3
  scheme: fp8_blocks  # e4m3
  block: [128, 128]  # the config's weight_block_size
  companions:
    # every linear
    "{w}": "{w}_scale_inv"  # one per block
rules:
  - drop: a
"""


def test_comments_of_the_section_are_kept_both_ways():
    count = len(extract_comments(COMMENTED_YAML, "yaml").all())
    cspec = format_text(COMMENTED_YAML, "q.yaml", to="cspec")
    assert len(extract_comments(cspec, "cspec").all()) == count
    assert "companion {w} -> {w}_scale_inv  # one per block\n" in cspec
    assert "# every linear\ncompanion {w}" in cspec
    back = format_text(cspec, "q.cspec", to="yaml")
    assert len(extract_comments(back, "yaml").all()) == count
    assert '    "{w}": "{w}_scale_inv"  # one per block\n' in back
    assert format_text(back, "q.yaml") == back
    assert '  companions:\n    # every linear\n    "{w}"' in back


def test_cspec_comments_stay_on_their_statements():
    text = "spec q\n# scales\nquantization mxfp4  # gpt-oss\ncompanion {w}_blocks -> {w}_scales  # experts\n"
    out = format_text(text, "q.cspec")
    assert out == text
    yml = format_text(text, "q.cspec", to="yaml")
    assert "# scales\nquantization:  # gpt-oss\n" in yml
    assert '"{w}_blocks": "{w}_scales"  # experts\n' in yml


def test_a_comment_inside_a_block_scalar_expression_is_kept():
    text = "spec: q\nquantization:\n  scheme: fp8_blocks\n  block: |\n    [128, 128]  # square\n"
    out = format_text(text, "q.yaml", to="cspec")
    assert "# square" in out
    assert _dump(out, "q.cspec") == _dump(text, "q.yaml")


# ---- the same mistakes refused at the same place ---------------------------------------------

Y_COMP = 'spec: q\nquantization:\n  scheme: fp8_blocks\n  companions:\n    "{w}": %s\n'
C_COMP = "spec q\nquantization fp8_blocks\ncompanion %s\n"

# name -> (YAML text, .cspec text or None, message fragment, (line, col) in YAML, (line, col) in .cspec)
MISTAKES = {
    "unknown scheme": (
        "spec: q\nquantization:\n  scheme: fp8_block\n",
        "spec q\nquantization fp8_block\n",
        "unknown quantization scheme 'fp8_block': did you mean 'fp8_blocks'?",
        (3, 11),
        (2, 14),
    ),
    "block with another scheme": (
        "spec: q\nquantization:\n  scheme: mxfp4\n  block: [32, 32]\n",
        "spec q\nquantization mxfp4 block [32, 32]\n",
        "a block shape is only for the fp8_blocks scheme, not mxfp4",
        (4, 10),
        (2, 26),
    ),
    "block of a zero": (
        "spec: q\nquantization:\n  scheme: fp8_blocks\n  block: [128, 0]\n",
        "spec q\nquantization fp8_blocks block [128, 0]\n",
        "a block shape is two whole numbers of at least 1",
        (4, 16),
        (2, 37),
    ),
    "no capture": (
        Y_COMP % '"w_scale"',
        C_COMP % "{w} -> w_scale",
        "companion template 'w_scale' has no {w}",
        (5, 13),
        (3, 18),
    ),
    "another capture": (
        Y_COMP % '"{x}_scale"',
        C_COMP % "{w} -> {x}_scale",
        "companion template '{x}_scale' has the capture {x}: its one capture is written {w}",
        (5, 14),
        (3, 19),
    ),
    "two captures": (
        Y_COMP % '"{w}.{x}"',
        C_COMP % "{w} -> {w}.{x}",
        "has the capture {x}: its one capture is written {w}",
        (5, 18),
        (3, 23),
    ),
    "a typed capture": (
        Y_COMP % '"{w:int}_s"',
        C_COMP % "{w} -> {w:int}_s",
        "companion template '{w:int}_s': {w} has no type and no offset",
        (5, 14),
        (3, 19),
    ),
    "an offset": (
        Y_COMP % '"{w+1}_s"',
        C_COMP % "{w} -> {w+1}_s",
        "{w} has no type and no offset",
        (5, 14),
        (3, 19),
    ),
    "capture not first": (
        Y_COMP % '"scale.{w}"',
        C_COMP % "{w} -> scale.{w}",
        "companion template 'scale.{w}' does not start with {w}",
        (5, 13),
        (3, 18),
    ),
    "weight capture not first": (
        'spec: q\nquantization:\n  scheme: fp8_blocks\n  companions:\n    "x.{w}": "{w}_s"\n',
        C_COMP % "x.{w} -> {w}_s",
        "weight template 'x.{w}' does not start with {w}",
        (5, 6),
        (3, 11),
    ),
    "companion is the weight": (
        Y_COMP % '["{w}_s", "{w}"]',
        C_COMP % "{w} -> {w}_s, {w}",
        "companion template '{w}' is its weight's own template",
        (5, 23),
        (3, 25),
    ),
    "companion twice for one weight": (
        Y_COMP % '["{w}_s", "{w}_s"]',
        C_COMP % "{w} -> {w}_s, {w}_s",
        "companion template '{w}_s' is given twice",
        (5, 23),
        (3, 25),
    ),
    "companion twice across weights": (
        Y_COMP % '"{w}_s"\n    "{w}.weight": "{w}_s"',
        C_COMP % "{w} -> {w}_s\ncompanion {w}.weight -> {w}_s",
        "companion template '{w}_s' is given twice",
        (6, 20),
        (4, 25),
    ),
    "weight twice": (
        Y_COMP % '"{w}_s"\n    "{w}": "{w}_t"',
        C_COMP % "{w} -> {w}_s\ncompanion {w} -> {w}_t",
        "twice",  # YAML: a key given twice in the mapping; .cspec: the weight template
        (6, 5),
        (4, 11),
    ),
    "unknown key": (
        "spec: q\nquantization:\n  scheme: mxfp4\n  blocks: 32\n",
        None,
        "unknown key 'blocks' in 'quantization'",
        (4, 3),
        None,
    ),
    "no scheme": (
        "spec: q\nquantization:\n  block: [128, 128]\n",
        None,
        "'quantization' needs 'scheme:'",
        (3, 3),
        None,
    ),
    "block list of strings": (
        'spec: q\nquantization:\n  scheme: fp8_blocks\n  block: ["128", 128]\n',
        None,
        "a block shape is a list of whole numbers",
        (4, 11),
        None,
    ),
    "a companion without quantization": (
        None,
        "spec q\ndrop a\ncompanion {w} -> {w}_s\n",
        "a 'companion' statement without a 'quantization' statement",
        None,
        (3, 1),
    ),
    "two quantization statements": (
        None,
        "spec q\nquantization mxfp4\ndrop a\nquantization mxfp4\n",
        "a second 'quantization' statement",
        None,
        (4, 1),
    ),
}


def _cases():
    for name, (yml, dsl, message, at_yaml, at_dsl) in MISTAKES.items():
        if yml is not None:
            yield pytest.param(yml, "q.yaml", message, at_yaml, id=f"{name}-yaml")
        if dsl is not None:
            yield pytest.param(dsl, "q.cspec", message, at_dsl, id=f"{name}-cspec")


@pytest.mark.parametrize(("text", "file", "message", "at"), _cases())
def test_a_mistake_is_refused_where_it_stands(text, file, message, at):
    with pytest.raises(SpecValidationError) as exc:
        parse_spec(text, file)
    err = exc.value
    assert message in err.message
    assert (err.span.file, err.span.line, err.span.col) == (file, *at)
    assert err.hint  # each says what to do


def test_the_unknown_scheme_lists_the_three():
    with pytest.raises(SpecValidationError) as exc:
        parse_spec("spec q\nquantization int4\n", "q.cspec")
    assert exc.value.hint == "a scheme is one of: fp8_blocks, mxfp4, fp8_tensor"
    assert "did you mean" not in exc.value.message


def test_a_deep_block_expression_is_refused_in_both_syntaxes():
    deep = "[" * 70 + "1" + "]" * 70
    for text, file in [
        (f"spec q\nquantization fp8_blocks block {deep}\n", "q.cspec"),
        (f'spec: q\nquantization:\n  scheme: fp8_blocks\n  block: "{deep}"\n', "q.yaml"),
    ]:
        with pytest.raises(SpecValidationError, match="nested deeper than 64 levels"):
            parse_spec(text, file)


def test_a_misspelt_statement_gets_its_hint():
    with pytest.raises(SpecSyntaxError) as exc:
        parse_spec("spec q\nquantisation fp8_blocks\n", "q.cspec")
    assert exc.value.message == "unknown word 'quantisation': did you mean 'quantization'?"
    with pytest.raises(SpecSyntaxError) as exc:
        parse_spec("spec q\nquantization mxfp4\ncompanoin {w}_blocks -> {w}_scales\n", "q.cspec")
    assert exc.value.message == "unknown word 'companoin': did you mean 'companion'?"
    with pytest.raises(SpecSyntaxError) as exc:
        parse_spec("spec q\nquantization fp8_blocks blok [128, 128]\n", "q.cspec")
    assert exc.value.message == "unknown word 'blok': did you mean 'block'?"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("companion {w} {w}_s", "missing '->' before '{w}_s' in a companion statement"),
        ("companion {w} = {w}_s", "missing '->' before '=' in a companion statement"),
        ("companion {w}\ndrop a", "the companion statement before this point has no '->' and no companion"),
    ],
)
def test_a_companion_without_its_arrow_gets_its_own_message(line, message):
    with pytest.raises(SpecSyntaxError) as exc:
        parse_spec(f"spec q\nquantization mxfp4\n{line}\n", "q.cspec")
    assert exc.value.message == message
    assert exc.value.hint.startswith("write it as: companion WEIGHT -> COMPANION")


# ---- the JSON schema -------------------------------------------------------------------------


def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json_schema())


def _parses(doc: dict) -> bool:
    try:
        parse_spec(yaml.safe_dump(doc, sort_keys=False), "q.yaml")
    except SpecError:
        return False
    return True


def test_the_schema_lists_the_section_where_the_front_end_reads_it():
    schema = json_schema()
    assert tuple(schema["properties"]) == TOP_KEYS
    section = schema["$defs"]["QuantizationSection"]
    assert tuple(section["properties"]) == ("scheme", "block", "companions")
    assert tuple(section["properties"]["scheme"]["enum"]) == SCHEMES
    assert section["required"] == ["scheme"]


GOOD = {
    "fp8 blocks": {"scheme": "fp8_blocks", "block": [128, 128], "companions": {"{w}": "{w}_scale_inv"}},
    "block expression": {"scheme": "fp8_blocks", "block": "config.q.weight_block_size ?? [128, 128]"},
    "mxfp4": {"scheme": "mxfp4", "companions": {"{w}_blocks": "{w}_scales"}},
    "per tensor": {
        "scheme": "fp8_tensor",
        "companions": {"{w}.weight": ["{w}.weight_scale", "{w}.input_scale"]},
    },
}
BAD = {
    "unknown scheme": {"scheme": "fp4"},
    "no scheme": {"companions": {"{w}": "{w}_s"}},
    "block with mxfp4": {"scheme": "mxfp4", "block": [32, 32]},
    "block of one number": {"scheme": "fp8_blocks", "block": [128]},
    "block of zero": {"scheme": "fp8_blocks", "block": [0, 128]},
    "unknown key": {"scheme": "mxfp4", "group": 32},
    "weight without {w}": {"scheme": "mxfp4", "companions": {"blocks": "{w}_scales"}},
    "companion with a typed capture": {"scheme": "mxfp4", "companions": {"{w}": "{w:int}_s"}},
    "capture not first": {"scheme": "mxfp4", "companions": {"{w}": "s.{w}"}},
    "no companion": {"scheme": "mxfp4", "companions": {"{w}": []}},
}


@pytest.mark.parametrize("section", GOOD.values(), ids=GOOD.keys())
def test_schema_and_parser_accept_a_good_section(section):
    doc = {"spec": "q", "quantization": section}
    assert list(_validator().iter_errors(doc)) == []
    assert _parses(doc)


@pytest.mark.parametrize("section", BAD.values(), ids=BAD.keys())
def test_schema_and_parser_refuse_a_bad_section(section):
    doc = {"spec": "q", "quantization": section}
    assert list(_validator().iter_errors(doc)) != []
    assert not _parses(doc)


def test_a_long_block_expression_breaks_and_reads_back():
    long = (
        "max_block(config.quantization_config.weight_block_size_of_a_long_name ?? [128, 128], "
        "config.text_config.another_quite_long_config_name)"
    )
    text = f"spec q\nquantization fp8_blocks block {long}\n"
    cspec, yml = format_text(text, "q.cspec"), format_text(text, "q.cspec", to="yaml")
    assert "  block: >-\n" in yml
    assert all(len(line) <= 100 for line in (cspec + yml).splitlines())
    assert _dump(cspec, "q.cspec") == _dump(yml, "q.yaml") == _dump(text, "q.cspec")
    assert format_text(yml, "q.yaml") == yml and format_text(cspec, "q.cspec") == cspec
