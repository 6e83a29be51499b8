"""`convspec fmt`: canonical layout (what emit.py writes), translation between YAML and .cspec, and
comments kept through both. Every built-in spec is already canonical (but the hand-written ones listed
below) and survives yaml -> cspec -> yaml unchanged."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from convspec.cli import main
from convspec.errors import SpecError, SpecSyntaxError, SpecValidationError
from convspec.spec import parse_spec
from convspec.spec.comments import Attached, extract_comments
from convspec.spec.format import format_text

SPECS = Path(__file__).resolve().parent.parent / "specs"
BUILTIN = sorted(SPECS.glob("*.yaml")) + sorted(SPECS.glob("*.cspec"))
# Written by hand before fmt existed, in the layout of the docs (aligned `=`, `     ->`, wrapped lines,
# plain YAML expressions): fmt would rewrite them, keeping their IR and comments.
HAND_LAID_OUT = {
    "mixtral.yaml",
    "qwen2_moe.yaml",
    "split_qkv.yaml",
    "legacy.cspec",
    "mixtral.cspec",
    "qwen2_moe.cspec",
    "split_qkv.cspec",
}


@cache
def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@cache
def _fmt(path: Path) -> str:
    return format_text(_read(path), str(path))


def _n_comments(text: str, syntax: str) -> int:
    return len(extract_comments(text, syntax).all())


# ---- canonical layout ------------------------------------------------------------------------

MESSY_YAML = """\
rules:
- {rename: '{p:path}.block_sparse_moe.{rest:path}', to: '{p}.mlp.{rest}'}
- to:
    "{p}.mlp.experts.gate_up_proj": >-
      cat(stack(gate, over=e),
          stack(up, over=e), dim=1, equal=true)
  convert:
    gate:   "{p:path}.mlp.experts.{e:int}.w1.weight"
    up: "{p:path}.mlp.experts.{e:int}.w3.weight"
- convert: {down: "{p:path}.mlp.experts.{e:int}.w2.weight"}
  ops: [stack(e)]
  to: "{p}.mlp.experts.down_proj"
- rename: "{p:path}.attn.{r:path}"
  unless: "{p:path}.attn.keep.{r:path}"
  to: "{p}.self_attn.{r}"
model_types:
  - mixtral
  - minimax
base_prefix:   model
spec: mixtral
doc: 'Mixtral experts, fused'
"""

MESSY_CSPEC = """\
spec   mixtral
doc "Mixtral experts, fused"
model_types mixtral,
            minimax
base_prefix model
rename {p:path}.block_sparse_moe.{rest:path}   ->   {p}.mlp.{rest}
convert gate = {p:path}.mlp.experts.{e:int}.w1.weight, up = {p:path}.mlp.experts.{e:int}.w3.weight
     -> {p}.mlp.experts.gate_up_proj
        = cat(stack(gate, over=e),
              stack(up, over=e), dim=1, equal=true)
convert down = {p:path}.mlp.experts.{e:int}.w2.weight -> {p}.mlp.experts.down_proj ops [stack(e)]
rename {p:path}.attn.{r:path} -> {p}.self_attn.{r} unless {p:path}.attn.keep.{r:path}
"""

CANONICAL_YAML = """\
spec: mixtral
doc: "Mixtral experts, fused"
model_types: [mixtral, minimax]
base_prefix: model
rules:
  - rename: "{p:path}.block_sparse_moe.{rest:path}"
    to: "{p}.mlp.{rest}"
  - convert:
      gate: "{p:path}.mlp.experts.{e:int}.w1.weight"
      up: "{p:path}.mlp.experts.{e:int}.w3.weight"
    to:
      "{p}.mlp.experts.gate_up_proj": "cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)"
  - convert:
      down: "{p:path}.mlp.experts.{e:int}.w2.weight"
    to: "{p}.mlp.experts.down_proj"
    ops: [stack(e)]
  - rename: "{p:path}.attn.{r:path}"
    to: "{p}.self_attn.{r}"
    unless: ["{p:path}.attn.keep.{r:path}"]
"""

CANONICAL_CSPEC = """\
spec mixtral "Mixtral experts, fused"
model_types mixtral, minimax
base_prefix model

rename {p:path}.block_sparse_moe.{rest:path} -> {p}.mlp.{rest}

convert gate = {p:path}.mlp.experts.{e:int}.w1.weight,
        up = {p:path}.mlp.experts.{e:int}.w3.weight
  -> {p}.mlp.experts.gate_up_proj = cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)

