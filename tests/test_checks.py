"""Static checks: each fires on a minimal bad spec and stays quiet on good ones; exact overlap
detection between key patterns, checked against brute force."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convspec
from convspec.compile.compiler import compile_spec
from convspec.compile.patterns import Pattern, intersection_witness
from convspec.spec import parse_dsl
from convspec.spec.parse import parse_template
from convspec.spec.source import Embedded, Source


def compile_text(text: str, config: dict | None = None):
    return compile_spec(parse_dsl(text, "t.cspec"), config)


H = "spec s\n"
# (check, a minimal spec that trips it, a fragment of the message, the config if any)
BAD = [
    ("rename target unbound", "rename {p:path}.a -> {q}.a", "capture {q} in the rename target is not bound"),
    ("rename type mismatch", "rename {p:path}.a -> {p:int}.b", "capture {p} is path in the source but int"),
    ("rename drops capture", "rename {p:path}.{n}.a -> {p}.a", "rename drops capture {n}"),
    (
        "input name twice",
        "convert a = {p:path}.a, a = {p:path}.b -> {p}.c = transpose(a)",
        "input name 'a' is used twice",
    ),
    (
        "capture types differ",
        "convert a = {p:path}.a.{e:int}, b = {p:path}.b.{e} -> {p}.c.{e} = cat(a, b, equal=true)",
        "capture {e} is int in one input and seg in another",
    ),
    (
        "let arity",
        "convert a = {p:path}.a let x, y, z = split(a, sizes=[1, 1]) -> {p}.x = transpose(x)",
        "let binds 3 names but the expression yields 2 values",
    ),
    (
        "let name twice",
        "convert a = {p:path}.a let a = transpose(a) -> {p}.x = transpose(a)",
        "name 'a' is bound twice",
    ),
    (
        "target count",
        "convert a = {p:path}.a -> {p}.x, {p}.y = split(a, sizes=[1, 1, 1])",
        "2 target(s) for an expression that yields 3 value(s)",
    ),
    ("unknown name", "convert a = {p:path}.a -> {p}.x = transpose(b)", "'b' is not an input or a let value"),
    (
        "multi-valued argument",
        "convert a = {p:path}.a -> {p}.x = transpose(chunk(a, n=2))",
        "chunk yields 2 values where one tensor is expected",
    ),
    ("unknown op", "convert a = {p:path}.a -> {p}.x = transpos(a)", "unknown op 'transpos'"),
    ("arity", "convert a = {p:path}.a -> {p}.x = cat(a)", "cat takes at least 2 tensor input(s), got 1"),
    (
        "too many inputs",
        "convert a = {p:path}.a, b = {p:path}.b -> {p}.x = transpose(a, b)",
        "transpose takes 1 tensor input(s), got 2",
    ),
    (
        "split sizes not a list",
        "convert a = {p:path}.a -> {p}.x, {p}.y = split(a, sizes=config.s)",
        "split sizes must be a list",
    ),
    (
        "too many positional parameters",
        "convert a = {p:path}.a -> {p}.x = transpose(a, 0, 1, 2)",
        "transpose takes at most 2 parameter(s) after its tensor inputs, got 3",
    ),
    ("unknown parameter", "convert a = {p:path}.a -> {p}.x = transpose(a, dim2=1)", "no parameter 'dim2'"),
    (
        "parameter twice",
        "convert a = {p:path}.a -> {p}.x = transpose(a, 0, dim0=1)",
        "parameter dim0 of transpose is given twice",
    ),
    ("missing parameter", "convert a = {p:path}.a -> {p}.x = permute_rope(a)", "needs parameter heads"),
    (
        "negative sizes",
        "convert a = {p:path}.a -> {p}.x, {p}.y = split(a, sizes=[2, -1])",
        "has a negative size",
    ),
    (
        "not a permutation",
        "convert a = {p:path}.a -> {p}.x = permute(a, dims=[0, 0])",
        "is not a permutation",
    ),
    ("chunk n < 1", "convert a = {p:path}.a -> {p}.x = chunk(a, n=0)", "chunk needs n >= 1"),
    ("int parameter", "convert a = {p:path}.a -> {p}.x = transpose(a, dim0=true)", "must be an integer"),
    ("ints parameter", "convert a = {p:path}.a -> {p}.x = permute(a, dims=1)", "must be a list of integers"),
    (
        "bool parameter",
        "convert a = {p:path}.a, b = {p:path}.b -> {p}.x = cat(a, b, equal=1)",
        "true or false",
    ),
    ("dtype", "convert a = {p:path}.a -> {p}.x = cast(a, dtype=float33)", "unknown dtype 'float33'"),
    ("capture parameter", "convert a = {p:path}.a.{e:int} -> {p}.x = stack(a, over=1)", "a capture name"),
    (
        "mixed collections",
        "convert a = {p:path}.a.{e:int}, b = {p:path}.b -> {p}.x.{e} = cat(a, b, equal=true)",
        "cat mixes collections",
    ),
    (
        "stack over a non-collection",
        "convert a = {p:path}.a.{e:int} -> {p}.x = stack(stack(a, over=e), over=e)",
        "stack(over=e) but its input is not a collection over {e}",
    ),
    ("stack over a seg", "convert a = {p:path}.a.{e} -> {p}.x = stack(a, over=e)", "needs an int capture"),
    (
        "unstack over a bound capture",
        "convert a = {p:path}.a.{e:int} -> {p}.x.{e} = unstack(a, over=e)",
        "unstack over {e}",
    ),
    (
        "target capture unbound",
        "convert a = {p:path}.a -> {p}.x.{q} = transpose(a)",
        "capture {q} in target {p}.x.{q} is not bound: no input binds it",
    ),
    (
        "target capture not bound by every input",
        "convert a = {p:path}.a.{k}, b = {p:path}.b -> {p}.x.{k} = transpose(b) -> {p}.y.{k} = transpose(a)",
        "it is not bound by every input",
    ),
    (
        "capture not reduced",
        "convert a = {p:path}.a.{e:int} -> {p}.x = transpose(a)",
        "capture {e} is present in the inputs and absent from target {p}.x, and no op reduces it",
    ),
    (
        "target written twice",
        "convert a = {p:path}.a, b = {p:path}.b -> {p}.x = transpose(a) -> {p}.x = transpose(b)",
        "target {p}.x is written twice",
    ),
    (
        "input never used",
        "convert a = {p:path}.a, b = {p:path}.b -> {p}.x = transpose(a)",
        "input 'b' is never used",
    ),
    (
        "value never used",
        "convert a = {p:path}.a let x, y = chunk(a, n=2) -> {p}.x = transpose(x)",
        "a value of chunk is never used",
    ),
    (
        "overlap inside a rule",
        "convert a = {p:path}.w, b = {p:path}.x.w -> {p}.c = cat(a, b, equal=true)",
        "inputs a and b can both match the key",
    ),
    (
        "overlap between rules",
        "convert a = {p:path}.w -> {p}.c = transpose(a)\nconvert b = x.{q:path} -> {q}.d = transpose(b)",
        "rules 1 and 2 can both claim the key 'x.w'",
    ),
]


@pytest.mark.parametrize(("check", "text", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_check_fires(check, text, fragment):
    with pytest.raises(convspec.CompileError) as info:
        compile_text(H + text + "\n")
    assert fragment in info.value.message
    assert info.value.span is not None and info.value.span.file == "t.cspec"


def test_config_checks_fire_only_with_a_config():
    text = H + "convert a = {p:path}.a -> {p}.x = permute_rope(a, heads=config.n_heads)\n"
    compile_text(text)  # no config: deferred to bind
    assert compile_text(text, {"n_heads": 2}).rules
    with pytest.raises(convspec.CompileError, match="the config has no field config.n_heads"):
        compile_text(text, {"heads": 2})
    with pytest.raises(convspec.CompileError, match="must be an integer"):
        compile_text(text, {"n_heads": "two"})


GOOD = [
    "rename {p:path}.a -> {p}.b",
    "drop {p:path}.rotary_emb.inv_freq",
    "rename {a}.{p:path}.w -> {p}.{a}.w",
    "convert a = {p:path}.a.{e:int} -> {p}.x = stack(a, over=e)",
    "convert a = {p:path}.a.{e:int} -> {p}.x ops [stack(e), transpose(0, 1)]",
    "convert a = {p:path}.a.{e:int}, b = {p:path}.b.{e:int} -> {p}.x.{e} = cat(a, b, dim=1, sizes=[2, 3])",
    "convert x = {p:path}.x -> {p}.a.{e} = unstack(x, over=e)",
    "convert a = {p:path}.a let x, y = chunk(a, n=2) -> {p}.x = transpose(x) -> {p}.y = transpose(y)",
    "convert a = {p:path}.a -> {p}.x, {p}.y = chunk(a)",
    "convert a = {p:path}.w1.weight -> {p}.x = transpose(a)\nconvert b = {p:path}.w1.weight_scale_inv -> {p}.y = transpose(b)",
    "convert a = {p:path}.experts.{e:int}.w -> {p}.x = stack(a, over=e)\n"
    "convert b = {p:path}.experts.shared.w -> {p}.y = transpose(b)",
    "convert a = {p:path}.a -> {p}.x = cast(a, dtype=float32, from=bfloat16)",
    "convert a = {p:path}.a -> {p}.x = reshape(a, shape=[-1], from_shape=[2, -1])",
]


@pytest.mark.parametrize("text", GOOD)
def test_good_specs_compile(text):
    plan = compile_text(H + text + "\n")
    assert len(plan.rules) == text.count("\n") + 1
    assert plan.inverse_rules is not None


@pytest.mark.parametrize("name", convspec.spec_names())
def test_builtin_specs_pass_the_checks(name):
    """Every built-in spec compiles (overlaps, captures, ops all checked) and has an exact inverse."""
    config = {"num_attention_heads": 4, "hidden_size": 32, "num_key_value_heads": 2}
    # the GGUF specs read their architecture's own config fields (bloom's n_head): tests/test_gguf_specs.py
    # compiles each with its model's config. Where llama.cpp stores w + 1 or -exp(A_log) saving back
    # rounds, which each such rule declares (`# noqa: W204`, which the lint test holds them to)
    gguf = name.startswith("gguf_")
    for plan in (convspec.compile(name),) + (() if gguf else (convspec.compile(name, config),)):
        assert plan.inverse_error is None, plan.inverse_error
        assert not plan.lossy or gguf, plan.lossy


# ---- overlap detection ------------------------------------------------------------------------


def tpl(text: str) -> Pattern:
    from convspec.compile.compiler import pattern_of

    return pattern_of(parse_template(text, Embedded(Source(text, None), 1, 1)))


DISJOINT = [
    ("{p:path}.w1.weight", "{p:path}.w1.weight_scale_inv"),
    ("{p:path}.experts.{e:int}.w", "{p:path}.experts.shared.w"),
    ("{e:int}", "01"),
    ("{e:int}", "x1"),
    ("{e:int}", ""),
    ("a.{e:int}", "a.b.0"),
    ("{n}", "a.b"),
    ("{p:path}.a", "{q:path}.b"),
    ("w{e:int}", "w1x"),
    ("layers.{i:int}.{n}", "layers.{j:int}"),
]
OVERLAP = [
    ("{p:path}.w", "{q:path}.x.w"),
    ("{e:int}", "10"),
    ("{e:int}", "0"),
    ("{n}", "{e:int}"),
    ("{p:path}.experts.{e:int}.w", "{p:path}.experts.{n}.w"),
    ("model.{p:path}", "{q:path}.weight"),
    ("w{e:int}", "{x}9"),
    ("{p:path}.{n}.{m}", "a.b.c.d"),
]


@pytest.mark.parametrize(("a", "b"), DISJOINT)
def test_no_overlap(a, b):
    pa, pb = tpl(a) if a else Pattern("", ()), tpl(b) if b else Pattern("", ())
    assert intersection_witness(pa, pb) is None
    assert intersection_witness(pb, pa) is None


@pytest.mark.parametrize(("a", "b"), OVERLAP)
def test_overlap_has_a_witness_both_match(a, b):
    pa, pb = tpl(a), tpl(b)
    for x, y in ((pa, pb), (pb, pa)):
        w = intersection_witness(x, y)
        assert w is not None
        assert x.compiled.fullmatch(w) and y.compiled.fullmatch(w)


# Small templates over a tiny alphabet, checked against every key up to a length bound.
LIT_CHARS = "a01"
KEY_CHARS = "a01.x"
MAX_KEY = 5
ALL_KEYS = ["".join(k) for n in range(MAX_KEY + 1) for k in itertools.product(KEY_CHARS, repeat=n)]


@st.composite
def patterns(draw):
    n_segs = draw(st.integers(1, 3))
    parts: list[tuple[str, str, str | None]] = []
    names = iter("pqrst")
    for i in range(n_segs):
        if i:
            parts.append(("lit", ".", None))
        kind = draw(st.sampled_from(["lit", "lit", "int", "seg", "path", "mixed"]))
        if kind == "lit":
            parts.append(("lit", draw(st.text(LIT_CHARS, min_size=1, max_size=2)), None))
        elif kind == "mixed":  # a literal prefix, then an int or seg capture in the same segment
            parts.append(("lit", draw(st.text(LIT_CHARS, min_size=1, max_size=1)), None))
            parts.append(("cap", next(names), draw(st.sampled_from(["int", "seg"]))))
        else:
            parts.append(("cap", next(names), kind))
    merged: list[tuple[str, str, str | None]] = []
    for part in parts:
        if merged and part[0] == "lit" and merged[-1][0] == "lit":
            merged[-1] = ("lit", merged[-1][1] + part[1], None)
        else:
            merged.append(part)
    text = "".join(a if k == "lit" else "{" + f"{a}:{t}" + "}" for k, a, t in merged)
    return Pattern(text, tuple(merged))


@settings(max_examples=150, deadline=None)
@given(a=patterns(), b=patterns())
def test_intersection_matches_brute_force(a, b):
    ra, rb = re.compile(a.regex()), re.compile(b.regex())
    both = [k for k in ALL_KEYS if ra.fullmatch(k) and rb.fullmatch(k)]
    w = intersection_witness(a, b)
    if both:
        assert w is not None, (a.text, b.text, both[0])
        # breadth-first: the witness is a shortest common key
        assert len(w) == min(len(k) for k in both)
    if w is not None:
        assert ra.fullmatch(w) and rb.fullmatch(w), (a.text, b.text, w)
    else:
        assert not both


def test_chunk_without_n_inside_a_chain_is_refused():
    from convspec.spec import parse_spec

    text = "spec a\nconvert q = {p:path}.qkv -> {p}.a, {p}.b ops [chunk(dim=0), transpose()]\n"
    with pytest.raises(convspec.CompileError, match="chunk needs n= here"):
        convspec.compile(parse_spec(text, "a.cspec"))


def test_yaml_flow_list_comma_gets_a_quoting_hint():
    from convspec.spec import parse_spec

    text = (
        "spec: a\nrules:\n  - convert: {g: '{p:path}.e.{e:int}.w', u: '{p:path}.e.{e:int}.v'}\n"
        "    to: '{p}.x'\n    ops: [stack(e), cat(dim=1, equal=true)]\n"
    )
    with pytest.raises(convspec.SpecSyntaxError) as exc:
        parse_spec(text, "a.yaml")
    assert 'quote calls with several arguments, e.g. ["cat(dim=1, equal=true)"]' in exc.value.hint
    quoted = text.replace("cat(dim=1, equal=true)", '"cat(dim=1, equal=true)"')
    assert convspec.compile(parse_spec(quoted, "a.yaml")).rules[0].nodes[-1].op == "cat"
