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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _compile(args)
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

        layout = {k: (e.shape, e.dtype) for k, e in read_layout(args.against).items()}
        bound = plan.bind(layout, strict=args.strict)
        out = {"text": render.bound_text, "json": render.bound_json, "dot": lambda b: render.plan_dot(b.plan)}
        print(out[args.format](bound))
    else:
        out = {"text": render.plan_text, "json": render.plan_json, "dot": render.plan_dot}
        print(out[args.format](plan))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
