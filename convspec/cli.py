"""The command line: arguments -> API -> rendering. The only module that prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import cache

from . import __version__, api, render
from .errors import ConvspecError
from .manifest import MANIFEST as MANIFEST_NAME
from .style import Style
from .style import table as style_table


def _style(stream) -> Style:
    return Style.for_stream(stream)


def _error_json(exc: ConvspecError) -> dict:
    span = exc.span
    d: dict = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    if span is not None:
        d.update(file=span.file, line=span.line, col=span.col)
    problems = getattr(exc, "problems", None)
    if problems is not None:
        d["problems"] = problems
    return d


SPEC_HELP = (
    "a built-in spec name or model type, or a spec file: a path with a / or a .yaml/.yml/.cspec suffix"
)
DEVICE_HELP = "where computed tensors go: cpu (default), cuda, cuda:N, mps; checked before anything is read"
ADAPTER_HELP = (
    "convert a PEFT LoRA adapter of the model (adapter_model.safetensors + adapter_config.json) with "
    "the adapter plan derived from the spec (automatic when SRC has an adapter_config.json)"
)
BASE_HELP = (
    "with an adapter: the base model's checkpoint (its config.json, and its shapes to check the factors)"
)


@cache  # built once: a parser is not changed by parsing, and building one costs more than most commands
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convspec", description="Declarative conversion specs for model checkpoints."
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a spec and show its plan")
    c.add_argument("spec", nargs="?", help=SPEC_HELP)
    _checkpoint_flags(c, "bind to a checkpoint's headers and show every group")
    c.add_argument(
        "--format",
        choices=("text", "json", "dot", "svg", "png"),
        default="text",
        help="svg and png draw the op DAG of each rule with graphviz (with --against: one group too)",
    )
    c.add_argument(
        "--group", help="with --against and a picture format: the group to draw (default: the first)"
    )
    c.add_argument("-o", "--output", metavar="FILE", help="write the output here (svg, png, dot)")
    c.add_argument("--reverse", action="store_true", help="show the inverse plan")
    c.add_argument(
        "--dequantize",
        action="store_true",
        help="show the plan that dequantizes quantized weights (to bfloat16)",
    )
    c.add_argument("--strict", action="store_true", help="with --against: every key must be claimed")
    c.add_argument("--adapter", action="store_true", help="show the plan of the model's LoRA adapters")
    c.add_argument("--base", metavar="DIR", help=BASE_HELP)
    c.add_argument(
        "--shard",
        metavar="AXES",
        help="with --against: what each rank reads under tp=N[,ep=N] with transformers' tp and ep plans",
    )
    c.add_argument(
        "--placements",
        metavar="FILE",
        help='with --shard: a JSON object {glob or "re:REGEX": style, or [style or dim per mesh dim]} '
        "placing the targets it matches before transformers' plans do",
    )
    c.add_argument("--list", action="store_true", help="list the built-in specs")
    _json_flag(c)
    cv = sub.add_parser("convert", help="convert a checkpoint with a spec (atomic, sharded safetensors)")
    cv.add_argument("spec", help=SPEC_HELP)
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--reverse", action="store_true", help="apply the inverse plan (save back)")
    cv.add_argument("--adapter", action="store_true", help=ADAPTER_HELP)
    cv.add_argument("--base", metavar="DIR", help=BASE_HELP)
    cv.add_argument(
        "--allow-lossy",
        action="store_true",
        help="with --reverse (or a .gguf output): run the nearest inverse of a lossy plan instead of refusing it",
    )
    cv.add_argument("--device", default="cpu", help=DEVICE_HELP)
    cv.add_argument("--dtype", help="cast every output to this dtype")
    cv.add_argument(
        "--dequantize",
        action="store_true",
        help="dequantize quantized weights (to --dtype, default bfloat16) instead of keeping their scales",
    )
    cv.add_argument(
        "--gguf-type",
        metavar="TYPE",
        help="for a .gguf output: f32, f16, bf16, q8_0 or q4_0 for every tensor of 2+ dims (1-D ones stay "
        "f32); default: each tensor's own dtype, exactly",
    )
    cv.add_argument("--max-shard-size", default="5GB")
    cv.add_argument(
        "--workers",
        default="1",
        metavar="N",
        help="split the groups across N processes; the same bytes as 1 (the default, this process)",
    )
    cv.add_argument("--strict", action="store_true", help="every key must be claimed by a rule")
    cv.add_argument("--dry-run", action="store_true", help="print what would be written, from headers only")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    cv.add_argument("--quiet", action="store_true", help="no progress display")
    cv.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a .bin/.pt checkpoint with torch.load(weights_only=True) (never its code)",
    )
    cv.add_argument(
        "--manifest",
        action="store_true",
        help=f"also write {MANIFEST_NAME}: sha256 of every source and output tensor, "
        "a checksum list, not a signature (see verify --manifest)",
    )
    _json_flag(cv)
    v = sub.add_parser("verify", help="convert forward and back, and compare with the source bit for bit")
    v.add_argument("spec", help=SPEC_HELP)
    v.add_argument("src")
    v.add_argument("--device", default="cpu", help=DEVICE_HELP)
    v.add_argument(
        "--converted", metavar="DIR", help="compare a converted directory with SRC converted afresh"
    )
    v.add_argument("--allow-pickle", action="store_true", help="read a .bin/.pt SRC (weights only)")
    v.add_argument(
        "--adapter", action="store_true", help="SRC is a LoRA adapter: convert it forward and back"
    )
    v.add_argument(
        "--base",
        metavar="DIR",
        help="with --adapter: also check that converting then merging into the converted base equals "
        "merging into DIR then converting (float64)",
    )
    v.add_argument("--reverse", action="store_true", help="with --adapter: SRC is in the converted layout")
    v.add_argument(
        "--manifest",
        action="store_true",
        help="with --converted: check that SRC and DIR still hash to what DIR's manifest records; a checksum "
        "list anyone who can write DIR can rewrite, not a proof of origin (verify without --manifest "
        "converts again and compares bit for bit)",
    )
    _json_flag(v)
    ch = sub.add_parser("check", help="lint a spec: overlaps, shadowed renames, dead rules, coverage")
    ch.add_argument("specs", nargs="+", metavar="SPEC", help=SPEC_HELP)
    _checkpoint_flags(ch, "also check against a checkpoint's headers")
    ch.add_argument("--select", metavar="CODES", help="only these rule codes or prefixes, comma-separated")
    ch.add_argument("--ignore", metavar="CODES", help="skip these rule codes or prefixes, comma-separated")
    _json_flag(ch)
    ex = sub.add_parser("explain", help="the life of one key: renames, the convert, its group, its outputs")
    ex.add_argument("spec", help=SPEC_HELP)
    ex.add_argument("key")
    _checkpoint_flags(ex, "bind to a checkpoint: the real group and shapes")
    ex.add_argument("--reverse", action="store_true", help="explain the key through the inverse plan")
    ex.add_argument("--adapter", action="store_true", help="explain a LoRA adapter's key (adapter plan)")
    ex.add_argument("--base", metavar="DIR", help=BASE_HELP)
    ex.add_argument(
        "--dequantize", action="store_true", help="explain the key through the plan that dequantizes"
    )
    _json_flag(ex)
    f = sub.add_parser("fmt", help="format spec files canonically, or translate between YAML and .cspec")
    f.add_argument("specs", nargs="+", metavar="SPEC", help="spec files (.yaml, .yml, .cspec)")
    f.add_argument("--to", choices=("yaml", "cspec"), help="translate to this syntax (printed, or -o FILE)")
    f.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is not formatted")
    f.add_argument("--stdout", action="store_true", help="print the result instead of rewriting the file")
    f.add_argument("-o", "--output", metavar="FILE", help="with one SPEC: write the result here")
    _json_flag(f)
    sc = sub.add_parser("schema", help="the JSON Schema of the YAML spec form (for editors)")
    sc.add_argument("-o", "--output", metavar="FILE", help="write the schema here")
    _json_flag(sc)  # the schema is JSON already; accepted so that every command takes --json
    inf = sub.add_parser("infer", help="synthesize the spec that maps one layout to another, and prove it")
    inf.add_argument("source", help="a checkpoint, a layout .json ({key: [shape, dtype]}), or a model type")
    inf.add_argument("target", help="the same kinds: a transformers model type or class is built on meta")
    inf.add_argument("-o", "--output", metavar="SPEC", help="write the spec here (a .yaml file)")
    inf.add_argument(
        "--config",
        help="a config.json: builds a model type named as SOURCE or TARGET, and names the spec's sizes",
    )
    inf.add_argument("--name", default="inferred", help="the spec's name")
    inf.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 while a question is left (a choice only data can confirm)",
    )
    inf.add_argument(
        "--against-spec",
        metavar="SPEC",
        help="compare with an existing spec by behaviour on SOURCE: the keys that go elsewhere",
    )
    _json_flag(inf)
    im = sub.add_parser(
        "import-transformers",
        help="write the spec for a transformers model type or class (needs transformers)",
    )
    im.add_argument("key", metavar="MODEL_TYPE_OR_CLASS")
    im.add_argument(
        "--gguf", action="store_true", help="KEY is a GGUF general.architecture: its gguf_ARCH spec"
    )
    im.add_argument("-o", "--output", metavar="FILE", help="write the spec here (included specs beside it)")
    _json_flag(im)
    return p


def _checkpoint_flags(p: argparse.ArgumentParser, against_help: str) -> None:
    """--against CHECKPOINT and --config FILE, which default to each other's config.json."""
    p.add_argument("--against", metavar="CHECKPOINT", help=against_help)
    p.add_argument("--config", help="a config.json (default with --against: the checkpoint's config.json)")


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable JSON output (errors too)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {
            "compile": _compile,
            "convert": _convert,
            "verify": _verify,
            "check": _check,
            "explain": _explain,
            "fmt": _fmt,
            "schema": _schema,
            "import-transformers": _import,
            "infer": _infer,
        }
        return commands[args.command](args)
    except ConvspecError as exc:
        return _report(exc, args)
    except KeyboardInterrupt:  # Ctrl-C: what was being written is removed already (AtomicDir, scratch_dir)
        return _report(ConvspecError("interrupted"), args, code=130, kind="KeyboardInterrupt")
    except BrokenPipeError:  # pragma: no cover - e.g. `| head`
        return 0
    except OSError as exc:  # the system refused something no part of convspec foresaw: still one line
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return _report(ConvspecError(f"{where}{exc.strerror or exc}"), args)


