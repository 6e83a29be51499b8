"""`convspec fmt`: canonical layout (what emit.py writes), translation between YAML and .cspec, and
comments kept through both. Every built-in spec, generated or hand-written, is canonical and survives
the round trip through the other syntax unchanged; the docs quote them exactly."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import convspec
from convspec.cli import main
from convspec.errors import SpecError, SpecSyntaxError, SpecValidationError
from convspec.spec import parse_spec
from convspec.spec.comments import Attached, extract_comments
from convspec.spec.emit import WIDTH, _plain
from convspec.spec.format import format_text

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
BUILTIN = sorted(SPECS.glob("*.yaml")) + sorted(SPECS.glob("*.cspec"))
SCHEMA_LINE = "# yaml-language-server: $schema=convspec.schema.json\n"


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
doc: Mixtral experts, fused
model_types: [mixtral, minimax]
base_prefix: model
rules:
  - rename: "{p:path}.block_sparse_moe.{rest:path}"
    to: "{p}.mlp.{rest}"
  - convert:
      gate: "{p:path}.mlp.experts.{e:int}.w1.weight"
      up: "{p:path}.mlp.experts.{e:int}.w3.weight"
    to:
      "{p}.mlp.experts.gate_up_proj": cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)
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
        up   = {p:path}.mlp.experts.{e:int}.w3.weight
     -> {p}.mlp.experts.gate_up_proj
        = cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)

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
    # plain in YAML: a plain scalar has no escapes, so `\\` and `"` stand for themselves
    assert (
        format_text(cspec, "x.cspec", to="yaml") == 'spec: x\ndoc: café \\ "q"\nmodel_types: []\nrules: []\n'
    )


# ---- long lines, plain YAML, paragraphs ---------------------------------------------------------

LONG_CSPEC = """\
spec x
convert a_very_long_input_name = {p:path}.some.quite.long.template.name.a, b = {p:path}.b
  let first, second = split(cat(transpose(a_very_long_input_name, dim0=0, dim1=1), b, dim=0, sizes=[config.text_config.hidden_size, config.text_config.intermediate_size]), dim=0, sizes=[config.a, config.b])
  -> {p}.out.first_value_with_a_long_name, {p}.out.second_value_with_a_long_name, {p}.out.third = split(permute_rope(cat(first, second, dim=0, equal=true), heads=config.num_attention_heads), dim=0, sizes=[config.a, config.b, config.c])
convert w = {p:path}.w -> {p}.w0, {p}.w1, {p}.w2, {p}.w3 ops [transpose(dim0=0, dim1=1), reshape(shape=[16, -1], from_shape=[16, 3, 2, 4, 4]), chunk(dim=0, n=4), cast(dtype=bfloat16, from=float32)]
"""

# Broken at argument boundaries, 4 in from the line that opens them; a broken argument ends its line.
LONG_CSPEC_CANONICAL = """\
spec x

convert a_very_long_input_name = {p:path}.some.quite.long.template.name.a,
        b                      = {p:path}.b
    let first, second
        = split(
            cat(transpose(a_very_long_input_name, dim0=0, dim1=1), b, dim=0,
                sizes=[config.text_config.hidden_size, config.text_config.intermediate_size]),
            dim=0, sizes=[config.a, config.b])
     -> {p}.out.first_value_with_a_long_name, {p}.out.second_value_with_a_long_name, {p}.out.third
        = split(
            permute_rope(cat(first, second, dim=0, equal=true), heads=config.num_attention_heads),
            dim=0, sizes=[config.a, config.b, config.c])

convert w = {p:path}.w
     -> {p}.w0, {p}.w1, {p}.w2, {p}.w3
        ops [transpose(dim0=0, dim1=1), reshape(shape=[16, -1], from_shape=[16, 3, 2, 4, 4]),
            chunk(dim=0, n=4), cast(dtype=bfloat16, from=float32)]
