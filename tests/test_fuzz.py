"""Fuzzing: any spec text, expression, config, safetensors header or plan JSON yields a result or
a typed convspec error, within a memory bound; never another exception, a hang or a blow-up. Nothing here
measures speed (that is bench/'s job): hypothesis has no deadline, and the only clock is a hang guard
minutes long, far past any input's honest cost on the busiest machine.

CI runs CONVSPEC_FUZZ_EXAMPLES examples per test (default 200: about 20 s on two cores). A long
run, about 20 minutes on two cores, with hypothesis' statistics:

    CONVSPEC_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -q --hypothesis-show-statistics
"""

from __future__ import annotations

import json
import os
import signal
import struct
import tracemalloc
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import convspec
from convspec.api import _builtin_index, _resolver
from convspec.compile.compiler import compile_spec
from convspec.compile.evaluate import evaluate
from convspec.compile.expr import ConfigExpr, from_spec
from convspec.errors import ConfigError, ConvspecError, PlanError, SpecError, SpecValidationError
from convspec.io.safetensors import MAX_HEADER, CheckpointError, read_header
from convspec.ops import OPS
from convspec.spec import parse_spec
from convspec.spec.model import Spec
from convspec.spec.parse import _parser, parse_expr
from convspec.spec.source import Embedded, Source

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("CONVSPEC_FUZZ_EXAMPLES", "200"))
# A hang fails the example instead of stalling the run. Not a speed check: an example takes
# milliseconds, the slowest seen took 9 s on a busy two-core machine; only a runaway takes minutes.
TIME_LIMIT_S = 120
PEAK_BYTES = 64 << 20  # the inputs are at most a few tens of KiB: 64 MiB of Python objects is a leak
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # speed belongs in bench/: a busy machine must not fail a test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
INT64 = 1 << 64


class Hang(Exception):
    """An input that takes longer than TIME_LIMIT_S: as bad as a crash."""


@contextmanager
def within(time_limit_s: float = TIME_LIMIT_S, peak_bytes: int = PEAK_BYTES, what: str = "it"):
    """The block under an alarm (a Hang after `time_limit_s`) and a tracemalloc peak bound."""

    def on_alarm(signum, frame):
        raise Hang(f"no answer within {time_limit_s} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, time_limit_s)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1] - before
        if not tracing:
            tracemalloc.stop()
    assert peak < peak_bytes, f"{what} allocated {peak} bytes at its peak"


def bounded(fn, *args, time_limit_s: float = TIME_LIMIT_S, peak_bytes: int = PEAK_BYTES):
    """fn(*args) or the ConvspecError it raised (rendered once), under an alarm and a tracemalloc
    peak bound; any other exception propagates and fails the example."""
    with within(time_limit_s, peak_bytes, getattr(fn, "__name__", repr(fn))):
        try:
            return fn(*args)
        except ConvspecError as exc:
            assert "error" in str(exc), repr(exc.message)  # the CLI prints it: rendering must work too
            return exc


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """Build the caches (the lark parser, the spec index) once, so no example pays or counts them."""
    _parser()
    _builtin_index()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    """One directory for the files the fuzzers write, so an include finds nothing else beside them."""
    return tmp_path_factory.mktemp("fuzz")


# ---- spec text ---------------------------------------------------------------------------------

YAML_SPECS, DSL_SPECS = sorted(ROOT.glob("specs/*.yaml")), sorted(ROOT.glob("specs/*.cspec"))
# Pieces of both syntaxes, and of YAML's riskier corners (anchors, tags, block scalars, odd breaks).
FRAGMENTS = [
    *"{}[]()\"',=:#.?*+-/%<>|&!\\\n\t ",
    *("spec", "doc", "model_types", "base_prefix", "rename", "alias", "unless", "include", "under"),
    *("only", "renames", "drop", "convert", "let", "ops", "->", "??", "//", "config.", "true", "false"),
    *("{p:path}", "{e:int}", "{i+1}", "{i-99999999999999999999999}", "{r:path?}", "{x:long}", "{p}"),
    *("stack(", "cat(", "split(", "chunk(", "over=e", "n=", "parts=", "sizes=[", "dtype=", "equal=true"),
    *("9" * 30, "-1", "0", "1.5", "fuzz", "mixtral", "identity", "qwen2_moe"),
    *(": ", "- ", "&a ", "*a", "<<: *a", "!!binary ", "!!python/object:os.system ", "? ", "|\n", ">-\n"),
    *("---\n", "...\n", "%YAML 1.1\n", "\n  ", "\n    - ", "\ufeff", "\x00", "\r", "\u2028", "\x85"),
]


@cache
def _seed(path: Path) -> bytes:
    """A spec file's bytes, read once however many mutants it seeds."""
    return path.read_bytes()


@st.composite
def mutated_spec(draw):
    """A real spec file with a few byte flips, deletions, insertions, duplicated or lost lines."""
    path = draw(st.sampled_from(YAML_SPECS) | st.sampled_from(DSL_SPECS))  # the few .cspec as often
    data = bytearray(_seed(path))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "delete", "insert", "dup_line", "drop_line", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            data[min(pos, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 40))]
        elif kind == "insert":
            data[pos:pos] = draw(st.sampled_from(FRAGMENTS)).encode()
        elif kind in ("dup_line", "drop_line"):
            lines = bytes(data).split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines[i : i + 1] = [lines[i]] * (2 if kind == "dup_line" else 0)
            data = bytearray(b"\n".join(lines))
        elif kind == "truncate":
            del data[pos:]
    return path.suffix, bytes(data)