def _report(exc: ConvspecError, args, code: int = 2, kind: str | None = None) -> int:
    """The error on stderr (one JSON document with --json), and the exit status."""
    if getattr(args, "json", False):
        d = _error_json(exc)
        if kind is not None:
            d["type"] = kind
        print(json.dumps({"error": d}), file=sys.stderr)
    else:
        print(exc.render(_style(sys.stderr)), file=sys.stderr)
    return code


def _compile(args) -> int:
    if args.list:
        names = api.spec_names()
        if args.json:
            print(json.dumps({n: api.load_spec(n).doc for n in names}, indent=2))
            return 0
        s = _style(sys.stdout)
        for row in style_table([(s.bold(n), api.load_spec(n).doc) for n in names], indent=""):
            print(row)
        return 0
    if not args.spec:
        raise ConvspecError(
            "compile needs a SPEC (a built-in name, a model type, or a spec file)",
            hint="see `convspec compile --list`",
        )
    fmt = "json" if args.json else args.format
    if args.group and not (args.against and fmt in ("dot", "svg", "png")):
        raise ConvspecError(
            "--group draws one group of a checkpoint", hint="use it with --against and --format svg|png|dot"
        )
    if args.placements is not None and args.shard is None:
        raise ConvspecError("--placements places targets for --shard", hint="use it with --shard tp=N[,ep=N]")
    if args.shard is not None and (not args.against or fmt not in ("text", "json")):
        raise ConvspecError(
            "--shard counts what each rank reads from a checkpoint's headers",
            hint="use it with --against CHECKPOINT (text or json output)",
        )
    plan = _plan(args)
    if args.output is not None:
        _check_not_an_input(args.output, args)
    bound = None
    if args.against:
        bound = plan.bind(_layout(args), strict=args.strict)
    if args.shard is not None:
        return _compile_shard(plan, bound, args, fmt)
    if fmt in ("dot", "svg", "png"):
        from . import dot

        text = dot.plan_dot(plan) if bound is None else dot.bound_dot(bound, args.group)
        if fmt == "dot":
            return _emit(text.encode() + b"\n", args.output)
        from .pictures import render_dot

        data = render_dot(text, fmt)
        if args.output is None and fmt == "png" and sys.stdout.isatty():
            raise ConvspecError("a png is binary: it is not printed to a terminal", hint="pass -o FILE.png")
        return _emit(data, args.output)
    s = _style(sys.stdout)
    if bound is not None:
        text = render.bound_json(bound) if fmt == "json" else render.bound_text(bound, s)
    else:
        text = render.plan_json(plan) if fmt == "json" else render.plan_text(plan, s)
    return _emit((text + "\n").encode(), args.output)


