"""Spec IR -> text: the YAML form and the DSL form, canonical layout. Parsing the result gives the
same IR back (tested for every built-in spec). Comments, when given, go back on the lines of the
parts they were attached to (see comments.py).

The layout is what people write by hand: YAML scalars plain where YAML reads them back unchanged;
lines kept within WIDTH by breaking expressions at argument boundaries (a folded `>-` block in YAML)
and filling long lists; in .cspec, a convert's input names, `->` targets and `= expr` lines aligned
at column 8, and consecutive one-line rules kept together without blank lines between them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal

import yaml

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
    Quantization,
    Ref,
    Rename,
    Spec,
    Str,
)

_PRECEDENCE = {"??": 1, "+": 2, "-": 2, "*": 3, "//": 3, "%": 3}
WIDTH = 100  # lines stay within this many columns where the content allows (templates never break)
STEP = {"yaml": 2, "cspec": 4}  # the hanging indent of a continuation line, each syntax its own
_COL = " " * 8  # .cspec: a convert's names, targets and broken `= expr` align under `convert `'s end
_ARROW = "     -> "  # .cspec: every `->` that starts a line, so what follows it stands at _COL


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


# ---- breaking long lines ---------------------------------------------------------------------

_Items = list[tuple[str, Expr]]  # (a `name=` prefix or "", the argument)


def _args(e: Expr) -> tuple[str, _Items, str] | None:
    """Where an expression may break: between the arguments of a call or the items of a list."""
    if isinstance(e, Call) and (e.args or e.kwargs):
        return e.op + "(", [("", a) for a in e.args] + [(f"{k.name}=", k.value) for k in e.kwargs], ")"
    if isinstance(e, ListExpr) and e.items:
        return "[", [("", i) for i in e.items], "]"
    return None


def _layout(e: Expr, col: int, indent: int, step: int, tail: int = 0) -> list[str]:
    """`e` written from column `col` of a line indented `indent`, `tail` characters following it: its
    first line's text, then whole continuation lines. It breaks only where it would pass WIDTH."""
    flat = expr_text(e)
    parts = _args(e)
    if parts is None or col + len(flat) + tail <= WIDTH:
        return [flat]
    return _layout_items(*parts, col, indent, step, tail)


def _layout_items(
    opener: str, items: _Items, closer: str, col: int, indent: int, step: int, tail: int
) -> list[str]:
    """Arguments filled line by line at a hanging indent (one `step` in from the line that opens
    them); one too long for any line breaks in turn, in place if it is the last, else on its own line
    (and what follows it starts a new line)."""
    inner = indent + step
    lines = [opener]
    broke = False  # the item before spans lines: the next starts a line of its own
    for k, (prefix, item) in enumerate(items):
        last = k == len(items) - 1
        end = closer if last else ","
        after = len(end) + (tail if last else 0)
        pos = col + len(lines[0]) if len(lines) == 1 else len(lines[-1])
        here = indent if len(lines) == 1 else len(lines[-1]) - len(lines[-1].lstrip(" "))
        sep = "" if k == 0 else " "
        text = prefix + expr_text(item)
        sub = _args(item)
        if not broke and pos + len(sep) + len(text) + after <= WIDTH:
            piece = [sep + text]
        elif sub is None or inner + len(text) + after <= WIDTH:
            lines.append(" " * inner)
            piece = [text]
        elif last and not broke and pos + len(sep) + len(prefix) + len(sub[0]) <= WIDTH:
            laid = _layout_items(*sub, pos + len(sep) + len(prefix), here, step, after)
            piece = [sep + prefix + laid[0], *laid[1:]]
        else:
            lines.append(" " * inner)
            laid = _layout_items(*sub, inner + len(prefix), inner, step, after)
            piece = [prefix + laid[0], *laid[1:]]
        lines[-1] += piece[0]
        lines += piece[1:]
        lines[-1] += end
        broke = len(piece) > 1
    return lines