spec_text = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=80).map("".join),
)

CONFIG_KEYS = st.sampled_from(
    ["num_attention_heads", "head_dim", "hidden_size", "num_key_value_heads", "text_config"]
    + ["vision_config", "a", "b", "c", "zero", "huge", "s", "l"]
)
hostile_ints = st.integers() | st.sampled_from([0, -1, 1, 2**63 - 1, 2**63, INT64, -INT64, 10**100, 10**1000])
config_leaf = st.none() | st.booleans() | hostile_ints | st.floats() | st.text(max_size=8)
config_value = st.recursive(
    config_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(CONFIG_KEYS, c, max_size=3), max_leaves=8
)
configs = st.none() | st.dictionaries(CONFIG_KEYS, config_value, max_size=6)


def convert(body: str) -> str:
    """A one-rule spec around a convert output `body`."""
    return "spec a\nconvert x = {p:path}.x.{e:int} -> {p}.y " + body + "\n"


def parse_and_compile(text: str, file: str, config: dict | None):
    """The spec, or the SpecError it raised; then its plan, or the ConvspecError compiling raised."""
    spec = bounded(parse_spec, text, file)
    assert isinstance(spec, Spec | SpecError), spec
    if isinstance(spec, Spec):
        plan = bounded(compile_spec, spec, config, _resolver(spec))
        assert isinstance(plan, convspec.Plan | ConvspecError), plan
        if isinstance(plan, convspec.Plan) and config is not None:  # with a config, nothing is deferred
            for rule in plan.rules:
                for node in rule.nodes:
                    assert not any(isinstance(v, ConfigExpr) for _, v in node.params), node
    return spec