def _compile_shard(plan, bound, args, fmt: str) -> int:
    """`compile --against DIR --shard tp=N,ep=N`: each rank's bytes and read calls, from headers only."""
    from .shardplan import model_type_of, parse_shard, read_overrides, shard_report

    parse_shard(args.shard)  # a bad shard is refused before the placements are worked out
    overrides = read_overrides(args.placements) if args.placements is not None else None
    report = shard_report(bound, model_type_of(plan), args.shard, overrides)
    if fmt == "json":
        text = json.dumps(report.to_json(), indent=2)
    else:
        text = "\n".join(report.lines(_style(sys.stdout)))
    if args.output is None:
        print(text)
        return 0
    return _emit((text + "\n").encode(), args.output)


def _check_not_an_input(output: str, args) -> None:
    """Refuse an output file that is (or holds, or is inside) a file the command reads: the spec and
    the specs it includes, --config, the --against checkpoint."""
    from .io.destination import check_output, real, source_paths

    check_output(output, api.spec_files(args.spec), args.spec, what="the spec")
    if args.config:
        check_output(output, [real(args.config)], args.config, what="the config")
    if args.against:
        check_output(output, source_paths(args.against), args.against, what="the checkpoint")


def _against(args):
    """The --against checkpoint, its headers read once per command (the plan, the layout, explain's
    notes all use it); None without --against."""
    if args.against is None:
        return None
    if getattr(args, "opened", None) is None:
        from .io.formats import open_checkpoint

        args.opened = open_checkpoint(args.against)
    return args.opened


