"""Where an output may go, checked before anything is read or written: never onto, around or inside
what it is made from, nor around the working directory, with room for its temporary name; the
folders made for it are removed again if it fails; an operating-system error while writing it is
one message naming the path and what to do."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .checkpoint import WEIGHT_SUFFIXES
from .safetensors import CheckpointError

# bytes in a destination's name: the 255 of NAME_MAX less the 47 the writer's temporary name adds
# beside it ('.', '.convspec-tmp-old-', a pid of up to 7 digits, '-', a start time of up to 20)
MAX_DST_NAME = 200


def real(path: str | Path) -> Path:
    """`path` with every link, `.` and `..` resolved as the kernel would (what is missing kept as named)."""
    return Path(os.path.realpath(path))


def output_path(dst: str | Path) -> Path:
    """`dst` as a folder with a name and a parent: `.`, `..` (or `a/..`) resolved to the folder they
    name; otherwise as given, a final link kept (--overwrite replaces a link, never what it points to)."""
    path = Path(dst)
    return real(path) if path.name in ("", "..") else path


def source_paths(src: str | Path | list | tuple) -> list[Path]:
    """The real paths a conversion of `src` reads, found without opening a file: the checkpoint (a
    folder, an index or a file), what its direct entries link to (a Hugging Face cache snapshot's
    files are links into its blobs folder), and beside a file, its config.json and, for an index,
    the weight files beside it."""
    items = list(src) if isinstance(src, list | tuple) else [src]
    out: list[Path] = []
    for item in items:
        path = real(item)
        out.append(path)
        beside = path if path.is_dir() else path.parent
        try:
            entries = list(os.scandir(beside))
        except OSError:  # unreadable or not there: the reader says so, naming the file
            continue
        for e in entries:
            if path.is_dir():
                if e.is_symlink():
                    out.append(real(e.path))
            elif e.name == "config.json" or (path.suffix == ".json" and e.name.endswith(WEIGHT_SUFFIXES)):
                out.append(real(e.path))
    return out


def check_output(dst: str | Path, inputs: list[Path], shown: str | Path, *, what: str = "the source") -> None:
    """Refuse an output `dst` that is, holds, or is inside one of `inputs` (real paths, from
    `source_paths` or a list of files); `shown` is the input as the user named it."""
    target = real(dst)
    alias = "" if Path(os.path.abspath(dst)) == target else f" (that is {target})"
    for p in inputs:
        if target == p:
            how = "is"
        elif target in p.parents:
            how = "holds"
        elif p in target.parents:
            how = "is inside"
        else:
            continue
        named = "" if p == Path(os.path.abspath(shown)) else f" ({p})"
        raise CheckpointError(
            f"cannot write {dst}{alias}: it {how} {what} {shown}{named}",
            hint=f"choose an output outside {shown}, and not a folder that holds it: "
            "writing there would replace or change what is being read",
        )


def check_destination(dst: str | Path) -> None:
    """Refuse, before anything is read, a destination folder that cannot be made here: the working
    directory or a folder holding it, a name with no room for the temporary beside it, a parent that
    is a file."""
    path = output_path(dst)
    target, here = real(path), real(os.getcwd())
    if target == here or target in here.parents:
        how = "is" if target == here else "holds"
        raise CheckpointError(
            f"cannot write {dst}: it {how} the working directory {here}",
            hint="name a new folder for the output (e.g. converted/): "
            "replacing the folder you are in would leave your shell in a deleted one",
        )
    size = len(os.fsencode(path.name))
    if size > MAX_DST_NAME:
        raise CheckpointError(
            f"cannot write {dst}: its name is {size} bytes long, more than {MAX_DST_NAME}",
            hint="choose a shorter name: the hidden temporary written beside it needs the rest of "
            "the file system's 255",
        )
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if os.path.lexists(folder) and not folder.is_dir():
        raise CheckpointError(
            f"cannot write {dst}: {folder} is a file, not a folder",
            hint="choose a destination whose parent is a folder (or one that can be made)",
        )


def make_folders(folder: Path) -> list[Path]:
    """Make `folder` and its missing parents; the ones this call made, innermost first (for
    `remove_folders`). Nothing is left made if it fails."""
    missing = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    try:
        for m in reversed(missing):
            try:
                os.mkdir(m)
            except FileExistsError:
                if not m.is_dir():
                    raise
                continue  # another process made it meanwhile: not ours to remove
            made.append(m)
    except BaseException:
        remove_folders(made[::-1])
        raise
    return made[::-1]


def remove_folders(made: list[Path]) -> None:
    """Remove the folders `make_folders` made (innermost first), each only while empty: one that
    something else was put in stays, with its parents."""
    for m in made:
        try:
            os.rmdir(m)
        except OSError:
            return


_WHAT = {
    errno.ENOSPC: ("no space is left on the device", "free space there, or write to another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free space there, or write to another disk"),
    errno.EFBIG: (
        "a file would be larger than this file system (or a limit on this process) allows",
        "pass a smaller --max-shard-size, or write to another file system",
    ),
    errno.ENAMETOOLONG: ("the path is too long for the file system", "choose a shorter path"),
    errno.EROFS: ("the file system is read-only", "write to another folder"),
}


def write_error(exc: OSError, dst: str | Path, tmp: Path | None = None) -> CheckpointError:
    """An operating-system error met while writing `dst` (into its temporary `tmp`), as one message
    naming the path and what to do. An error on another file (a source file read) names that file."""
    name = exc.filename
    failed = Path(os.fsdecode(name)) if isinstance(name, str | bytes | os.PathLike) else None
    why = exc.strerror or str(exc)
    if failed is not None and tmp is not None and not _near(failed, Path(dst), tmp):
        return CheckpointError(f"cannot read {failed}: {why}", hint="check that the file can be read")
    if exc.errno in _WHAT:
        text, hint = _WHAT[exc.errno]
        return CheckpointError(f"cannot write {dst}: {text}", hint=f"{hint}; nothing was left behind")
    if exc.errno in (errno.EACCES, errno.EPERM):
        folder = Path(dst).parent  # the temporary's folder, where its own name says nothing to the user
        if failed is not None and not (tmp is not None and (failed == tmp or tmp in failed.parents)):
            folder = failed.parent
        return CheckpointError(
            f"cannot write {dst}: permission denied in {folder}",
            hint="choose a folder you can write to, or ask its owner for write permission",
        )
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and failed is not None:
        return CheckpointError(
            f"cannot write {dst}: {_first_file(failed)} is a file, not a folder",
            hint="choose a destination whose parent is a folder",
        )
    return CheckpointError(f"cannot write {dst}: {why}", hint="nothing was left behind")


def _near(path: Path, dst: Path, tmp: Path) -> bool:
    """Whether `path` is the destination, its temporary, a parent of either, or inside either."""
    p = Path(os.path.abspath(path))
    for own in (Path(os.path.abspath(dst)), Path(os.path.abspath(tmp))):
        if p == own or p in own.parents or own in p.parents:
            return True
    return False


def _first_file(path: Path) -> Path:
    """The first existing path on the way to `path` that is not a folder (`path` itself if none)."""
    for p in reversed((path, *path.parents)):
        if os.path.lexists(p) and not p.is_dir():
            return p
    return path
