"""Multi-process convert: every shard file is laid out first (its header and each tensor's offset are
known from headers alone), then the groups are split across worker processes that write their
tensors at their offsets. The bytes are those one process writes; the commit stays the parent's."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from .bind import BoundPlan
from .dtypes import ITEMSIZE
from .errors import ConvspecError
from .io.checkpoint import Checkpoint
from .io.formats import open_checkpoint
from .io.writer import Place, lay_out, write_index, write_item

FAULT_ENV = "CONVSPEC_TEST_WORKER_FAULT"  # "N:raise", "N:kill" or "N:hang": worker N fails (tests only)
WORKERS_HINT = "e.g. --workers 4; 1 (the default) converts in this process"
RANKS_HINT = "under torchrun the ranks are the workers: leave --workers out"


class WorkerError(ConvspecError):
    """A worker process of a multi-process convert failed or died: nothing was written."""


MAX_WORKERS = 1024  # processes a convert may start: past any machine's cores, short of a fork bomb


def check_workers(value: Any) -> int:
    """The number of worker processes, from an int or a decimal string: a whole number, at least 1
    and at most MAX_WORKERS."""
    from .ops.base import short

    n = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and 0 < len(value.strip()) <= 9 and value.strip().isdigit():
        n = int(value.strip())
    if n is None or not 1 <= n <= MAX_WORKERS:
        raise ConvspecError(
            f"--workers must be a whole number of at least 1 (at most {MAX_WORKERS}), not {short(value)}",
            hint=WORKERS_HINT,
        )
    return n


@dataclasses.dataclass
class Unit:
    """What one worker may be given: a passthrough key (`ref`: its source key) or a group (its index)."""

    kind: str  # "pass" or "group"
    ref: Any
    size: int  # output bytes


def units(bound: BoundPlan, dtype: str | None) -> list[Unit]:
    """The units of work in the order `stream_bound` runs them, each with the bytes it writes."""

    def nbytes(shape, dt) -> int:
        n = ITEMSIZE[dtype or dt]
        for s in shape:
            n *= s
        return n

    out = [Unit("pass", s, nbytes(bound.layout[s].shape, bound.layout[s].dtype)) for s in bound.passthrough]
    for i, g in enumerate(bound.groups):
        out.append(Unit("group", i, sum(nbytes(info.shape, info.dtype) for info in g.outputs.values())))
    return out


def split(sizes: list[int], n: int) -> list[range]:
    """Contiguous runs of units, one per worker (at most one per unit), of about equal bytes: each
    worker then writes one stretch of the output, in order."""
    n = max(1, min(n, len(sizes)))
    total, acc, cuts = sum(sizes), 0, [0]
    for i, size in enumerate(sizes):
        acc += size
        left_units, left_shares = len(sizes) - i - 1, n - len(cuts)
        if left_shares > 0 and left_units >= left_shares:
            if acc * n >= len(cuts) * total or left_units == left_shares:
                cuts.append(i + 1)
    cuts.append(len(sizes))
    return [range(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]


@dataclasses.dataclass
class Job:
    """One worker's share: the bound plan cut to its units, and where each of its outputs goes."""

    index: int
    count: int
    bound: BoundPlan
    src: Any  # what `Checkpoint` takes
    out_dir: Path
    places: dict[str, Place]
    device: str
    dtype: str | None
    copies: bool
    parent: int  # the parent's pid: a worker whose parent is gone stops
    stream: Callable  # streaming.stream_bound, passed down: this module sits below streaming


@dataclasses.dataclass
class Work:
    """A bound conversion to split: what `stream_bound` (passed as `stream`: this module sits below
    streaming) is called with, the outputs in order, and the progress callback."""

    bound: BoundPlan
    ckpt: Checkpoint
    entries: list[tuple[str, tuple[int, ...], str]]
    stream: Callable
    device: str = "cpu"
    dtype: str | None = None
    on_tensor: Callable[[str, int], None] | None = None


def jobs_for(work: Work, out_dir: Path, places: dict[str, Place], workers: int) -> list[Job]:
    """One Job per share of the units (at most one worker per unit)."""
    bound = work.bound
    all_units = units(bound, work.dtype)
    shares = split([u.size for u in all_units], workers)
    src = work.ckpt.files if work.ckpt.files else work.ckpt.src
    copies = work.device == "cpu"  # as a single-process convert: block moves copied file to file
    out = []
    for i, share in enumerate(shares):
        mine = [all_units[j] for j in share]
        passthrough = {u.ref: bound.passthrough[u.ref] for u in mine if u.kind == "pass"}
        groups = [bound.groups[u.ref] for u in mine if u.kind == "group"]
        sub = dataclasses.replace(bound, passthrough=passthrough, groups=groups)
        keys = [*passthrough.values(), *(k for g in groups for k in g.outputs)]
        job = Job(
            index=i,
            count=len(shares),
            bound=sub,
            src=src,
            out_dir=out_dir,
            places={k: places[k] for k in keys},
            device=work.device,
            dtype=work.dtype,
            copies=copies,
            parent=os.getpid(),
            stream=work.stream,
        )
        out.append(job)
    return out