@FUZZ
@given(text=spec_text, suffix=st.sampled_from([".yaml", ".cspec"]), config=configs)
# The crashes the fuzzer found, each its minimal input: they stay covered as explicit examples.
@example(text="[" * 5000 + "]" * 5000, suffix=".yaml", config=None)  # PyYAML's composer recursed
@example(text="{a: " * 2000 + "}" * 2000, suffix=".yaml", config=None)
@example(text="spec: a\nrules:\n - include: /etc/passwd\n", suffix=".yaml", config=None)  # read a file
@example(text=convert("= transpose(x, dim0=" + "9" * 5000 + ")"), suffix=".cspec", config=None)  # int()
@example(text="spec a\nrename {p:path}.{i:int} -> {p}.{i+" + "9" * 5000 + "}\n", suffix=".cspec", config=None)
@example(text=convert("= chunk(stack(x, over=e), n=100000000)"), suffix=".cspec", config=None)  # 1e8 names
@example(text=convert("= stack(x, over=e, parts=config.a)"), suffix=".cspec", config={"a": 2**40})
@example(text=convert("= stack(x, over=e, parts=config.n)"), suffix=".cspec", config=None)  # TypeError
@example(text=convert("= stack(x, over=config.e)"), suffix=".cspec", config=None)  # TypeError
@example(text=convert("ops [chunk(n=4096), chunk(n=4096)]"), suffix=".cspec", config=None)  # 16M names
def test_spec_text(text: str, suffix: str, config):
    """Any text, in either syntax, parses or raises a SpecError; compiling raises only ConvspecErrors."""
    parse_and_compile(text, f"fuzz{suffix}", config)


@FUZZ
@given(mutant=mutated_spec(), config=configs)
@example(mutant=(".cspec", b"spec a\ninclude fuzz\n"), config=None)  # its own file, by another name
@example(mutant=(".yaml", b"spec: a\nrules:\n  - include: fuzz\n"), config=None)
@example(mutant=(".yaml", b"spec: a\ndoc: \xff\n"), config=None)
def test_mutated_spec_files(mutant, config, fuzz_dir: Path):
    """A damaged real spec file, read from disk as the command line reads it: a typed error at worst."""
    suffix, data = mutant
    path = fuzz_dir / f"fuzz{suffix}"
    path.write_bytes(data)
    spec = bounded(convspec.load_spec, str(path))
    assert isinstance(spec, Spec | SpecError), spec
    if isinstance(spec, Spec):
        plan = bounded(compile_spec, spec, config, _resolver(spec))
        assert isinstance(plan, convspec.Plan | ConvspecError), plan


def test_unmutated_seeds_parse():
    """The mutation seeds themselves are good specs, so the mutants start from valid input."""
    for path in YAML_SPECS + DSL_SPECS:
        assert isinstance(convspec.load_spec(str(path)), Spec), path


# ---- expressions -------------------------------------------------------------------------------

numbers = st.integers(0, 2**70).map(str) | st.sampled_from(
    ["0", "9223372036854775807", "18446744073709551615", "18446744073709551616", "9" * 40, "1.5"]
    + ["9" * 400 + ".5", "0" * 50 + "1"]
)
names = st.sampled_from(
    ["config.a", "config.b", "config.c.d", "config.zero", "config.huge", "config.s", "config.l"]
    + ["config.text_config.head_dim", "config.nope", "x", "e", "true", "false", "float32", "a.b"]
)
OP_NAMES = ["stack", "cat", "split", "chunk", "transpose", "cast", "f", "__import__"]


def _expr_extend(inner):
    """Bigger expressions from smaller ones: operators with or without parentheses, lists, calls."""
    binop = st.tuples(inner, st.sampled_from(["+", "-", "*", "//", "%", "??"]), inner, st.booleans())
    call = st.tuples(
        st.sampled_from(OP_NAMES),
        st.lists(inner, max_size=3),
        st.lists(st.tuples(st.sampled_from(["n", "dim", "over", "sizes"]), inner), max_size=2),
    )
    return st.one_of(
        binop.map(lambda t: f"({t[0]} {t[1]} {t[2]})" if t[3] else f"{t[0]} {t[1]} {t[2]}"),
        inner.map(lambda x: f"-{x}"),
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        call.map(lambda c: f"{c[0]}(" + ", ".join(c[1] + [f"{k}={v}" for k, v in c[2]]) + ")"),
    )


