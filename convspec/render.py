"""Plans and bound plans as text for people, JSON for tools, and DOT for graphviz. Returns strings."""

from __future__ import annotations

import json
from collections import defaultdict

from .bind import BoundPlan
from .compile.plan import Plan, PlanRule, _show
from .ops import TensorInfo


def _rule_lines(rule: PlanRule) -> list[str]:
    kind = "alias" if rule.one_way else rule.kind
    head = f"rule {rule.index + 1}  {kind:<8} {rule.where}"
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


def plan_text(plan: Plan) -> str:
    lines = [f"plan {plan.name}: {plan.doc}" if plan.doc else f"plan {plan.name}"]
    if plan.model_types:
        lines.append(f"model types: {', '.join(plan.model_types)}")
    lines.append(f"rules: {len(plan.rules)}")
    lines.append("")
    for rule in plan.rules:
        lines += _rule_lines(rule)
        lines.append("")
    if plan.inverse_error:
        lines.append(f"inverse: not available: {plan.inverse_error}")
    elif plan.lossy:
        lines.append("inverse: lossy: " + "; ".join(plan.lossy))
    else:
        lines.append("inverse: exact")
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


def _table(rows: list[tuple[str, ...]], indent: str = "    ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]


def bound_text(bound: BoundPlan) -> str:
    lines = [plan_text(bound.plan), "", "groups:"]
    by_rule: dict[int, list] = defaultdict(list)
    for g in bound.groups:
        by_rule[g.rule.index].append(g)
    for ri, groups in sorted(by_rule.items()):
        lines.append(f"  rule {ri + 1} ({groups[0].rule.where}): {len(groups)} group(s)")
        for g in groups:
            lines.append(f"    group {g.name}")
            rows = [
                (
                    "in",
                    k,
                    str(list(bound.layout[k].shape)),
                    bound.layout[k].dtype,
                    _fmt_bytes(bound.layout[k].nbytes),
                )
                for k in g.source_keys
            ]
            rows += [
                ("out", k, str(list(i.shape)), i.dtype, _fmt_bytes(i.nbytes)) for k, i in g.outputs.items()
            ]
            lines += _table(rows, "      ")
    renamed = [(s, d) for s, d in bound.passthrough.items() if s != d]
    if renamed:
        lines.append(f"  renamed: {len(renamed)} key(s)")
        lines += _table(
            [(s, "->", d, str(list(bound.layout[s].shape)), bound.layout[s].dtype) for s, d in renamed],
            "    ",
        )
    cov = bound.coverage()
    lines += [
        "",
        "coverage:",
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
            "rule": g.rule.index + 1,
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


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plan_dot(plan: Plan) -> str:
    """One cluster per rule: input patterns -> op nodes -> output patterns (drawn once, not per layer)."""
    out = [
        "digraph plan {",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=10];',
        f"  label={_q(plan.name)};",
    ]
    for rule in plan.rules:
        r = f"r{rule.index}"
        out.append(f"  subgraph cluster_{r} {{")
        out.append(f"    label={_q(f'rule {rule.index + 1}: {rule.kind}')};")
        for name, pat in rule.inputs:
            out.append(f"    {_q(f'{r}:{name}')} [shape=box, style=rounded, label={_q(pat.text)}];")
        producer = {n: f"{r}:{n}" for n, _ in rule.inputs}
        for i, node in enumerate(rule.nodes):
            nid = f"{r}:op{i}"
            params = ", ".join(f"{k}={_show(v)}" for k, v in node.params if v is not None)
            out.append(f"    {_q(nid)} [shape=ellipse, label={_q(f'{node.op}({params})')}];")
            for a in node.inputs:
                out.append(f"    {_q(producer[a])} -> {_q(nid)};")
            for o in node.outputs:
                producer[o] = nid
        for j, (v, pat) in enumerate(rule.outputs):
            oid = f"{r}:out{j}"
            out.append(f"    {_q(oid)} [shape=box, label={_q(pat.display())}];")
            out.append(f"    {_q(producer[v])} -> {_q(oid)};")
        out.append("  }")
    out.append("}")
    return "\n".join(out)