def _fill(first: str, items: list[str], indent: int, close: str = "") -> str:
    """`first` then the items, comma-separated, as many to a line as fit; then `close`."""
    lines = [first]
    for k, item in enumerate(items):
        end = close if k == len(items) - 1 else ","
        starting = k == 0 or len(lines[-1]) == indent
        if not starting and len(lines[-1]) + 1 + len(item) + len(end) > WIDTH:
            lines.append(" " * indent)
            starting = True
        lines[-1] += ("" if starting else " ") + item + end
    if not items:
        lines[-1] += close
    return "\n".join(lines)


# ---- YAML scalars ----------------------------------------------------------------------------

_INDICATORS = frozenset("-?:,[]{}#&*!|>'\"%@`")
_KEYWORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"})
_RESOLVER = yaml.resolver.Resolver()


def _plain(text: str, flow: bool = False) -> bool:
    """Whether YAML reads `text` unquoted back as this same string (in a `[...]` list if `flow`).
    Numbers and keywords of YAML 1.1 and 1.2 stay quoted, so editors read them as strings too."""
    if not text or not text.isprintable() or text != text.strip() or text[0] in _INDICATORS:
        return False
    if ": " in text or " #" in text or text.endswith(":") or text.lower() in _KEYWORDS:
        return False
    if text[0] in "+." or text[0].isdigit() or (flow and any(c in ",[]{}:?" for c in text)):
        return False
    return _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)) == "tag:yaml.org,2002:str"


def _q(text: str) -> str:
    """A YAML scalar: plain when it is safe, double-quoted otherwise."""
    return text if _plain(text) else _yaml_quote(text)


def _yaml_quote(text: str) -> str:
    """A double-quoted YAML scalar that keeps printable non-ASCII text as it is (`café`, not `caf\\u00e9`)."""
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(c if c.isprintable() else _escape(c) for c in quoted)


def _escape(c: str) -> str:
    """A YAML escape for a character that cannot stand as it is in a double-quoted scalar."""
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def _flow_item(text: str) -> str:
    """An item of a YAML `[...]` list: plain unless YAML would split or misread it (`cat(dim=1, equal=true)`)."""
    return text if _plain(text, flow=True) else _yaml_quote(text)


def _flow_list(first: str, items: list[str], indent: int) -> str:
    """`first` then a `[...]` list of plain-or-quoted items, filled to WIDTH."""
    return _fill(first + "[", [_flow_item(t) for t in items], indent, "]")


def _foldable(text: str) -> bool:
    """Whether a folded block scalar (`>-`) reads back as `text` when its lines break at spaces:
    folding joins lines with one space, and a line that starts with a blank would keep its break."""
    return text.isprintable() and text == text.strip() and "  " not in text


@dataclass(frozen=True)
class _Line:
    """One line of output (or several, for a part that breaks) and the slots it writes; no text: a
    part this syntax gives no line; soft: a gap between rules kept only when comments follow it."""

    text: str | None
    slots: tuple[Slot, ...] = ()
    rule: int | None = None
    trail_first: bool = False  # the trailing comment goes on its first line (a `>-` header)
    soft: bool = False


def to_yaml(spec: Spec, header: str = "", comments: Comments | None = None) -> str:
    """The spec in the YAML syntax. `header` is written first (comment lines), then `comments`' own."""
    doc, folded = _yaml_doc(spec.doc)
    top = [
        _Line(f"spec: {_q(spec.name)}", (("spec",),)),
        _Line(doc if spec.doc else None, (("doc",),), trail_first=folded),
        _Line(_flow_list("model_types: ", spec.model_types, 2), (("model_types",),)),
        _Line(f"base_prefix: {spec.base_prefix}" if spec.base_prefix else None, (("base_prefix",),)),
        *_yaml_quantization(spec.quantization),
        _Line("rules:" if spec.rules else "rules: []", (("rules",),)),
    ]
    lines = top + [line for i, rule in enumerate(spec.rules) for line in _yaml_rule(i, rule)]
    return _render(lines, header, comments, footer_gap=False)