EXPR_TOKENS = ["(", ")", "[", "]", ",", "=", "+", "-", "*", "**", "//", "/", "%", "??", ".", "config"]
expressions = st.one_of(
    st.recursive(numbers | names | st.sampled_from(['"s"', '""', "[]"]), _expr_extend, max_leaves=30),
    st.lists(st.sampled_from(EXPR_TOKENS) | numbers | names, max_size=40).map(" ".join),
    st.text(max_size=60),
)
expr_configs = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "a": hostile_ints,
        "b": hostile_ints,
        "c": st.fixed_dictionaries({"d": hostile_ints}),
        "zero": st.just(0),
        "huge": st.sampled_from([2**64, 10**1000, -(10**300)]),
        "s": st.text(max_size=5),
        "l": st.lists(hostile_ints, max_size=3),
        "text_config": config_value,
    },
)


def _ints(v):
    """Every int in an evaluated value, lists included: each must fit in 64 bits."""
    if isinstance(v, list):
        for x in v:
            yield from _ints(x)
    elif isinstance(v, int) and not isinstance(v, bool):
        yield v


def where(text: str) -> Embedded:
    """An expression as if it stood alone on line 1 of a spec, so errors can point into it."""
    return Embedded(Source(text, "fuzz.cspec"), 1, 1)


@FUZZ
@given(text=expressions, config=expr_configs)
@example(text="9" * 5000, config=None)  # int() refuses more than 4300 digits
@example(text="10**10**6", config=None)  # no ** in the language: a syntax error, not a huge number
@example(text="config.a * config.a * config.a", config={"a": 10**1000})
@example(text="4294967296 * 4294967296", config=None)
@example(text="1 // 0", config=None)
@example(text="1 % (config.a - config.a)", config={"a": 3})
@example(text="-" * 5000 + "1", config=None)  # deeper than MAX_EXPR_DEPTH
@example(text="[" * 5000 + "]" * 5000, config=None)
@example(text="(" * 5000 + "1" + ")" * 5000, config=None)
@example(text="+".join(["config.a"] * 2000), config={"a": 2**60})
@example(text="config.s * 2", config={"s": {"x": [10**5000]}})  # a message must not repr a huge int
def test_expressions(text: str, config):
    """Any expression parses or raises a SpecError; evaluating it returns plain values within 64 bits
    or raises a ConfigError."""
    expr = bounded(parse_expr, text, where(text))
    assert not isinstance(expr, ConvspecError) or isinstance(expr, SpecError), expr
    if isinstance(expr, ConvspecError):
        return
    value = bounded(evaluate, from_spec(expr), config, "fuzz")
    assert not isinstance(value, ConvspecError) or isinstance(value, ConfigError), value
    assert all(abs(i) < INT64 for i in _ints(value)), value


PARAM_SLOTS = [
    "transpose(stack(x, over=e), dim0={}, dim1=0)",
    "chunk(stack(x, over=e), n={})",
    "split(stack(x, over=e), dim=0, sizes=[{0}, {0}])",
    "reshape(stack(x, over=e), shape={}, from_shape=[2])",
    "cast(stack(x, over=e), dtype={}, from=float32)",
    "stack(x, over=e, parts={})",
    "stack(x, over={})",
    "permute_rope(stack(x, over=e), heads={})",
    "cat(stack(x, over=e), stack(x, over=e), dim=0, sizes={})",
]


@FUZZ
@given(slot=st.sampled_from(PARAM_SLOTS), text=expressions, config=expr_configs)
@example(slot=PARAM_SLOTS[1], text="config.huge", config={"huge": 2**64})
@example(slot=PARAM_SLOTS[1], text="4096 * 4096", config=None)
def test_expressions_as_parameters(slot: str, text: str, config):
    """An expression in an op's parameter compiles, with or without a config, or raises a typed error."""
    parse_and_compile(convert("= " + slot.format(text)), "fuzz.cspec", config)


