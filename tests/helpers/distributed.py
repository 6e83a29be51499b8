"""Several worker processes on this machine, one torch.distributed rendezvous (gloo, CPU): each is
killed after `timeout` seconds at most, so a test that goes wrong fails and never hangs. Each worker
writes its result as JSON to `out/rank{R}.json`; a worker must tear its process group down itself.

With torch 2.13 and gloo, about one process exit in six after `destroy_process_group` aborts
("terminate called without an active exception") once yaml or regex is imported (a 2-rank script
that only makes a group, gathers once and destroys it shows it; without those imports, 0 in 70). A
worker that ran to its end has written its result, so it leaves without the interpreter's
finalizers: `EXIT` is appended to every script."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


EXIT = """
import os as _os, sys as _sys
_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, world: int, out: Path, *args: str, timeout: float = 120) -> list[dict]:
    """Run `script` (Python source) as `world` ranks with `out` and `args` as argv[1:]; the results
    each wrote to `out/rank{R}.json`. Fails with the workers' output if any exits non-zero."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "PYTHONPATH": str(ROOT),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script + EXIT, str(out), *map(str, args)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