convert down = {p:path}.mlp.experts.{e:int}.w2.weight
  -> {p}.mlp.experts.down_proj ops [stack(e)]

rename {p:path}.attn.{r:path} -> {p}.self_attn.{r}
  unless {p:path}.attn.keep.{r:path}
"""


def test_messy_yaml_gives_the_canonical_yaml():
    assert format_text(MESSY_YAML, "m.yaml") == CANONICAL_YAML


def test_messy_cspec_gives_the_canonical_cspec():
    assert format_text(MESSY_CSPEC, "m.cspec") == CANONICAL_CSPEC


@pytest.mark.parametrize(
    ("text", "file", "to", "expected"),
    [
        (MESSY_YAML, "m.yaml", "cspec", CANONICAL_CSPEC),
        (MESSY_CSPEC, "m.cspec", "yaml", CANONICAL_YAML),
        (MESSY_YAML, "m.yml", "yaml", CANONICAL_YAML),
    ],
)
def test_translation_gives_the_other_canonical_text(text, file, to, expected):
    assert format_text(text, file, to=to) == expected


def test_translation_keeps_the_ir():
    a = parse_spec(MESSY_YAML, "m.yaml").model_dump()
    assert parse_spec(format_text(MESSY_YAML, "m.yaml", to="cspec"), "m.cspec").model_dump() == a
    assert parse_spec(MESSY_CSPEC, "m.cspec").model_dump() == a


def test_ops_that_yaml_would_split_at_a_comma_stay_quoted():
    text = 'spec: x\nrules:\n  - convert: {w: "{p:path}.w.{e:int}"}\n    to: "{p}.w"\n    ops: [stack(e), "cat(dim=0, equal=true)"]\n'
    out = format_text(text, "x.yaml")
    assert '    ops: [stack(e), "cat(dim=0, equal=true)"]\n' in out
    assert parse_spec(out, "x.yaml").model_dump() == parse_spec(text, "x.yaml").model_dump()


def test_unicode_stays_readable_and_strings_round_trip():
    text = 'spec: x\ndoc: "café \\\\ \\"q\\""\n'
    cspec = format_text(text, "x.yaml", to="cspec")
    assert cspec == 'spec x "café \\\\ \\"q\\""\n'
    assert (
        format_text(cspec, "x.cspec", to="yaml")
        == 'spec: x\ndoc: "café \\\\ \\"q\\""\nmodel_types: []\nrules: []\n'
    )


# ---- comments --------------------------------------------------------------------------------

COMMENTED_YAML = """\
# yaml-language-server: $schema=convspec.schema.json
# Mixtral, by hand.

spec: mixtral    # the name
doc: Mixtral experts, fused
model_types: [mixtral, minimax]
base_prefix: model
rules:
  # 1. move the MoE block
  - rename: "{p:path}.block_sparse_moe.{rest:path}"    # old name
    to: "{p}.mlp.{rest}"
  # 2. fuse the experts
  - convert:
      # w1 is the gate
      gate: "{p:path}.mlp.experts.{e:int}.w1.weight"
      up: "{p:path}.mlp.experts.{e:int}.w3.weight"  # w3 is up
    to:
      "{p}.mlp.experts.gate_up_proj": cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)  # gate first
  - convert:
      down: "{p:path}.mlp.experts.{e:int}.w2.weight"
    to: "{p}.mlp.experts.down_proj"
    ops: [stack(e)]   # one tensor per layer

# more rules to come
"""

COMMENTED_YAML_FORMATTED = """\
# yaml-language-server: $schema=convspec.schema.json
# Mixtral, by hand.
spec: mixtral  # the name
doc: "Mixtral experts, fused"
model_types: [mixtral, minimax]
base_prefix: model
rules:
  # 1. move the MoE block
  - rename: "{p:path}.block_sparse_moe.{rest:path}"  # old name
    to: "{p}.mlp.{rest}"
  # 2. fuse the experts
  - convert:
      # w1 is the gate
      gate: "{p:path}.mlp.experts.{e:int}.w1.weight"
      up: "{p:path}.mlp.experts.{e:int}.w3.weight"  # w3 is up
    to:
      "{p}.mlp.experts.gate_up_proj": "cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)"  # gate first
  - convert:
      down: "{p:path}.mlp.experts.{e:int}.w2.weight"
    to: "{p}.mlp.experts.down_proj"
    ops: [stack(e)]  # one tensor per layer
# more rules to come
"""

# The first input shares the `convert` line in .cspec, so the comment above it moves above the rule.
COMMENTED_CSPEC = """\
# yaml-language-server: $schema=convspec.schema.json
# Mixtral, by hand.
spec mixtral "Mixtral experts, fused"  # the name
model_types mixtral, minimax
base_prefix model