# Well-formed DSL specs with random templates, rules and op calls, so the compiler's checks (captures,
# arities, overlaps, includes, the inverse) see more than the parser's first error.
SEGMENTS = ["model", "layers", "mlp", "experts", "w1", "weight", "{p:path}", "{q:path?}"]
SEGMENTS += ["{e:int}", "{i:int}"]  # two int captures, for {i+1} and for stack(over=e)
templates = st.lists(st.sampled_from([*SEGMENTS, "{k}", "x-y"]), min_size=1, max_size=5, unique=True).map(
    ".".join
)
rename_targets = templates | templates.map(lambda t: t + ".{i+1}")
param_values = st.sampled_from(
    ["e", "k", "0", "1", "-1", "2", "true", "float32", "bfloat16", "[1, 1]", "[0, 1]", "[2, -1]"]
    + ["config.a", "config.a // config.zero", "[config.a, 2]", "config.huge"]
)


def _call(parts) -> str:
    """`name(arg, ..., key=value, ...)` from its drawn parts."""
    name, args, kwargs = parts
    return f"{name}(" + ", ".join(args + [f"{k}={v}" for k, v in kwargs]) + ")"


def _op_call(args):
    """A call of a real op with its own parameters (and now and then one it does not have)."""

    def for_op(name: str):
        own = [p.name for p in OPS[name].params] + ["bogus"]
        kwargs = st.lists(st.tuples(st.sampled_from(own), param_values), max_size=3, unique_by=lambda t: t[0])
        return st.tuples(st.just(name), args, kwargs).map(_call)

    return st.sampled_from(sorted(OPS)).flatmap(for_op)


tensor_exprs = st.recursive(
    st.sampled_from(["a", "b", "c"]),
    lambda inner: _op_call(st.lists(inner, min_size=1, max_size=3)),
    max_leaves=6,
)
chain_calls = _op_call(st.just([]))


@st.composite
def dsl_specs(draw) -> str:
    """A spec of a few random rules of every kind, each well formed as text."""
    lines = ["spec fuzz"]
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(
            st.sampled_from(["rename", "alias", "drop", "convert", "convert", "include", "base_prefix"])
        )
        if kind in ("rename", "alias"):
            unless = draw(st.sampled_from(["", " unless " + draw(templates)]))
            lines.append(f"{kind} {draw(templates)} -> {draw(rename_targets)}{unless}")
        elif kind == "drop":
            lines.append(f"drop {draw(templates)}")
        elif kind == "include":
            under = draw(st.sampled_from(["", " under model", ' under model, ""', " under a.b only renames"]))
            lines.append(
                f"include {draw(st.sampled_from(['mixtral', 'identity', 'qwen2_moe', 'fuzz', 'nope']))}{under}"
            )
        elif kind == "base_prefix":
            lines.append("base_prefix model")
        else:
            names = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
            rule = "convert " + ", ".join(f"{n} = {draw(templates)}" for n in names)
            if draw(st.booleans()):
                rule += f"\n  let v = {draw(tensor_exprs)}"
            targets = ", ".join(draw(st.lists(templates, min_size=1, max_size=3)))
            if draw(st.booleans()):
                rule += f"\n  -> {targets} = {draw(tensor_exprs)}"
            else:
                rule += (
                    f"\n  -> {targets} ops ["
                    + ", ".join(draw(st.lists(chain_calls, min_size=1, max_size=3)))
                    + "]"
                )
            lines.append(rule)
    return "\n".join(lines) + "\n"


@FUZZ
@given(text=dsl_specs(), config=expr_configs)
@example(text=convert("= cast(stack(x, over=e), dtype=config.a, from=float32)"), config=None)  # TypeError
def test_generated_specs(text: str, config):
    """Well-formed specs with random rules compile to a plan or raise a typed error, never another."""
    spec = parse_and_compile(text, "fuzz.cspec", config)
    event(f"parsed: {type(spec).__name__}")


def test_huge_config_ints_do_not_multiply():
    """A config may hold 10**10**6: its product is refused before it is computed, not after."""
    huge = 10**10**6
    expr = parse_expr("config.a * config.a * config.a", where("config.a * config.a * config.a"))
    err = bounded(evaluate, from_spec(expr), {"a": huge}, "fuzz")
    assert isinstance(err, ConfigError) and "more than 64" in err.message, err


