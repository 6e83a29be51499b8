"""The public entry points: load a spec by name or path, compile it with a config."""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .compile.compiler import compile_spec
from .compile.plan import Plan
from .devices import WRITES, check_device
from .dtypes import check_dtype
from .errors import ConvspecError, SpecNotFoundError
from .io.config import load_config
from .spec import Spec, parse_spec
from .spec.source import read_spec_text

if TYPE_CHECKING:
    from .streaming import ConvertResult

SUFFIXES = (".yaml", ".yml", ".cspec")


def _builtin_dir():
    """specs/ beside the package in a checkout (editable install), else the installed copy."""
    here = Path(__file__).resolve().parent.parent / "specs"
    if here.is_dir():
        return here
    return resources.files("convspec.specs")


@cache
def _builtin_index() -> dict[str, str]:
    """Every name a built-in spec answers to (its own name, its model types and class names) -> file.
    Only the YAML header is read here (with the C loader when present); specs are parsed on use."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    names: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for entry in sorted(_builtin_dir().iterdir(), key=lambda e: e.name):
        if not entry.name.endswith((".yaml", ".yml")):
            continue
        head = _header(entry.read_text(encoding="utf-8"), loader)
        names.setdefault(str(head.get("spec")), entry.name)
        for mt in head.get("model_types") or ():
            aliases.setdefault(str(mt), entry.name)
    return {**aliases, **names}


def _header(text: str, loader) -> dict:
    """A spec file's top-level fields before its rules (the rules are most of the text, and parsing
    them is most of the cost); the whole file when `spec` is not among them."""
    before, found, _ = text.partition("\nrules:")
    head = yaml.load(before, Loader=loader) if found else None
    if not isinstance(head, dict) or "spec" not in head:
        head = yaml.load(text, Loader=loader)
    return head if isinstance(head, dict) else {}


def spec_names() -> builtins.list[str]:
    """The names of the built-in specs."""
    index = _builtin_index()
    return sorted(name for name, file in index.items() if file.rsplit(".", 1)[0] == name)


def load_spec(name_or_path: str | Path) -> Spec:
    """A spec, by built-in name or by path. One rule decides which, in every command taking a SPEC:

    - a `Path` (any os.PathLike), or a string holding a `/` (`./mixtral`, `specs/x.yaml`, `/abs/x.cspec`) or ending
      in `.yaml`, `.yml` or `.cspec`, is a path, and must be a spec file (a directory never is);
    - any other string is a name: a built-in spec, a model type or a transformers class name a
      built-in spec lists. The working directory is not looked at, so a file or folder there named
      `mixtral` never shadows the built-in; `./mixtral` reads such a file.

    Args:
        name_or_path: a built-in name (`"mixtral"`, `"deepseek_v3"`, `"CLIPVisionModel"`) or the
            path of a spec file, YAML (`.yaml`, `.yml`) or the DSL (`.cspec`, or no suffix).

    Returns:
        The parsed Spec, not yet compiled (see `compile`).

    Raises:
        SpecNotFoundError: no built-in of that name (the hint names close ones, or says `./NAME`
            reads a file of that name here), or a path that does not exist or is a directory.
        SpecError: the file is not a valid spec (the message gives file:line:col).

    Example:
        >>> import convspec
        >>> convspec.load_spec("mixtral").name
        'mixtral'
        >>> convspec.load_spec("deepseek_v3").name  # a model type names the spec that serves it
        'qwen2_moe'
    """
    text = str(name_or_path)
    if hasattr(name_or_path, "__fspath__") or _is_path(text):
        return _load_file(text)
    index = _builtin_index()
    if text not in index:
        close = difflib.get_close_matches(text, list(index), 3)
        raise SpecNotFoundError(
            f"no built-in spec or model type named {text!r}",
            hint=_here_hint(text)
            or (f"did you mean {', '.join(close)}? " if close else "")
            + "see `convspec compile --list`, or pass a path to a .yaml/.cspec file",
        )
    entry = _builtin_dir().joinpath(index[text])
    return parse_spec(entry.read_text(encoding="utf-8"), f"specs/{index[text]}")


def _is_path(text: str) -> bool:
    """The spec-name rule: a separator (`/`, or Windows' `\\`) or a spec suffix makes a path; anything
    else is a name (no built-in name holds either)."""
    return "/" in text or "\\" in text or text.endswith(SUFFIXES)


def _kind(path: Path) -> str | None:
    """ "file", "dir", "special" (a pipe, a device: refused by name when read), or None where nothing
    is there or the name cannot be looked up (too long)."""
    try:
        return "file" if path.is_file() else "dir" if path.is_dir() else "special" if path.exists() else None
    except OSError:
        return None


def _load_file(text: str) -> Spec:
    path = Path(text)
    kind = _kind(path)
    if kind in ("file", "special"):
        return parse_spec(read_spec_text(path), text)
    builtin = path.name.removesuffix(path.suffix)
    named = f"the built-in spec is named {builtin}, with no path or suffix"
    if kind == "dir":
        raise SpecNotFoundError(
            f"{text} is a directory, not a spec file",
            hint="pass a .yaml, .yml or .cspec file" + (f"; {named}" if builtin in _builtin_index() else ""),
        )
    raise SpecNotFoundError(
        f"spec file {text} does not exist",
        hint=named
        if builtin in _builtin_index()
        else "check the path, or name a built-in spec (no path, no suffix): see `convspec compile --list`",
    )


def _here_hint(name: str) -> str | None:
    """For a name that is no built-in: what to type if the user meant a file of that name here."""
    kind = _kind(Path(name))
    if kind == "file":
        return f"a name is never read from the working directory; for the file {name} here, pass ./{name}"
    if kind == "dir":
        return f"{name} here is a directory, and a spec is a .yaml, .yml or .cspec file"
    return None


def compile(  # noqa: A001
    spec: Spec | str | Path, config: dict | str | Path | Any | None = None, *, dequantize: bool | str = False
) -> Plan:
    """Compile a spec into a Plan: every rule checked, its ops resolved, its inverse derived.

    Args:
        spec: a `Spec` (from `load_spec`), or what `load_spec` takes: a built-in spec name, a model
            type or transformers class name, or the path of a `.yaml`/`.cspec` file.
        config: the model config that the spec's `config.*` expressions read: a dict, the path of a
            `config.json` (or of its directory), an object with `to_dict()` (a transformers config),
            or None when the spec reads none (an expression that needs it fails at `bind`). Its
            `quantization_config` says how quantized weights are stored (docs/quantization.md).
        dequantize: the plan dequantizes quantized weights (`Plan.dequantize`): to bfloat16, or to
            the dtype given; by default they are kept, bit for bit, with their scales.

    Returns:
        The compiled `Plan`, immutable and JSON-serialisable (`Plan.to_json`).

    Raises:
        SpecNotFoundError: no built-in spec or file by that name.
        SpecSyntaxError, SpecValidationError: the spec's text or structure is wrong (file, line, column).
        CompileError: a static check fails (overlapping rules, an op's parameters, an unknown capture).
        ConfigError: the config file is missing or not a JSON object.

    Example:
        >>> plan = convspec.compile("mixtral", config="tiny-mixtral/config.json")
        >>> plan.name, plan.model_types
        ('mixtral', ('mixtral', 'minimax'))
    """
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    plan = compile_spec(spec, load_config(config), resolve=_resolver(spec))
    return plan.for_dtype(None, dequantize)


def _resolver(spec: Spec):
    """Included specs: a file beside the including spec (NAME.yaml / NAME.cspec), else a built-in."""

    def resolve(name: str) -> Spec:
        if spec.file:
            here = Path(spec.file).parent
            for suffix in SUFFIXES:
                if (here / f"{name}{suffix}").is_file():
                    return load_spec(here / f"{name}{suffix}")
        return load_spec(name)

    return resolve


def convert(
    spec: Spec | str | Path,
    src: str | Path,
    dst: str | Path,
    *,
    reverse: bool = False,
    device: str = "cpu",
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    on_tensor: Callable[[str, int], None] | None = None,
    manifest: bool = False,
    allow_pickle: bool = False,
    workers: int = 1,
    ranks: bool = False,
    dequantize: bool | str = False,
    gguf_type: str | None = None,
    allow_lossy: bool = False,
    adapter: bool | None = None,
    base: str | Path | None = None,
) -> ConvertResult:
    """Convert the checkpoint at `src` into `dst`: sharded safetensors named as Hugging Face names
    them, written atomically (complete, or absent), the source's other files copied beside. The
    spec is compiled with the source's `config.json`. Flags are keyword-only.

    Args:
        spec: what `compile` takes (a `Spec`, a built-in name, a model type or a spec file).
        src: a checkpoint directory, a `model.safetensors.index.json`, or one `.safetensors` file.
        dst: the output directory; it must not exist unless `overwrite`.
        reverse: run the inverse plan (converted layout -> original).
        device: where computed ops run (`"cpu"`, `"cuda"`, ...); block moves are file copies.
        max_shard_size: the largest shard, `"5GB"` (decimal), `"512MiB"` (binary) or a byte count.
        dtype: cast every floating tensor to this dtype (`"bfloat16"`, ...); None keeps each dtype.
        strict: refuse source keys no rule claims, instead of passing them through unchanged.
        overwrite: replace an existing `dst` (swapped in atomically).
        dry_run: bind and plan the output, write nothing (`result.dst` is None).
        on_tensor: called with (key, bytes) as each output tensor is written (progress).
        manifest: also write `convspec-manifest.json` (sha256 of every source and output tensor).
        allow_pickle: read a `.bin`/`.pt` checkpoint with `torch.load(weights_only=True)` (never its
            code), through a safetensors copy in a temporary folder beside `dst`.
        workers: split the groups across this many processes (at most one per group or renamed
            key); the files are byte for byte those of `workers=1`, which converts in this process.
        ranks: split the groups across the ranks of the torch.distributed job instead (torchrun:
            every rank calls `convert` alike; rank 0 commits; one filesystem for all).
        dequantize: dequantize quantized weights (FP8 blocks, MXFP4, compressed-tensors FP8) to
            `dtype` (default bfloat16) with transformers' numerics; else they are kept, bit for bit,
            with their scales beside them (docs/quantization.md).
        gguf_type: for a `.gguf` output, the type of every tensor of two dims or more (`"f16"`,
            `"bf16"`, `"f32"`, `"q8_0"`, `"q4_0"`; 1-D tensors stay F32, as llama.cpp keeps them);
            None keeps each tensor's dtype, exactly (docs/gguf.md).
        allow_lossy: with `reverse`, run the nearest inverse of a lossy plan (llama.cpp's `w + 1`
            norms round in float32) instead of refusing it.
        adapter: `src` is a PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) of
            a model the spec converts: its factors are converted by the adapter plan derived from the
            spec (docs/adapters.md). None: when `src` has an adapter_config.json.
        base: with an adapter, the base model's checkpoint (in the layout `src` adapts): its
            config.json compiles the spec, and its headers check the factors' shapes.

    A `.gguf` file is read or written where `src` or `dst` names one: a GGUF spec (`gguf_llama`, or
    `llama`, or `gguf` for the file's own architecture) converts GGUF -> transformers, and writing a
    `.gguf` from a Hugging Face folder runs it in reverse.

    Returns:
        A `ConvertResult`: `dst`, the shard file names (`files`), the number of tensors and bytes
        written, the `BoundPlan` (`bound`), and what was cleaned up of killed earlier runs.

    Raises:
        CheckpointError: `src` is missing or malformed, `dst` exists, a pickle without `allow_pickle`.
        BindError: the checkpoint does not fit the plan (every problem, by key), before any write.
        SpecError, ConfigError, NotInvertibleError: as `compile` and `Plan.inverse`.
        WorkerError: with `workers` or `ranks`, a worker or rank failed or died (it is named).

    Example:
        >>> r = convspec.convert("mixtral", "tiny-mixtral", "tiny-mixtral-fused", max_shard_size="64KB")
        >>> r.tensors, r.files[0]
        (21, 'model-00001-of-00002.safetensors')
        >>> back = convspec.convert("mixtral", "tiny-mixtral-fused", "tiny-mixtral-back", reverse=True)
    """
    from .io.destination import check_destination, check_output, source_paths
    from .io.writer import parse_size
    from .parallel_convert import RANKS_HINT, check_workers
    from .ranks import agreed, process_group
    from .streaming import convert_checkpoint

    device = check_device(device, needs_data=WRITES)  # options first: before a pickle is transcoded
    check_dtype(dtype)
    parse_size(max_shard_size)
    workers = check_workers(workers)
    if adapter or (adapter is None and _is_adapter(src)):
        return _convert_adapter(
            spec,
            src,
            dst,
            reverse=reverse,
            device=device,
            dtype=dtype,
            strict=strict,
            overwrite=overwrite,
            dry_run=dry_run,
            on_tensor=on_tensor,
            base=base,
            refused={
                "--manifest": manifest,
                "--workers": workers > 1,
                "torchrun ranks": ranks,
                "--dequantize": bool(dequantize),
                "--gguf-type": gguf_type is not None,
                "--allow-pickle": allow_pickle,
            },
        )
    if base is not None:
        raise ConvspecError(
            "--base names the base model of an adapter", hint=f"{src} is no adapter: drop --base"
        )
    if ranks and workers > 1:
        raise ConvspecError("--workers and torchrun ranks cannot be combined", hint=RANKS_HINT)
    with process_group() if ranks else nullcontext():  # under torchrun: every rank, alike
        with agreed(ranks):  # a rank whose destination or checkpoint is wrong stops every rank
            # where the output goes, before anything is read: never onto, around or inside the source
            check_output(dst, source_paths(src), src)
            check_destination(dst)
        cleaned: list[Path] = []
        with safetensors_source(src, allow_pickle, beside=dst, removed=cleaned) as src:
            from .io.formats import open_checkpoint

            with agreed(ranks):  # a rank whose copy of the checkpoint is wrong stops every rank
                ckpt = open_checkpoint(src)  # its headers are read once, for the config and the conversion
                spec, reverse = gguf_spec(spec, ckpt, dst, reverse)
                plan = compile(spec, config=ckpt.config)
                if reverse:
                    plan = plan.inverse(allow_lossy=allow_lossy)
                plan = plan.for_dtype(dtype, dequantize)
            result = convert_checkpoint(
                plan,
                src,
                dst,
                device=device,
                dtype=dtype,
                max_shard_size=max_shard_size,
                strict=strict,
                overwrite=overwrite,
                dry_run=dry_run,
                on_tensor=on_tensor,
                manifest=manifest,
                ckpt=ckpt,
                workers=workers,
                ranks=ranks,
                gguf_type=gguf_type,
            )
    if cleaned and result.cleanup is not None:  # a killed run's pickle copy: said with the rest
        result.cleanup = result.cleanup._replace(removed=[*cleaned, *result.cleanup.removed])
    return result


def _is_adapter(src) -> bool:
    from .io.adapter import is_adapter

    return is_adapter(src)


def adapter_plan(
    spec: Spec | str | Path,
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    reverse: bool = False,
    apart: bool = False,
):
    """The plan that converts the LoRA adapter directory `adapter` (`reverse`: one of the converted
    layout, back), checked against the adapter's headers and, given `base`, the base checkpoint's:
    A and B in pairs, of the config's ranks, of the base weights' shapes. Returns the
    `compile.lora.Adapter` (its `plan` converts forward; with `reverse`, use `plan.inverse()`).
    `apart` (with `reverse`): the adapter plan of the inverse spec instead, for an adapter trained
    on the converted layout: parts adapted apart are joined block-diagonally, a fused weight's
    adapter is split with every part keeping its whole A, where the inverse of the adapter plan
    (exact, for an adapter convspec converted) refuses them."""
    return _adapter(spec, adapter, base=base, reverse=reverse, apart=apart)[0]


def _adapter(spec, adapter, *, base=None, reverse=False, apart=False, ckpt=None):
    """`adapter_plan`, and the adapter's checkpoint it read the headers of (`ckpt`: read already)."""
    from .adapters import adapter_plan as derive_for
    from .adapters import check_base, check_factors, check_refused
    from .compile.lora import derive
    from .io.adapter import read_adapter_config
    from .io.formats import open_checkpoint
    from .io.safetensors import CheckpointError

    src = Path(adapter)
    if not _is_adapter(src):
        raise CheckpointError(
            f"{src}: not a PEFT adapter (no adapter_config.json)",
            hint="pass the directory PEFT saved the adapter in",
        )
    config = read_adapter_config(src)
    ckpt = open_checkpoint(src) if ckpt is None else ckpt
    base_ckpt = None
    if base is not None:
        base_ckpt = open_checkpoint(base)
    plan = compile(spec, config=None if base_ckpt is None else base_ckpt.config)
    if reverse and apart:
        plan, reverse = plan.inverse(), False
    side = "out" if reverse else "in"
    first = derive(plan, config)
    check_factors(ckpt.layout, config, first, side, src)  # before any bind: pairs and ranks by key
    check_refused(first, first.converting(reverse), ckpt.layout, src)
    derived = derive_for(first, ckpt.layout, reverse)
    if base_ckpt is not None:
        check_base(ckpt.layout, base_ckpt.layout, derived, side, src, base)
    return derived, ckpt


def verify_adapter(
    spec: Spec | str | Path, adapter: str | Path, *, base: str | Path | None = None, reverse: bool = False
):
    """Convert the adapter forward and back and compare with it bit for bit; given `base` (the
    base checkpoint in the adapter's layout), also merge: converting the adapter and the base then
    merging equals merging then converting, in float64. Returns (round-trip mismatches as
    (key, why), the `adapters.MergeCheck` or None)."""
    import torch

    from .adapters import merge_check
    from .io.formats import open_checkpoint

    derived, ckpt = _adapter(spec, adapter, base=base, reverse=reverse)
    forward = derived.converting(reverse)
    factors = {k: ckpt.get(k) for k in ckpt.layout}
    back = forward.inverse().apply(forward.apply(factors))
    problems = [(k, "missing after the round trip") for k in factors if k not in back]
    problems += [(k, "not in the adapter") for k in back if k not in factors]
    problems += [
        (k, "differs after the round trip")
        for k, t in factors.items()
        if k in back and (back[k].dtype != t.dtype or back[k].shape != t.shape or not torch.equal(back[k], t))
    ]
    merged = None
    if base is not None:
        weights_ckpt = open_checkpoint(base)
        weights = {k: weights_ckpt.get(k) for k in weights_ckpt.layout}
        merged = merge_check(derived.base, derived, weights, factors, reverse)
    return problems, merged


def _convert_adapter(
    spec, src, dst, *, reverse, device, dtype, strict, overwrite, dry_run, on_tensor, base, refused
):
    """`convert` of a PEFT LoRA adapter: the adapter plan of the spec, one adapter_model.safetensors
    and the adapter config that names the converted modules, written atomically."""
    from .io.destination import check_destination, check_output, source_paths
    from .ops.lowrank import FactorsApart
    from .streaming import convert_checkpoint

    flags = [flag for flag, on in refused.items() if on]
    if flags:
        raise ConvspecError(
            f"{', '.join(flags)} cannot apply to an adapter ({src})",
            hint="an adapter is one small file: drop them",
        )
    check_output(dst, source_paths(src), src)
    check_destination(dst)
    derived, ckpt = _adapter(spec, src, base=base, reverse=reverse)
    options = dict(device=device, dtype=dtype, strict=strict, overwrite=overwrite, dry_run=dry_run)
    try:
        return convert_checkpoint(
            derived.converting(reverse), src, dst, **options, on_tensor=on_tensor, ckpt=ckpt, adapter=derived
        )
    except FactorsApart as exc:
        if not reverse:
            raise
        why = exc.short
    # not the output of a forward conversion (nothing was written): the inverse spec's own adapter
    # plan converts it faithfully, at the rank of the parts together
    derived, _ = _adapter(spec, src, base=base, reverse=True, apart=True, ckpt=ckpt)
    result = convert_checkpoint(
        derived.plan, src, dst, **options, on_tensor=on_tensor, ckpt=ckpt, adapter=derived
    )
    result.notes.append(
        f"{src} is no conversion of an adapter of the original layout ({why}): converted by the adapter "
        "plan of the inverse spec, whose parts keep the fused weight's whole rank (rank_pattern says it)"
    )
    return result


def gguf_spec(
    spec: Spec | str | Path, ckpt, dst: str | Path, reverse: bool
) -> tuple[Spec | str | Path, bool]:
    """The spec and direction for a conversion that reads or writes a .gguf file: `llama` (or a
    transformers model type) names the built-in `gguf_llama`, `gguf` the one for the file's own
    architecture (or the config's), and GGUF to GGUF keeps the names (`identity`); a GGUF spec
    writing a .gguf from another format runs in reverse."""
    from .io.gguf_checkpoint import GgufCheckpoint, is_gguf

    reads, writes = isinstance(ckpt, GgufCheckpoint), is_gguf(dst)
    if not (reads or writes):
        return spec, reverse
    if isinstance(spec, str) and not _is_path(spec):
        from . import ggufmeta

        if reads and writes:  # GGUF to GGUF: the same names, other types (--gguf-type)
            spec = "identity"
        elif spec == "gguf":
            if reads:
                arch = str(ckpt.header.value("general.architecture"))
            else:
                arch = ggufmeta.gguf_arch(load_config(ckpt.config) or {})
            spec = ggufmeta.spec_name(arch)
        elif ggufmeta.spec_name(spec) in _builtin_index():
            spec = ggufmeta.spec_name(spec)
        elif not spec.startswith("gguf_"):
            try:
                spec = ggufmeta.spec_name(ggufmeta.gguf_arch(spec))
            except ConvspecError:
                pass  # not a GGUF architecture: the spec is loaded as named
    if writes and not reads and not reverse:
        spec = spec if isinstance(spec, Spec) else load_spec(spec)
        reverse = spec.name.startswith("gguf_")
    return spec, reverse


@contextmanager
def safetensors_source(src, allow_pickle: bool, beside=None, removed: list[Path] | None = None):
    """`src` itself, or with `allow_pickle` and a pickle checkpoint, a safetensors copy of it made
    in a temporary folder beside `beside` (the destination: same disk; else the system's temporary
    folder), locked while in use and removed afterwards; one a killed run left there is removed
    (and listed in `removed`). An error about the copy names the user's files, never the copy."""
    from .io.destination import output_path, write_error
    from .io.pickled import pickle_files, safetensors_names, transcode
    from .io.writer import scratch_dir

    path = Path(src)
    has_safetensors = (
        path.is_file()
        and path.suffix == ".safetensors"
        or (
            path.is_dir()
            and (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists())
        )
    )
    if not allow_pickle or has_safetensors or not path.exists() or not pickle_files(path):
        yield src
        return
    import tempfile

    parent = output_path(beside).parent if beside is not None else Path(tempfile.gettempdir())
    purpose = beside if beside is not None else f"a safetensors copy of {src} in {parent}"
    with scratch_dir(parent, purpose, removed) as tmp:
        out = tmp / "checkpoint"
        try:
            copy = transcode(path, out)
        except OSError as exc:
            raise write_error(exc, purpose, tmp) from None
        try:
            yield copy
        except ConvspecError as exc:
            files = pickle_files(path)
            renames = [(out / n, f) for n, f in zip(safetensors_names(files), files, strict=True)]
            _rename_paths(exc, [*renames, (out, path)])
            raise


def _rename_paths(exc: ConvspecError, renames: list[tuple[Path, Path]]) -> None:
    """Every spelling of each temporary path in the error's text replaced by the user's path."""
    pairs = []
    for tmp, user in renames:
        for spelling in {str(tmp), os.path.abspath(tmp), os.path.realpath(tmp)}:
            pairs.append((spelling, str(user)))
    pairs.sort(key=lambda p: -len(p[0]))  # a file's path before its folder's

    def fix(text):
        if not isinstance(text, str):
            return text
        for old, new in pairs:
            text = text.replace(old, new)
        return text

    exc.message, exc.hint = fix(exc.message), fix(exc.hint)
    exc.args = (exc.message,)
    if isinstance(getattr(exc, "problems", None), list):
        exc.problems = [fix(p) for p in exc.problems]
    if exc.span is not None and exc.span.file:
        exc.span = dataclasses.replace(exc.span, file=fix(exc.span.file))


def spec_files(name_or_path: str | Path) -> builtins.list[Path]:
    """The files a spec is read from: its own and those of the specs it includes, however deep, each
    once, found as `compile` finds them (a file beside the including spec, else a built-in). A command
    that writes a file checks it is none of these."""
    out: dict[Path, None] = {}  # in the order found
    todo = [_spec_file(name_or_path, None)]
    while todo:
        file = todo.pop()
        if file is None or file in out:
            continue
        out[file] = None
        try:
            spec = load_spec(file)
        except ConvspecError:  # compile reports it; what could be read is listed
            continue
        todo += [_spec_file(r.spec, file.parent) for r in spec.rules if r.kind == "include"]
    return list(out)


def _spec_file(name_or_path: str | Path, beside: Path | None) -> Path | None:
    """The real path of the spec file a name or path stands for, as `load_spec` and the include
    resolver read it; None for a name that is no built-in."""
    if beside is not None:
        for suffix in SUFFIXES:
            if (beside / f"{name_or_path}{suffix}").is_file():
                return Path(os.path.realpath(beside / f"{name_or_path}{suffix}"))
    text = str(name_or_path)
    if hasattr(name_or_path, "__fspath__") or _is_path(text):
        return Path(os.path.realpath(text))
    file = _builtin_index().get(text)
    return None if file is None else Path(os.path.realpath(str(_builtin_dir().joinpath(file))))