def _layout(args) -> dict | None:
    """The --against checkpoint's layout from its headers ({key: TensorInfo}), or None without it."""
    ckpt = _against(args)
    return None if ckpt is None else ckpt.layout


def _plan(args):
    """The spec compiled with --config or the checkpoint's config.json, inverted with --reverse; with
    --adapter or an adapter as --against, the plan of its LoRA adapters."""
    from .io.adapter import is_adapter

    if getattr(args, "adapter", False) or (args.against and is_adapter(args.against)):
        return _adapter_plan(args)
    if getattr(args, "base", None):
        raise ConvspecError("--base names the base model of an adapter", hint="use it with --adapter")
    spec = args.spec
    from .io.gguf_checkpoint import is_gguf

    if args.against and is_gguf(args.against):  # the GGUF spec, its config from the file
        ckpt = _against(args)
        spec, _ = api.gguf_spec(spec, ckpt, "", args.reverse)
        plan = api.compile(spec, config=args.config or ckpt.config)
    else:
        plan = api.compile(spec, config=args.config or _checkpoint_config(args.against))
    plan = plan.inverse() if args.reverse else plan
    return plan.dequantize() if getattr(args, "dequantize", False) else plan


def _adapter_plan(args):
    """The adapter plan: for the --against adapter (checked against its headers, and --base's), or
    for adapters of PEFT's default config."""
    from .io.adapter import is_adapter

    if args.against and is_adapter(args.against):
        if args.config:
            raise ConvspecError(
                "an adapter's spec is compiled with --base's config.json", hint="pass --base DIR"
            )
        derived = api.adapter_plan(args.spec, args.against, base=args.base, reverse=args.reverse)
    else:
        if args.against:
            raise ConvspecError(f"--adapter: {args.against} is no PEFT adapter (no adapter_config.json)")
        from .compile.lora import derive

        config = args.config or _checkpoint_config(args.base)
        derived = derive(api.compile(args.spec, config=config))
    return derived.converting(args.reverse)


def _checkpoint_config(against: str | None) -> str | None:
    """The checkpoint's own config.json, when there is one (a pipe or a link out by that name is an error)."""
    if against is None or not os.path.isdir(against):
        return None
    from .io.config import checkpoint_config

    found = checkpoint_config(against)
    return str(found) if found else None


def _emit(data: bytes, output: str | None) -> int:
    """Bytes to stdout, or to a file written whole (never half-written)."""
    if output is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    from .io.files import write_file_atomic

    write_file_atomic(output, data)
    return 0


