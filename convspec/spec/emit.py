"""Spec IR -> text: the YAML form and the DSL form, canonical layout. Parsing the result gives the
same IR back (tested for every built-in spec). Comments, when given, go back on the lines of the
parts they were attached to (see comments.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal

from ..errors import SpecValidationError
from .comments import Comments, Slot
from .model import (
    BinOp,
    Call,
    Convert,
    Drop,
    Expr,
    Include,
    ListExpr,
    Neg,
    Num,
    Ref,
    Rename,
    Spec,
    Str,
    Template,
)

_PRECEDENCE = {"??": 1, "+": 2, "-": 2, "*": 3, "//": 3, "%": 3}
_PLAIN_YAML = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def expr_text(e: Expr, parent: int = 0) -> str:
    """An expression as the grammar reads it, with only the parentheses it needs."""
    if isinstance(e, Num):
        return _num(e.value)
    if isinstance(e, Str):
        return _dsl_string(e.value)
    if isinstance(e, Ref):
        return e.dotted
    if isinstance(e, ListExpr):
        return "[" + ", ".join(expr_text(i) for i in e.items) + "]"
    if isinstance(e, Neg):
        return "-" + expr_text(e.operand, 4)
    if isinstance(e, BinOp):
        p = _PRECEDENCE[e.op]
        # left-associative: the right operand needs parentheses at equal precedence
        text = f"{expr_text(e.left, p)} {e.op} {expr_text(e.right, p + 1)}"
        return f"({text})" if p < parent else text
    if isinstance(e, Call):
        args = [expr_text(a) for a in e.args] + [f"{k.name}={expr_text(k.value)}" for k in e.kwargs]
        return f"{e.op}({', '.join(args)})"
    raise TypeError(f"not an expression: {e!r}")  # pragma: no cover


def _num(value: int | float) -> str:
    """A number as the grammar reads it back: digits, and a point for a float (never `1e+20`)."""
    text = str(value)
    if isinstance(value, float) and not re.fullmatch(r"\d+\.\d+", text):
        text = format(Decimal(repr(value)), "f")
        text = text if "." in text else text + ".0"
    return text


def _dsl_string(text: str) -> str:
    """A "string" the grammar reads back: only `\\` and `"` are escaped (the grammar knows no `\\n`)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _q(text: str) -> str:
    """A YAML scalar: plain when it is safe, double-quoted otherwise."""
    if _PLAIN_YAML.fullmatch(text) and text not in ("true", "false", "null", "yes", "no", "on", "off"):
        return text
    return _yaml_quote(text)


def _yaml_quote(text: str) -> str:
    """A double-quoted YAML scalar that keeps printable non-ASCII text as it is (`café`, not `caf\\u00e9`)."""
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(c if c.isprintable() else _escape(c) for c in quoted)


def _escape(c: str) -> str:
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


_FLOW_UNSAFE = re.compile(r"[,\[\]{}#]|: |^[-?:!&*|>'\"%@`\s]|\s$")


def _flow_item(text: str) -> str:
    """An item of a YAML `[...]` list: plain unless YAML would split or misread it (`cat(dim=1, equal=true)`)."""
    return _yaml_quote(text) if not text or _FLOW_UNSAFE.search(text) else text


def _tlist(ts: list[Template]) -> str:
    return "[" + ", ".join(_q(t.text) for t in ts) + "]"


@dataclass(frozen=True)
class _Line:
    """One line of output and the slots it writes; no text: a part this syntax gives no line."""

    text: str | None
    slots: tuple[Slot, ...] = ()
    rule: int | None = None


def to_yaml(spec: Spec, header: str = "", comments: Comments | None = None) -> str:
    """The spec in the YAML syntax. `header` is written first (comment lines), then `comments`' own."""
    top = [
        _Line(f"spec: {_q(spec.name)}", (("spec",),)),
        _Line(f"doc: {_q(spec.doc)}" if spec.doc else None, (("doc",),)),
        _Line("model_types: [" + ", ".join(_q(m) for m in spec.model_types) + "]", (("model_types",),)),
        _Line(f"base_prefix: {spec.base_prefix}" if spec.base_prefix else None, (("base_prefix",),)),
        _Line("rules:" if spec.rules else "rules: []", (("rules",),)),
    ]
    lines = top + [line for i, rule in enumerate(spec.rules) for line in _yaml_rule(i, rule)]
    return _render(lines, header, comments, footer_gap=False)


def _yaml_rule(i: int, rule) -> list[_Line]:
    def line(text: str | None, *slots: Slot) -> _Line:
        return _Line(text, tuple((i, *s) for s in slots), i)

    if isinstance(rule, Rename):
        kind = "alias" if rule.one_way else "rename"
        return [
            line(f"  - {kind}: {_q(rule.source.text)}", ("head",)),
            line(f"    to: {_q(rule.target.text)}", ("to",)),
            line(f"    unless: {_tlist(rule.unless)}" if rule.unless else None, ("unless",)),
        ]
    if isinstance(rule, Drop):
        return [line(f"  - drop: {_q(rule.source.text)}", ("head",))]
    if isinstance(rule, Include):
        under = "    under: [" + ", ".join(u or '""' for u in rule.under) + "]"
        return [
            line(f"  - include: {_q(rule.spec)}", ("head",)),
            line(under if rule.under else None, ("under",)),
            line(f"    only: {rule.only}" if rule.only != "all" else None, ("only",)),
        ]
    assert isinstance(rule, Convert)
    out = [line("  - convert:", ("head",))]
    out += [line(f"      {b.name}: {_q(b.template.text)}", ("in", j)) for j, b in enumerate(rule.inputs)]
    out.append(line("    let:" if rule.lets else None, ("let",)))
    for j, let in enumerate(rule.lets):
        out.append(line(f"      {', '.join(let.names)}: {_q(expr_text(let.expr))}", ("let", j)))
    chains = [o for o in rule.outputs if o.chain is not None]
    if chains and len(rule.outputs) > 1:
        raise SpecValidationError(
            "a convert with an `ops [...]` output and other outputs has no YAML form",
            span=chains[0].span or rule.span,
            hint="YAML writes either one `to:` key with `ops: [...]`, or a `to:` mapping of expressions",
        )
    if chains:
        o = chains[0]
        key = _target_key(o.targets) if len(o.targets) == 1 else _tlist(o.targets)
        out.append(line(f"    to: {key}", ("to",), ("out", 0)))
        out.append(line("    ops: [" + ", ".join(_flow_item(expr_text(c)) for c in o.chain) + "]", ("ops",)))
        return out
    out.append(line("    to:", ("to",)))
    for j, o in enumerate(rule.outputs):
        out.append(line(f"      {_target_key(o.targets)}: {_q(expr_text(o.expr))}", ("out", j)))
    return out