def _yaml_quantization(q: Quantization | None) -> list[_Line]:
    """`quantization:` with its scheme, block (a `[...]` list when it is one of numbers) and companions."""
    if q is None:
        return [_Line(None, (("quantization",),))]
    block, folded = None, False
    if q.block is not None:
        numbers = isinstance(q.block, ListExpr) and all(isinstance(i, Num) for i in q.block.items)
        block = "  block: " + (expr_text(q.block) if numbers else _q(expr_text(q.block)))
        if len(block) > WIDTH and not numbers and expr_text(q.block).isprintable():
            laid = _layout(q.block, 4, 4, STEP["yaml"])  # folded like a long `to:` expression
            block, folded = "\n".join(["  block: >-", "    " + laid[0], *laid[1:]]), True
    lines = [
        _Line("quantization:", (("quantization",),)),
        _Line(f"  scheme: {q.scheme}", (("quantization", "scheme"),)),
        _Line(block, (("quantization", "block"),), trail_first=folded),
        _Line("  companions:" if q.companions else None, (("quantization", "companions"),)),
    ]
    for j, c in enumerate(q.companions):
        value = _q(c.companions[0]) if len(c.companions) == 1 else _flow_list("", c.companions, 6)
        lines.append(_Line(f"    {_q(c.weight)}: {value}", (("companion", j),)))
    return lines


def _dsl_quantization(q: Quantization | None) -> list[_Line]:
    """`quantization SCHEME [block EXPR]`, then one `companion WEIGHT -> COMPANION, ...` per weight."""
    if q is None:
        return [_Line(None, (("quantization",),))]
    head = f"quantization {q.scheme}"
    if q.block is not None:
        head += " block "
        head += "\n".join(_layout(q.block, len(head), 0, STEP["cspec"]))
    slots = (("quantization",), ("quantization", "scheme"), ("quantization", "block"))
    lines = [_Line(head, slots), _Line(None, (("quantization", "companions"),))]
    for j, c in enumerate(q.companions):
        text = _fill(f"companion {c.weight} -> ", c.companions, 4)
        lines.append(_Line(text, (("companion", j),)))
    return lines


def _yaml_doc(doc: str) -> tuple[str, bool]:
    """`doc: TEXT` on one line, or folded at spaces when that line would pass WIDTH; whether folded."""
    line = f"doc: {_q(doc)}"
    if len(line) <= WIDTH or not _foldable(doc):
        return line, False
    return "doc: >-\n" + _fill_words(doc.split(" "), 2), True


def _fill_words(words: list[str], indent: int) -> str:
    """Words joined by spaces, as many to a line as fit, each line indented (a folded block's body)."""
    lines = [" " * indent + words[0]]
    for w in words[1:]:
        if len(lines[-1]) + 1 + len(w) > WIDTH:
            lines.append(" " * indent + w)
        else:
            lines[-1] += " " + w
    return "\n".join(lines)


def _yaml_entry(key: str, e: Expr) -> tuple[str, bool]:
    """`KEY: EXPR` of a `let:` or `to:` mapping; a folded block, broken at argument boundaries, when
    the line would pass WIDTH (the front end maps positions inside it back to the file). Whether folded."""
    flat = expr_text(e)
    line = f"      {_q(key)}: {_q(flat)}"
    if len(line) <= WIDTH or not flat.isprintable():
        return line, False
    laid = _layout(e, 8, 8, STEP["yaml"])
    return "\n".join([f"      {_q(key)}: >-", "        " + laid[0], *laid[1:]]), True


