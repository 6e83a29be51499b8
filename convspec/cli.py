"""The command line: arguments -> API -> rendering. The only module that prints."""

from __future__ import annotations

import argparse
import sys

from . import api, render
from .errors import ConvspecError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convspec", description="Declarative conversion specs for model checkpoints."
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a spec and show its plan")
    c.add_argument("spec", nargs="?", help="a built-in spec name or model type, or a .yaml/.cspec path")
    c.add_argument("--config", help="a config.json (default with --against: the checkpoint's config.json)")
    c.add_argument(
        "--against", metavar="CHECKPOINT", help="bind to a checkpoint's headers and show every group"
    )
    c.add_argument("--format", choices=("text", "json", "dot"), default="text")
    c.add_argument("--reverse", action="store_true", help="show the inverse plan")
    c.add_argument("--strict", action="store_true", help="with --against: every key must be claimed")
    c.add_argument("--list", action="store_true", help="list the built-in specs")
    cv = sub.add_parser("convert", help="convert a checkpoint with a spec (atomic, sharded safetensors)")
    cv.add_argument("spec")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--reverse", action="store_true", help="apply the inverse plan (save back)")
    cv.add_argument("--device", default="cpu")
    cv.add_argument("--dtype", help="cast every output to this dtype")
    cv.add_argument("--max-shard-size", default="5GB")
    cv.add_argument("--strict", action="store_true", help="every key must be claimed by a rule")
    cv.add_argument("--dry-run", action="store_true", help="print what would be written, from headers only")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    cv.add_argument("--quiet", action="store_true", help="no progress display")
    v = sub.add_parser("verify", help="convert forward and back, and compare with the source bit for bit")
    v.add_argument("spec")
    v.add_argument("src")
    v.add_argument("--device", default="cpu")
    v.add_argument(
        "--converted", metavar="DIR", help="compare a converted directory with SRC converted afresh"
    )
    im = sub.add_parser(
        "import-transformers",
        help="write the spec for a transformers model type or class (needs transformers)",
    )
    im.add_argument("key", metavar="MODEL_TYPE_OR_CLASS")
    im.add_argument("-o", "--output", metavar="FILE", help="write the spec here (included specs beside it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {
            "compile": _compile,
            "convert": _convert,
            "verify": _verify,
            "import-transformers": _import,
        }
        return commands[args.command](args)
    except ConvspecError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except BrokenPipeError:  # pragma: no cover - e.g. `| head`
        return 0


def _compile(args) -> int:
    if args.list:
        for name in api.spec_names():
            spec = api.load_spec(name)
            print(f"{name:<16} {spec.doc}")
        return 0
    if not args.spec:
        raise ConvspecError(
            "compile needs a SPEC (a built-in name, a model type, or a spec file)",
            hint="see `convspec compile --list`",
        )
    config = args.config
    if config is None and args.against:
        from pathlib import Path

        candidate = Path(args.against) / "config.json"
        config = str(candidate) if candidate.is_file() else None
    plan = api.compile(args.spec, config=config)
    if args.reverse:
        plan = plan.inverse()
    if args.against:
        from .io.safetensors import read_layout

        layout = {k: e.info for k, e in read_layout(args.against).items()}
        bound = plan.bind(layout, strict=args.strict)
        out = {"text": render.bound_text, "json": render.bound_json, "dot": lambda b: render.plan_dot(b.plan)}
        print(out[args.format](bound))
    else:
        out = {"text": render.plan_text, "json": render.plan_json, "dot": render.plan_dot}
        print(out[args.format](plan))
    return 0


def _convert(args) -> int:
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
    )
    if progress is not None:
        progress.done()
    if args.dry_run:
        from .streaming import output_order

        for key, shape, dtype in output_order(r.bound, args.dtype):
            print(f"{key}  {list(shape)}  {dtype}")
        print(f"would write {r.tensors} tensors, {r.bytes} bytes to {args.dst}")
        return 0
    print(f"wrote {r.tensors} tensors ({r.bytes} bytes) in {len(r.files)} file(s) to {r.dst}")
    return 0


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
    from .io.checkpoint import Checkpoint
    from .streaming import verify_checkpoint

    plan = api.compile(args.spec, config=Checkpoint(args.src).config_path)
    checked, bad = verify_checkpoint(plan, args.src, device=args.device, converted=args.converted)
    if not bad:
        what = f"match {args.converted}" if args.converted else "come back"
        print(f"ok: {checked} tensors {what} bit for bit")
        return 0
    for m in bad:
        diff = "" if m.max_abs_diff is None else f", max abs diff {m.max_abs_diff:g}"
        print(f"MISMATCH {m.key} {list(m.shape)} {m.dtype}: {m.why}{diff}")
    print(f"{len(bad)} mismatch(es) among {checked} tensors checked")
    return 1


def _import(args) -> int:
    from pathlib import Path

    from .hf.library import import_key

    imp = import_key(args.key)
    main_text = imp.specs[imp.name]
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
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(main_text)
    written = [str(out)]
    for name, text in imp.specs.items():
        if name != imp.name:
            (out.parent / f"{name}.yaml").write_text(text)
            written.append(str(out.parent / f"{name}.yaml"))
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
