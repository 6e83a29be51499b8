"""Streaming conversion: checkpoint -> plan -> sink, one group in memory at a time."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bind import BoundPlan, LimitError
from .blocks import block_runs
from .compile.plan import Plan
from .devices import COMPARES, WRITES, check_device
from .dtypes import ITEMSIZE, check_dtype
from .errors import BindError, ConvspecError
from .io.checkpoint import Checkpoint
from .io.formats import open_checkpoint
from .io.gguf_checkpoint import GgufCheckpoint, is_gguf
from .io.writer import AtomicDir, FileCopy, parse_size, write_sharded
from .ops.cast import cast_tensor

if TYPE_CHECKING:
    import torch

    from .compile.lora import Adapter


def output_order(bound: BoundPlan, dtype: str | None = None) -> list[tuple[str, tuple[int, ...], str]]:
    """Every output (key, shape, dtype) in the order `stream_bound` yields them."""
    out = [
        (dst, bound.layout[src].shape, dtype or bound.layout[src].dtype)
        for src, dst in bound.passthrough.items()
    ]
    for g in bound.groups:
        out += [(k, i.shape, dtype or i.dtype) for k, i in g.outputs.items()]
    return out


def stream_bound(
    bound: BoundPlan,
    ckpt: Checkpoint,
    device: str = "cpu",
    dtype: str | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
    copies: bool = False,
) -> Iterator[tuple[str, torch.Tensor | FileCopy]]:
    """Yield converted tensors group by group. The next unit's reads run in a background thread while
    the current one is computed, so at most two units' tensors are alive at a time. A group that only
    moves blocks is read straight into its preallocated outputs; with `copies`, such units (and
    renamed tensors) come out as FileCopy byte ranges for the writer to copy file to file. Torch is
    imported only if a tensor is made: a conversion that is all copies never loads it."""
    pinned = str(device).startswith("cuda")
    layout = bound.layout

    on_cpu = str(device) == "cpu"  # the tensors read are there already: no `.to` per key

    def finish(key: str, t: torch.Tensor) -> torch.Tensor:
        t = t if on_cpu else t.to(device, non_blocking=True)
        t = cast_tensor(t, dtype) if dtype else t  # NaNs keep their bits, as the cast op does
        if on_tensor is not None:
            on_tensor(key, t.numel() * t.element_size())
        return t

    def moved(keys) -> bool:  # the bytes go out as they are: no cast, none decoded on read
        if ckpt.decoded and any(k in ckpt.decoded for k in keys):
            return False
        return dtype is None or all(layout[k].dtype == dtype for k in keys)

    units: list[tuple[str, object, object]] = [("pass", src, dst) for src, dst in bound.passthrough.items()]
    for g in bound.groups:
        runs = block_runs(bound, g, 0 if copies else None) if moved(g.source_keys) else None
        units.append(("block", g, runs) if runs is not None else ("compute", g, None))

    def read(unit) -> dict[str, torch.Tensor] | None:
        kind, what, runs = unit
        if kind == "pass":
            if copies and moved([what]):
                return None
            t = ckpt.get(what)
            return {what: t.pin_memory() if pinned else t}
        if kind == "block":
            if copies:
                return None
            return {k: ckpt.assemble(i.shape, i.dtype, runs[k], pin=pinned) for k, i in what.outputs.items()}
        return {k: ckpt.get(k) for k in what.source_keys}

    def copy(key: str, runs) -> tuple[str, FileCopy]:
        spans = [(*ckpt.file_offset(src, a), b, n) for src, a, b, n in runs]
        if on_tensor is not None:
            on_tensor(key, sum(n for *_, n in spans))
        return key, FileCopy(spans)

    for (kind, what, runs), tensors in _read_ahead(read, units):
        if kind == "pass":
            if tensors is None:
                e = layout[what]
                yield copy(runs, [(what, 0, 0, e.nbytes)])
            else:
                yield runs, finish(runs, tensors[what])
        elif kind == "block":
            for k in what.outputs:
                yield copy(k, runs[k]) if tensors is None else (k, finish(k, tensors.pop(k)))
        else:
            import torch

            from .run import run_group

            with torch.no_grad(), _few_threads(torch, computes(what.rule)):
                if not on_cpu:
                    tensors = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
                outs = run_group(bound, what, tensors)
            del tensors
            for k in what.outputs:
                yield k, finish(k, outs.pop(k))


READ_AHEAD = (os.cpu_count() or 1) > 2  # with two cores or fewer, a reader thread beside torch's compute
# threads slows both (60 `torch.cat` of a DeepSeek layout: 1.2 s with it, 0.03-0.11 s without)


def computes(rule) -> bool:
    """Whether a rule computes values (dequantizes, casts): work every core should share."""
    from .ops import OPS

    return any(OPS[n.op].changes_values for n in rule.nodes)


@contextmanager
def _few_threads(torch, computing: bool = False) -> Iterator[None]:
    """One torch thread for a group's ops where cores are few, unless they compute values: waking a
    second one costs more than the copies it shares (DeepSeek's 58 `torch.cat`: 1.2 s with two
    threads, 0.05 s with one, on a busy 2-core machine), but a dequantization is work for both. The
    bits do not depend on the threads."""
    before = torch.get_num_threads()
    if READ_AHEAD or before == 1 or computing:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _read_ahead(read: Callable, units: list) -> Iterator[tuple[Any, Any]]:
    """(unit, read(unit)) in order; with READ_AHEAD the next unit is read in a background thread while
    the caller works on this one, so at most two units' tensors are alive at a time."""
    if not READ_AHEAD:
        for unit in units:
            yield unit, read(unit)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convspec-read") as pool:
        pending = pool.submit(read, units[0]) if units else None
        for i, unit in enumerate(units):
            cell = [pending.result()]  # emptied as it is yielded: the caller holds the only reference
            pending = pool.submit(read, units[i + 1]) if i + 1 < len(units) else None
            yield unit, cell.pop()