def _yaml_rule(i: int, rule) -> list[_Line]:
    def line(text: str | None, *slots: Slot, trail_first: bool = False) -> _Line:
        return _Line(text, tuple((i, *s) for s in slots), i, trail_first)

    if isinstance(rule, Rename):
        kind = "alias" if rule.one_way else "rename"
        unless = _flow_list("    unless: ", [t.text for t in rule.unless], 6)
        return [
            line(f"  - {kind}: {_q(rule.source.text)}", ("head",)),
            line(f"    to: {_q(rule.target.text)}", ("to",)),
            line(unless if rule.unless else None, ("unless",)),
        ]
    if isinstance(rule, Drop):
        return [line(f"  - drop: {_q(rule.source.text)}", ("head",))]
    if isinstance(rule, Include):
        under = _fill("    under: [", [u or '""' for u in rule.under], 6, "]")
        return [
            line(f"  - include: {_q(rule.spec)}", ("head",)),
            line(under if rule.under else None, ("under",)),
            line(f"    only: {rule.only}" if rule.only != "all" else None, ("only",)),
        ]
    assert isinstance(rule, Convert)
    out = [line("  - convert:", ("head",))]
    out += [line(f"      {_q(b.name)}: {_q(b.template.text)}", ("in", j)) for j, b in enumerate(rule.inputs)]
    out.append(line("    let:" if rule.lets else None, ("let",)))
    for j, let in enumerate(rule.lets):
        text, folded = _yaml_entry(", ".join(let.names), let.expr)
        out.append(line(text, ("let", j), trail_first=folded))
    chains = [o for o in rule.outputs if o.chain is not None]
    if chains and len(rule.outputs) > 1:
        raise SpecValidationError(
            "a convert with an `ops [...]` output and other outputs has no YAML form",
            span=chains[0].span or rule.span,
            hint="YAML writes either one `to:` key with `ops: [...]`, or a `to:` mapping of expressions",
        )
    if chains:
        o = chains[0]
        targets = [t.text for t in o.targets]
        to = f"    to: {_q(targets[0])}" if len(targets) == 1 else _flow_list("    to: ", targets, 6)
        out.append(line(to, ("to",), ("out", 0)))
        out.append(line(_flow_list("    ops: ", [expr_text(c) for c in o.chain], 6), ("ops",)))
        return out
    out.append(line("    to:", ("to",)))
    for j, o in enumerate(rule.outputs):
        text, folded = _yaml_entry(", ".join(t.text for t in o.targets), o.expr)
        out.append(line(text, ("out", j), trail_first=folded))
    return out


def to_dsl(spec: Spec, header: str = "", comments: Comments | None = None) -> str:
    """The spec in the .cspec syntax."""
    if "\n" in spec.doc:
        raise SpecValidationError(
            "the doc has a line break, which a .cspec string cannot hold",
            span=spec.span,
            hint="make the doc one line",
        )
    head = f"spec {spec.name}" + (f" {_dsl_string(spec.doc)}" if spec.doc else "")
    apart = len(head) > WIDTH  # a long doc gets a `doc "..."` line of its own
    lines = [
        _Line(f"spec {spec.name}" if apart else head, (("spec",),) if apart else (("spec",), ("doc",))),
        _Line(f"doc {_dsl_string(spec.doc)}" if apart else None, (("doc",),) if apart else ()),
        _Line(_fill("model_types ", spec.model_types, 4) if spec.model_types else None, (("model_types",),)),
        _Line(f"base_prefix {spec.base_prefix}" if spec.base_prefix else None, (("base_prefix",),)),
        *_dsl_quantization(spec.quantization),
        _Line(None, (("rules",),)),
    ]
    previous_long = True  # the header: a blank line always follows it
    for i, rule in enumerate(spec.rules):
        rule_lines = _dsl_rule(i, rule)
        long = sum(ln.text.count("\n") + 1 for ln in rule_lines if ln.text) > 1
        # one-line rules stand together; a rule of several lines, or one with comments above, stands apart
        lines.append(_Line("", (), i, soft=not (long or previous_long)))
        lines += rule_lines
        previous_long = long
    return _render(lines, header, comments, footer_gap=True)