"""

# The same in YAML: folded blocks (`>-`) 2 in, as YAML indents; lists filled.
LONG_YAML_CANONICAL = """\
spec: x
model_types: []
rules:
  - convert:
      a_very_long_input_name: "{p:path}.some.quite.long.template.name.a"
      b: "{p:path}.b"
    let:
      first, second: >-
        split(
          cat(transpose(a_very_long_input_name, dim0=0, dim1=1), b, dim=0,
            sizes=[config.text_config.hidden_size, config.text_config.intermediate_size]),
          dim=0, sizes=[config.a, config.b])
    to:
      "{p}.out.first_value_with_a_long_name, {p}.out.second_value_with_a_long_name, {p}.out.third": >-
        split(permute_rope(cat(first, second, dim=0, equal=true), heads=config.num_attention_heads),
          dim=0, sizes=[config.a, config.b, config.c])
  - convert:
      w: "{p:path}.w"
    to: ["{p}.w0", "{p}.w1", "{p}.w2", "{p}.w3"]
    ops: ["transpose(dim0=0, dim1=1)", "reshape(shape=[16, -1], from_shape=[16, 3, 2, 4, 4])",
      "chunk(dim=0, n=4)", "cast(dtype=bfloat16, from=float32)"]
"""


@pytest.mark.parametrize(
    ("to", "expected"),
    [("cspec", LONG_CSPEC_CANONICAL), ("yaml", LONG_YAML_CANONICAL)],
    ids=["cspec", "yaml"],
)
def test_long_expressions_break_at_argument_boundaries(to, expected):
    out = format_text(LONG_CSPEC, "x.cspec", to=to)
    assert out == expected
    assert parse_spec(out, f"x.{to}").model_dump() == parse_spec(LONG_CSPEC, "x.cspec").model_dump()
    # every line fits but the YAML key of three targets, which has no place to break
    assert [line for line in out.splitlines() if len(line) > WIDTH] == (
        [] if to == "cspec" else [line for line in out.splitlines() if line.endswith('.third": >-')]
    )


@pytest.mark.parametrize(
    ("old", "new", "at", "error"),
    [
        ("transpose(a_very", "transpos(a_very", "transpos(", None),  # a folded line, 2 in
        ("hidden_size, config", "hidden_size,, config", ", config", "unexpected ','"),  # 4 in
        ("sizes=[config.a, config.b, config.c]", "sizes=[config.a, config.b config.c]", "config.c", None),
    ],
)
def test_errors_inside_a_folded_expression_point_at_their_line_and_column(old, new, at, error):
    folded = format_text(LONG_CSPEC, "x.cspec", to="yaml")
    assert folded.count(old) == 1
    bad = folded.replace(old, new)
    line = next(n for n, text in enumerate(bad.splitlines(), 1) if new in text)
    col = bad.splitlines()[line - 1].index(new) + new.index(at) + 1
    assert bad.splitlines()[line - 1].startswith("          ")  # a continuation line of a block
    with pytest.raises(SpecError) as exc:
        convspec.compile(parse_spec(bad, "x.yaml"))
    assert str(exc.value).startswith(f"x.yaml:{line}:{col}: error: {error or ''}")
    assert str(exc.value).splitlines()[1].strip() == bad.splitlines()[line - 1].strip()


_YAML_TEXT = st.text(
    alphabet=st.sampled_from(list("aZ09_. -?:,[]{}#&*!|>'\"%@`~=<+\\\té")), max_size=8
) | st.sampled_from(["true", "No", "ON", "y", "~", "null", "0x1F", "1e3", ".inf", "<<", "=", "2001-12-14"])


@given(_YAML_TEXT)
def test_a_plain_scalar_reads_back_as_the_same_string(text):
    if _plain(text):
        assert yaml.safe_load(f"k: {text}\n") == {"k": text}
        assert yaml.safe_load(f"{text}: v\n") == {text: "v"}
    if _plain(text, flow=True):
        assert yaml.safe_load(f"k: [{text}, x]\n") == {"k": [text, "x"]}


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("Mixtral per-expert w1/w2/w3 checkpoints <-> fused gate_up_proj / down_proj experts", True),
        ("cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)", True),
        ("model.language_model.{rest}", True),
        ("q, k, v", True),
        ("{p}.mlp.experts.gate_up_proj", False),  # `{` opens a mapping
        ("-x", False),
        ("a: b", False),
        ("a #b", False),
        ("a:", False),
        ("yes", False),
        ("Off", False),
        ("~", False),
        ("12", False),
        ("1e3", False),  # a float in YAML 1.2
        ("", False),
        (" a", False),
        ("a\tb", False),
    ],
)
def test_plain_only_where_yaml_reads_a_string(text, plain):
    assert _plain(text) is plain
    if plain:
        assert yaml.safe_load(f"k: {text}\n") == {"k": text}


_ATOM = (
    st.integers(0, 10**6).map(str)
    | st.sampled_from(["w", "e", "true", "bfloat16", "config.text_config.num_attention_heads"])
    | st.text(st.sampled_from(list("ab #:-[]{}',\"\\é")), max_size=10).map(
        lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'
    )
)
_NAMES = st.sampled_from(["cat", "split", "a_rather_long_op_name", "f"])


def _call(args: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    kwargs = st.lists(st.tuples(st.sampled_from(["dim", "sizes", "heads_of_the_model"]), args), max_size=3)
    return st.builds(
        lambda op, pos, kw: f"{op}({', '.join(pos + [f'{k}={v}' for k, v in dict(kw).items()])})",
        _NAMES,
        st.lists(args, max_size=4),
        kwargs,
    )


_EXPR = st.recursive(
    _ATOM,
    lambda inner: (
        _call(inner)
        | st.lists(inner, max_size=5).map(lambda xs: "[" + ", ".join(xs) + "]")
        | st.tuples(inner, st.sampled_from(["??", "+", "*", "//"]), inner).map(" ".join)
    ),
    max_leaves=30,
)


@given(_EXPR, _EXPR)
def test_any_expression_survives_the_layout_in_both_syntaxes(let, out):
    """format_text parses what it writes and refuses a different IR, so writing is the check."""
    text = f"spec x\nconvert w = {{p:path}}.w\n  let v = {let}\n  -> {{p}}.v = {out}\n"
    for to in ("yaml", "cspec"):
        once = format_text(text, "x.cspec", to=to)
        assert format_text(once, f"x.{to}") == once
        assert format_text(once, f"x.{to}", to="cspec" if to == "yaml" else "yaml")


def test_a_yaml_key_with_commas_and_braces_is_plain_outside_a_list_only():
    out = format_text(
        "spec x\nrename a.{r:path} -> b.{r}\n  unless a.keep.{r:path}, a.x\n", "x.cspec", to="yaml"
    )
    assert "  - rename: a.{r:path}\n    to: b.{r}\n" in out
    assert '    unless: ["a.keep.{r:path}", a.x]\n' in out


def test_long_lists_fill_their_lines_and_a_long_doc_folds():
    types = [f"model_type_{i}" for i in range(30)]
    doc = "A doc of many words " * 8
    cspec = f'spec x "{doc.strip()}"\nmodel_types {", ".join(types)}\n'
    yaml_text = format_text(cspec, "x.cspec", to="yaml")
    assert yaml_text.startswith("spec: x\ndoc: >-\n  A doc of many words A doc")
    assert "model_types: [model_type_0, model_type_1," in yaml_text
    assert "\n  model_type_" in yaml_text and yaml_text.count("model_types") == 1
    assert max(len(line) for line in yaml_text.splitlines()) <= WIDTH
    assert yaml.safe_load(yaml_text)["doc"] == doc.strip()
    again = format_text(yaml_text, "x.yaml", to="cspec")
    assert again.startswith(f'spec x\ndoc "{doc.strip()}"\nmodel_types model_type_0, model_type_1,')
    assert "\n    model_type_" in again
    assert format_text(again, "x.cspec") == again
    assert parse_spec(again, "x.cspec").model_dump() == parse_spec(cspec, "x.cspec").model_dump()


def test_a_long_rename_puts_its_arrow_under_the_convert_column():
    src = "{p:path}.attention.attention.relative_position_bias.relative_position_bias_table.{rest:path?}"
    out = format_text(f"spec x\nrename {src} -> {{p}}.table.{{rest}}\n", "x.cspec")
    assert out == f"spec x\n\nrename {src}\n     -> {{p}}.table.{{rest}}\n"


def test_one_line_rules_stand_together_and_a_comment_starts_a_paragraph():
    text = (
        "spec x\nrename a.{r:path} -> b.{r}\n\n\ndrop c.{r:path}\n# the vision tower\n"
        "alias v.{r:path} -> {r}\nconvert w = {p:path}.w -> {p}.v = transpose(w)\ninclude y\n"
    )
    assert format_text(text, "x.cspec") == (
        "spec x\n\nrename a.{r:path} -> b.{r}\ndrop c.{r:path}\n\n# the vision tower\nalias v.{r:path} -> {r}\n"
        "\nconvert w = {p:path}.w\n     -> {p}.v = transpose(w)\n\ninclude y\n"
    )


def test_a_trailing_comment_of_a_folded_expression_stays_on_its_header_line():
    text = LONG_YAML_CANONICAL.replace('.third": >-\n', '.third": >-  # three at once\n')
    assert extract_comments(text, "yaml").slots == {(0, "out", 0): Attached(trailing="# three at once")}
    out = format_text(text, "x.yaml")
    assert out == text
    cspec = format_text(text, "x.yaml", to="cspec")
    assert "            dim=0, sizes=[config.a, config.b, config.c])  # three at once\n" in cspec
    assert format_text(cspec, "x.cspec", to="yaml") == text


# ---- the docs quote the built-in specs -------------------------------------------------------


def _fenced(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^```[a-z]*\n(.*?)^```$", text, re.M | re.S)]


def test_readme_quotes_the_builtin_mixtral_spec_exactly():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## A spec\n", 1)[1].split("\n## ", 1)[0]
    assert _fenced(section) == [_read(SPECS / "mixtral.yaml"), _read(SPECS / "mixtral.cspec")]


def test_language_md_quotes_the_builtin_specs_exactly():
    blocks = _fenced((ROOT / "docs" / "language.md").read_text(encoding="utf-8"))
    for name in ("mixtral.yaml", "mixtral.cspec", "split_qkv.cspec"):
        assert _read(SPECS / name) in blocks, name
    quoted = [b for b in blocks if re.match(r"(# yaml-language-server.*\n)?spec:? (mixtral|split_qkv)\b", b)]
    assert len(quoted) == 3


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
doc: Mixtral experts, fused
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
      "{p}.mlp.experts.gate_up_proj": cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)  # gate first
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
        up   = {p:path}.mlp.experts.{e:int}.w3.weight  # w3 is up
     -> {p}.mlp.experts.gate_up_proj
        = cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)  # gate first

convert down = {p:path}.mlp.experts.{e:int}.w2.weight
     -> {p}.mlp.experts.down_proj ops [stack(e)]  # one tensor per layer

# more rules to come
"""