def _convert(args) -> int:
    from .parallel_convert import check_workers, torchrun_world

    workers = check_workers(args.workers)  # before anything is read
    ranks = torchrun_world() is not None  # launched by torchrun: the ranks share the work
    progress = None if args.quiet or args.dry_run or not sys.stderr.isatty() else _Progress()
    r = api.convert(
        args.spec,
        args.src,
        args.dst,
        reverse=args.reverse,
        device=args.device,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        strict=args.strict,
        overwrite=args.overwrite,
        dry_run=args.dry_run,
        on_tensor=progress,
        manifest=args.manifest,
        allow_pickle=args.allow_pickle,
        workers=workers,
        ranks=ranks,
        dequantize=args.dequantize,
        gguf_type=args.gguf_type,
        allow_lossy=args.allow_lossy,
        adapter=True if args.adapter else None,
        base=args.base,
    )
    if progress is not None:
        progress.done()
    if args.json:
        from .streaming import output_order

        outputs = {k: {"shape": list(s), "dtype": d} for k, s, d in output_order(r.bound, args.dtype)}
        print(
            json.dumps(
                {
                    "dry_run": args.dry_run,
                    "dst": str(args.dst),
                    "files": r.files,
                    "tensors": r.tensors,
                    "bytes": r.bytes,
                    "coverage": r.bound.coverage(),
                    "warnings": r.bound.warnings,
                    "notes": r.notes,
                    **({"outputs": outputs} if args.dry_run else {}),
                },
                indent=2,
            )
        )
        return 0
    if args.dry_run:
        from .streaming import output_order

        rows = [(key, str(list(shape)), dtype) for key, shape, dtype in output_order(r.bound, args.dtype)]
        print("\n".join(style_table(rows, indent="")))
        print(f"would write {r.tensors} tensors, {r.bytes} bytes to {args.dst}")
        _already_note(r)
        return 0
    for line in [*_cleanup_notes(r.cleanup), *r.notes]:
        print(f"note: {line}", file=sys.stderr)
    print(f"wrote {r.tensors} tensors ({r.bytes} bytes) in {len(r.files)} file(s) to {r.dst}")
    _already_note(r)
    return 0


def _already_note(r) -> None:
    """How many source keys were in the layout being written already (copied unchanged)."""
    from .streaming import layout_name

    if r.already:
        print(
            f"{r.already} of {len(r.bound.layout)} keys are in the {layout_name(r.bound.plan)} layout "
            "already: they pass through unchanged"
        )


def _cleanup_notes(cleanup) -> list[str]:
    """What convert found of earlier runs beside the destination, as a person would want to know."""
    if cleanup is None:
        return []
    out = [f"removed {p.name}, left by a conversion that died" for p in cleanup.removed]
    if cleanup.restored is not None:
        out.append(
            f"restored the destination, which a killed --overwrite had moved aside ({cleanup.restored.name})"
        )
    out += [
        f"left {p.name} alone: "
        + (f"process {pid} is still writing it" if pid else "a live process holds it")
        for p, pid in cleanup.kept
    ]
    return out


class _Progress:
    """A one-line progress display on a terminal: tensors, bytes and bytes per second."""

    def __init__(self) -> None:
        import time

        self.clock = time.monotonic
        self.start = self.last = self.clock()
        self.n = self.bytes = 0

    def __call__(self, key: str, nbytes: int) -> None:
        self.n += 1
        self.bytes += nbytes
        now = self.clock()
        if now - self.last >= 0.1:
            self.last = now
            rate = self.bytes / max(now - self.start, 1e-9) / 2**20
            print(
                f"\r  {self.n} tensors, {self.bytes / 2**20:.1f} MiB, {rate:.1f} MiB/s",
                end="",
                file=sys.stderr,
            )

    def done(self) -> None:
        print("\r\033[K", end="", file=sys.stderr)


