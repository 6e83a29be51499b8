"""DOT text to svg/png bytes with graphviz: a system `dot`, else the `graphviz-pure` build that
`pip install 'convspec[pictures]'` brings (what CI has), so pictures need no system package."""

from __future__ import annotations

import shutil
import subprocess

from .errors import ConvspecError

FORMATS = ("svg", "png")
EXECUTABLES = ("dot", "graphviz-pure")  # the first found on PATH is tried first
INSTALL_HINT = "pip install 'convspec[pictures]' (or apt-get install graphviz)"


def find_graphviz() -> list[str]:
    """The graphviz executables on PATH, `dot` before `graphviz-pure`; empty when there is none."""
    return [path for name in EXECUTABLES if (path := shutil.which(name)) is not None]


def render_dot(dot_text: str, fmt: str, timeout: float = 120.0) -> bytes:
    """DOT text as svg or png bytes. No graphviz, a timeout, or a failure (graphviz's own message)
    is a ConvspecError; a `dot` that fails (a build without png) hands over to graphviz-pure."""
    if fmt not in FORMATS:
        raise ConvspecError(f"cannot draw {fmt!r}: pictures are {' or '.join(FORMATS)}")
    exes = find_graphviz()
    if not exes:
        raise ConvspecError(f"drawing {fmt} needs graphviz", hint=INSTALL_HINT)
    data = dot_text.encode("utf-8", "backslashreplace")
    errors: list[ConvspecError] = []
    for exe in exes:
        try:
            done = subprocess.run([exe, f"-T{fmt}"], input=data, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ConvspecError(
                f"graphviz ({exe}) took longer than {timeout:g}s to draw the {fmt}",
                hint="use --format dot and run graphviz yourself",
            ) from exc
        except OSError as exc:
            errors.append(ConvspecError(f"could not run graphviz ({exe}): {exc}", hint=INSTALL_HINT))
            continue
        if done.returncode == 0 and done.stdout:
            return done.stdout
        err = done.stderr.decode("utf-8", "replace").strip() or f"exit status {done.returncode}, no output"
        errors.append(ConvspecError(f"graphviz ({exe}) failed to draw the {fmt}: {err}"))
    raise errors[0]
