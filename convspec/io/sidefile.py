"""Files read whole (an index, a config.json, a manifest) and the files whose headers are read: each is
checked to be a regular file before it is opened and opened without blocking, so a pipe or a device
never hangs or wakes anything; side files are read with a stated size cap and decoded as strict JSON
(UTF-8, no key given twice), so a huge or ambiguous file is one error naming it, not a traceback."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from ..errors import ConvspecError

MAX_INDEX_BYTES = 64 << 20  # the largest Hub index (~91k keys, about 9 MB) seven times over
MAX_CONFIG_BYTES = 16 << 20  # configs are kilobytes; the largest seen (vocabularies inline) about 2 MB
MAX_MANIFEST_BYTES = 128 << 20  # about 350 bytes a tensor: 350k source and output tensors

_KINDS = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
}
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


def os_error(path: Path, exc: OSError) -> str:
    """What an OSError on `path` means, in one line that names the file."""
    code = exc.errno
    if code == errno.ENOENT:
        return f"{path}: does not exist"
    if code in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied"
    if code == errno.ELOOP:
        return f"{path}: a symlink loop (too many levels of symbolic links)"
    if code == errno.EISDIR:
        return f"{path}: is a directory, not a file"
    if code == errno.ENOTDIR:
        return f"{path}: a part of the path is not a directory"
    return f"{path}: cannot read it ({exc.strerror or exc})"


def open_regular(path: str | Path, error: type[ConvspecError] = ConvspecError, what: str = "file") -> int:
    """A read-only descriptor of `path`, which must be a regular file: its type is checked before the
    open (a device is never opened) and again on the descriptor (a swap in between is caught), and the
    open never blocks (a pipe is refused, not waited on)."""
    path = Path(path)
    try:
        before = os.stat(path)
        _check_regular(path, before, error, what)
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        raise error(os_error(path, exc)) from None
    try:
        now = os.fstat(fd)
        _check_regular(path, now, error, what)
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            raise error(f"{path}: replaced while it was being opened")
    except BaseException:
        os.close(fd)
        raise
    return fd


def regular_file(
    path: str | Path, error: type[ConvspecError] = ConvspecError, what: str = "file"
) -> os.stat_result:
    """`path`'s status, which must be a regular file's (links followed): else an error naming it."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise error(os_error(path, exc)) from None
    _check_regular(path, st, error, what)
    return st


def _check_regular(path: Path, st: os.stat_result, error: type[ConvspecError], what: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "a special file")
        raise error(f"{path}: not a regular file ({kind})")


def read_capped(
    path: str | Path, cap: int, error: type[ConvspecError] = ConvspecError, what: str = "file"
) -> bytes:
    """The whole of a regular file of at most `cap` bytes; a larger one is refused after reading at most
    cap + 1 bytes (none when its size already says so)."""
    path = Path(path)
    fd = open_regular(path, error, what)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise error(_too_big(path, cap, what, size))
        chunks, got = [], 0
        while got <= cap:  # a file that grows after fstat is still read no further than cap + 1
            chunk = os.read(fd, min(cap + 1 - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > cap:
            raise error(_too_big(path, cap, what, None))
        return b"".join(chunks)
    except OSError as exc:
        raise error(os_error(path, exc)) from None
    finally:
        os.close(fd)


def _too_big(path: Path, cap: int, what: str, size: int | None) -> str:
    has = f"{size} bytes" if size is not None else f"more than {cap} bytes"
    return f"{path}: {has}, over the limit of {cap} bytes for a {what}"


class DuplicateKey(ValueError):
    """A JSON object gives one key twice: json.loads would keep the last one silently."""


def unique_keys(pairs: list) -> dict:
    """A JSON object as a dict, its keys compared after decoding (`"a"` and `"\\u0061"` are one key);
    a key given twice is refused, since which value was meant is a guess."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKey(k)
            seen.add(k)
    return out


def load_json(
    path: str | Path, cap: int, error: type[ConvspecError] = ConvspecError, what: str = "file"
) -> object:
    """A side file's JSON, read with `read_capped`: UTF-8 text, no key given twice in one object; a
    malformed one is an error naming the file (and the line:column where JSON says)."""
    path = Path(path)
    data = read_capped(path, cap, error, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKey as exc:
        raise error(
            f"{path}: the key {exc.args[0]!r} is given twice in one object (which is meant?)"
        ) from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except ValueError as exc:  # an integer past 4300 digits
        raise error(f"{path}: invalid JSON ({str(exc)[:200]})") from None
    except RecursionError:
        raise error(f"{path}: invalid JSON (nested too deeply)") from None
