"""The sharded safetensors writer: headers computed before a byte is written, atomic directories."""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import signal
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ..dtypes import ITEMSIZE
from .destination import check_destination, make_folders, output_path, remove_folders, write_error
from .memory import tensor_memory
from .safetensors import SAFETENSORS_CODES, CheckpointError

try:
    import fcntl
except ImportError:  # not POSIX: temporaries are told apart by pid alone
    fcntl = None

if TYPE_CHECKING:
    import torch

SAFETENSORS_CODE = {name: code for code, name in SAFETENSORS_CODES.items()}  # float32 -> F32
TMP_MARK = ".convspec-tmp-"


MAX_SHARD_SIZE = 2**60  # bytes (1 EiB): more than any disk holds, and every offset still fits an int64
MAX_SIZE_CHARS = 40  # characters of a size: 2**60 is 19 digits, and a unit and spaces a few more


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal, as Hugging Face), '512MiB' -> binary; ints pass through.
    At least 1 byte, at most MAX_SHARD_SIZE; read exactly (no float), so no size can overflow."""
    if isinstance(text, int) and not isinstance(text, bool):
        return _bounded_size(
            text, str(text) if text.bit_length() <= 64 else f"{text.bit_length()}-bit integer"
        )
    shown = str(text)
    shown = shown if len(shown) <= MAX_SIZE_CHARS else f"{shown[:20]}... ({len(shown)} characters)"
    if isinstance(text, str) and len(text) > MAX_SIZE_CHARS:
        raise CheckpointError(
            f"the size {shown!r} is longer than {MAX_SIZE_CHARS} characters",
            hint=f"use e.g. 5GB, 500MB, 2GiB or a byte count, at most {MAX_SHARD_SIZE} bytes (1 EiB)",
        )
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]i?)?B?)\s*", shown, re.I)
    if not isinstance(text, str) or not m:
        raise CheckpointError(
            f"cannot read the size {shown!r}",
            hint=f"use e.g. 5GB, 500MB, 2GiB or a byte count, at most {MAX_SHARD_SIZE} bytes (1 EiB)",
        )
    num, unit = Fraction(m.group(1)), m.group(2).upper().rstrip("B")
    scale = {
        "": 1,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "KI": 2**10,
        "MI": 2**20,
        "GI": 2**30,
        "TI": 2**40,
    }[unit]
    return _bounded_size(int(num * scale), shown)


def _bounded_size(n: int, shown: str) -> int:
    if n < 1 or n > MAX_SHARD_SIZE:
        raise CheckpointError(
            f"the size {shown!r} is {'less than 1 byte' if n < 1 else f'more than {MAX_SHARD_SIZE} bytes'}",
            hint=f"use e.g. 5GB, 500MB, 2GiB or a byte count, from 1 to {MAX_SHARD_SIZE} bytes (1 EiB)",
        )
    return n


def plan_shards(entries: list[tuple[str, tuple[int, ...], str]], max_shard_size: int) -> list[list[int]]:
    """Greedy, in order: a new shard when the next tensor would pass the limit (a big tensor stands alone)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(entries):
        n = ITEMSIZE[dtype]
        for s in shape:
            n *= s
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


