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
        if os.path.lexists(parent):
            raise ConvspecError(f"cannot write {path}: {parent} is not a folder", hint="choose another path")
        raise ConvspecError(f"cannot write {path}: folder {parent} does not exist", hint="create it first")
    try:  # the temporary's name is cut short: a name the system takes must not fail for its temporary
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:48]}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise _error(path, exc) from None
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
        raise _error(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _error(path: Path, exc: OSError) -> ConvspecError:
    from .destination import write_error

    err = write_error(exc, path)
    return ConvspecError(err.message, hint=err.hint)