# Back in YAML: the two comments that had no line of their own in .cspec stay where .cspec put them.
COMMENTED_BACK_TO_YAML = """\
# yaml-language-server: $schema=convspec.schema.json
# Mixtral, by hand.
spec: mixtral  # the name
doc: Mixtral experts, fused
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
      "{p}.mlp.experts.gate_up_proj": cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)  # gate first
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
    assert '      "{p}.v": cast(w, dtype=float32, note="# c")  # header\n' in out
    assert extract_comments(out, "yaml").all() == ["# real", "# header"]
    cspec = format_text(yaml_text, "x.yaml", to="cspec")
    assert cspec.startswith('spec x "a # b"  # real\n')
    assert '     -> {p}.v = cast(w, dtype=float32, note="# c")  # header\n' in cspec


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
        '    to:\n      # why float32\n      "{p}.v": cast(w, dtype=float32)\n'
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
        "     # q is wider\n"
        "     # k\n"
        "     -> {p}.q, {p}.k = split(qkv, dim=0, sizes=[8, 4])  # q\n"
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
        "    # intermediates\n"
        "    let v = transpose(w, dim0=0, dim1=1)\n"
        "     # outputs\n"
        "     -> {p}.v = v\n"
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
    ("text", "file"),
    [
        (CANONICAL_YAML, "x.yaml"),
        (CANONICAL_CSPEC, "x.cspec"),
        (LONG_YAML_CANONICAL, "x.yaml"),
        (LONG_CSPEC_CANONICAL, "x.cspec"),
    ],
    ids=["yaml", "cspec", "long-yaml", "long-cspec"],
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
    assert _fmt(path) == _read(path)


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_builtin_yaml_names_the_schema_first(path):
    assert _read(path).startswith(SCHEMA_LINE)


@pytest.mark.parametrize("path", BUILTIN, ids=lambda p: p.name)
def test_builtin_spec_round_trips_through_the_other_syntax(path):
    syntax = "yaml" if path.suffix == ".yaml" else "cspec"
    other = "cspec" if syntax == "yaml" else "yaml"
    moved = format_text(_read(path), str(path), to=other)
    back = format_text(moved, f"{path.stem}.{other}", to=syntax)
    assert back == _read(path)
    assert parse_spec(back, str(path)).model_dump() == parse_spec(_read(path), str(path)).model_dump()
    assert extract_comments(moved, other).all() == extract_comments(_read(path), syntax).all()


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
