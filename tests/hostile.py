"""Round two of the bad-input catalogue: hostile inputs run as real processes under a memory cap and a
time limit, so work that grows without bound fails the test instead of the machine.

Each case is a `Case` of `test_bad_inputs` (files under a fresh directory, an argv, an expected
fragment of the first error line). `run_hostile` runs it as `python -m convspec.cli` with RLIMIT_AS
and a timeout, and `assert_refused` checks the promises of docs/safety.md: exit 2 (or 130), one
error line, no traceback, nothing left behind, the source untouched.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from test_bad_inputs import Case, _snapshot, _write

ROOT = Path(__file__).resolve().parent.parent

MEMORY_CAP = 1 << 30  # bytes of address space a hostile case may use (torch alone maps ~400 MiB)
TIME_LIMIT = 40  # seconds a hostile case may run, import of torch included


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


def _cap(memory: int):
    def limit() -> None:  # pragma: no cover - runs in the child
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        os.setsid()  # its own process group: a timeout kills everything it started

    return limit


def run_hostile(
    case: Case,
    d: Path,
    *,
    memory: int = MEMORY_CAP,
    timeout: float = TIME_LIMIT,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Outcome:
    """Run `case` under `d` as a separate process with a memory cap and a time limit."""
    argv = [a.replace("{d}", str(d)) for a in case.argv] + list(extra)
    child_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    child_env.pop("FORCE_COLOR", None)
    p = subprocess.Popen(
        [sys.executable, "-m", "convspec.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=child_env,
        preexec_fn=_cap(memory),
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise AssertionError(f"{case.name}: still running after {timeout} s (unbounded work)") from None
    return Outcome(p.returncode, out, err)


def assert_refused(case: Case, d: Path, outcome: Outcome, before: dict, code: int = 2) -> None:
    """Exit `code`, one error line naming what was wrong, no traceback, nothing written or changed."""
    text = outcome.out + outcome.err
    assert "Traceback" not in text, f"{case.name}: {text[-2000:]}"
    assert "MemoryError" not in text, case.name
    assert outcome.code == code, f"{case.name}: exit {outcome.code}: {outcome.err[-2000:]}"
    lines = outcome.err.splitlines()
    assert lines, case.name
    assert case.expected.replace("{d}", str(d)) in lines[0], f"{case.name}: {lines[0]}"
    assert sum(line.startswith("error: ") or ": error: " in line for line in lines) == 1, case.name
    assert not [p for p in d.rglob("*") if ".convspec-" in p.name or p.name.startswith(".out.")], case.name
    assert _snapshot(d) == before, f"{case.name}: something was written, left behind or changed"


def check_case(case: Case, d: Path, **kw) -> Outcome:
    """Write the case's files, run it hostile, and assert it was refused cleanly."""
    _write(case, d)
    before = _snapshot(d)
    outcome = run_hostile(case, d, **kw)
    assert_refused(case, d, outcome, before)
    return outcome
