"""Running the CLI in a fresh interpreter, to see what it imports."""

from __future__ import annotations

import subprocess
import sys


def cli_without_torch(argv: list[str]) -> tuple[str, str]:
    """Run `convspec ARGV` in a fresh interpreter: ("NO-TORCH 0" when it exited 0 and never imported
    torch), and the process's output for an assertion message."""
    code = (
        "import sys; from convspec.cli import main; "
        f"rc = main({argv!r}); "
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return res.stdout.strip().splitlines()[-1], res.stdout[-500:] + res.stderr[-500:]
