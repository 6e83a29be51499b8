"""The DSL's syntax errors: the mistakes spec authors make most get their own message (location, what
is wrong, what to write), recognised by example as lark's `match_examples` does; the rest keep the
general 'unexpected X / expected Y' message, and the forms other tests pin keep theirs word for word."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from lark import UnexpectedToken

from convspec.errors import SpecSyntaxError
from convspec.spec import grammar, parse_spec
from convspec.spec.syntax_errors import _MESSAGES, EXAMPLES, _key, _mistake_states


@dataclass(frozen=True)
class Case:
    name: str
    text: str
    expected: str  # the whole message as printed; the file is FILE


CASES = [
    Case(
        "rename_equals",
        "spec t\nrename {p:path}.a = {p}.b\n",
        "FILE:2:19: error: '=' where '->' belongs: a rename maps its source to its target with '->'\n"
        "    rename {p:path}.a = {p}.b\n"
        "                      ^\n"
        "  hint: write it as: rename SOURCE -> TARGET (alias alike); a key template has no spaces\n",
    ),
    Case(
        "rename_missing_arrow",
        "spec t\nalias {p:path}.a to {p}.b\n",
        "FILE:2:18: error: missing '->' before 'to'\n"
        "    alias {p:path}.a to {p}.b\n"
        "                     ^\n"
        "  hint: write it as: rename SOURCE -> TARGET (alias alike); a key template has no spaces\n",
    ),
    Case(
        "rename_without_target",
        "spec t\nrename {p:path}.a\ndrop {p:path}.c\n",
        "FILE:3:1: error: the rename or alias before this point has no '->' and no target\n"
        "    drop {p:path}.c\n"
        "    ^\n"
        "  hint: write it as: rename SOURCE -> TARGET (alias alike); a key template has no spaces\n",
    ),
    Case(
        "rename_without_target_at_the_end",
        "spec t\nrename {p:path}.a\n",
        "FILE:2:18: error: the rename or alias before this point has no '->' and no target\n"
        "    rename {p:path}.a\n"
        "                     ^\n"
        "  hint: write it as: rename SOURCE -> TARGET (alias alike); a key template has no spaces\n",
    ),
    Case(
        "output_equals",
        "spec t\nconvert x = {p:path}.x\n     = {p}.y = transpose(x)\n",
        "FILE:3:6: error: an output of a convert starts with '->', not '='\n"
        "         = {p}.y = transpose(x)\n"
        "         ^\n"
        "  hint: each output of a convert is a line '-> TARGETS = EXPR' or '-> TARGETS ops [CALLS]'; a convert's inputs are separated by ','\n",
    ),
    Case(
        "output_missing_arrow",
        "spec t\nconvert x = {p:path}.x\n     {p}.y = transpose(x)\n",
        "FILE:3:6: error: missing '->' before the output '{p}.y'\n"
        "         {p}.y = transpose(x)\n"
        "         ^\n"
        "  hint: each output of a convert is a line '-> TARGETS = EXPR' or '-> TARGETS ops [CALLS]'; a convert's inputs are separated by ','\n",
    ),
    Case(
        "convert_without_output",
        "spec t\nconvert x = {p:path}.x\ndrop {p:path}.z\n",
        "FILE:3:1: error: the convert before this point has no output: its inputs must be followed by '-> TARGETS = EXPR'\n"
        "    drop {p:path}.z\n"
        "    ^\n"
        "  hint: each output of a convert is a line '-> TARGETS = EXPR' or '-> TARGETS ops [CALLS]'; a convert's inputs are separated by ','\n",
    ),
    Case(
        "output_without_expression",
        "spec t\nconvert x = {p:path}.x\n     -> {p}.y\n",
        "FILE:3:14: error: the output before this point has no expression: its targets must be followed by '= EXPR' or 'ops [CALLS]'\n"
        "         -> {p}.y\n"
        "                 ^\n"
        "  hint: each output of a convert is a line '-> TARGETS = EXPR' or '-> TARGETS ops [CALLS]'; a convert's inputs are separated by ','\n",
    ),
    Case(
        "unclosed_brace",
        "spec t\nrename {p:path.a -> {p}.b\n",
        "FILE:2:8: error: unclosed '{' in a key template\n"
        "    rename {p:path.a -> {p}.b\n"
        "           ^\n"
        "  hint: close each capture with '}', as in {p:path}.weight; a key template has no spaces\n",
    ),
    Case(
        "missing_comma",
        "spec t\nconvert x = {p:path}.x\n     -> {p}.y = transpose(x dim0=0, dim1=1)\n",
        "FILE:3:29: error: missing ',' before 'dim0': arguments are separated by commas\n"
        "         -> {p}.y = transpose(x dim0=0, dim1=1)\n"
        "                                ^\n"
        "  hint: write op arguments as f(a, b, dim=1) and lists as [a, b]\n",
    ),
    Case(
        "missing_comma_list",
        "spec t\nconvert x = {p:path}.x\n     -> {p}.y, {p}.z = split(x, sizes=[2 2])\n",
        "FILE:3:42: error: missing ',' before '2': list items are separated by commas\n"
        "         -> {p}.y, {p}.z = split(x, sizes=[2 2])\n"
        "                                             ^\n"
        "  hint: write op arguments as f(a, b, dim=1) and lists as [a, b]\n",
    ),
    Case(
        "unclosed_call",
        "spec t\nconvert x = {p:path}.x\n     -> {p}.y = transpose(x, dim0=0\ndrop {p:path}.z\n",
        "FILE:4:1: error: an op call before this point is not closed: ')' is missing\n"
        "    drop {p:path}.z\n"
        "    ^\n"
        "  hint: write op arguments as f(a, b, dim=1) and lists as [a, b]\n",
    ),
    Case(
        "misspelt_keyword",
        "spec t\nconvret x = {p:path}.x\n     -> {p}.y = transpose(x)\n",
        "FILE:2:1: error: unknown word 'convret': did you mean 'convert'?\n"
        "    convret x = {p:path}.x\n"
        "    ^\n"
        "  hint: expected 'alias', 'base_prefix', 'companion', 'convert', 'doc', 'drop', 'include', 'model_types', ...\n",
    ),
    Case(
        "swapped_letters",
        "spec t\nconvert x = {p:path}.x\n     lte y = x\n     -> {p}.y = y\n",
        "FILE:3:6: error: unknown word 'lte': did you mean 'let'?\n"
        "         lte y = x\n"
        "         ^\n"
        "  hint: expected ',', '->', 'let'\n",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_common_mistake_gets_its_own_message(case: Case):
    with pytest.raises(SpecSyntaxError) as exc:
        parse_spec(case.text, "FILE")
    assert str(exc.value) + "\n" == case.expected


@pytest.mark.parametrize(
    ("text", "first_line"),
    [
        # pinned elsewhere (test_errors_golden, test_bad_inputs, test_fmt): the general message stays
        ("spec t\nrename {p:path}.a => {p}.b\n", "FILE:2:19: error: unexpected '=>' in spec"),
        ("spec t\nconvert x = {p:path}.x\n", "FILE:2:23: error: spec ends too early"),
        ("spec t\nfrobnicate {p:path}.a\n", "FILE:2:1: error: unexpected 'frobnicate' in spec"),
        (
            "spec x\nconvert w {p:path}.w -> {p}.v = transpose(w)\n",
            "FILE:2:11: error: unexpected '{p:path}.w' in spec",
        ),
        # no mistake of the table: the general message
        ("spec t 'doc'\n", "FILE:1:8: error: unexpected \"'doc'\" in spec"),
        (
            "spec t\nconvert x = {p:path}.x\n     -> {p}.y = transpose(x,)\n",
            "FILE:3:29: error: unexpected ')' in spec",
        ),
    ],
)
def test_other_errors_keep_the_general_message(text: str, first_line: str):
    with pytest.raises(SpecSyntaxError) as exc:
        parse_spec(text, "FILE")
    assert str(exc.value).splitlines()[0] == first_line


def test_the_same_mistake_in_a_yaml_expression_keeps_its_pinned_message():
    text = 'spec: t\nrules:\n  - convert:\n      x: "{p:path}.x"\n    to:\n      "{p}.y": stack(x over=e)\n'
    with pytest.raises(SpecSyntaxError) as exc:
        parse_spec(text, "FILE.yaml")
    assert str(exc.value).splitlines()[0] == "FILE.yaml:6:24: error: unexpected 'over' in expression"


def test_every_example_fails_and_is_told_as_its_own_mistake():
    for mistake, texts in EXAMPLES.items():
        for text in texts:
            with pytest.raises(UnexpectedToken) as exc:
                grammar.parser().parse(text, start="spec")
            told = [m for m in _mistake_states()[_key(exc.value)] if _MESSAGES[m](exc.value)]
            assert told[:1] == [mistake], (mistake, text, told)


def test_the_grammar_cache_lives_in_a_private_folder_or_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = grammar._cache_file()
    assert path is not None and os.path.dirname(path) == str(tmp_path / "convspec")
    assert os.stat(tmp_path / "convspec").st_mode & 0o077 == 0
    os.chmod(tmp_path / "convspec", 0o777)  # others could plant the pickle lark would load
    assert grammar._cache_file() is None
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # never a folder under the working directory
    assert grammar._cache_file() is None