def bind_checkpoint(plan: Plan, ckpt: Checkpoint, strict: bool = False, claims: bool = True) -> BoundPlan:
    """Bind, and refuse a checkpoint the plan does not apply to: no rule claims a key and none is in
    the layout the plan writes already. A checkpoint already in that layout binds: its keys pass
    through (the plan of the other direction would claim them, so no hint can point that way).
    `claims=False`: a checkpoint no rule claims is fine (an adapter of weights the spec leaves alone)."""
    try:
        bound = plan.bind(ckpt.layout, strict=strict)
    except LimitError as exc:  # name the file that holds the keys (bind sees only the layout)
        entry = ckpt.entries.get(exc.keys[0]) if exc.keys else None
        where = entry.file if entry is not None else ckpt.src
        raise LimitError([f"{where}: {exc.problems[0]}"], exc.keys, hint=exc.hint) from None
    if claims and plan.rules and bound.claimed == 0 and not bound.already and ckpt.entries:
        raise BindError(
            [f"spec {plan.name} claims no key of {ckpt.src} ({len(ckpt.entries)} keys)"],
            hint="check that the spec fits this model",
        )
    return bound


def layout_name(plan: Plan) -> str:
    """The layout a plan writes: the target layout of the spec, or the original one for its inverse."""
    return "original" if plan.is_inverse else "target"


class Loaded(dict):
    """What `Plan.load` returns: the converted tensors by key, with `bound`, what bind found."""

    def __init__(self, items, bound: BoundPlan):
        super().__init__(items)
        self.bound = bound

    @property
    def already(self) -> int:
        """Source keys that were in the target layout already: they passed through unchanged."""
        return len(self.bound.already)


@dataclass
class ConvertResult:
    dst: Path | None
    files: list[str]
    tensors: int
    bytes: int
    bound: BoundPlan
    cleanup: Any = None  # what was found of earlier runs beside dst (io.writer.Cleanup)
    notes: list[str] = field(default_factory=list)  # what the user should know (a tokenizer not written)

    @property
    def already(self) -> int:
        """Source keys already in the layout this conversion writes: copied unchanged."""
        return len(self.bound.already)


