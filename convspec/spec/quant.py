"""The checks of a `quantization` section that both front ends share, so both syntaxes refuse the
same sections with the same messages: a scheme of the three, `{w}` templates, no duplicates."""

from __future__ import annotations

import difflib
from typing import get_args

from ..errors import Span, SpecValidationError
from .model import Cap, Companion, Expr, ListExpr, Num, Quantization, Template

SCHEMES: tuple[str, ...] = get_args(Quantization.model_fields["scheme"].annotation)
BLOCK_SCHEME = "fp8_blocks"  # the one scheme whose scale covers a block of rows x cols
_EXAMPLE = "{w}_scale_inv"


def check_scheme(name: str, span: Span | None) -> str:
    """The scheme's name, or an error listing the schemes (with the nearest one first)."""
    if name in SCHEMES:
        return name
    close = difflib.get_close_matches(name, SCHEMES, n=1, cutoff=0.6)
    raise SpecValidationError(
        f"unknown quantization scheme {name!r}" + (f": did you mean {close[0]!r}?" if close else ""),
        span=span,
        hint=f"a scheme is one of: {', '.join(SCHEMES)}",
    )


def check_template(t: Template, what: str) -> str:
    """A weight or companion template: `{w}` first, then literal key text; its text."""
    caps = t.captures()
    if not caps:
        raise SpecValidationError(
            f"{what} {t.text!r} has no {{w}}",
            span=t.span,
            hint=f"write the weight's key as {{w}} followed by literal text, e.g. {_EXAMPLE}",
        )
    for cap in caps:
        if cap.name != "w":
            raise SpecValidationError(
                f"{what} {t.text!r} has the capture {{{cap.name}}}: its one capture is written {{w}}",
                span=cap.span,
                hint=f"write the weight's key as {{w}}, e.g. {_EXAMPLE}",
            )
        if cap.type is not None or cap.offset:
            raise SpecValidationError(
                f"{what} {t.text!r}: {{w}} has no type and no offset",
                span=cap.span,
                hint="write it {w}: it stands for a whole weight name",
            )
    if not isinstance(t.parts[0], Cap):
        raise SpecValidationError(
            f"{what} {t.text!r} does not start with {{w}}",
            span=t.span,
            hint=f"put {{w}} first and the literal text after it, e.g. {_EXAMPLE}",
        )
    return t.text


def check_block(block: Expr, scheme: str, span: Span | None) -> None:
    """A block shape belongs to fp8_blocks; written as a literal list it is [rows, cols], each >= 1."""
    if scheme != BLOCK_SCHEME:
        raise SpecValidationError(
            f"a block shape is only for the {BLOCK_SCHEME} scheme, not {scheme}",
            span=span,
            hint=f"remove the block, or use the scheme {BLOCK_SCHEME}",
        )
    if isinstance(block, ListExpr) and all(isinstance(i, Num) for i in block.items):
        bad = [i for i in block.items if not isinstance(i.value, int) or i.value < 1]
        if len(block.items) != 2 or bad:
            raise SpecValidationError(
                "a block shape is two whole numbers of at least 1, [rows, cols]",
                span=bad[0].span if bad and bad[0].span else block.span or span,
                hint="e.g. [128, 128], or config.quantization_config.weight_block_size ?? [128, 128]",
            )


def build(
    scheme: str,
    block: Expr | None,
    block_span: Span | None,
    entries: list[tuple[Template, list[Template], Span | None]],
    span: Span | None,
) -> Quantization:
    """The section from checked parts: each weight template once, each companion once, never its weight."""
    if block is not None:
        check_block(block, scheme, block_span)
    weights: dict[str, Template] = {}
    seen: dict[str, Template] = {}
    companions = []
    for weight, comps, where in entries:
        wtext = check_template(weight, "weight template")
        if wtext in weights:
            raise SpecValidationError(
                f"weight template {wtext!r} is given twice",
                span=weight.span,
                hint=f"give all its companions in one place (first given at {_at(weights[wtext])})",
            )
        weights[wtext] = weight
        if not comps:
            raise SpecValidationError(
                f"weight template {wtext!r} has no companion", span=where, hint=f"e.g. {_EXAMPLE}"
            )
        for comp in comps:
            ctext = check_template(comp, "companion template")
            if ctext == wtext:
                raise SpecValidationError(
                    f"companion template {ctext!r} is its weight's own template",
                    span=comp.span,
                    hint=f"a companion is another tensor beside the weight, e.g. {_EXAMPLE}",
                )
            if ctext in seen:
                raise SpecValidationError(
                    f"companion template {ctext!r} is given twice",
                    span=comp.span,
                    hint=f"each companion belongs to one weight (first given at {_at(seen[ctext])})",
                )
            seen[ctext] = comp
        companions.append(Companion(weight=wtext, companions=[c.text for c in comps], span=where))
    return Quantization(scheme=scheme, companions=companions, block=block, span=span)


def _at(t: Template) -> str:
    return f"line {t.span.line}, column {t.span.col}" if t.span else "an earlier line"
