"""Writing one small file whole: a temporary beside it, synced, then renamed over it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import ConvspecError


def write_file_atomic(path: str | Path, data: bytes) -> None:
    """`path` holds `data` afterwards, or is unchanged if anything fails: never half-written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConvspecError(f"cannot write {path}: folder {parent} does not exist", hint="create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ConvspecError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
