"""Spec IR -> text: the YAML form and the DSL form, canonical layout. Parsing the result gives the
same IR back (tested for every built-in spec)."""

from __future__ import annotations

import json
import re

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
        return str(e.value)
    if isinstance(e, Str):
        return json.dumps(e.value)
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


def _q(text: str) -> str:
    """A YAML scalar: plain when it is safe, double-quoted otherwise."""
    if _PLAIN_YAML.fullmatch(text) and text not in ("true", "false", "null", "yes", "no", "on", "off"):
        return text
    return json.dumps(text)


def _tlist(ts: list[Template]) -> str:
    return "[" + ", ".join(_q(t.text) for t in ts) + "]"


def to_yaml(spec: Spec, header: str = "") -> str:
    """The spec in the YAML syntax. `header` is written first (comment lines)."""
    lines = [header.rstrip("\n")] if header else []
    lines.append(f"spec: {_q(spec.name)}")
    if spec.doc:
        lines.append(f"doc: {_q(spec.doc)}")
    lines.append("model_types: [" + ", ".join(_q(m) for m in spec.model_types) + "]")
    if spec.base_prefix:
        lines.append(f"base_prefix: {spec.base_prefix}")
    lines.append("rules:" if spec.rules else "rules: []")
    for rule in spec.rules:
        if isinstance(rule, Rename):
            kind = "alias" if rule.one_way else "rename"
            lines.append(f"  - {kind}: {_q(rule.source.text)}")
            lines.append(f"    to: {_q(rule.target.text)}")
            if rule.unless:
                lines.append(f"    unless: {_tlist(rule.unless)}")
        elif isinstance(rule, Drop):
            lines.append(f"  - drop: {_q(rule.source.text)}")
        elif isinstance(rule, Include):
            lines.append(f"  - include: {rule.spec}")
            if rule.under:
                lines.append("    under: [" + ", ".join(u or '""' for u in rule.under) + "]")
            if rule.only != "all":
                lines.append(f"    only: {rule.only}")
        elif isinstance(rule, Convert):
            lines.append("  - convert:")
            for b in rule.inputs:
                lines.append(f"      {b.name}: {_q(b.template.text)}")
            if rule.lets:
                lines.append("    let:")
                for let in rule.lets:
                    lines.append(f"      {', '.join(let.names)}: {_q(expr_text(let.expr))}")
            if len(rule.outputs) == 1 and rule.outputs[0].chain is not None:
                out = rule.outputs[0]
                lines.append(f"    to: {_target_key(out.targets)}")
                lines.append("    ops: [" + ", ".join(expr_text(c) for c in out.chain) + "]")
            else:
                lines.append("    to:")
                for out in rule.outputs:
                    lines.append(f"      {_target_key(out.targets)}: {_q(expr_text(out.expr))}")
    return "\n".join(lines) + "\n"


def _target_key(targets: list[Template]) -> str:
    return _q(", ".join(t.text for t in targets))


def to_dsl(spec: Spec, header: str = "") -> str:
    """The spec in the .cspec syntax."""
    lines = [header.rstrip("\n")] if header else []
    lines.append(f"spec {spec.name}" + (f" {json.dumps(spec.doc)}" if spec.doc else ""))
    if spec.model_types:
        lines.append("model_types " + ", ".join(spec.model_types))
    if spec.base_prefix:
        lines.append(f"base_prefix {spec.base_prefix}")
    for rule in spec.rules:
        lines.append("")
        if isinstance(rule, Rename):
            kind = "alias" if rule.one_way else "rename"
            text = f"{kind} {rule.source.text} -> {rule.target.text}"
            if rule.unless:
                text += "\n  unless " + ", ".join(t.text for t in rule.unless)
            lines.append(text)
        elif isinstance(rule, Drop):
            lines.append(f"drop {rule.source.text}")
        elif isinstance(rule, Include):
            under = ", ".join(u or '""' for u in rule.under)
            only = f" only {rule.only}" if rule.only != "all" else ""
            lines.append(f"include {rule.spec}" + (f" under {under}" if rule.under else "") + only)
        elif isinstance(rule, Convert):
            pad = "convert "
            for i, b in enumerate(rule.inputs):
                sep = "," if i < len(rule.inputs) - 1 else ""
                lines.append(f"{pad}{b.name} = {b.template.text}{sep}")
                pad = " " * 8
            for let in rule.lets:
                lines.append(f"  let {', '.join(let.names)} = {expr_text(let.expr)}")
            for out in rule.outputs:
                targets = ", ".join(t.text for t in out.targets)
                if out.chain is not None:
                    lines.append(f"  -> {targets} ops [" + ", ".join(expr_text(c) for c in out.chain) + "]")
                else:
                    lines.append(f"  -> {targets} = {expr_text(out.expr)}")
    return "\n".join(lines) + "\n"
