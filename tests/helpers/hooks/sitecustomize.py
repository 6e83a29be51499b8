"""Conditions a hostile case needs in its child process, set up at interpreter start when this folder
leads PYTHONPATH (see `hooked_env`): CONVSPEC_TEST_HOOK holds ';'-separated directives.

- `fsize=N`: no file may grow past N bytes (RLIMIT_FSIZE) and SIGXFSZ is ignored, so a write past it
  fails with EFBIG, as a full disk fails with ENOSPC: the kernel's own error, unprivileged.
- `nodac`: drop the capabilities that let root ignore file permissions (CAP_DAC_OVERRIDE,
  CAP_DAC_READ_SEARCH, CAP_FOWNER), so a read-only folder refuses root as it refuses a user.
- `SIGNAL@module:qualname#n`: send SIGNAL (INT, KILL) to this process on the n-th call of that
  function (after it returns; `<` before): a real signal, at a chosen point of the work.
"""

from __future__ import annotations

import os
import sys


def _fsize(n: int) -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


def _nodac() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        return  # no capabilities to drop
    for bit in (1, 2, 3):
        data[0].effective &= ~(1 << bit)
        data[0].permitted &= ~(1 << bit)
    libc.capset(ctypes.byref(header), data)


def _signal_at(directive: str) -> None:
    import functools
    import importlib
    import signal

    name, where = directive.split("@", 1)
    before = where.startswith("<")
    where, _, nth = where.lstrip("<").partition("#")
    module, _, qualname = where.partition(":")
    n = int(nth or 1)
    sig = getattr(signal, f"SIG{name}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    owner = importlib.import_module(module)
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, attr)
    calls = [0]

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if before and calls[0] == n:
            os.kill(os.getpid(), sig)
        out = real(*args, **kwargs)
        if not before and calls[0] == n:
            os.kill(os.getpid(), sig)
        return out

    setattr(owner, attr, wrapper)


for _d in filter(None, os.environ.get("CONVSPEC_TEST_HOOK", "").split(";")):
    if _d.startswith("fsize="):
        _fsize(int(_d[6:]))
    elif _d == "nodac":
        _nodac()
    else:
        _signal_at(_d)
