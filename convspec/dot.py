"""Plans as DOT for graphviz: each rule drawn once, whatever the number of layers, so a 60-layer MoE
reads like a 2-layer one; a bound plan adds group counts and one concrete group with real shapes."""

from __future__ import annotations

import difflib
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from .compile.plan import Node, Plan, PlanRule, _show
from .errors import ConvspecError, Span
from .keyshapes import compact_keys
from .ops import OPS, TensorInfo
from .ops.base import REQUIRED

if TYPE_CHECKING:
    from .bind import BoundPlan, Group

FONT = "Helvetica"
MONO = "Courier"
MAX_LINES = 8  # compacted key lines drawn per node; the rest are counted

# colours: patterns white, ops amber, outputs green, the concrete group blue, drops red
C_CLUSTER, C_CLUSTER_LINE = "#f6f8fb", "#9aaecb"
C_OP, C_OP_LINE = "#fff3d1", "#c99a2e"
C_OUT, C_OUT_LINE = "#e3f3e6", "#5b9a68"
C_GROUP, C_GROUP_LINE = "#eef5ff", "#3b73c4"
C_DROP = "#fbe3e1"
C_HEAD = "#e4e9f2"
C_DIM = "#6b7280"
C_COUNT = "#1d5fb8"


# ---- escaping --------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _visible(s: str) -> str:
    """Control characters and lone surrogates as visible escapes (`\\n`, `\\udc80`): a label never
    breaks a line, and the text always encodes as UTF-8."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], s)


def _q(s: str) -> str:
    """A DOT quoted string whose label shows `s` literally (backslashes and quotes escaped)."""
    return '"' + _visible(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _h(s: Any) -> str:
    """Text for an HTML-like label: &, <, >, quotes escaped, control characters made visible."""
    return (
        _visible(str(s))
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
    )


def _mono(s: str, size: int | None = None) -> str:
    size_attr = f' point-size="{size}"' if size else ""
    return f'<font face="{MONO}"{size_attr}>{_h(s)}</font>'


def _small(html: str, color: str = C_DIM, size: int = 9) -> str:
    return f'<font point-size="{size}" color="{color}">{html}</font>'


# ---- shapes, keys and params as text ----------------------------------------------------------


def _shape(info: TensorInfo) -> str:
    return "[" + ", ".join(map(str, info.shape)) + "]"


def _sizes(infos: list[TensorInfo]) -> str:
    """`64 x [1408, 2048] bfloat16`: a count with the one shape and dtype, or how many differ."""
    kinds = Counter((i.shape, i.dtype) for i in infos)
    if len(kinds) == 1:
        shape, dtype = next(iter(kinds))
        one = f"{_shape(TensorInfo(shape, dtype))} {dtype}"
        return one if len(infos) == 1 else f"{len(infos)} \u00d7 {one}"
    return f"{len(infos)} keys, {len(kinds)} shapes"


def _params(plan: Plan, node: Node) -> tuple[list[str], list[str]]:
    """A node's parameters as `name=value`, defaults left out (dims always shown), and apart the
    config expressions, with their value when the plan's config gives one."""
    from .compile.evaluate import evaluate
    from .compile.expr import ConfigExpr

    op = OPS.get(node.op)
    defaults = {p.name: p.default for p in op.params} if op is not None else {}
    out, exprs = [], []
    for k, v in node.params:
        if v is None:
            continue
        if isinstance(v, ConfigExpr):
            text = v.text
            try:
                value = evaluate(v.ir, plan.config, node.where)
            except ConvspecError:  # no config, or one without the field: show the expression
                exprs.append(f"{k} = {text}")
            else:
                exprs.append(f"{k}={_show(value)} = {text}")
            continue
        d = defaults.get(k, REQUIRED)
        if d is not REQUIRED and type(d) is type(v) and d == v and not k.startswith("dim"):
            continue
        out.append(f"{k}={_show(v)}")
    return out, exprs