# 1. move the MoE block
rename {p:path}.block_sparse_moe.{rest:path} -> {p}.mlp.{rest}  # old name

# 2. fuse the experts
# w1 is the gate
convert gate = {p:path}.mlp.experts.{e:int}.w1.weight,
        up = {p:path}.mlp.experts.{e:int}.w3.weight  # w3 is up
  -> {p}.mlp.experts.gate_up_proj = cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)  # gate first

convert down = {p:path}.mlp.experts.{e:int}.w2.weight
  -> {p}.mlp.experts.down_proj ops [stack(e)]  # one tensor per layer

# more rules to come
"""

# Back in YAML: the two comments that had no line of their own in .cspec stay where .cspec put them.
COMMENTED_BACK_TO_YAML = """\
# yaml-language-server: $schema=convspec.schema.json
# Mixtral, by hand.
spec: mixtral  # the name
doc: "Mixtral experts, fused"
model_types: [mixtral, minimax]
base_prefix: model
rules:
  # 1. move the MoE block
  - rename: "{p:path}.block_sparse_moe.{rest:path}"  # old name
    to: "{p}.mlp.{rest}"
  # 2. fuse the experts
  # w1 is the gate
  - convert:
      gate: "{p:path}.mlp.experts.{e:int}.w1.weight"
      up: "{p:path}.mlp.experts.{e:int}.w3.weight"  # w3 is up
    to:
      "{p}.mlp.experts.gate_up_proj": "cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)"  # gate first
  - convert:
      down: "{p:path}.mlp.experts.{e:int}.w2.weight"
    to: "{p}.mlp.experts.down_proj"  # one tensor per layer
    ops: [stack(e)]
# more rules to come
"""


def test_yaml_comments_are_kept_in_place():
    assert format_text(COMMENTED_YAML, "c.yaml") == COMMENTED_YAML_FORMATTED


def test_yaml_comments_are_translated_to_cspec():
    assert format_text(COMMENTED_YAML, "c.yaml", to="cspec") == COMMENTED_CSPEC


def test_cspec_comments_are_kept_and_translated_back_to_yaml():
    assert format_text(COMMENTED_CSPEC, "c.cspec") == COMMENTED_CSPEC
    assert format_text(COMMENTED_CSPEC, "c.cspec", to="yaml") == COMMENTED_BACK_TO_YAML
    assert format_text(COMMENTED_BACK_TO_YAML, "c.yaml", to="cspec") == COMMENTED_CSPEC


def test_comments_are_attached_to_the_parts_they_describe():
    c = extract_comments(COMMENTED_YAML, "yaml")
    assert c.header == ["# yaml-language-server: $schema=convspec.schema.json", "# Mixtral, by hand."]
    assert c.slots[("spec",)] == Attached(trailing="# the name")
    assert c.slots[(0, "head")] == Attached(above=["# 1. move the MoE block"], trailing="# old name")
    assert c.slots[(1, "in", 0)] == Attached(above=["# w1 is the gate"])
    assert c.slots[(1, "out", 0)] == Attached(trailing="# gate first")
    assert c.slots[(2, "ops")] == Attached(trailing="# one tensor per layer")
    assert c.footer == ["# more rules to come"]
    d = extract_comments(COMMENTED_CSPEC, "cspec")
    assert d.slots[(1, "head")] == Attached(above=["# 2. fuse the experts", "# w1 is the gate"])
    assert d.slots[(1, "in", 1)] == Attached(trailing="# w3 is up")
    assert d.footer == ["# more rules to come"]


def test_a_hash_in_a_string_is_not_a_comment():
    yaml_text = (
        "spec: x\n"
        "doc: 'a # b'  # real\n"
        "rules:\n"
        "  - convert:\n"
        '      w: "{p:path}.w"\n'
        "    to:\n"
        '      "{p}.v": >-  # header\n'
        '        cast(w, dtype=float32, note="# c")\n'
    )
    out = format_text(yaml_text, "x.yaml")
    assert 'doc: "a # b"  # real\n' in out
    assert '      "{p}.v": "cast(w, dtype=float32, note=\\"# c\\")"  # header\n' in out
    assert extract_comments(out, "yaml").all() == ["# real", "# header"]
    cspec = format_text(yaml_text, "x.yaml", to="cspec")
    assert cspec.startswith('spec x "a # b"  # real\n')
    assert '  -> {p}.v = cast(w, dtype=float32, note="# c")  # header\n' in cspec


def test_a_comment_inside_a_yaml_expression_goes_above_it():
    text = (
        "spec: x\n"
        "rules:\n"
        "  - convert:\n"
        '      w: "{p:path}.w"\n'
        "    to:\n"
        '      "{p}.v": |-\n'
        "        cast(w,  # why float32\n"
        "             dtype=float32)\n"
    )
    assert format_text(text, "x.yaml").endswith(
        '    to:\n      # why float32\n      "{p}.v": "cast(w, dtype=float32)"\n'
    )


def test_comments_inside_a_multi_line_rule_move_above_its_line():
    text = """\