def _dsl_rule(i: int, rule) -> list[_Line]:
    def line(text: str | None, *slots: Slot) -> _Line:
        return _Line(text, tuple((i, *s) for s in slots), i)

    if isinstance(rule, Rename):
        kind = "alias" if rule.one_way else "rename"
        head = f"{kind} {rule.source.text} -> {rule.target.text}"
        if len(head) > WIDTH:
            head = f"{kind} {rule.source.text}\n{_ARROW}{rule.target.text}"
        return [
            line(head, ("head",), ("to",)),
            line(_fill("  unless ", [t.text for t in rule.unless], 6) if rule.unless else None, ("unless",)),
        ]
    if isinstance(rule, Drop):
        return [line(f"drop {rule.source.text}", ("head",))]
    if isinstance(rule, Include):
        text = f"include {rule.spec}"
        if rule.under:
            text = _fill(f"{text} under ", [u or '""' for u in rule.under], 4)
        text += f" only {rule.only}" if rule.only != "all" else ""
        return [line(text, ("head",), ("under",), ("only",))]
    assert isinstance(rule, Convert)
    out = []
    width = max(len(b.name) for b in rule.inputs)
    for j, b in enumerate(rule.inputs):
        sep = "," if j < len(rule.inputs) - 1 else ""
        slots = (("head",), ("in", 0)) if j == 0 else (("in", j),)
        lead = "convert " if j == 0 else _COL
        out.append(line(f"{lead}{b.name:<{width}} = {b.template.text}{sep}", *slots))
    out.append(line(None, ("let",)))
    out += [
        line(_dsl_binding(f"    let {', '.join(let.names)}", let.expr), ("let", j))
        for j, let in enumerate(rule.lets)
    ]
    out.append(line(None, ("to",)))
    for j, o in enumerate(rule.outputs):
        targets = [t.text for t in o.targets]
        if o.chain is None:
            out.append(line(_dsl_binding(_ARROW + ", ".join(targets), o.expr, targets), ("out", j)))
            continue
        chain = [("", c) for c in o.chain]
        flat = f"{_ARROW}{', '.join(targets)} ops [{', '.join(expr_text(c) for c in o.chain)}]"
        if len(flat) > WIDTH:
            laid = _layout_items("[", chain, "]", len(_COL) + 4, len(_COL), STEP["cspec"], 0)
            flat = "\n".join([_fill(_ARROW, targets, len(_COL)), f"{_COL}ops {laid[0]}", *laid[1:]])
        out.append(line(flat, ("out", j), ("ops",)))
    return out


def _dsl_binding(head: str, e: Expr, targets: list[str] | None = None) -> str:
    """`HEAD = EXPR` on one line, or, when that would pass WIDTH, `= EXPR` on the next line under the
    names, the expression broken at argument boundaries (long targets fill their own lines first)."""
    flat = f"{head} = {expr_text(e)}"
    if len(flat) <= WIDTH:
        return flat
    if targets is not None:
        head = _fill(_ARROW, targets, len(_COL))
    laid = _layout(e, len(_COL) + 2, len(_COL), STEP["cspec"])
    return "\n".join([head, f"{_COL}= {laid[0]}", *laid[1:]])


def _render(lines: list[_Line], header: str, comments: Comments | None, footer_gap: bool) -> str:
    """The lines with each slot's comments above it and its trailing one at its end; comments of a part
    this syntax has no line for go to the next line of its rule (or the rule's top at its end)."""
    c = comments or Comments()
    out: list[str | None] = [header.rstrip("\n")] if header else []
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
            out.append(None if ln.soft else "")
            continue
        trailing = [a.trailing for a in attached if a.trailing is not None]
        above = pending + [t for a in attached for t in a.above] + trailing[1:]
        pending = []
        indent = ln.text[: len(ln.text) - len(ln.text.lstrip(" "))]
        if rule_top is None and rule is not None:
            rule_top = (len(out), indent)
        out += [indent + t for t in above]
        out.append(_with_trailing(ln, trailing[0]) if trailing else ln.text)
    if pending and rule_top is not None:
        out[rule_top[0] : rule_top[0]] = [rule_top[1] + p for p in pending]
    elif pending:
        out += pending
    if c.footer:
        out += ([""] if footer_gap else []) + c.footer
    # a soft gap stays blank only before comments: they start a new paragraph of rules
    kept = [t if t is not None else "" for k, t in enumerate(out) if t is not None or _comment_next(out, k)]
    return "\n".join(kept) + "\n"


def _with_trailing(ln: _Line, comment: str) -> str:
    """A part's text with its trailing comment: at the end, or on the header line of a `>-` block
    (after it, the comment would be part of the block's text)."""
    assert ln.text is not None
    if not ln.trail_first:
        return f"{ln.text}  {comment}"
    first, _, rest = ln.text.partition("\n")
    return f"{first}  {comment}\n{rest}"


def _comment_next(out: list[str | None], k: int) -> bool:
    """Whether a comment line follows entry k: a soft gap before it marks a new paragraph."""
    nxt = out[k + 1] if k + 1 < len(out) else None
    return nxt is not None and nxt.lstrip(" ").startswith("#")
