"""Ranks of a torch.distributed job agreeing before they act (issue 16): a problem one rank finds
(a file missing from its copy, a bad placement) becomes every rank's error, before any data is read,
so no rank is left waiting in a collective the others never reach."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from .errors import ConvspecError

RANK_TIMEOUT = timedelta(seconds=1800)  # how long a rank waits for the others, in a group made here


def agree(problem: ConvspecError | None) -> None:
    """Every rank of the job learns whether any rank found a problem, and then all raise the same
    error (naming the rank when they differ). Without a process group of several ranks, this rank's
    own problem is raised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if problem is not None:
            raise problem
        return
    found: list = [None] * dist.get_world_size()
    mine = None if problem is None else (problem.message, problem.hint)
    dist.all_gather_object(found, mine)
    failed = [(rank, f) for rank, f in enumerate(found) if f is not None]
    if not failed:
        return
    if problem is not None and len(failed) == len(found) and all(f == mine for _, f in failed):
        raise problem  # every rank found the same: as it is
    rank, (message, hint) = failed[0]
    more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
    raise ConvspecError(f"rank {rank}: {message}{more}", hint=hint)


@contextmanager
def agreed(on: bool = True) -> Iterator[None]:
    """Run the block's checks on every rank, then `agree` on what they found (`on`: only then)."""
    if not on:
        yield
        return
    try:
        yield
    except Exception as exc:  # any failure: the others must not wait for this rank
        problem = exc if isinstance(exc, ConvspecError) else ConvspecError(f"{type(exc).__name__}: {exc}")
        try:
            agree(problem)
        except ConvspecError as shared:
            if shared is problem:
                raise exc from None  # every rank failed alike: the error as it is
            raise
        raise  # pragma: no cover - agree raised
    agree(None)


@contextmanager
def process_group(backend: str = "gloo") -> Iterator[None]:
    """The job's process group: the one already made, or one made here from torchrun's environment
    and torn down after the block."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group(backend, timeout=RANK_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_job(what: str) -> None:
    """`what` needs a torch.distributed job: a process group made already, or torchrun's environment
    to make one from; otherwise one clear error, where torch would fail on a missing variable."""
    import os

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) and "RANK" not in os.environ:
        raise ConvspecError(
            f"{what} needs a torch.distributed job, and there is none",
            hint="run under torchrun, or call torch.distributed.init_process_group first (or pass mesh=)",
        )