# safetensors' dtype order: its writer lays tensors out by dtype, this order reversed, then by name
_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16")
_DTYPE_ORDER += ("F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_DTYPE_RANK = {code: i for i, code in enumerate(_DTYPE_ORDER)}


def laid_out(entries: list) -> list:
    """(key, shape, dtype) entries in the order safetensors' own writer lays a file out (larger dtypes
    first, then by name), so that a file it wrote, converted and converted back, is the same bytes."""
    return sorted(entries, key=lambda e: (-_DTYPE_RANK.get(SAFETENSORS_CODE[e[2]], -1), e[0]))


def shard_header(entries, metadata: dict) -> bytes:
    """A shard's header (length prefix included) for (key, shape, dtype) entries laid out in order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, shape, dtype in entries:
        n = ITEMSIZE[dtype]
        for s in shape:
            n *= s
        header[key] = {
            "dtype": SAFETENSORS_CODE[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as safetensors stores them (C order, on the CPU), without numpy."""
    return tensor_memory(t.detach().to("cpu").contiguous())


class Cleanup(NamedTuple):
    """What `clean_temporaries` found beside a destination."""

    removed: list[Path]  # temporaries of dead runs, deleted
    restored: Path | None  # a destination a killed --overwrite had moved aside, renamed back into place
    kept: list[tuple[Path, int | None]]  # temporaries of running processes (their pid), left alone


def clean_temporaries(dst: Path) -> Cleanup:
    """Delete what killed runs left beside `dst` (their temporaries, their pickle copies), restore a
    destination one of them had moved aside, and leave alone the temporaries of conversions still running."""
    removed: list[Path] = []
    kept: list[tuple[Path, int | None]] = []
    restored = None
    asides = []
    for path, aside, pid, start in _temporaries(dst):
        if _in_use(path, pid, start):
            kept.append((path, pid))
        elif aside:
            asides.append(path)
        else:
            _remove(path)
            removed.append(path)
    for path in sorted(asides, key=_ctime, reverse=True):
        # a run killed between moving the old destination aside and renaming the new one in
        if restored is None and not os.path.lexists(dst):
            try:
                os.rename(path, dst)
                restored = path
                _fsync_dir(dst.parent)
                continue
            except OSError:
                pass
        _remove(path)
        removed.append(path)
    removed += clean_scratch(dst.parent)  # a killed run's pickle copy, made beside its destination
    return Cleanup(removed, restored, kept)


def _temporaries(dst: Path) -> Iterator[tuple[Path, bool, int | None, int | None]]:
    """Every temporary beside `dst` named as this writer names them: (path, moved aside?, pid, start)."""
    prefix = f".{dst.name}{TMP_MARK}"
    try:
        names = [n for n in os.listdir(dst.parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in sorted(names):
        m = re.fullmatch(r"(old-)?(\d+)(?:-(\d+))?", name[len(prefix) :])
        if m is None:
            continue  # not a name this writer makes: not ours to delete
        yield dst.parent / name, m.group(1) is not None, int(m.group(2)), m.group(3) and int(m.group(3))


def _in_use(path: Path, pid: int | None, start: int | None) -> bool:
    """A writer holds a lock on its temporary until it ends (the kernel drops it with the process, in
    any pid namespace); the pid and start time in the name cover the instant before the lock is taken."""
    if _locked(path):
        return True
    if pid is None or pid == os.getpid() or not _alive(pid):
        return False
    if start is None:
        return True  # named by an older writer: a live pid is all there is to go on
    now = _start_time(pid)
    return now is None or now == start  # a different start time: the pid was reused


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `path` (a directory), or None where no lock
    can be taken here; raises BlockingIOError when another process holds it."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None
    return fd


def _locked(path: Path) -> bool:
    """Whether a live process holds `path`'s lock (the lock is taken and dropped to find out)."""
    try:
        fd = _try_lock(path)
    except BlockingIOError:
        return True
    if fd is not None:
        os.close(fd)
    return False


def _lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `path` (a directory); None where it cannot."""
    try:
        return _try_lock(path)
    except BlockingIOError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (Linux); None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _ctime(path: Path) -> float:
    try:
        return path.lstat().st_ctime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot sync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_RENAMEAT2: object = ...  # libc's renameat2, looked up on first use; None where there is none


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) with `flags`: True when done, False where the system or filesystem lacks it."""
    global _RENAMEAT2
    if _RENAMEAT2 is ...:
        _RENAMEAT2 = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _RENAMEAT2 = fn
            except (OSError, AttributeError):
                pass
    if _RENAMEAT2 is None:
        return False
    import ctypes

    at_fdcwd = -100
    if _RENAMEAT2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _mark() -> str:
    """This process in a temporary's name: pid, and start time where known (a reused pid is not alive)."""
    start = _start_time(os.getpid())
    return f"{os.getpid()}" if start is None else f"{os.getpid()}-{start}"


class Atomic:
    """What AtomicDir and io/gguf_writer's AtomicFile share: a `with` block commits on success, and
    aborts on any failure (an OSError said as one message naming `dst`)."""

    dst: Path
    tmp: Path

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def _rename_noreplace(self) -> bool:
        """Rename the temporary to `dst` unless something is there: False, and nothing done, if it is."""
        try:
            if _rename2(self.tmp, self.dst, RENAME_NOREPLACE):
                return True
        except FileExistsError:
            return False
        if os.path.lexists(self.dst):
            return False
        os.rename(self.tmp, self.dst)
        return True

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
                return
            except BaseException as failed:
                exc = failed
        self.abort()
        if isinstance(exc, OSError):
            raise write_error(exc, self.dst, self.tmp) from None
        if exc_type is None:
            raise exc


class AtomicDir(Atomic):
    """A temporary directory beside `dst`, renamed into place only by `commit()`; removed on failure.
    A kill at any instant leaves `dst` as it was or complete; the next run clears what the dead one left."""

    def __init__(self, dst: str | Path, overwrite: bool = False):
        self.dst = output_path(dst)
        self.overwrite = overwrite
        # folders made for dst, innermost first: synced at commit, removed on failure
        self._made: list[Path] = []
        self._lock = self._aside_lock = None
        self.tmp = self.dst.parent / f".{self.dst.name}{TMP_MARK}{_mark()}"
        check_destination(dst)
        made_tmp = False
        try:
            parent = self.dst.parent
            self.cleanup = clean_temporaries(self.dst) if parent.is_dir() else Cleanup([], None, [])
            self.stale = self.cleanup.removed
            if os.path.lexists(self.dst) and not overwrite:
                raise CheckpointError(f"{self.dst} already exists", hint="pass --overwrite to replace it")
            with _deferred_interrupt():  # what is made is recorded before a Ctrl-C can stop it
                self._made = make_folders(parent)
                if os.path.lexists(self.tmp):
                    if _locked(self.tmp):
                        raise CheckpointError(f"{self.dst} is being written by this process already")
                    _remove(self.tmp)
                self.tmp.mkdir()
                made_tmp = True
                self._lock = _lock(self.tmp)
        except BaseException as exc:
            if made_tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self._release()
            remove_folders(self._made)
            if isinstance(exc, OSError):
                raise write_error(exc, self.dst, self.tmp) from None
            raise

    def commit(self) -> None:
        """Everything synced, then the directory swapped in by one atomic rename; the old one goes last."""
        _fsync_tree(self.tmp)
        old = None
        if not self._rename_noreplace():
            if not self.overwrite:
                raise CheckpointError(
                    f"{self.dst} appeared while converting; it was left as it is",
                    hint="pass --overwrite to replace it",
                )
            if _rename2(self.tmp, self.dst, RENAME_EXCHANGE):
                old = self.tmp  # the old destination, now under the temporary's name
            else:
                old = self._swap_aside()
        _fsync_dir(self.dst.parent)
        for made in self._made:
            _fsync_dir(made.parent)
        self._made = []  # they hold the destination now
        self._release()
        if old is not None:
            _remove(old)

    def _swap_aside(self) -> Path:
        """Without an atomic exchange: old moved aside (locked: no other run takes it for a dead one's), new
        renamed in. A kill between the renames leaves the old one aside; the next run renames it back."""
        old = self.dst.parent / f".{self.dst.name}{TMP_MARK}old-{_mark()}"
        self._aside_lock = _lock(self.dst) if self.dst.is_dir() and not self.dst.is_symlink() else None
        os.rename(self.dst, old)
        try:
            os.rename(self.tmp, self.dst)
        except BaseException:
            os.rename(old, self.dst)
            raise
        return old

    def _release(self) -> None:
        for fd in (self._lock, self._aside_lock):
            if fd is not None:
                os.close(fd)
        self._lock = self._aside_lock = None

    def abort(self) -> None:
        """The temporary and the folders made for it removed; a second Ctrl-C meanwhile is ignored."""
        with _uninterrupted():
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._release()
            remove_folders(self._made)
            self._made = []

    def __enter__(self) -> Path:
        return self.tmp


@contextmanager
def _sigint_handled_by(handler) -> Iterator[None]:
    """SIGINT goes to `handler` for the duration (in the main thread; elsewhere signals cannot be set)."""
    try:
        before = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _uninterrupted():
    """SIGINT ignored for the duration."""
    return _sigint_handled_by(signal.SIG_IGN)


@contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """A SIGINT meanwhile is held and delivered at the end."""
    held: list[int] = []
    try:
        with _sigint_handled_by(lambda signum, frame: held.append(signum)):
            yield
    finally:  # delivered even when the block failed, as it would have been without the hold
        if held:
            signal.raise_signal(signal.SIGINT)


SCRATCH_MARK = ".convspec-pickle-"
_scratch_count = itertools.count()


@contextmanager
def scratch_dir(parent: str | Path, purpose: str | Path, removed: list[Path] | None = None) -> Iterator[Path]:
    """A folder in `parent` for intermediate files (a pickle checkpoint's safetensors copy), locked
    while it lives and named with this process's pid and start time as `AtomicDir`'s temporaries
    are; removed on exit, with the folders made for it. One a killed run left in `parent` is removed
    here by the next run (and listed in `removed`). OS errors name `purpose`, what it is for."""
    parent = Path(parent)
    found = clean_scratch(parent)
    if removed is not None:
        removed.extend(found)
    start = _start_time(os.getpid()) or 0
    path = parent / f"{SCRATCH_MARK}{os.getpid()}-{start}-{next(_scratch_count)}"
    made: list[Path] = []
    lock = None
    try:
        try:
            with _deferred_interrupt():  # what is made is recorded before a Ctrl-C can stop it
                made = make_folders(parent)
                path.mkdir()
                lock = _lock(path)
        except OSError as exc:
            raise write_error(exc, purpose, path) from None
        yield path
    finally:
        with _uninterrupted():
            shutil.rmtree(path, ignore_errors=True)
            if lock is not None:
                os.close(lock)
            remove_folders(made)


def clean_scratch(parent: Path) -> list[Path]:
    """`scratch_dir` folders in `parent` whose process is gone, removed; those in use are left alone."""
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(SCRATCH_MARK))
    except OSError:
        return []
    removed = []
    for name in names:
        m = re.fullmatch(r"(\d+)-(\d+)-\d+", name[len(SCRATCH_MARK) :])
        if m is None:
            continue  # not a name scratch_dir makes: not ours to delete
        path = parent / name
        if not _in_use(path, int(m.group(1)), int(m.group(2)) or None):
            _remove(path)
            removed.append(path)
    return removed


class FileCopy(NamedTuple):
    """A tensor to write as byte ranges of existing files, copied file to file by the kernel:
    spans of (file, absolute offset, offset within the tensor, size)."""

    spans: list[tuple[str, int, int, int]]


def shard_names(count: int, stem: str = "model") -> list[str]:
    """The files of `count` shards, named as Hugging Face names them (`stem`: PEFT's is adapter_model)."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class Place(NamedTuple):
    """Where one output tensor goes: its file in the output directory, its absolute offset there,
    and what it must be (the entry `write_item` checks it against)."""

    file: str
    offset: int
    key: str
    shape: tuple[int, ...]
    dtype: str
    size: int


def shard_places(
    entries: list[tuple[str, tuple[int, ...], str]], max_shard_size: int, metadata: dict | None = None
) -> tuple[list[str], dict[str, Place], list[bytes]]:
    """The shard names, where every tensor goes, and each shard's header: from the entries alone."""
    metadata = {"format": "pt", **(metadata or {})}
    shards = plan_shards(entries, max_shard_size)
    places: dict[str, Place] = {}
    heads = []
    for name, idx in zip(shard_names(len(shards)), shards, strict=True):
        part = laid_out([entries[i] for i in idx])
        heads.append(shard_header(part, metadata))
        pos = len(heads[-1])
        for key, shape, dtype in part:
            size = ITEMSIZE[dtype] * _numel(shape)
            places[key] = Place(name, pos, key, tuple(shape), dtype, size)
            pos += size
    return shard_names(len(shards)), places, heads


def lay_out(
    out_dir: Path,
    entries: list[tuple[str, tuple[int, ...], str]],
    max_shard_size: int,
    metadata: dict | None = None,
) -> tuple[list[str], dict[str, Place]]:
    """Every shard file made at its final size with its header written, before any tensor: then any
    process can write any tensor at its `Place` (multi-process convert). The shard names and places."""
    names, places, heads = shard_places(entries, max_shard_size, metadata)
    ends = {p.file: p.offset + p.size for p in places.values()}
    for name, head in zip(names, heads, strict=True):
        with open(out_dir / name, "wb") as f:
            f.write(head)
            f.truncate(max(ends.get(name, 0), len(head)))
    return names, places


def write_index(out_dir: Path, entries: list, weight_map: Mapping[str, str], names: list[str]) -> None:
    """`model.safetensors.index.json` where there are several shards."""
    if len(names) > 1:
        total = sum(ITEMSIZE[d] * _numel(s) for _, s, d in entries)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_sharded(
    out_dir: Path,
    entries: list[tuple[str, tuple[int, ...], str]],
    tensors: Iterable[tuple[str, torch.Tensor | FileCopy]],
    max_shard_size: int,
    metadata: dict | None = None,
    flush_behind: bool = False,
    stem: str = "model",
) -> list[str]:
    """Write tensors (arriving in `entries` order) as HF-named shards plus an index when there are several.
    Every header is computed before a byte is written; each tensor then goes straight to its offset.
    With `flush_behind`, a background thread pushes written data to disk while the rest is written,
    so that the fsync before the directory is committed finds little left to do."""
    metadata = {"format": "pt", **(metadata or {})}
    shards = plan_shards(entries, max_shard_size)
    names = shard_names(len(shards), stem)
    it: Iterator[tuple[str, torch.Tensor | FileCopy]] = iter(tensors)
    weight_map = {}
    sources: dict[str, int] = {}
    behind = _FlushBehind() if flush_behind else None
    try:
        for name, idx in zip(names, shards, strict=True):
            part = [entries[i] for i in idx]  # the order tensors arrive in
            with open(out_dir / name, "wb") as f:
                laid = laid_out(part)
                head = shard_header(laid, metadata)
                f.write(head)
                f.flush()
                at, pos = {}, len(head)
                for key, shape, dtype in laid:
                    at[key] = pos
                    pos += ITEMSIZE[dtype] * _numel(shape)
                fd = f.fileno()
                try:
                    for key, shape, dtype in part:
                        size = ITEMSIZE[dtype] * _numel(shape)
                        write_item(fd, at[key], (key, shape, dtype, size), next(it), sources)
                        weight_map[key] = name
                        if behind is not None:
                            behind.written(fd, size)
                except BaseException:
                    if behind is not None:
                        behind.settle()  # no flush may outlive the file it flushes
                    raise
                if behind is not None:
                    behind.wait()
    finally:
        if behind is not None:
            behind.close()
        for src in sources.values():
            os.close(src)
    write_index(out_dir, entries, weight_map, names)
    return names


def write_file(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """One safetensors file holding `tensors` laid out as safetensors lays them out, header metadata {"format": "pt"}: what
    `safetensors.torch.save_file` writes, without the numpy it needs. Not atomic (a folder of them is:
    `AtomicDir`); shared or non-contiguous tensors are written as contiguous copies."""
    entries = []
    for key, t in tensors.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"tensor {key}: dtype {t.dtype} cannot be written as safetensors")
        entries.append((key, tuple(t.shape), dtype))
    laid = laid_out(entries)
    with open(path, "wb") as f:
        head = shard_header(laid, {"format": "pt", **(metadata or {})})
        f.write(head)
        f.flush()
        pos = len(head)
        for key, _, _ in laid:
            data = tensor_bytes(tensors[key])
            pwrite_all(f.fileno(), data, pos)
            pos += len(data)


class _FlushBehind:
    """fdatasync in a background thread after every FLUSH_EVERY bytes written, one at a time: the disk
    writes while the writer copies on."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="convspec-flush")
        self.pending = None
        self.since = 0

    def written(self, fd: int, n: int) -> None:
        self.since += n
        if self.since >= FLUSH_EVERY and (self.pending is None or self.pending.done()):
            self.since = 0
            self.pending = self.pool.submit(os.fdatasync, fd)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None
        self.since = 0

    def settle(self) -> None:
        """Wait for a flush in flight, ignoring its outcome (the write already failed)."""
        if self.pending is not None:
            self.pending.exception()
            self.pending = None

    def close(self) -> None:
        self.pool.shutdown()


FLUSH_EVERY = 256 << 20


def write_item(fd: int, pos: int, expected: tuple, got: tuple, sources: dict[str, int]) -> None:
    """One tensor at its offset `pos` of `fd`: copied file to file, or its bytes written; checked against
    its entry (key, shape, dtype, size). `sources` caches the descriptors of files copied from."""
    key, shape, dtype, size = expected
    got_key, item = got
    if isinstance(item, FileCopy):
        got_size = sum(span[3] for span in item.spans)
        if got_key != key or got_size != size:
            raise RuntimeError(f"writer expected {key} ({size} bytes), got {got_key} ({got_size})")
        spans = sorted(item.spans)
        for file in dict.fromkeys(span[0] for span in spans):
            if file not in sources:
                sources[file] = os.open(file, os.O_RDONLY)
        if len(spans) > 1 and size <= GATHER_MAX and size < MIN_COPY_RUN * len(spans):
            pwrite_all(fd, gather(spans, sources, size), pos)
            return
        for file, offset, dst, n in spans:
            copy_range(sources[file], offset, fd, pos + dst, n)
        return
    seen = (got_key, tuple(item.shape), str(item.dtype).removeprefix("torch."))
    if seen != (key, tuple(shape), dtype):
        raise RuntimeError(f"writer expected {key} {list(shape)} {dtype}, got {seen}")
    pwrite_all(fd, tensor_bytes(item), pos)


_write_item = write_item  # its earlier name


MIN_COPY_RUN = (
    64 << 10
)  # spans smaller than this on average are gathered in memory: a syscall each costs more
GATHER_MAX = 64 << 20  # the most a tensor gathered in memory may be (and each source region read for it)
GATHER_WASTE = 16 << 10  # bytes read but not wanted, per read saved, for one read of a whole region to pay


def gather(spans: list[tuple[str, int, int, int]], sources: dict[str, int], size: int) -> memoryview:
    """A tensor's bytes from many small spans (file, offset, offset here, size): the region of each file
    that holds them read at once where that reads little more than they are, else span by span."""
    out = memoryview(bytearray(size))
    for file, group in itertools.groupby(spans, key=lambda span: span[0]):
        group = list(group)
        lo, hi = group[0][1], max(offset + n for _, offset, _, n in group)
        wanted = sum(n for *_, n in group)
        if hi - lo <= min(wanted + len(group) * GATHER_WASTE, GATHER_MAX):
            region = memoryview(_pread_exact(sources[file], lo, hi - lo))
            for _, offset, dst, n in group:
                out[dst : dst + n] = region[offset - lo : offset - lo + n]
        else:
            for _, offset, dst, n in group:
                out[dst : dst + n] = _pread_exact(sources[file], offset, n)
    return out


def _pread_exact(fd: int, offset: int, n: int) -> bytearray:
    """`n` bytes at `offset`; a file that ends before is reported as `copy_range` reports it."""
    buf = bytearray(n)
    view, done = memoryview(buf), 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CheckpointError(f"a source file ended {n - done} bytes early while copying")
        done += got
    return buf


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


_COPY_CHUNK = 16 << 20


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, size: int) -> None:
    """`size` bytes from one file to another at given offsets: in the kernel with copy_file_range
    where the filesystems allow it, else through one reused buffer."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < size:
                n = os.copy_file_range(src, dst, size - done, src_offset + done, dst_offset + done)
                if n == 0:
                    raise CheckpointError(f"a source file ended {size - done} bytes early while copying")
                done += n
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
    buf = bytearray(min(_COPY_CHUNK, size - done))
    view = memoryview(buf)
    while done < size:
        n = os.preadv(src, [view[: min(len(buf), size - done)]], src_offset + done)
        if n == 0:
            raise CheckpointError(f"a source file ended {size - done} bytes early while copying")
        pwrite_all(dst, view[:n], dst_offset + done)
        done += n


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
