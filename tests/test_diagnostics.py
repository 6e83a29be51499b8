"""The compiler's structured diagnostics: the passes raise the first error by default and collect them
all for `check`, whose findings are those diagnostics (code, place, message), never read from text."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import convspec
from convspec import api
from convspec.compile.compiler import PASSES, compile_all, compile_spec
from convspec.errors import (
    BindError,
    CompileError,
    Diagnostic,
    ErrorLevel,
    Problem,
    Severity,
    Span,
    SpecError,
    SpecSyntaxError,
)
from convspec.lint import RULES, check_spec

# Four problems in four rules: an unused input (E102), an unknown op (E002), a rename that drops a
# capture (E102), and two converts that claim one key (E101).
BAD = (
    "spec bad\n"
    "convert a = {p:path}.a, b = {p:path}.b\n"
    "     -> {p}.c = transpose(a)\n"
    "convert x = {p:path}.x\n"
    "     -> {p}.y = frobnicate(x)\n"
    "rename {p:path}.{i:int}.w -> {p}.w\n"
    "convert m = {p:path}.w1.weight -> {p}.m = transpose(m)\n"
    "convert n = model.{q:path}.weight -> {q}.n = transpose(n)\n"
)


def spec_path(tmp_path: Path, text: str = BAD) -> str:
    path = tmp_path / "bad.cspec"
    path.write_text(text)
    return str(path)


def collected(path: str) -> list[Diagnostic]:
    state = compile_all(api.load_spec(path))
    return state.diagnostics


def test_the_compiler_is_an_explicit_ordered_tuple_of_passes():
    assert [p.name for p in PASSES] == ["includes", "quantization", "rules", "overlaps", "inverse", "plan"]
    assert [p.bounded for p in PASSES] == [False, False, False, True, True, False]


def test_collecting_reports_every_error_with_its_code_severity_and_span(tmp_path):
    path = spec_path(tmp_path)
    found = collected(path)
    assert [(d.code, d.severity, d.span.line, d.span.col) for d in found] == [
        ("E102", Severity.ERROR, 2, 25),  # the input b
        ("E002", Severity.ERROR, 5, 17),  # the call of frobnicate
        ("E102", Severity.ERROR, 6, 30),  # the rename target
        ("E101", Severity.ERROR, 8, 9),  # the input of the later convert that claims the key
    ]
    assert all(isinstance(d.span, Span) and d.span.file == path for d in found)
    assert found[0].message == "rule 1 (convert): input 'b' is never used"
    assert found[0].hint == "use it in an output, or remove it (a drop rule discards keys)"
    assert "unknown op 'frobnicate'" in found[1].message
    assert found[2].message == "rename drops capture {i}: different keys would get the same name"
    assert found[3].message.startswith("rules 4 and 5 can both claim the key 'model.w1.weight'")
    assert all(d.code in RULES and RULES[d.code].severity == d.severity for d in found)


def test_a_failed_rule_leaves_no_plan_and_an_overlap_alone_does(tmp_path):
    failed = compile_all(api.load_spec(spec_path(tmp_path)))
    assert failed.plan is None and failed.failed == {0, 1, 2} and len(failed.errors) == 4
    overlap_only = "spec ok\n" + "".join(BAD.splitlines(keepends=True)[6:])
    state = compile_all(api.load_spec(spec_path(tmp_path, overlap_only)))
    assert [d.code for d in state.diagnostics] == ["E101"]
    assert state.plan is not None and len(state.plan.rules) == 2


def test_by_default_compiling_raises_the_first_error_with_todays_message(tmp_path):
    path = spec_path(tmp_path)
    with pytest.raises(CompileError) as info:
        compile_spec(api.load_spec(path))
    exc = info.value
    first = collected(path)[0]
    assert exc.diagnostic() == first
    assert exc.code == "E102"
    assert str(exc) == (
        f"{path}:2:25: error: rule 1 (convert): input 'b' is never used\n"
        "    convert a = {p:path}.a, b = {p:path}.b\n"
        "                            ^\n"
        "  hint: use it in an output, or remove it (a drop rule discards keys)"
    )
    with pytest.raises(CompileError, match="rule 1 \\(convert\\): input 'b' is never used"):
        convspec.compile(path)


def test_a_raised_overlap_points_at_the_rule_a_collected_one_at_its_input(tmp_path):
    """Raising keeps today's caret (the later rule); collected, each overlap is at the claiming input."""
    overlap_only = "spec ok\n" + "".join(BAD.splitlines(keepends=True)[6:])
    path = spec_path(tmp_path, overlap_only)
    with pytest.raises(CompileError) as info:
        compile_spec(api.load_spec(path))
    assert (info.value.code, info.value.span.line, info.value.span.col) == ("E101", 3, 1)
    assert [(d.code, d.span.line, d.span.col) for d in collected(path)] == [("E101", 3, 9)]
    assert collected(path)[0].message == info.value.message


def test_every_lint_finding_of_a_bad_spec_is_a_compiler_diagnostic(tmp_path):
    path = spec_path(tmp_path)
    findings = check_spec(path).findings
    assert [(f.code, f.message, f.file, f.line, f.col, f.hint) for f in findings] == [
        (d.code, d.message, d.span.file, d.span.line, d.span.col, d.hint) for d in collected(path)
    ]
    assert [f.severity for f in findings] == ["error"] * 4


def test_an_include_that_cannot_expand_stops_the_compile(tmp_path):
    path = spec_path(tmp_path, "spec t\ninclude nowhere_to_be_found\nrename a.{x} -> b.{x}\n")
    state = compile_all(api.load_spec(path))
    assert [(d.code, d.span.line) for d in state.diagnostics] == [("E002", 2)]
    assert state.stopped and state.plan is None and state.rules == []


def test_error_kinds_carry_their_code():
    assert SpecSyntaxError("x").code == SpecError.code == "E001"
    assert CompileError("x").code == "E002"
    assert CompileError("x", code="E101").code == "E101"
    assert BindError(["x"]).code == "E103"
    d = CompileError("m", hint="h", code="E102").diagnostic()
    assert d == Diagnostic("E102", Severity.ERROR, "m", None, "h")
    assert ErrorLevel.IMMEDIATE is not ErrorLevel.COLLECT


def test_a_bind_problem_names_its_rule_as_data():
    p = Problem("rule 3 (convert, x:1:1): group g: no", 3)
    assert p == "rule 3 (convert, x:1:1): group g: no" and p.rule == 3
    assert Problem("anything").rule is None
    back = pickle.loads(pickle.dumps(p))
    assert back == p and back.rule == 3


def test_a_bind_problem_of_a_real_plan_carries_the_rule_number():
    from convspec.ops import TensorInfo

    layout = {
        f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight": TensorInfo((4, 2), "bfloat16")
        for e in (0, 2)
    }
    layout |= {
        f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight": TensorInfo((4, 2), "bfloat16")
        for e in (0, 2)
    }
    plan = convspec.compile("mixtral")
    with pytest.raises(BindError) as info:
        plan.bind(layout)
    numbered = [p for p in info.value.problems if getattr(p, "rule", None)]
    assert numbered and all(p.startswith(f"rule {p.rule} (") for p in numbered)


def test_convspec_check_lists_every_error_of_the_spec(tmp_path, capsys):
    from convspec.cli import main

    path = spec_path(tmp_path)
    assert main(["check", path]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split()[0] for line in out[:4]] == ["E102", "E002", "E102", "E101"]
    assert out[-1] == f"{path}: 4 errors"
