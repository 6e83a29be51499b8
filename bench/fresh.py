"""One timed job of a benchmark in a fresh process: what its last line printed (JSON, with "s" the
seconds it timed itself) and its peak RSS from the kernel (`wait4`), so each job's memory is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_job(script: str, args: list[str], env: dict | None = None) -> tuple[float, float, dict]:
    """(seconds, peak RSS in GiB, what it printed) of `python script *args`; SystemExit if it fails."""
    p = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, text=True, env=env)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{' '.join(args)} failed ({code})")
    got = json.loads(out.strip().splitlines()[-1])
    return got["s"], usage.ru_maxrss / (1 << 20), got