def test_power_and_huge_literals_are_refused_while_parsing():
    """`**` is not in the language, and a literal past 64 bits is refused before int() sees it."""
    assert isinstance(bounded(parse_expr, "10**10**6", where("10**10**6")), SpecError)
    err = bounded(parse_expr, "9" * 5000, where("9" * 5000))
    assert isinstance(err, SpecValidationError) and "does not fit in 64 bits" in err.message, err


# ---- safetensors headers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """Small real checkpoints written by safetensors itself: the mutation seeds."""
    d = tmp_path_factory.mktemp("st")
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, d / "two.safetensors")
    save_file({"w": torch.arange(6, dtype=torch.int64).reshape(3, 2)}, d / "one.safetensors", {"k": "v"})
    save_file({"e": torch.zeros(0, 5), "s": torch.tensor(1.0, dtype=torch.float16)}, d / "edge.safetensors")
    return {name: (d / f"{name}.safetensors").read_bytes() for name in SEEDS}


SEEDS = ["two", "one", "edge"]
json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**200), 2**200)
    | st.sampled_from([2**62, 2**63, INT64, -1, 0, 1, -(2**62)])
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "BOOL", "F8_E4M3", "f32", "", "C64"])
)
json_value = st.recursive(
    json_scalar,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=12,
)
hostile_shape = st.lists(
    st.sampled_from([0, 1, 2, 3, 2**62, 2**63, -1, -(2**62), 1.5, "2", True, None]) | st.integers(-5, 10),
    max_size=4,
)


@st.composite
def mutated_checkpoint(draw, seeds: dict[str, bytes]):
    """A real safetensors file with its header JSON edited (dtypes, shapes, offsets, nesting), its
    length field rewritten, or its bytes flipped and cut."""
    data = bytearray(seeds[draw(st.sampled_from(SEEDS))])
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), bytes(data[8 + n :])
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from([*header, "new", "__metadata__"]))
        entry = header.get(key)
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "drop"]))
        if field == "drop":
            header.pop(draw(st.sampled_from([*header, "x"])), None)
        elif field == "entry" or not isinstance(entry, dict):
            header[key] = draw(json_value)
        elif field == "shape":
            entry["shape"] = draw(hostile_shape | json_value)
        elif field == "data_offsets":
            ints = st.integers(-2, 2**64) | st.sampled_from([0, 8, 24, 2**63])
            entry["data_offsets"] = draw(st.lists(ints, max_size=3) | json_value)
        else:
            entry["dtype"] = draw(json_value)
    text = json.dumps(header).encode()
    text += b" " * draw(st.integers(0, 8))  # safetensors pads its header with spaces
    length = draw(
        st.just(len(text))
        | st.sampled_from([0, 1, 7, MAX_HEADER, MAX_HEADER + 1, 2**63, INT64 - 1])
        | st.integers(0, len(text) + len(body) + 16)
    )
    out = bytearray(struct.pack("<Q", length) + text + body)
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, max(len(out) - 1, 0)))
        kind = draw(st.sampled_from(["flip", "cut", "delete"]))
        if kind == "flip" and out:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del out[pos:]
        else:
            del out[pos : pos + draw(st.integers(1, 16))]
    return bytes(out)


def check_entries(path: Path, entries) -> None:
    """What read_header returns lies inside the file, does not overlap, and matches its shape."""
    size = path.stat().st_size
    spans = sorted((e.start, e.end) for e in entries)
    for e in entries:
        assert 8 <= e.start <= e.end <= size, e
        assert e.end - e.start == e.info.nbytes, e
        assert all(isinstance(s, int) and s >= 0 for s in e.shape), e
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)), spans