def convert_checkpoint(
    plan: Plan,
    src: str | Path,
    dst: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    strict: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    on_tensor: Callable[[str, int], None] | None = None,
    manifest: bool = False,
    ckpt: Checkpoint | None = None,
    workers: int = 1,
    ranks: bool = False,
    gguf_type: str | None = None,
    adapter: Adapter | None = None,
) -> ConvertResult:
    """Convert a checkpoint directory to `dst` atomically (complete and valid, or absent); with
    `manifest`, a per-tensor hash manifest of the source and the output is written inside it.
    `ckpt`, `open_checkpoint(src)` already read (to find its config), spares reading every header again.
    With `workers` > 1 the groups are split across that many processes (the same bytes); with
    `ranks`, across the ranks of the torch.distributed job, each of which calls this alike. With
    `adapter` (`plan` is its plan or that plan's inverse), a PEFT adapter is written: one
    adapter_model.safetensors and the adapter_config.json that names the converted modules."""
    from .parallel_convert import Work, check_workers, convert_on_ranks, write_parallel
    from .ranks import agreed, process_group

    workers = check_workers(workers)
    check_dtype(dtype)
    device = check_device(device, needs_data=WRITES)
    check_gguf_output(dst, gguf_type, workers, ranks, manifest)
    with process_group() if ranks else nullcontext():  # one group for the checks and the writing
        with agreed(ranks):  # every rank checks, then all go on
            ckpt = open_checkpoint(src) if ckpt is None else ckpt
            bound = bind_checkpoint(plan, ckpt, strict, claims=adapter is None)
        entries = output_order(bound, dtype)
        total = sum(ITEMSIZE[d] * math.prod(s) for _, s, d in entries)
        limit = parse_size(max_shard_size) if adapter is None else 1 << 62  # PEFT reads one file
        if is_gguf(dst) and not isinstance(ckpt, GgufCheckpoint):  # from GGUF, names are llama.cpp's already
            from .gguf_output import check_gguf_names

            check_gguf_names(bound, src, dst)
        if dry_run:
            return ConvertResult(None, [], len(entries), total, bound)
        if is_gguf(dst):
            from .gguf_output import write_gguf_output

            stream = stream_bound(bound, ckpt, device, dtype, on_tensor, copies=device == "cpu")
            files, cleanup = write_gguf_output(
                ckpt, dst, entries, stream, gguf_type=gguf_type, overwrite=overwrite
            )
            return ConvertResult(Path(dst), files, len(entries), total, bound, cleanup)

        notes: list[str] = []
        if adapter is not None and bound.claimed == 0:
            notes.append(
                f"no key of {src} adapts a weight {plan.name} converts: the adapter is copied unchanged"
            )

        def finish(tmp: Path) -> None:
            ckpt.copy_side_files(tmp)
            if isinstance(ckpt, GgufCheckpoint):
                from .gguf_tokenizer import write_tokenizer

                notes.extend(filter(None, [write_tokenizer(ckpt, tmp)]))
            if plan.quant is not None and plan.quant.dequantize is not None:
                from .companions import drop_quantization_config

                drop_quantization_config(tmp / "config.json", plan.quant.dequantize)
            from . import manifest as hashes

            (tmp / hashes.MANIFEST).unlink(missing_ok=True)  # the source's own would not describe this output
            if manifest:
                hashes.write(hashes.build(plan.name, plan.is_inverse, dtype, src, tmp), tmp)
            if adapter is not None:
                from .adapters import converted_config
                from .io.adapter import ADAPTER_CONFIG, config_text

                reverse = plan.is_inverse != adapter.plan.is_inverse
                (tmp / ADAPTER_CONFIG).write_text(config_text(converted_config(adapter, bound, reverse)))

        work = Work(bound, ckpt, entries, stream_bound, device, dtype, on_tensor)
        if ranks:
            files, cleanup = convert_on_ranks(work, dst, limit, finish, overwrite)
            return ConvertResult(Path(dst), files, len(entries), total, bound, cleanup, notes)
        atomic = AtomicDir(dst, overwrite=overwrite)
        with atomic as tmp:
            if workers > 1:
                files = write_parallel(work, tmp, limit, workers)
            else:
                stream = stream_bound(bound, ckpt, device, dtype, on_tensor, copies=device == "cpu")
                stem = "model" if adapter is None else "adapter_model"
                files = write_sharded(tmp, entries, stream, limit, flush_behind=True, stem=stem)
            finish(tmp)
        return ConvertResult(Path(dst), files, len(entries), total, bound, atomic.cleanup, notes)


def check_gguf_output(dst, gguf_type: str | None, workers: int, ranks: bool, manifest: bool) -> None:
    """Options that a GGUF output (one file, one process) cannot honour, refused before any read."""
    from .io.gguf_writer import check_gguf_type

    check_gguf_type(gguf_type)  # a known name first: then it is short enough to show as it is
    if not is_gguf(dst):
        if gguf_type is not None:
            raise ConvspecError(
                f"--gguf-type {gguf_type} needs a .gguf output, not {dst}",
                hint="name the output NAME.gguf",
            )
        return
    refused = [
        flag
        for flag, on in (("--workers", workers > 1), ("torchrun ranks", ranks), ("--manifest", manifest))
        if on
    ]
    if refused:
        raise ConvspecError(
            f"a GGUF output is one file written by one process: {', '.join(refused)} cannot apply to {dst}",
            hint="drop them, or write a safetensors folder",
        )