spec x
convert qkv = {p:path}.qkv  # fused
     -> {p}.q, {p}.k
        = split(qkv, dim=0, sizes=[
            # q is wider
            8,  # q
            4])  # k
"""
    assert format_text(text, "x.cspec") == (
        "spec x\n"
        "\n"
        "convert qkv = {p:path}.qkv  # fused\n"
        "  # q is wider\n"
        "  # k\n"
        "  -> {p}.q, {p}.k = split(qkv, dim=0, sizes=[8, 4])  # q\n"
    )


def test_comments_of_lines_the_other_syntax_lacks_go_to_the_next_line_or_the_rule():
    text = """\
spec: x
model_types: []  # none yet
rules:  # in order
  - include: other
    under: [model]  # the text model
    only: renames
  - convert:
      w: "{p:path}.w"
    let:  # intermediates
      v: "transpose(w, dim0=0, dim1=1)"
    to:  # outputs
      "{p}.v": v
"""
    assert format_text(text, "x.yaml", to="cspec") == (
        "spec x\n"
        "\n"
        "# none yet\n"
        "# in order\n"
        "include other under model only renames  # the text model\n"
        "\n"
        "convert w = {p:path}.w\n"
        "  # intermediates\n"
        "  let v = transpose(w, dim0=0, dim1=1)\n"
        "  # outputs\n"
        "  -> {p}.v = v\n"
    )


SAMPLES = [
    (MESSY_YAML, "m.yaml"),
    (MESSY_CSPEC, "m.cspec"),
    (COMMENTED_YAML, "c.yaml"),
    (COMMENTED_CSPEC, "c.cspec"),
]


@pytest.mark.parametrize(("text", "file"), SAMPLES, ids=[f for _, f in SAMPLES])
@pytest.mark.parametrize("to", [None, "yaml", "cspec"])
def test_fmt_is_idempotent(text, file, to):
    once = format_text(text, file, to=to)
    target = to or ("yaml" if file.endswith(".yaml") else "cspec")
    again = format_text(once, f"again.{target}")
    assert again == once


def _with_a_comment_on_each_line(text: str):
    lines = text.split("\n")[:-1]
    for i, line in enumerate(lines):
        indent = line[: len(line) - len(line.lstrip())]
        yield "\n".join([*lines[:i], f"{indent}# above {i}", *lines[i:]]) + "\n"
        if line.strip() and "#" not in line:
            yield "\n".join([*lines[:i], f"{line}  # after {i}", *lines[i + 1 :]]) + "\n"


@pytest.mark.parametrize(
    ("text", "file"), [(CANONICAL_YAML, "x.yaml"), (CANONICAL_CSPEC, "x.cspec")], ids=["yaml", "cspec"]
)
def test_no_comment_is_ever_lost(text, file):
    syntax = "yaml" if file.endswith(".yaml") else "cspec"
    other = "cspec" if syntax == "yaml" else "yaml"
    tried = 0
    for variant in _with_a_comment_on_each_line(text):
        try:
            ir = parse_spec(variant, file).model_dump()
        except SpecError:
            continue  # a comment inside a YAML block scalar, say
        tried += 1
        n = _n_comments(variant, syntax)
        out = format_text(variant, file)
        assert _n_comments(out, syntax) == n and format_text(out, file) == out, variant
        moved = format_text(variant, file, to=other)
        assert _n_comments(moved, other) == n, variant
        back = format_text(moved, f"x.{other}", to=syntax)
        assert _n_comments(back, syntax) == n and parse_spec(back, file).model_dump() == ir, variant
        assert format_text(back, file) == back, variant
    assert tried > 20


# ---- the built-in specs ----------------------------------------------------------------------


@pytest.mark.parametrize("path", BUILTIN, ids=lambda p: p.name)
def test_builtin_spec_is_canonical(path):
    text, out = _read(path), _fmt(path)
    if path.name in HAND_LAID_OUT:  # rewritten, but to the same spec with the same comments
        syntax = "yaml" if path.suffix == ".yaml" else "cspec"
        assert parse_spec(out, str(path)).model_dump() == parse_spec(text, str(path)).model_dump()
        assert extract_comments(out, syntax).all() == extract_comments(text, syntax).all()
        assert format_text(out, str(path)) == out
    else:
        assert out == text


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_builtin_spec_round_trips_through_cspec(path):
    cspec = format_text(_read(path), str(path), to="cspec")
    back = format_text(cspec, path.stem + ".cspec", to="yaml")
    assert back == _fmt(path)
    assert parse_spec(back, str(path)).model_dump() == parse_spec(_read(path), str(path)).model_dump()


# ---- errors ----------------------------------------------------------------------------------


def test_a_bad_yaml_spec_raises_with_its_location():
    text = 'spec: x\nrules:\n  - rename: "{p:path}.w"\n    too: "{p}.v"\n'
    with pytest.raises(SpecValidationError) as exc:
        format_text(text, "bad.yaml")
    assert str(exc.value).startswith("bad.yaml:4:5: error: unknown key 'too'")


def test_a_bad_cspec_raises_with_its_location():
    with pytest.raises(SpecSyntaxError) as exc:
        format_text("spec x\nconvert w {p:path}.w -> {p}.v = transpose(w)\n", "bad.cspec")
    assert str(exc.value).startswith("bad.cspec:2:11: error: unexpected '{p:path}.w'")


@pytest.mark.parametrize(
    ("text", "file", "to", "message"),
    [
        (
            "spec x\nconvert a = {p}.a -> {p}.b ops [stack(e)] -> {p}.c = a\n",
            "x.cspec",
            "yaml",
            "has no YAML form",
        ),
        ('spec: x\ndoc: "two\\nlines"\n', "x.yaml", "cspec", "line break"),
        ('spec: x\nmodel_types: ["a b"]\n', "x.yaml", "cspec", "cannot be written in the cspec syntax"),
    ],
)
def test_a_spec_the_other_syntax_cannot_write_is_refused(text, file, to, message):
    with pytest.raises(SpecValidationError, match=message):
        format_text(text, file, to=to)


# ---- the command line ------------------------------------------------------------------------


@pytest.fixture
def messy(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(MESSY_YAML)
    return path


def test_cli_rewrites_in_place(messy, capsys):
    assert main(["fmt", str(messy)]) == 0
    assert messy.read_text() == CANONICAL_YAML
    assert "1 file(s) reformatted" in capsys.readouterr().err
    assert main(["fmt", str(messy)]) == 0
    assert "0 file(s) reformatted, 1 unchanged" in capsys.readouterr().err


def test_cli_check_exits_1_and_changes_nothing(messy, tmp_path, capsys):
    assert main(["fmt", "--check", str(messy)]) == 1
    assert messy.read_text() == MESSY_YAML
    assert f"would reformat {messy}" in capsys.readouterr().out
    clean = tmp_path / "clean.cspec"
    clean.write_text(CANONICAL_CSPEC)
    assert main(["fmt", "--check", str(clean)]) == 0


def test_cli_translates_to_stdout(messy, capsys):
    assert main(["fmt", str(messy), "--to", "cspec"]) == 0
    assert capsys.readouterr().out == CANONICAL_CSPEC
    assert messy.read_text() == MESSY_YAML


def test_cli_writes_the_output_file(messy, tmp_path):
    out = tmp_path / "m.cspec"
    assert main(["fmt", str(messy), "--to", "cspec", "-o", str(out)]) == 0
    assert out.read_text() == CANONICAL_CSPEC
    assert messy.read_text() == MESSY_YAML


def test_cli_json_reports_each_file(messy, tmp_path, capsys):
    clean = tmp_path / "clean.yaml"
    clean.write_text(CANONICAL_YAML)
    assert main(["fmt", "--check", "--json", str(messy), str(clean)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report == [
        {"file": str(messy), "output": str(messy), "changed": True},
        {"file": str(clean), "output": str(clean), "changed": False},
    ]


def test_cli_bad_spec_exits_2_with_its_location(tmp_path, capsys):
    bad = tmp_path / "bad.cspec"
    bad.write_text("spec x\nconvert w {p:path}.w -> {p}.v = transpose(w)\n")
    assert main(["fmt", str(bad)]) == 2
    assert f"{bad}:2:11: error" in capsys.readouterr().err
    assert bad.read_text() == "spec x\nconvert w {p:path}.w -> {p}.v = transpose(w)\n"
