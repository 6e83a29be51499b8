"""`convspec fmt`: a spec in the canonical layout of emit.py, in its own syntax or the other, with its
comments kept (comments.py finds them, the emitters write them back on the lines they belong to)."""

from __future__ import annotations

from ..errors import SpecError, SpecValidationError
from . import parse_spec
from .comments import extract_comments
from .emit import to_dsl, to_yaml
from .model import Spec

SYNTAXES = ("yaml", "cspec")


def syntax_of(file: str | None) -> str:
    """The syntax a file is read in: YAML for .yaml/.yml, the DSL for anything else (as parse_spec)."""
    return "yaml" if file and file.endswith((".yaml", ".yml")) else "cspec"


def format_text(text: str, file: str | None, to: str | None = None) -> str:
    """The spec text in canonical layout, in `to` ("yaml"/"cspec"; None: its own syntax), comments kept.

    Raises the parser's SpecError for a bad spec, and SpecValidationError for a spec the target
    syntax cannot write (the result is parsed again and must give the same IR).
    """
    if to is not None and to not in SYNTAXES:
        raise ValueError(f"unknown syntax {to!r}: expected one of {', '.join(SYNTAXES)}")
    syntax = syntax_of(file)
    target = to or syntax
    spec = parse_spec(text, file, syntax=syntax)
    comments = extract_comments(text, syntax)
    out = to_yaml(spec, comments=comments) if target == "yaml" else to_dsl(spec, comments=comments)
    _same_spec(out, spec, target)
    return out


def _same_spec(out: str, spec: Spec, target: str) -> None:
    """The formatted text must parse to the same IR; a name the other syntax cannot spell fails here."""
    try:
        again = parse_spec(out, None, syntax=target)
    except SpecError as exc:
        raise SpecValidationError(
            f"this spec cannot be written in the {target} syntax: its {target} text would not parse"
            f" ({exc.message})",
            span=spec.span,
            hint="a name or string it holds has no spelling there; keep the spec in its own syntax",
        ) from None
    if again.model_dump() != spec.model_dump():
        raise SpecValidationError(  # pragma: no cover - the emitters write every IR they accept
            f"this spec cannot be written in the {target} syntax without changing it", span=spec.span
        )