def _verify(args) -> int:
    from .devices import COMPARES, check_device
    from .io.formats import open_checkpoint
    from .streaming import verify_checkpoint

    check_device(args.device, needs_data=COMPARES)  # before a pickle source is transcoded
    if args.manifest:
        return _verify_manifest(args)
    from .io.adapter import is_adapter

    if args.adapter or is_adapter(args.src):
        return _verify_adapter(args)
    if args.base or args.reverse:
        raise ConvspecError(
            "--base and --reverse verify an adapter", hint="pass --adapter with an adapter directory"
        )
    with api.safetensors_source(args.src, args.allow_pickle) as src:
        plan = api.compile(args.spec, config=open_checkpoint(src).config)
        v = verify_checkpoint(plan, src, device=args.device, converted=args.converted)
    bad = v.mismatches
    if args.json:
        mismatches = [
            {
                "key": m.key,
                "shape": list(m.shape),
                "dtype": m.dtype,
                "why": m.why,
                "max_abs_diff": m.max_abs_diff,
            }
            for m in bad
        ]
        d = {
            "checked": v.checked,
            "total": v.total,
            "ok": not bad,
            "stopped": v.stopped,
            "mismatches": mismatches,
        }
        print(json.dumps(d, indent=2))
        return 1 if bad else 0
    s = _style(sys.stdout)
    if not bad:
        what = f"match {args.converted}" if args.converted else "come back"
        print(f"{s.ok('ok')}: {v.checked} tensors {what} bit for bit")
        return 0
    for m in bad:
        diff = "" if m.max_abs_diff is None else f", max abs diff {m.max_abs_diff:g}"
        print(f"{s.error('MISMATCH')} {m.key} {list(m.shape)} {m.dtype}: {m.why}{diff}")
    tail = f"; stopped at the first {len(bad)} (the source has {v.total} tensors)" if v.stopped else ""
    print(f"{len(bad)} mismatch(es) among {v.checked} tensors checked{tail}")
    return 1


def _verify_adapter(args) -> int:
    """An adapter converted forward and back (bit for bit), and with --base merged both ways."""
    if args.converted or args.allow_pickle:
        raise ConvspecError("--converted and --allow-pickle do not apply to an adapter", hint="drop them")
    problems, merged = api.verify_adapter(args.spec, args.src, base=args.base, reverse=args.reverse)
    bad = [*problems, *((m.key, m.why, m.max_abs_diff) for m in (merged.mismatches if merged else []))]
    if args.json:
        d = {"round_trip": [{"key": k, "why": w} for k, w in problems], "ok": not bad}
        if merged is not None:
            d["merge"] = {
                "checked": merged.checked,
                "tolerance": merged.tolerance,
                "mismatches": [
                    {"key": m.key, "why": m.why, "max_abs_diff": m.max_abs_diff} for m in merged.mismatches
                ],
            }
        print(json.dumps(d, indent=2))
        return 1 if bad else 0
    s = _style(sys.stdout)
    for k, why in problems:
        print(f"{s.error('MISMATCH')} {k}: {why}")
    for m in merged.mismatches if merged else []:
        diff = "" if m.max_abs_diff is None else f", max abs diff {m.max_abs_diff:g}"
        print(f"{s.error('MISMATCH')} {m.key}: {m.why}{diff}")
    if not problems:
        print(f"{s.ok('ok')}: the adapter comes back bit for bit")
    if merged is not None and not merged.mismatches:
        print(
            f"{s.ok('ok')}: {merged.checked} weights: converting then merging equals merging then converting "
            f"(float64, within {merged.tolerance:g} of each weight's largest value)"
        )
    return 1 if bad else 0


def _verify_manifest(args) -> int:
    """SRC and the converted directory hashed again and compared with the manifest convert wrote."""
    from . import manifest

    if not args.converted:
        raise ConvspecError("verify --manifest checks a converted directory", hint="pass --converted DIR")
    spec = manifest.load(args.converted).get("spec")
    result = manifest.check(args.src, args.converted)
    expected = api.load_spec(args.spec).name
    if spec != expected:
        result.problems.insert(0, f"the manifest was written by spec {spec}, not {expected}")
    if args.json:
        print(
            json.dumps(
                {"checked": result.checked, "ok": result.ok, "spec": spec, "problems": result.problems},
                indent=2,
            )
        )
        return 0 if result.ok else 1
    s = _style(sys.stdout)
    if result.ok:
        print(f"{s.ok('ok')}: {result.checked} tensors of {args.src} and {args.converted} match the manifest")
        return 0
    for p in result.problems[:50]:
        print(f"{s.error('CHANGED')} {p}")
    more = " (first 50 shown)" if len(result.problems) > 50 else ""
    print(f"{len(result.problems)} difference(s) from the manifest among {result.checked} tensors{more}")
    return 1


def _check(args) -> int:
    from .lint import check_spec

    config = args.config or _checkpoint_config(args.against)
    layout = _layout(args)
    select = _codes(args.select)
    ignore = _codes(args.ignore)
    reports = [
        check_spec(spec, config=config, layout=layout, select=select, ignore=ignore, checkpoint=args.against)
        for spec in args.specs
    ]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        s = _style(sys.stdout)
        print("\n".join(r.text(s) for r in reports))
    return 1 if any(r.errors for r in reports) else 0


