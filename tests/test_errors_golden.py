"""Golden error messages: each bad spec renders one exact message with location, caret and hint.

Every expected string below was read and judged as a message a person can act on; the file
path is written as FILE (the tests write each spec to a temporary file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import convspec


@dataclass(frozen=True)
class Case:
    name: str
    suffix: str
    text: str
    error: type[convspec.ConvspecError]
    expected: str
    config: dict | None = None


CASES = [
    Case(
        "dsl_syntax",
        ".cspec",
        "spec bad\nrename {p:path}.a => {p}.b\n",
        convspec.SpecSyntaxError,
        "FILE:2:19: error: unexpected '=>' in spec\n"
        "    rename {p:path}.a => {p}.b\n"
        "                      ^\n"
        "  hint: expected '->'\n",
    ),
    Case(
        "dsl_eof",
        ".cspec",
        "spec bad\nconvert x = {p:path}.x\n",
        convspec.SpecSyntaxError,
        "FILE:2:23: error: spec ends too early\n"
        "    convert x = {p:path}.x\n"
        "                          ^\n"
        "  hint: expected ',', '->', 'let'\n",
    ),
    Case(
        "dsl_syntax2",
        ".cspec",
        "spec bad\nconvert x = {p:path}.w\n     -> {p}.y = stack(x, over=\n",
        convspec.SpecSyntaxError,
        "FILE:3:31: error: spec ends too early\n"
        "         -> {p}.y = stack(x, over=\n"
        "                                  ^\n"
        "  hint: expected '(', '-', '[', a \"quoted string\", a name, a number\n",
    ),
    Case(
        "yaml_syntax",
        ".yaml",
        'spec: bad\nrules:\n  - rename: "{p:path}.a"\n     to: "{p}.b"\n',
        convspec.SpecSyntaxError,
        "FILE:4:6: error: invalid YAML: expected <block end>, but found '<block mapping start>'\n"
        '         to: "{p}.b"\n'
        "         ^\n"
        "  hint: check the indentation, and quote values that contain ': ', '{' or '#'\n",
    ),
    Case(
        "yaml_expr_syntax",
        ".yaml",
        "spec: bad\n"
        "rules:\n"
        "  - convert:\n"
        '      x: "{p:path}.x.{e:int}"\n'
        "    to:\n"
        '      "{p}.y": stack(x over=e)\n',
        convspec.SpecSyntaxError,
        "FILE:6:24: error: unexpected 'over' in expression\n"
        '          "{p}.y": stack(x over=e)\n'
        "                           ^\n"
        "  hint: expected '%', '(', ')', '*', '+', ',', '-', '.', ...\n",
    ),
    Case(
        "capture_type",
        ".cspec",
        "spec bad\nrename {p:paht}.a -> {p}.b\n",
        convspec.SpecValidationError,
        "FILE:2:11: error: unknown capture type 'paht' for {p}\n"
        "    rename {p:paht}.a -> {p}.b\n"
        "              ^\n"
        "  hint: a capture type is one of: path (dot-separated segments), path? (zero or more segments), "
        "int (a decimal index), seg (one segment fragment)\n",
    ),
    Case(
        "touching",
        ".yaml",
        'spec: bad\nrules:\n  - drop: "{a}{b:int}.weight"\n',
        convspec.SpecValidationError,
        "FILE:3:16: error: captures {a} and {b} touch: nothing tells where one ends\n"
        '      - drop: "{a}{b:int}.weight"\n'
        "                   ^\n"
        "  hint: separate captures with literal text such as '.'\n",
    ),
    Case(
        "path_mid",
        ".cspec",
        "spec bad\ndrop {p:path}x.a\n",
        convspec.SpecValidationError,
        "FILE:2:7: error: path capture {p:path} must stand for whole segments\n"
        "    drop {p:path}x.a\n"
        "          ^\n"
        "  hint: put it at the start or end of the key, or between dots: '{p:path}.mlp.weight'\n",
    ),
    Case(
        "dup_key",
        ".yaml",
        'spec: bad\nrules:\n  - rename: "{p:path}.a"\n    to: "{p}.b"\n    to: "{p}.c"\n',
        convspec.SpecValidationError,
        "FILE:5:5: error: key 'to' appears twice in a rename rule\n"
        '        to: "{p}.c"\n'
        "        ^\n"
        "  hint: first given at line 4\n",
    ),
    Case(
        "unknown_key",
        ".yaml",
        'spec: bad\nrules:\n  - rename: "{p:path}.a"\n    too: "{p}.b"\n',
        convspec.SpecValidationError,
        "FILE:4:5: error: unknown key 'too' in a rename rule\n"
        '        too: "{p}.b"\n'
        "        ^\n"
        "  hint: allowed keys: rename, to, unless\n",
    ),
    Case(
        "unknown_top",
        ".yaml",
        'spec: bad\nrule:\n  - drop: "{p:path}.a"\n',
        convspec.SpecValidationError,
        "FILE:2:1: error: unknown key 'rule' in the spec\n"
        "    rule:\n"
        "    ^\n"
        "  hint: allowed keys: spec, doc, model_types, base_prefix, quantization, rules\n",
    ),
    Case(
        "yaml_not_string",
        ".yaml",
        "spec: bad\nrules:\n  - drop: 12\n",
        convspec.SpecValidationError,
        "FILE:3:11: error: a drop template must be a string, got '12'\n"
        "      - drop: 12\n"
        "              ^\n"
        '  hint: quote it: "..."\n',
    ),
    Case(
        "unknown_op",
        ".cspec",
        "spec bad\nconvert x = {p:path}.x.{e:int}\n     -> {p}.y = stak(x, over=e)\n",
        convspec.CompileError,
        "FILE:3:17: error: rule 1 (convert): unknown op 'stak'\n"
        "         -> {p}.y = stak(x, over=e)\n"
        "                    ^\n"
        "  hint: did you mean 'stack'? ops: add, block_diag, cast, cat, chunk, deinterleave, dequant_fp8, dequant_fp8_tensor, dequant_ggml, dequant_mxfp4, flatten, interleave, log_neg, neg_exp, no_low_rank, permute, permute_rope, quantize_ggml, regroup_heads, reshape, same, share, split, squeeze, stack, transpose, unblock_diag, unflatten, unpermute_rope, unsqueeze, unstack\n",
    ),
    Case(
        "arity",
        ".cspec",
        "spec bad\nconvert x = {p:path}.x\n     -> {p}.y = cat(x, dim=0)\n",
        convspec.CompileError,
        "FILE:3:17: error: rule 1 (convert): cat takes at least 2 tensor input(s), got 1\n"
        "         -> {p}.y = cat(x, dim=0)\n"
        "                    ^\n",
    ),
    Case(
        "unknown_param",
        ".cspec",
        "spec bad\nconvert x = {p:path}.x.{e:int}\n     -> {p}.y = stack(x, ovr=e)\n",
        convspec.CompileError,
        "FILE:3:26: error: rule 1 (convert): stack has no parameter 'ovr'\n"
        "         -> {p}.y = stack(x, ovr=e)\n"
        "                             ^\n"
        "  hint: did you mean 'over'? parameters: over, dim, parts\n",
    ),
    Case(
        "bad_param_type",
        ".yaml",
        "spec: bad\n"
        "rules:\n"
        "  - convert:\n"
        '      x: "{p:path}.x"\n'
        "    to:\n"
        '      "{p}.y": transpose(x, dim0="a")\n',
        convspec.CompileError,
        "FILE:6:34: error: rule 1 (convert): parameter dim0 of transpose must be an integer, got 'a'\n"
        '          "{p}.y": transpose(x, dim0="a")\n'
        "                                     ^\n",
    ),
    Case(
        "unknown_dtype",
        ".cspec",
        "spec bad\nconvert x = {p:path}.x\n     -> {p}.y = cast(x, dtype=bfloat61, from=float32)\n",
        convspec.CompileError,
        "FILE:3:31: error: rule 1 (convert): unknown dtype 'bfloat61' for cast\n"
        "         -> {p}.y = cast(x, dtype=bfloat61, from=float32)\n"
        "                                  ^\n"
        "  hint: did you mean 'bfloat16'? dtypes: float64, float32, float16, bfloat16, float8_e4m3fn, float8_e5m2, float8_e8m0fnu, int64, int32, int16, int8, uint8, bool\n",
    ),
    Case(
        "chunk_folded",
        ".yaml",
        "spec: bad\n"
        "rules:\n"
        "  - convert:\n"
        '      x: "{p:path}.x"\n'
        "    to:\n"
        '      "{p}.a, {p}.b": >-\n'
        "        chunk(x,\n"
        "          dimm=0)\n",
        convspec.CompileError,
        "FILE:8:11: error: rule 1 (convert): chunk has no parameter 'dimm'\n"
        "              dimm=0)\n"
        "              ^\n"
        "  hint: did you mean 'dim'? parameters: n, dim\n",
    ),
    Case(
        "target_not_bound",
        ".cspec",
        "spec bad\n"
        "convert a = {p:path}.a.{k}, b = {p:path}.b\n"
        "     -> {p}.d.{k} = transpose(b)\n"
        "     -> {p}.c.{k} = transpose(a)\n",
        convspec.CompileError,
        "FILE:3:9: error: rule 1 (convert): capture {k} in target {p}.d.{k} is not bound: it is not bound by every input\n"
        "         -> {p}.d.{k} = transpose(b)\n"
        "            ^\n"
        "  hint: use only captures that every input binds\n",
    ),
    Case(
        "not_reduced",
        ".yaml",
        "spec: bad\n"
        "rules:\n"
        "  - convert:\n"
        '      x: "{p:path}.x.{e:int}.w"\n'
        '    to: "{p}.y"\n'
        "    ops: [transpose()]\n",
        convspec.CompileError,
        "FILE:5:10: error: rule 1 (convert): capture {e} is present in the inputs and absent from target {p}.y, and no op reduces it\n"
        '        to: "{p}.y"\n'
        "             ^\n"
        "  hint: reduce it with stack(x, over=e), or keep {e} in the target\n",
    ),
    Case(
        "stack_non_int",
        ".cspec",
        "spec bad\nconvert x = {p:path}.experts.{e}.w\n     -> {p}.w = stack(x, over=e)\n",
        convspec.CompileError,
        "FILE:3:17: error: rule 1 (convert): stack over {e} needs an int capture ({e:int}) to order its members\n"
        "         -> {p}.w = stack(x, over=e)\n"
        "                    ^\n"
        "  hint: declare it as {e:int} in the input templates\n",
    ),
    Case(
        "mixes",
        ".cspec",
        "spec bad\nconvert a = {p:path}.a.{k}, b = {p:path}.b\n     -> {p}.c.{k} = cat(a, b)\n",
        convspec.CompileError,
        "FILE:3:21: error: rule 1 (convert): cat mixes collections: a over {k}, b over {nothing}\n"
        "         -> {p}.c.{k} = cat(a, b)\n"
        "                        ^\n"
        "  hint: stack each input over the same captures first\n",
    ),
    Case(
        "unstack_bound",
        ".cspec",
        "spec bad\nconvert a = {p:path}.a.{e:int}\n     -> {p}.b.{e} = unstack(a, over=e)\n",
        convspec.CompileError,
        "FILE:3:21: error: rule 1 (convert): unstack over {e}, which is already bound\n"
        "         -> {p}.b.{e} = unstack(a, over=e)\n"
        "                        ^\n",
    ),
    Case(
        "value_unused",
        ".cspec",
        "spec bad\n"
        "convert a = {p:path}.a\n"
        "  let q, k = split(a, sizes=[2, 2])\n"
        "     -> {p}.q = transpose(q)\n",
        convspec.CompileError,
        "FILE:3:14: error: rule 1 (convert): a value of split is never used (it would be lost)\n"
        "      let q, k = split(a, sizes=[2, 2])\n"
        "                 ^\n",
    ),
    Case(
        "rename_drops",
        ".cspec",
        "spec bad\nrename {p:path}.layers.{i:int}.w -> {p}.w\n",
        convspec.CompileError,
        "FILE:2:37: error: rename drops capture {i}: different keys would get the same name\n"
        "    rename {p:path}.layers.{i:int}.w -> {p}.w\n"
        "                                        ^\n"
        "  hint: use {i} in the target\n",
    ),
    Case(
        "rename_unbound",
        ".cspec",
        "spec bad\nrename {p:path}.a -> {p}.{q}.b\n",
        convspec.CompileError,
        "FILE:2:22: error: capture {q} in the rename target is not bound by its source\n"
        "    rename {p:path}.a -> {p}.{q}.b\n"
        "                         ^\n"
        "  hint: bound captures: p\n",
    ),
    Case(
        "input_unused",
        ".cspec",
        "spec bad\nconvert a = {p:path}.a, b = {p:path}.b\n     -> {p}.c = transpose(a)\n",
        convspec.CompileError,
        "FILE:2:25: error: rule 1 (convert): input 'b' is never used\n"
        "    convert a = {p:path}.a, b = {p:path}.b\n"
        "                            ^\n"
        "  hint: use it in an output, or remove it (a drop rule discards keys)\n",
    ),
    Case(
        "overlap",
        ".yaml",
        "spec: bad\n"
        "rules:\n"
        "  - convert:\n"
        '      x: "{p:path}.w1.weight"\n'
        '    to: "{p}.a"\n'
        "    ops: [transpose()]\n"
        "  - convert:\n"
        '      y: "model.{q:path}.weight"\n'
        '    to: "{q}.b"\n'
        "    ops: [transpose()]\n",
        convspec.CompileError,
        "FILE:7:5: error: rules 1 and 2 can both claim the key 'model.w1.weight' ({p:path}.w1.weight and model.{q:path}.weight)\n"
        "      - convert:\n"
        "        ^\n"
        "  hint: at most one convert may claim a key: make the templates disjoint\n",
    ),
    Case(
        "same_rule_overlap",
        ".cspec",
        "spec bad\nconvert a = {p:path}.w, b = {p:path}.x.w\n     -> {p}.c = cat(a, b, equal=true)\n",
        convspec.CompileError,
        "FILE:2:1: error: rule 1 (convert): inputs a and b can both match the key '0.x.w'\n"
        "    convert a = {p:path}.w, b = {p:path}.x.w\n"
        "    ^\n"
        "  hint: make the input templates disjoint\n",
    ),
    Case(
        "config_missing",
        ".cspec",
        "spec bad\nconvert x = {p:path}.x\n     -> {p}.y = permute_rope(x, heads=config.num_heads)\n",
        convspec.CompileError,
        "FILE:3:39: error: rule 1 (convert): the config has no field config.num_heads\n"
        "         -> {p}.y = permute_rope(x, heads=config.num_heads)\n"
        "                                          ^\n"
        "  hint: add it to the config, or give a default: config.num_heads ?? VALUE\n",
        config={"num_attention_heads": 4},
    ),
    Case(
        "config_missing_nested",
        ".yaml",
        "spec: bad\n"
        "rules:\n"
        "  - convert:\n"
        '      x: "{p:path}.x"\n'
        "    to:\n"
        '      "{p}.y": permute_rope(x, heads=config.text_config.num_heads)\n',
        convspec.CompileError,
        "FILE:6:38: error: rule 1 (convert): the config has no field config.text_config.num_heads\n"
        '          "{p}.y": permute_rope(x, heads=config.text_config.num_heads)\n'
        "                                         ^\n"
        "  hint: add it to the config, or give a default: config.text_config.num_heads ?? VALUE\n",
        config={"text_config": {"hidden_size": 8}},
    ),
]


def _render(case: Case, tmp_path: Path) -> tuple[BaseException, str]:
    path = tmp_path / f"bad{case.suffix}"
    path.write_text(case.text, encoding="utf-8")
    with pytest.raises(convspec.ConvspecError) as info:
        convspec.compile(convspec.load_spec(str(path)), case.config)
    return info.value, str(info.value).replace(str(path), "FILE")


def test_enough_distinct_cases():
    assert len({c.name for c in CASES}) == len(CASES) >= 18
    assert len({c.expected for c in CASES}) == len(CASES)
    assert {c.suffix for c in CASES} == {".cspec", ".yaml"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_message(case: Case, tmp_path: Path):
    exc, rendered = _render(case, tmp_path)
    assert type(exc) is case.error
    assert rendered + "\n" == case.expected


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_has_span_and_caret_under_the_located_column(case: Case, tmp_path: Path):
    exc, _ = _render(case, tmp_path)
    assert exc.span is not None
    assert exc.span.file == str(tmp_path / f"bad{case.suffix}")
    source_line = case.text.splitlines()[exc.span.line - 1]
    assert exc.span.text == source_line
    # the caret line has the caret exactly under the span's column
    lines = exc.render().splitlines()
    caret = lines[2]
    assert caret.rstrip().endswith("^") and len(caret.rstrip()) - 4 == exc.span.col


def test_spec_errors_are_spec_errors(tmp_path: Path):
    for case in CASES:
        exc, _ = _render(case, tmp_path)
        assert isinstance(exc, convspec.SpecError), case.name


def test_compile_without_config_defers_config_fields(tmp_path: Path):
    """The config_missing specs compile without a config; the field is only needed with one."""
    for case in CASES:
        if case.config is None:
            continue
        path = tmp_path / f"ok{case.suffix}"
        path.write_text(case.text, encoding="utf-8")
        plan = convspec.compile(convspec.load_spec(str(path)))
        assert plan.rules