def read_checked(path: Path):
    """read_header's entries, checked against the file, or the CheckpointError it raised."""
    entries = bounded(read_header, path)
    assert isinstance(entries, list | CheckpointError), entries
    if isinstance(entries, list):
        check_entries(path, entries)
    return entries


@FUZZ
@given(data=st.binary(max_size=512) | st.binary(min_size=8, max_size=8).map(lambda b: b + b"{}"))
@example(data=b"")
@example(data=struct.pack("<Q", 2) + b"{}")
@example(data=struct.pack("<Q", INT64 - 1) + b"{}")
def test_read_header_random_bytes(data: bytes, fuzz_dir: Path):
    """Random bytes are a checkpoint or a CheckpointError naming the file."""
    path = fuzz_dir / "random.safetensors"
    path.write_bytes(data)
    read_checked(path)


@FUZZ
@given(data=st.data())
def test_read_header_mutated(seeds: dict[str, bytes], data, fuzz_dir: Path):
    """Real checkpoints with hostile headers (huge or negative dims, floats, nested objects, bad
    offsets and lengths) give consistent entries or a CheckpointError."""
    path = fuzz_dir / "mutant.safetensors"
    path.write_bytes(data.draw(mutated_checkpoint(seeds)))
    read_checked(path)


def test_seed_checkpoints_read(seeds: dict[str, bytes], fuzz_dir: Path):
    """The mutation seeds read cleanly, so the mutants start from valid files."""
    for name, data in seeds.items():
        path = fuzz_dir / f"{name}.safetensors"
        path.write_bytes(data)
        entries = read_checked(path)
        assert isinstance(entries, list) and entries, name


@pytest.mark.parametrize("claimed", [MAX_HEADER, MAX_HEADER + 1, 2**63, INT64 - 1])
def test_huge_claimed_header_length_reads_nothing(claimed: int, tmp_path: Path):
    """A header length far past the end of a small file is refused before a buffer that size exists."""
    path = tmp_path / "liar.safetensors"
    path.write_bytes(
        struct.pack("<Q", claimed) + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    )
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError):
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def _header(shape_json: str) -> bytes:
    """A one-tensor file whose header gives `shape_json` as the shape (8 bytes of data, as for [2])."""
    text = b'{"t": {"dtype": "F32", "shape": ' + shape_json.encode() + b', "data_offsets": [0, 8]}}'
    return struct.pack("<Q", len(text)) + text + b"\0" * 8


# What the fuzzer found in the header reader: the first four crashed it (OverflowError, ValueError,
# RecursionError), the last four were read as other shapes. Fixed in convspec/io/safetensors.py,
# the >4300-digit integer (a ValueError from json.loads itself) included.
HOSTILE_HEADERS = [
    pytest.param(_header("[Infinity]"), id="infinity-dim"),
    pytest.param(_header("[1e400]"), id="overflowing-float-dim"),
    pytest.param(_header("[" + "9" * 5000 + "]"), id="5000-digit-dim"),
    pytest.param(struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, id="deep-json"),
    pytest.param(_header('"12"'), id="string-shape-read-as-[1,2]"),
    pytest.param(_header("[2.9]"), id="float-dim-truncated"),
    pytest.param(_header("[true, 2]"), id="bool-dim-read-as-1"),
    pytest.param(_header('{"2": 1}'), id="object-shape-read-as-its-keys"),
]