def _target_key(targets: list[Template]) -> str:
    return _q(", ".join(t.text for t in targets))


def to_dsl(spec: Spec, header: str = "", comments: Comments | None = None) -> str:
    """The spec in the .cspec syntax."""
    if "\n" in spec.doc:
        raise SpecValidationError(
            "the doc has a line break, which a .cspec string cannot hold",
            span=spec.span,
            hint="make the doc one line",
        )
    lines = [
        _Line(f"spec {spec.name}" + (f" {_dsl_string(spec.doc)}" if spec.doc else ""), (("spec",), ("doc",))),
        _Line(
            "model_types " + ", ".join(spec.model_types) if spec.model_types else None, (("model_types",),)
        ),
        _Line(f"base_prefix {spec.base_prefix}" if spec.base_prefix else None, (("base_prefix",),)),
        _Line(None, (("rules",),)),
    ]
    for i, rule in enumerate(spec.rules):
        lines.append(_Line("", (), i))
        lines += _dsl_rule(i, rule)
    return _render(lines, header, comments, footer_gap=True)


def _dsl_rule(i: int, rule) -> list[_Line]:
    def line(text: str | None, *slots: Slot) -> _Line:
        return _Line(text, tuple((i, *s) for s in slots), i)

    if isinstance(rule, Rename):
        kind = "alias" if rule.one_way else "rename"
        unless = "  unless " + ", ".join(t.text for t in rule.unless)
        return [
            line(f"{kind} {rule.source.text} -> {rule.target.text}", ("head",), ("to",)),
            line(unless if rule.unless else None, ("unless",)),
        ]
    if isinstance(rule, Drop):
        return [line(f"drop {rule.source.text}", ("head",))]
    if isinstance(rule, Include):
        under = ", ".join(u or '""' for u in rule.under)
        only = f" only {rule.only}" if rule.only != "all" else ""
        text = f"include {rule.spec}" + (f" under {under}" if rule.under else "") + only
        return [line(text, ("head",), ("under",), ("only",))]
    assert isinstance(rule, Convert)
    out = []
    for j, b in enumerate(rule.inputs):
        sep = "," if j < len(rule.inputs) - 1 else ""
        slots = (("head",), ("in", 0)) if j == 0 else (("in", j),)
        out.append(line(f"{'convert ' if j == 0 else ' ' * 8}{b.name} = {b.template.text}{sep}", *slots))
    out.append(line(None, ("let",)))
    out += [
        line(f"  let {', '.join(let.names)} = {expr_text(let.expr)}", ("let", j))
        for j, let in enumerate(rule.lets)
    ]
    out.append(line(None, ("to",)))
    for j, o in enumerate(rule.outputs):
        targets = ", ".join(t.text for t in o.targets)
        if o.chain is not None:
            chain = ", ".join(expr_text(c) for c in o.chain)
            out.append(line(f"  -> {targets} ops [{chain}]", ("out", j), ("ops",)))
        else:
            out.append(line(f"  -> {targets} = {expr_text(o.expr)}", ("out", j)))
    return out


def _render(lines: list[_Line], header: str, comments: Comments | None, footer_gap: bool) -> str:
    """The lines with each slot's comments above it and its trailing one at its end; comments of a part
    this syntax has no line for go to the next line of its rule (or the rule's top at its end)."""
    c = comments or Comments()
    out = [header.rstrip("\n")] if header else []
    out += c.header
    pending: list[str] = []
    rule: int | None = None
    rule_top: tuple[int, str] | None = None  # where the current rule's first line begins, its indent
    for ln in lines:
        if ln.rule != rule:
            if pending and rule_top is not None:
                out[rule_top[0] : rule_top[0]] = [rule_top[1] + p for p in pending]
                pending = []
            rule, rule_top = ln.rule, None
        attached = [c.slots[s] for s in ln.slots if s in c.slots]
        if ln.text is None:
            pending += [t for a in attached for t in a.lines()]
            continue
        if not ln.text:
            out.append("")
            continue
        trailing = [a.trailing for a in attached if a.trailing is not None]
        above = pending + [t for a in attached for t in a.above] + trailing[1:]
        pending = []
        indent = ln.text[: len(ln.text) - len(ln.text.lstrip(" "))]
        if rule_top is None and rule is not None:
            rule_top = (len(out), indent)
        out += [indent + t for t in above]
        out.append(ln.text + (f"  {trailing[0]}" if trailing else ""))
    if pending and rule_top is not None:
        out[rule_top[0] : rule_top[0]] = [rule_top[1] + p for p in pending]
    elif pending:
        out += pending
    if c.footer:
        out += ([""] if footer_gap else []) + c.footer
    return "\n".join(out) + "\n"
