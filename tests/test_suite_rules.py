"""The suite's own rules, checked: no test depends on how fast the machine is (speed is bench/'s)."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import settings

TESTS = Path(__file__).resolve().parent


def test_hypothesis_has_no_deadline_by_default():
    """conftest.py loads a profile without hypothesis' 200 ms deadline, for every property test."""
    assert settings.default.deadline is None


def test_no_test_sets_a_deadline():
    """A `deadline=` anywhere in the suite is None: a busy two-core machine took 9 s for an example."""
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "deadline":
                if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                    found.append(f"{path.name}:{node.value.lineno}: deadline={ast.unparse(node.value)}")
    assert not found, found


def test_the_fuzz_hang_guard_is_minutes():
    """The fuzzers' alarm only stops a runaway input: it is far past what a slow machine takes."""
    import test_fuzz

    assert test_fuzz.TIME_LIMIT_S >= 60
    assert test_fuzz.FUZZ.deadline is None