def write_parallel(work: Work, out_dir: Path, max_shard_size: int, workers: int) -> list[str]:
    """What `write_sharded` writes for `stream_bound`'s outputs, by `workers` processes (the shard
    names returned); raises WorkerError, every worker ended, when one fails."""
    names, places = lay_out(out_dir, work.entries, max_shard_size)
    run_jobs(jobs_for(work, out_dir, places, workers), work.on_tensor)
    write_index(out_dir, work.entries, {k: p.file for k, p in places.items()}, names)
    return names


def run_jobs(jobs: list[Job], on_tensor: Callable[[str, int], None] | None = None) -> None:
    """Each job in a spawned process (no fork under torch's threads); returns when all have written.
    On a failure, an interrupt or SIGTERM the others are ended before the error goes on."""
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    try:
        with _sigterm_interrupts():
            for job in jobs:
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker, args=(job, send), name=f"convspec-worker-{job.index + 1}")
                p.daemon = True
                p.start()
                send.close()  # the child's end: EOF here once the child is gone
                procs.append(p)
                conns.append(recv)
            _wait(procs, conns, on_tensor)
    finally:
        _end(procs)
        for c in conns:
            c.close()


def _wait(procs, conns, on_tensor) -> None:
    """Relay progress until every worker has ended; the first failure raises."""
    n = len(procs)
    ok = [False] * n
    listening = dict(enumerate(conns))  # until each says done or reaches EOF
    by_sentinel = {p.sentinel: i for i, p in enumerate(procs)}
    while by_sentinel:
        for ready in wait([*listening.values(), *by_sentinel]):
            if ready in by_sentinel:
                i = by_sentinel.pop(ready)
                while i in listening and listening[i].poll():  # what it said before it ended
                    _listen(i, n, listening, ok, on_tensor)
                procs[i].join()
                if not ok[i] or procs[i].exitcode != 0:
                    raise WorkerError(f"worker {i + 1} of {n} {_ended(procs[i].exitcode)}", hint=_NOTHING)
            else:
                i = conns.index(ready)
                if i in listening:
                    _listen(i, n, listening, ok, on_tensor)


_NOTHING = "nothing was written: the destination is left as it was"


def _listen(i: int, n: int, listening: dict, ok: list, on_tensor) -> None:
    """One message of worker i: progress, done, or its error (raised here); EOF stops the listening."""
    try:
        msg = listening[i].recv()
    except (EOFError, OSError):
        del listening[i]
        return
    if msg[0] == "tensor":
        if on_tensor is not None:
            on_tensor(msg[1], msg[2])
    elif msg[0] == "error":
        _, key, message, hint = msg
        where = f" while writing {key}" if key else ""
        raise WorkerError(f"worker {i + 1} of {n} failed{where}: {message}", hint=hint or _NOTHING)
    else:
        ok[i] = True
        del listening[i]