def _value_label(rule: PlanRule, name: str) -> str:
    """`gate[e]`: a value's name and the captures it is a collection over."""
    free = rule.free_of.get(name, ())
    return name + (f"[{','.join(free)}]" if free else "")


# ---- DOT building blocks ---------------------------------------------------------------------


class _Dot:
    """Lines of DOT with indentation; every label goes through _q or _h."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 1
        self.column: list[str] = []  # a cluster's inputs, top to bottom
        self.right: list[str] = []  # its outputs, top to bottom

    def add(self, line: str) -> None:
        self.lines.append("  " * self.depth + line)

    def node(self, nid: str, html: str, **attrs: str) -> None:
        extra = "".join(f", {k}={v}" for k, v in attrs.items())
        self.add(f"{nid} [label=<{html}>{extra}];")

    def edge(self, a: str, b: str, label: str | None = None, **attrs: str) -> None:
        bits = [f"label={_q(label)}"] if label else []
        bits += [f"{k}={v}" for k, v in attrs.items()]
        self.add(f"{a} -> {b}" + (f" [{', '.join(bits)}]" if bits else "") + ";")

    def open(self, cid: str, html_label: str, fill: str, line: str, style: str = "rounded,filled") -> None:
        self.add(f"subgraph cluster_{cid} {{")
        self.depth += 1
        self.add(f'label=<{html_label}>; labeljust="l"; style="{style}";')
        self.add(f'fillcolor="{fill}"; color="{line}"; penwidth=1.2; margin=10;')

    def close(self) -> None:
        """End a cluster, its inputs and its outputs each pinned in a column in spec order (a flat
        chain: under rankdir=LR dot stacks a rank's order bottom-up, so the chain runs reversed)."""
        for column in (self.column, self.right):
            if len(column) > 1:
                self.add("{rank=same; " + "; ".join(column) + ";}")
                self.add(" -> ".join(reversed(column)) + " [style=invis];")
        self.column, self.right = [], []
        self.depth -= 1
        self.add("}")


def _pattern_node(d: _Dot, nid: str, text: str, fill: str = "white", line: str = "#8a96a8") -> None:
    d.node(nid, _mono(text), shape="box", style='"rounded,filled"', fillcolor=f'"{fill}"', color=f'"{line}"')


def _op_html(plan: Plan, node: Node, shapes: list[str] | None = None) -> str:
    params, exprs = _params(plan, node)
    html = f"<b>{_h(node.op)}</b>"
    if params:
        html += "<br/>" + _small(_h(", ".join(params)), "#4b5563")
    for e in exprs:
        html += "<br/>" + _small(_mono(e, 8), "#4b5563")
    for s in shapes or ():
        html += "<br/>" + _small(_mono(s, 9), "#7a4b00")
    return html


def _header(plan: Plan, bound: BoundPlan | None) -> str:
    title = _h(plan.name + (" (inverse)" if plan.is_inverse else ""))
    lines = [f'<font point-size="14"><b>{title}</b></font>']
    if plan.doc:
        lines.append(_small(_h(plan.doc), "#374151", 10))
    if bound is not None:
        c = bound.coverage()
        lines.append(
            _small(
                _h(
                    f"bound to a checkpoint of {c['keys']:,} keys: {c['converted']:,} converted in "
                    f"{len(bound.groups):,} groups, {c['renamed']:,} renamed, {c['dropped']:,} dropped, "
                    f"{c['unmatched']:,} passed through"
                ),
                C_COUNT,
                10,
            )
        )
    return _left(lines)


def _left(lines: list[str]) -> str:
    """Label lines flush left. Each line is one text run: svg places runs by graphviz's font metrics,
    and a viewer's substitute font (wider than Helvetica) would make runs on one line overlap."""
    return '<br align="left"/>'.join(lines) + '<br align="left"/>'


# ---- rules -----------------------------------------------------------------------------------


def _rule_head(rule: PlanRule) -> list[str]:
    """A convert's label: `rule 2 · convert`, then where it is written and what makes a group."""
    where = str(rule.where) + (
        "  \u00b7  one group per " + ", ".join(f"{{{k}}}" for k in rule.keep) if rule.keep else ""
    )
    return [f"<b>rule {rule.number} \u00b7 {_h(rule.kind)}</b>", _small(_h(where))]


def _split_where(where: Span) -> tuple[str, str]:
    """`specs/x.yaml:6:5` -> ("specs/x.yaml", "6:5"); a place known only by name stays whole."""
    if where.line:
        return where.file or "<spec>", f"{where.line}:{where.col}"
    return "", str(where)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _table(d: _Dot, run: list[PlanRule]) -> None:
    """A run of consecutive renames, aliases and drops as one table node, a row each, in spec order:
    dozens of renames take one compact node, not a cluster each."""
    first, last = run[0].number, run[-1].number
    kinds = Counter("alias" if r.one_way else r.kind for r in run)
    what = ", ".join(_plural(n, k) for k, n in kinds.items())
    files = {_split_where(r.where)[0] for r in run}
    common = files.pop() if len(files) == 1 else ""
    span = f"rule {first}" if first == last else f"rules {first}-{last}"
    rows = [
        f'<tr><td colspan="4" bgcolor="{C_HEAD}" align="left" balign="left"><b>{span} \u00b7 {_h(what)}</b>'
        + (f"<br/>{_small(_h(common))}" if common else "")
        + "</td></tr>",
        "<tr>"
        + "".join(
            f'<td align="left">{_small(f"<b>{h}</b>", "#374151")}</td>' for h in ("rule", "from", "to", "at")
        )
        + "</tr>",
    ]
    for r in run:
        src = _mono(r.inputs[0][1].text)
        if r.unless:
            src += "<br/>" + _small(_mono("unless " + ", ".join(u.text for u in r.unless), 9))
        kind = "alias" if r.one_way else r.kind
        num = f"{r.number}" + (f"<br/>{_small(kind)}" if kind != "rename" else "")
        if r.kind == "drop":
            dst, bg = '<font color="#b42318"><b>dropped</b></font>', f' bgcolor="{C_DROP}"'
        else:
            dst, bg = _mono(r.outputs[0][1].display()), ""
            if r.one_way:
                dst += "<br/>" + _small("on load only")
        at = _split_where(r.where)[1] if common else str(r.where)
        rows.append(
            f'<tr><td align="right"{bg}>{num}</td><td align="left" balign="left"{bg}>{src}</td>'
            f'<td align="left" balign="left"{bg}>{dst}</td><td align="left"{bg}>{_small(_h(at))}</td></tr>'
        )
    table = (
        f'<table border="1" cellborder="1" cellspacing="0" cellpadding="4" color="{C_CLUSTER_LINE}" '
        f'bgcolor="white">' + "".join(rows) + "</table>"
    )
    d.node(f"t{run[0].index}", table, shape="plain")


def _convert(d: _Dot, plan: Plan, rule: PlanRule, count: int | None, drawn: Group | None) -> None:
    """One convert as a cluster: input patterns -> ops (with parameters) -> output patterns."""
    r = f"r{rule.index}"
    head = _rule_head(rule)
    fill, line = C_CLUSTER, C_CLUSTER_LINE
    if count:
        text = f"\u00d7 {count:,} group{'s' if count != 1 else ''} in this checkpoint"
        text += f" ({drawn.name} drawn below)" if drawn is not None else ""
        head.insert(1, f'<font color="{C_COUNT}"><b>{_h(text)}</b></font>')
    elif count == 0:
        head.insert(1, _small("no groups in this checkpoint", "#9ca3af", 10))
        fill, line = "#fafafa", "#d1d5db"
    d.open(r, _left(head), fill, line)
    producer = {}
    for k, (name, pat) in enumerate(rule.inputs):
        _pattern_node(d, f"{r}_in{k}", pat.text)
        d.column.append(f"{r}_in{k}")
        producer[name] = (f"{r}_in{k}", False)
    _dag(d, plan, rule, r, producer)
    for j, (v, pat) in enumerate(rule.outputs):
        _pattern_node(d, f"{r}_out{j}", pat.display(), C_OUT, C_OUT_LINE)
        d.right.append(f"{r}_out{j}")
        src, multi = producer[v]
        d.edge(src, f"{r}_out{j}", _edge_label(rule, v, multi))
    d.close()


def _edge_label(rule: PlanRule, value: str, multi: bool) -> str | None:
    """Name an edge where it helps: a named value (`gate[e]`), or which output of a multi-output op."""
    return _value_label(rule, value) if multi or not value.startswith("%") else None


def _dag(
    d: _Dot,
    plan: Plan,
    rule: PlanRule,
    prefix: str,
    producer: dict[str, tuple[str, bool]],
    shapes: dict[str, list[str]] | None = None,
) -> None:
    """The op nodes of a rule and the edges into them; `producer` maps each value to its node."""
    for i, node in enumerate(rule.nodes):
        nid = f"{prefix}_op{i}"
        lines = None
        if shapes is not None:
            many = len(node.outputs) > 1
            lines = [(f"{o}: " if many else "") + s for o in node.outputs for s in shapes.get(o, [])]
        d.node(
            nid,
            _op_html(plan, node, lines),
            shape="box",
            style='"rounded,filled"',
            fillcolor=f'"{C_OP}"',
            color=f'"{C_OP_LINE}"',
        )
        for a in node.inputs:
            src, multi = producer[a]
            d.edge(src, nid, _edge_label(rule, a, multi))
        for o in node.outputs:
            producer[o] = (nid, len(node.outputs) > 1)


# ---- the concrete group ----------------------------------------------------------------------


def _keys_html(keys: list[str], infos: dict[str, TensorInfo]) -> str:
    """Keys compacted to templates, each with its count, shape and dtype; at most MAX_LINES lines."""
    folded = compact_keys(keys)
    rows = []
    for text, ks in folded[:MAX_LINES]:
        rows.append(_mono(text) + "<br/>" + _small(_h(_sizes([infos[k] for k in ks])), "#4b5563"))
    if len(folded) > MAX_LINES:
        rest = sum(len(ks) for _, ks in folded[MAX_LINES:])
        rows.append(_small(_h(f"... and {rest:,} more keys in {len(folded) - MAX_LINES:,} more lines")))
    return "<br/>".join(rows)


def _value_shapes(value: dict) -> list[str]:
    """A value of the DAG (index -> TensorInfo) as shape text: one tensor, or a count of them."""
    infos = [v for v in value.values() if isinstance(v, TensorInfo)]
    return [_sizes(infos)] if infos else []


def _group(d: _Dot, bound: BoundPlan, g: Group, count: int) -> None:
    """One group drawn in full: its real member keys, each op's inferred shape, its output keys."""
    from .interpret import index_order, infer_group

    plan, rule, infos = bound.plan, g.rule, bound.layout
    env = infer_group(plan, rule, g.members, infos)
    shapes = {name: _value_shapes(v) for name, v in env.items()}
    of = f"rule {rule.number}" + ("" if count == 1 else f", one of {count:,}")
    label = [f"<b>group {_h(g.name)} \u00b7 {of}</b>", _small("its real keys and inferred shapes", C_COUNT)]
    d.open("group", _left(label), C_GROUP, C_GROUP_LINE, "rounded,filled,bold")
    producer = {}
    for k, (name, _) in enumerate(rule.inputs):
        members = g.members.get(name, {})
        keys = [members[i] for i in sorted(members, key=index_order)]
        d.node(
            f"g_in{k}",
            _keys_html(keys, infos),
            shape="box",
            style='"rounded,filled"',
            fillcolor='"white"',
            color=f'"{C_GROUP_LINE}"',
        )
        producer[name] = (f"g_in{k}", False)
        d.column.append(f"g_in{k}")
    _dag(d, plan, rule, "g", producer, shapes)
    by_value: dict[str, list[str]] = {}
    for target, (value, _) in g.out_values.items():
        by_value.setdefault(value, []).append(target)
    for j, (v, _) in enumerate(rule.outputs):
        targets = by_value.get(v, [])
        d.node(
            f"g_out{j}",
            _keys_html(targets, g.outputs),
            shape="box",
            style='"rounded,filled"',
            fillcolor=f'"{C_OUT}"',
            color=f'"{C_OUT_LINE}"',
        )
        d.right.append(f"g_out{j}")
        src, multi = producer[v]
        d.edge(src, f"g_out{j}", _edge_label(rule, v, multi))
    d.close()


def _sorted_groups(bound: BoundPlan) -> list[Group]:
    from .interpret import index_order

    return sorted(bound.groups, key=lambda g: (g.rule.index, index_order(tuple(g.keep.values()))))


def find_group(bound: BoundPlan, name: str | None) -> Group | None:
    """The group `name` names (`p=model.layers.3`, or `RULE:NAME` for another rule's group of that
    name), the first group of the first convert for None; an unknown name is an error with a hint."""
    groups = _sorted_groups(bound)
    if name is None:
        return groups[0] if groups else None
    for g in groups:
        if name in (g.name, f"{g.rule.number}:{g.name}"):
            return g
    names = list(dict.fromkeys(g.name for g in groups))
    if not names:
        raise ConvspecError(f"no group {name!r}: no convert rule has a group in this checkpoint")
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    shown = close or names[:5]
    raise ConvspecError(
        f"no group {name!r} in this checkpoint ({len(names):,} group names)",
        hint=("did you mean " if close else "groups are named like ")
        + ", ".join(shown)
        + (" (prefix RULE: to pick a rule, e.g. 2:NAME)" if len(groups) > len(names) else ""),
    )


# ---- the public API --------------------------------------------------------------------------


def _draw(plan: Plan, bound: BoundPlan | None, group: Group | None) -> str:
    counts = Counter(g.rule.index for g in bound.groups) if bound is not None else None
    blocks: list[_Dot] = []  # one per table, convert and group, in spec order
    run: list[PlanRule] = []
    for rule in [*plan.rules, None]:
        if rule is not None and rule.kind != "convert":
            run.append(rule)
            continue
        if run:
            blocks.append(_Dot())
            _table(blocks[-1], run)
            run = []
        if rule is None:
            break
        chosen = group if group is not None and group.rule.index == rule.index else None
        blocks.append(_Dot())
        _convert(blocks[-1], plan, rule, None if counts is None else counts[rule.index], chosen)
        if chosen is not None and bound is not None:
            blocks.append(_Dot())
            _group(blocks[-1], bound, chosen, counts[rule.index])
    lines = [
        "digraph plan {",
        '  rankdir=LR; newrank=true; labelloc="t"; labeljust="l"; nodesep=0.25; ranksep=0.45;',
        f'  fontname="{FONT}"; fontsize=11; bgcolor="white"; pad=0.3;',
        f'  node [fontname="{FONT}", fontsize=10, margin="0.12,0.06"];',
        f'  edge [fontname="{FONT}", fontsize=9, fontcolor="{C_DIM}", color="{C_DIM}", arrowsize=0.7];',
        f"  label=<{_header(plan, bound)}>;",
        "  // dot stacks separate components bottom-up under rankdir=LR: the last rule comes first here",
    ]
    for block in reversed(blocks):
        lines.extend(block.lines)
    lines.append("}")
    return "\n".join(lines) + "\n"


def plan_dot(plan: Plan) -> str:
    """The plan's rules top to bottom, each drawn once: renames as tables, converts as op DAGs."""
    return _draw(plan, None, None)


def bound_dot(bound: BoundPlan, group: str | None = None) -> str:
    """The plan's rules with each convert's group count in this checkpoint, plus one group (`group`,
    or the first) drawn in full with its real keys and inferred shapes: the same size for 2 or 60 layers."""
    return _draw(bound.plan, bound, find_group(bound, group))
