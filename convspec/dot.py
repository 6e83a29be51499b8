"""Plans as DOT for graphviz: each rule drawn once (input patterns -> ops -> output patterns)."""

from __future__ import annotations

from .compile.plan import Plan, _show


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


def bound_dot(bound, group: str | None = None) -> str:
    """A bound plan's picture (for now the plan's rules; the concrete group is drawn in a later change)."""
    return plan_dot(bound.plan)