def _ended(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"ended with exit code {code} before finishing"


def _end(procs) -> None:
    """Every worker still running terminated, then killed if it lingers; all reaped."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt for the duration, so the workers are ended and the temporary
    removed as on Ctrl-C (in the main thread; elsewhere signals cannot be set)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        before = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _worker(job: Job, conn) -> None:
    """A worker process: its share written, progress and the outcome sent to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends us
    _die_with_parent(job.parent)
    _limit_threads(job.count)
    current: list[str | None] = [None]
    try:
        _fault(job.index)
        write_share(job, lambda key, n: conn.send(("tensor", key, n)), current)
        conn.send(("done",))
    except BaseException as exc:  # reported to the parent, which names this worker
        conn.send(("error", *_said(exc, current[0])))
        conn.close()
        sys.exit(1)
    conn.close()


def write_share(job: Job, sent: Callable[[str, int], None], current: list | None = None) -> None:
    """A job's tensors, made as `stream_bound` makes them, each written at its place and synced."""
    ckpt = open_checkpoint(job.src)
    fds: dict[str, int] = {}
    sources: dict[str, int] = {}
    try:
        for key, item in job.stream(job.bound, ckpt, job.device, job.dtype, copies=job.copies):
            if current is not None:
                current[0] = key
            p = job.places[key]
            if p.file not in fds:
                fds[p.file] = os.open(job.out_dir / p.file, os.O_WRONLY)
            write_item(fds[p.file], p.offset, (p.key, p.shape, p.dtype, p.size), (key, item), sources)
            del item
            sent(key, p.size)
            if job.parent != os.getpid() and os.getppid() != job.parent:  # a worker whose parent died
                raise WorkerError("the parent process is gone")
        if current is not None:
            current[0] = None
        for fd in fds.values():
            os.fdatasync(fd)  # each worker syncs its own writes: the parent's fsync finds little left
    finally:
        for fd in [*fds.values(), *sources.values()]:
            os.close(fd)
        ckpt.close()


def _die_with_parent(parent: int) -> None:
    """On Linux, SIGKILL when the parent dies (a killed convert leaves no worker writing on)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def _limit_threads(count: int) -> None:
    """The cores shared among the workers: torch in each uses its part of them."""
    threads = max(1, (os.cpu_count() or 1) // count)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _fault(index: int) -> None:
    """Tests make worker `index` fail through FAULT_ENV ("N:raise", "N:kill" or "N:hang", N from 1)."""
    what = os.environ.get(FAULT_ENV, "").partition(":")
    if what[0] != str(index + 1):
        return
    if what[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what[2] == "hang":  # until the parent ends it
        signal.pause()
    if what[2] == "raise":
        raise RuntimeError(f"{FAULT_ENV} made this worker fail")


def torchrun_world() -> int | None:
    """The world size when launched by torchrun (or any launcher setting its env), else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        int(os.environ["RANK"])
    except (KeyError, ValueError):
        return None
    has_master = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
    return world if world > 1 and has_master else None


def convert_on_ranks(
    work: Work, dst: str | Path, max_shard_size: int, finish: Callable[[Path], None], overwrite: bool = False
) -> tuple[list[str], Any]:
    """Every rank of a torch.distributed job writes its share (the ranks are the workers); rank 0
    makes the temporary, and after all have written (gloo), finishes it with `finish` and commits.
    Every rank returns (the shard names, what rank 0 cleaned up) or raises the same failure. The
    caller holds the process group (`ranks.process_group`)."""
    import torch.distributed as dist

    with _sigterm_interrupts():
        return _on_ranks(dist, work, dst, max_shard_size, finish, overwrite)


def _on_ranks(dist, work: Work, dst, limit: int, finish, overwrite: bool):
    from .io.writer import AtomicDir, shard_places

    rank, world = dist.get_rank(), dist.get_world_size()
    entries = work.entries
    names, places, _ = shard_places(entries, limit)
    atomic = None
    said: list = [None]
    if rank == 0:
        try:
            atomic = AtomicDir(dst, overwrite=overwrite)
            lay_out(atomic.tmp, entries, limit)
            said = [str(atomic.tmp)]
        except BaseException as exc:
            if atomic is not None:
                atomic.abort()
            dist.broadcast_object_list([_said(exc, None)], src=0)
            raise
    dist.broadcast_object_list(said, src=0)
    if isinstance(said[0], tuple):
        raise _rank_error(0, world, said[0], "could not start the conversion")
    jobs = jobs_for(work, Path(said[0]), places, world)
    current: list = [None]
    status, mine = None, None
    try:
        _fault(rank)
        if rank < len(jobs):
            write_share(jobs[rank], work.on_tensor or (lambda key, n: None), current)
    except Exception as exc:  # told to every rank before anything is committed
        status, mine = _said(exc, current[0]), exc
    statuses: list = [None] * world
    dist.all_gather_object(statuses, status)
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        if atomic is not None:
            atomic.abort()
        if isinstance(mine, ConvspecError):
            raise mine
        raise _rank_error(failed[0][0], world, failed[0][1], "failed")
    outcome: list = [None]
    failure = None
    if rank == 0:
        failure = _commit(atomic, names, entries, places, finish)
        outcome = [None if failure is None else _said(failure, None)]
    dist.broadcast_object_list(outcome, src=0)  # the error as text: not every exception pickles
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise _rank_error(0, world, outcome[0], "could not commit")
    return names, atomic.cleanup if atomic is not None else None


def _commit(atomic, names, entries, places, finish):
    """Rank 0: the index and side files written, the directory committed; None, or the error."""
    tmp = atomic.tmp
    try:
        write_index(tmp, entries, {k: p.file for k, p in places.items()}, names)
        finish(tmp)
    except BaseException as exc:
        failed = exc
    else:
        failed = None
    try:
        atomic.__exit__(type(failed) if failed else None, failed, None)  # commit, or abort
    except BaseException as exc:
        return exc
    return failed


def _said(exc: BaseException, key: str | None) -> tuple:
    """An error as it travels between processes: (key being written, message, hint)."""
    return (key, getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}", getattr(exc, "hint", None))


def _rank_error(rank: int, world: int, said: tuple, what: str) -> WorkerError:
    key, message, hint = said[:3]
    where = f" while writing {key}" if key else ""
    return WorkerError(f"rank {rank} of {world} {what}{where}: {message}", hint=hint or _NOTHING)