@pytest.mark.parametrize("data", HOSTILE_HEADERS)
def test_read_header_refuses_hostile_numbers(data: bytes, tmp_path: Path):
    """A shape must be a list of non-negative JSON integers; anything else is a CheckpointError."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    assert isinstance(bounded(read_header, path), CheckpointError)


def test_config_json_refuses_huge_ints(tmp_path: Path):
    """The same 5000-digit integer in a config.json is a ConvspecError, not a ValueError."""
    (tmp_path / "config.json").write_text('{"head_dim": ' + "9" * 5000 + "}")
    with pytest.raises(ConvspecError):
        convspec.compile("split_qkv", config=str(tmp_path / "config.json"))


# ---- plans read from JSON ----------------------------------------------------------------------

QKV_CONFIG = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 2, "hidden_size": 8}
MIXTRAL_LAYOUT = {
    f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight": ((4, 2) if w == "w2" else (2, 4), "float32")
    for i in range(2)
    for e in range(2)
    for w in ("w1", "w2", "w3")
} | {"model.layers.0.block_sparse_moe.gate.weight": ((2, 2), "float32")}


@cache
def _plan_seeds() -> tuple[str, ...]:
    """Valid plans to damage: forward and inverse, a config expression left for bind, and none left."""
    mixtral, qkv = convspec.compile("mixtral"), convspec.compile("split_qkv")
    return tuple(
        p.to_json() for p in (mixtral, mixtral.inverse(), qkv, convspec.compile("split_qkv", QKV_CONFIG))
    )


@cache
def _plan_strings() -> tuple[str, ...]:
    """Every string of the seeds (op, capture and value names, kinds, types, templates) and the ops'."""
    out: set[str] = set(OPS)

    def walk(x):
        if isinstance(x, str):
            out.add(x)
        elif isinstance(x, dict):
            out.update(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for text in _plan_seeds():
        walk(json.loads(text))
    return tuple(sorted(out))


def _places(x, path=()):
    """The path to every value inside a JSON value (its keys and list indices), itself first."""
    yield path
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        yield from _places(v, (*path, k))


@st.composite
def mutated_plan(draw) -> str:
    """A valid plan's JSON with values deleted, replaced by other JSON or by another of its values,
    names changed to other names it has, numbers nudged, list items repeated; or its text damaged."""
    d = json.loads(draw(st.sampled_from(_plan_seeds())))
    for _ in range(draw(st.integers(1, 4))):
        places = list(_places(d))[1:]
        path = draw(st.sampled_from(places))
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        key, value = path[-1], parent[path[-1]]
        kind = draw(st.sampled_from(["delete", "json", "other", "name", "number", "repeat", "version"]))
        if kind == "delete":
            del parent[key]
        elif kind == "json":
            parent[key] = draw(json_value)
        elif kind == "other":
            other = draw(st.sampled_from(places))
            node = d
            for k in other:
                node = node[k]
            parent[key] = json.loads(json.dumps(node))
        elif kind == "name":
            parent[key] = draw(st.sampled_from(_plan_strings()))
        elif kind == "number" and isinstance(value, int):
            parent[key] = value + draw(st.sampled_from([-1, 1, -value, 2**63]))
        elif kind == "repeat" and isinstance(parent, list):
            parent.insert(key, json.loads(json.dumps(value)))
        elif kind == "version":
            d["convspec_plan"] = draw(st.sampled_from([0, 1, 1, 3]))
    text = json.dumps(d)
    if draw(st.integers(0, 9)) == 0:  # now and then, damage the text itself
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from(['"', "}", ",", "", "\\", "[", "\x00"])) + text[pos + 1 :]
    return text


@FUZZ
@given(text=mutated_plan())
@example(text=json.dumps({"convspec_plan": 2, "rules": [{"index": 0}]}))
def test_mutated_plan_json(text: str):
    """A damaged plan is a PlanError or a plan; a plan that loads binds or raises a ConvspecError."""
    plan = bounded(convspec.Plan.from_json, text)
    assert isinstance(plan, convspec.Plan | PlanError), plan
    event(f"loaded: {type(plan).__name__}")
    if isinstance(plan, convspec.Plan):
        for layout in (MIXTRAL_LAYOUT, convspec.compile("mixtral").bind(MIXTRAL_LAYOUT).outputs):
            bound = bounded(plan.bind, layout)
            assert not isinstance(bound, Exception) or isinstance(bound, ConvspecError), bound


def test_plan_seeds_load():
    """The seeds themselves load back equal, so the mutants start from valid plans."""
    for text in _plan_seeds():
        assert convspec.Plan.from_json(text).to_json() == text