def save_state_dict(
    plan: Plan,
    state_dict: Mapping[str, torch.Tensor],
    dst: str | Path,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> list[str]:
    """What `Plan.save` does (same files, return value, errors and atomicity), streamed: the state dict
    is bound first, then each group is computed and written in turn, so the outputs alive beside the
    state dict are one group's, where converting it whole first added most of a checkpoint's size."""
    from .ops import TensorInfo

    shared: dict[TensorInfo, TensorInfo] = {}  # equal tensors share one TensorInfo: bind compares by identity
    bound = plan.bind(
        {k: shared.setdefault(i, i) for k, t in state_dict.items() for i in (TensorInfo.of(t),)}
    )
    entries = output_order(bound)
    with AtomicDir(dst, overwrite=overwrite) as tmp:
        return write_sharded(tmp, entries, _computed(bound, state_dict), parse_size(max_shard_size))


def _computed(bound: BoundPlan, state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The outputs of a bound state dict in `output_order`, one group computed at a time."""
    for src, dst in bound.passthrough.items():
        yield dst, state_dict[src]
    if not bound.groups:
        return
    import torch

    from .run import run_group

    for g in bound.groups:
        with torch.no_grad(), _few_threads(torch):  # as stream_bound runs a group
            outs = run_group(bound, g, state_dict)
        for k in g.outputs:
            yield k, outs.pop(k)


@dataclass
class Mismatch:
    key: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_diff: float | None
    why: str


@dataclass
class Verification:
    """What `verify` found: tensors compared, the first mismatches, and whether it stopped early."""

    checked: int
    total: int  # tensors the source has
    mismatches: list[Mismatch]
    stopped: bool  # the limit of mismatches was reached before every tensor was compared

    def __iter__(self):  # `checked, bad = verify_checkpoint(...)` as before
        return iter((self.checked, self.mismatches))


def verify_checkpoint(
    plan: Plan, src: str | Path, device: str = "cpu", limit: int = 20, converted: str | Path | None = None
) -> Verification:
    """Forward then inverse, group by group, compared with the source bit for bit; or, with `converted`,
    the forward outputs compared with a converted directory. Stops after `limit` mismatches."""
    import torch

    device = check_device(device, needs_data=COMPARES)
    with torch.no_grad():
        return _verify(plan, src, device, limit, converted)


def _dtype(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _verify(plan: Plan, src, device: str, limit: int, converted) -> Verification:
    import torch

    from .run import run_group

    ckpt = open_checkpoint(src)
    bound = bind_checkpoint(plan, ckpt)
    other = open_checkpoint(converted) if converted is not None else None
    inverse = plan.inverse() if other is None else None
    bad: list[Mismatch] = []
    checked = 0
    if other is not None:
        extra = sorted(set(other.entries) - set(bound.outputs))
        bad += [
            Mismatch(k, other.entries[k].shape, other.entries[k].dtype, None, "not produced by the plan")
            for k in extra[:limit]
        ]

    def compare(originals: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        nonlocal checked
        if other is None:
            back = inverse.apply(outputs)
        else:  # the converted directory is the reference; the fresh forward outputs are checked against it
            back, originals = outputs, {}
            for k, t in outputs.items():
                if k in other.entries:
                    originals[k] = other.get(k)
                else:
                    bad.append(
                        Mismatch(k, tuple(t.shape), _dtype(t), None, "missing from the converted directory")
                    )
        strays = [k for k in back if k not in originals]
        for k, t in originals.items():
            checked += 1
            b = back.get(k)
            if b is None:
                why = "missing after the round trip"
                if strays:
                    why += (
                        f" (it came back as {strays[0]})"
                        if len(strays) == 1
                        else f" (the group gave back {', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''})"
                    )
                bad.append(Mismatch(k, tuple(t.shape), _dtype(t), None, why))
            elif b.shape != t.shape or b.dtype != t.dtype:
                bad.append(
                    Mismatch(k, tuple(t.shape), _dtype(t), None, f"came back as {list(b.shape)} {_dtype(b)}")
                )
            elif not torch.equal(b.cpu().reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)):
                diff = (b.cpu().double() - t.double()).abs().max().item() if t.dtype != torch.bool else None
                bad.append(Mismatch(k, tuple(t.shape), _dtype(t), diff, "bits differ"))

    units: list = [*bound.passthrough.items(), *bound.groups]  # (source key, final key) or a Group
    stopped = False
    for unit in units:
        if len(bad) >= limit:
            stopped = True
            break
        if isinstance(unit, tuple):
            src_key, dst = unit
            t = ckpt.get(src_key)
            compare({src_key: t}, {dst: t.to(device)})
        else:
            originals = {k: ckpt.get(k) for k in unit.source_keys}
            outs = run_group(bound, unit, {k: v.to(device) for k, v in originals.items()})
            compare(originals, outs)
    return Verification(checked, len(ckpt.entries), bad[:limit], stopped)