def _codes(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(c.strip().upper() for c in text.split(",") if c.strip())


def _explain(args) -> int:
    from .explain import explain, explanation_text

    e = explain(_plan(args), args.key, _layout(args))
    ckpt = _against(args)
    if ckpt is not None and args.key in ckpt.decoded:  # a GGUF block type: the values are not the bytes
        from .ops.ggml import GGML_TYPES

        kind = GGML_TYPES[ckpt.decoded[args.key]]
        e.notes.append(
            f"stored as {kind} blocks in {args.against}: read through dequant_ggml, which is lossy"
        )
    if args.json:
        print(json.dumps(e.to_dict(), indent=2))
    else:
        print(explanation_text(e, _style(sys.stdout)))
    return 1 if e.problems or e.claim == "error" else 0


def _infer(args) -> int:
    """The synthesized spec (printed, or -o FILE) and the report; exit 1 when it explains less than
    every key, binds other than exactly, or draws a lint warning."""
    import tempfile
    from pathlib import Path

    from .io.files import write_file_atomic
    from .layout_sources import read_layout
    from .lint import check_spec
    from .ops import TensorInfo
    from .synthesis import infer

    if args.output is not None and not args.output.endswith((".yaml", ".yml")):
        raise ConvspecError(f"-o {args.output}: infer writes a YAML spec", hint="name it NAME.yaml")
    if args.output is not None:  # never onto, around or inside what it reads
        from .io.destination import check_output, source_paths

        for x in (args.source, args.target, args.config):
            if x is not None and Path(x).exists():
                check_output(args.output, source_paths(x), x)

    def named(x: str):  # a checkpoint stays a path: its tensors decide what shapes cannot
        return x if Path(x).exists() else read_layout(x, args.config)

    r = infer(named(args.source), named(args.target), name=args.name, config=args.config)
    source = r.source_layout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.name}.yaml"
        path.write_text(r.spec)
        layout = {k: TensorInfo(shape, dtype) for k, (shape, dtype) in source.items()}
        lint = check_spec(str(path), config=args.config, layout=layout)
    findings = [  # warnings and errors; I301 (keys passed through) is what unchanged keys are
        f.text(_style(sys.stdout)).replace(str(path), args.output or "<spec>")
        for f in lint.findings
        if f.severity != "info"
    ]
    ok = r.ok and not findings and not (args.strict and r.found.questions)
    differs = None
    if args.against_spec is not None:
        from .synthesis import compare

        plan = api.compile(args.against_spec, config=args.config)
        differs = compare(r.spec, plan, source, args.config)
        ok = ok and not differs
    if args.output is not None:
        write_file_atomic(Path(args.output), r.spec.encode())
    if args.json:
        extra = {} if differs is None else {"against_spec": differs}
        print(json.dumps({**r.to_dict(), "ok": ok, "lint": findings, **extra}, indent=2))
        return 0 if ok else 1
    if args.output is None:
        print(r.spec, end="")
    unsettled = args.strict and r.ok and not findings and bool(r.found.questions) and not differs
    report = _infer_report(r, findings, ok, unsettled)
    if differs is not None:
        head = f"against {args.against_spec}: " + (
            f"{len(differs)} source keys go elsewhere"
            if differs
            else "the same behaviour on every source key"
        )
        report += "\n" + "\n".join([head, *(f"  {d}" for d in differs[:SHOWN])])
    print(report, file=sys.stderr if args.output is None else sys.stdout)
    return 0 if ok else 1


SHOWN = 20  # groups of unexplained keys shown per side (--json has them all)


def _infer_report(r, findings: list[str], ok: bool, unsettled: bool = False) -> str:
    """What infer explained, left, asked and proved, for a person."""
    from .synthesis import grouped

    f = r.found
    explained = r.source_keys - len(f.unexplained_source)
    lines = [
        f"{explained} of {r.source_keys} source keys explained ({f.unchanged} unchanged, {len(f.rules)} rules)"
    ]
    for side, left in (("source", f.unexplained_source), ("target", f.unexplained_target)):
        for g in grouped(left)[:SHOWN]:
            lines.append(
                f"  not explained ({side}): {g['template']} {g['shape']} {g['dtype']} x{g['keys']}, e.g. {g['first']}"
            )
    lines += [f"  decided: {d}" for d in f.decided]
    lines += [f"  question: {q}" for q in f.questions]
    lines += [f"  lint: {x}" for x in findings]
    p = r.proof
    if p.error:
        lines.append(f"  not proved: {p.error}")
    lines += [f"  forward differs: {d}" for d in p.forward] + [f"  inverse differs: {d}" for d in p.inverse]
    if ok:
        lines.append("ok: binds both ways exactly on these layouts")
    elif unsettled:
        lines.append("not settled: binds both ways exactly, but questions are left (--strict)")
    else:
        lines.append("not a complete, proved spec")
    return "\n".join(lines)


