"""Plans and bound plans as text for people, JSON for tools, and DOT for graphviz. Returns strings."""

from __future__ import annotations

import json
from collections import defaultdict

from .bind import BoundPlan
from .compile.plan import Plan, PlanRule
from .dot import plan_dot  # noqa: F401  (re-exported: render is where callers look)
from .ops import TensorInfo
from .style import PLAIN, Style, table


def _rule_lines(rule: PlanRule, s: Style = PLAIN) -> list[str]:
    kind = "alias" if rule.one_way else rule.kind
    head = s.bold(f"rule {rule.number}") + f"  {s(f'{kind:<8}', 'magenta')} {s.dim(rule.where)}"
    if rule.kind == "rename":
        lines = [head, f"    {rule.inputs[0][1].text}", f"    -> {rule.outputs[0][1].display()}"]
        lines += [f"    unless {u.text}" for u in rule.unless]
        return lines
    if rule.kind == "drop":
        return [head, f"    {rule.inputs[0][1].text}"]
    width = max(len(n) for n, _ in rule.inputs)
    lines = [head]
    lines += [f"    in   {n:<{width}} = {p.text}" for n, p in rule.inputs]
    lines += [f"    op   {node}" for node in rule.nodes]
    lines += [f"    out  {p.display()} = {v}" for v, p in rule.outputs]
    if rule.keep:
        lines.append(f"    group by {', '.join('{' + c + '}' for c in rule.keep)}")
    return lines


def plan_text(plan: Plan, s: Style = PLAIN) -> str:
    """The plan for a person: each rule with its patterns and ops, the inverse, the combined regex."""
    name = s.bold(f"plan {plan.name}")
    lines = [f"{name}: {plan.doc}" if plan.doc else name]
    if plan.model_types:
        lines.append(f"model types: {', '.join(plan.model_types)}")
    lines.append(f"rules: {len(plan.rules)}")
    lines.append("")
    for rule in plan.rules:
        lines += _rule_lines(rule, s)
        lines.append("")
    if plan.inverse_error:
        lines.append(f"inverse: {s.warning('not available')}: {plan.inverse_error}")
    elif plan.lossy:
        lines.append(f"inverse: {s.warning('lossy')}: " + "; ".join(plan.lossy))
    else:
        lines.append(f"inverse: {s.ok('exact')}")
    lines.append("")
    lines.append("combined regex:")
    lines.append(f"    {plan.regex}")
    return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def bound_text(bound: BoundPlan, s: Style = PLAIN) -> str:
    """The bound plan: every group with its keys, shapes, dtypes and bytes, then the coverage."""
    lines = [plan_text(bound.plan, s), "", s.bold("groups:")]
    by_rule: dict[int, list] = defaultdict(list)
    layout: dict = bound.layout
    shown: dict[TensorInfo, tuple[str, str, str]] = {}

    def cells(i: TensorInfo) -> tuple[str, str, str]:  # each distinct (shape, dtype) made text once
        got = shown.get(i)
        if got is None:
            got = shown[i] = (str(list(i.shape)), i.dtype, _fmt_bytes(i.nbytes))
        return got

    for g in bound.groups:
        by_rule[g.rule.index].append(g)
    for ri, groups in sorted(by_rule.items()):
        lines.append(f"  rule {ri + 1} ({groups[0].rule.where}): {len(groups)} group(s)")
        for g in groups:
            lines.append(f"    group {g.name}")
            rows = [("in", k, *cells(layout[k])) for k in g.source_keys]
            rows += [("out", k, *cells(i)) for k, i in g.outputs.items()]
            lines += table(rows, "      ")
    renamed = [(s, d) for s, d in bound.passthrough.items() if s != d]
    if renamed:
        lines.append(f"  renamed: {len(renamed)} key(s)")
        lines += table(
            [(s, "->", d, str(list(bound.layout[s].shape)), bound.layout[s].dtype) for s, d in renamed],
            "    ",
        )
    cov = bound.coverage()
    lines += [
        "",
        s.bold("coverage:"),
        f"    keys       {cov['keys']}",
        f"    converted  {cov['converted']}",
        f"    renamed    {cov['renamed']}",
        f"    dropped    {cov['dropped']}",
        f"    unmatched  {cov['unmatched']}  (passed through unchanged)",
        f"    claimed    {cov['claimed_share']:.1%}",
    ]
    for k in bound.unmatched[:50]:
        lines.append(f"      {k}")
    if len(bound.unmatched) > 50:
        lines.append(f"      ... and {len(bound.unmatched) - 50} more")
    if bound.warnings:
        lines.append(f"warnings: {len(bound.warnings)}")
        lines += [f"    {w}" for w in bound.warnings[:20]]
    total_out = sum(TensorInfo(s, d).nbytes for s, d in bound.outputs.values())
    lines.append(f"outputs: {len(bound.outputs)} tensors, {_fmt_bytes(total_out)}")
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    return json.dumps(json.loads(plan.to_json()), indent=2)


def bound_json(bound: BoundPlan) -> str:
    d = json.loads(bound.plan.to_json())
    d["groups"] = [
        {
            "rule": g.rule.number,
            "group": g.keep,
            "inputs": {
                k: {"shape": list(bound.layout[k].shape), "dtype": bound.layout[k].dtype}
                for k in g.source_keys
            },
            "outputs": {k: {"shape": list(i.shape), "dtype": i.dtype} for k, i in g.outputs.items()},
        }
        for g in bound.groups
    ]
    d["passthrough"] = bound.passthrough
    d["unmatched"] = bound.unmatched
    d["dropped"] = bound.dropped
    d["coverage"] = bound.coverage()
    d["warnings"] = bound.warnings
    return json.dumps(d, indent=2)