def _fmt(args) -> int:
    """Every file is formatted before any is written: a bad spec among several changes none."""
    from pathlib import Path

    from .io.files import write_file_atomic
    from .spec.format import format_text
    from .spec.source import read_spec_text

    if args.output and len(args.specs) > 1:
        raise ConvspecError("-o FILE takes one SPEC", hint="format several files in place, or one at a time")
    if args.output and args.to:
        suffix = ".cspec" if args.to == "cspec" else (".yaml", ".yml")
        if not args.output.endswith(suffix):
            raise ConvspecError(
                f"-o {args.output}: --to {args.to} writes a {'.cspec' if args.to == 'cspec' else '.yaml'} file",
                hint="name the output after the syntax it holds",
            )
    printing = args.stdout or (args.to is not None and not args.output)
    results = []
    for name in args.specs:
        path = Path(name)
        if not path.exists():
            raise ConvspecError(
                f"spec file {name} does not exist", hint="fmt works on files, not built-in names"
            )
        text = read_spec_text(path)
        out = format_text(text, name, to=args.to)
        target = Path(args.output) if args.output else path
        before = target.read_text(encoding="utf-8") if target.is_file() else None
        results.append({"file": name, "output": str(target), "changed": out != before, "text": out})
    for r in results:
        if args.check or printing:
            continue
        if r["changed"]:
            write_file_atomic(r["output"], r["text"].encode("utf-8"))
    if args.json:
        for r in results:
            if not printing:
                del r["text"]
        print(json.dumps(results, indent=2))
    elif printing:
        for r in results:
            sys.stdout.write(r["text"])
    elif args.check:
        for r in results:
            if r["changed"]:
                print(f"would reformat {r['file']}")
        n = sum(r["changed"] for r in results)
        print(f"{n} file(s) would be reformatted, {len(results) - n} already formatted", file=sys.stderr)
    elif args.output:
        r = results[0]
        print(f"wrote {r['output']}" if r["changed"] else f"{r['output']} already holds it", file=sys.stderr)
    else:
        n = sum(r["changed"] for r in results)
        print(f"{n} file(s) reformatted, {len(results) - n} unchanged", file=sys.stderr)
    return 1 if args.check and any(r["changed"] for r in results) else 0


def _schema(args) -> int:
    from .spec.schema import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    _emit(text.encode("utf-8"), args.output)
    if args.output and args.json:  # the schema went to the file: say where, as one JSON document
        print(json.dumps({"output": args.output}))
    return 0


def _import(args) -> int:

    from .hf.library import import_key

    if args.gguf:
        from .hf.gguf_import import import_gguf as import_key
    imp = import_key(args.key)
    main_text = imp.specs[imp.name]
    if args.json:
        written = _write_imported(imp, args.output) if args.output else []
        d = {"name": imp.name, "notes": imp.notes, "verified": imp.verified, "written": written}
        if not args.output:
            d["specs"] = imp.specs
        print(json.dumps(d, indent=2))
        return 0
    for note in imp.notes:
        print(f"warning: not expressible: {note}", file=sys.stderr)
    if imp.verified is not None:
        print(f"warning: not checked against a model: {imp.verified}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(main_text)
        rest = [n for n in imp.specs if n != imp.name]
        if rest:
            print(
                f"note: {imp.name} includes {', '.join(rest)}; -o FILE writes them beside it", file=sys.stderr
            )
        return 0
    written = _write_imported(imp, args.output)
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0


def _write_imported(imp, output: str) -> list[str]:
    """The imported spec at `output`, and the specs it includes beside it, each written whole."""
    from pathlib import Path

    from .io.files import write_file_atomic

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out, imp.specs[imp.name].encode("utf-8"))
    written = [str(out)]
    for name, text in imp.specs.items():
        if name != imp.name:
            write_file_atomic(out.parent / f"{name}.yaml", text.encode("utf-8"))
            written.append(str(out.parent / f"{name}.yaml"))
    return written


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
