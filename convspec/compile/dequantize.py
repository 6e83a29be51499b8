"""A plan that dequantizes: from a plan that keeps quantized weights with their companions, the plan
whose converts dequantize each weight first (the scheme's op) and drop the scales' own ops, and whose
per-tensor companions (`input_scale`) are dropped. Lossy: its inverse would need a quantize op."""

from __future__ import annotations

from dataclasses import replace

from ..errors import CompileError, Span
from .compiler import _template, check_convert, drop_rule, inverse_of, pattern_of
from .plan import Node, Plan, PlanRule


def dequantized(plan: Plan, dtype: str) -> Plan:
    """`plan` with its quantized weights dequantized to `dtype` (a float dtype the scheme's op makes)."""
    q = plan.quant
    if q is None:
        raise CompileError(
            f"the plan {plan.name} has no quantization to dequantize",
            hint="give the checkpoint's config.json (its quantization_config), or add a quantization section",
        )
    if q.dequantize is not None:
        if q.dequantize == dtype:
            return plan
        raise CompileError(f"the plan {plan.name} dequantizes to {q.dequantize} already, not {dtype}")
    q = replace(q, dequantize=dtype)
    rules = [_rule(r, q) for r in plan.rules]
    for form in q.forms:  # per-tensor companions (input_scale) have no place beside floats
        for c in form.companions[1:]:
            rules.append(drop_rule(len(rules), Span(f"the {q.scheme} quantization", 0, 0), _pattern(c)))
    inverse_rules, inverse_error, lossy = inverse_of(rules)
    return replace(
        plan,
        rules=tuple(rules),
        inverse_rules=inverse_rules,
        inverse_error=inverse_error,
        lossy=lossy,
        quant=q,
    )


def _pattern(tail: str):
    return pattern_of(_template("{q:path}" + tail))


def dequant_node(q, weight: str, scale: str, where: Span, in_convert: bool = True) -> Node:
    """`weight.dequantized = <the scheme's op>(weight, scale, ...)`: the one node every dequantizing
    rule adds (in a convert, with the scheme's params for converts)."""
    params = q.dequant_params(in_convert)
    return Node(q.kind.dequant, (weight, scale), (f"{weight}.dequantized",), tuple(params.items()), where)


def _rule(r: PlanRule, q) -> PlanRule:
    """A convert that dequantizes: at its outputs where the scheme's grid is one of blocks (the
    converted weight and its converted grid, which follows it block for block), else first."""
    if r.kind != "convert":
        return r
    return (_at_outputs(r, q) if q.kind.grid == "blocks" else None) or _first(r, q)


def _at_outputs(r: PlanRule, q) -> PlanRule | None:
    """The weights and their grids move as they do kept (whole FP8 blocks: bytes copied as they are),
    then each output weight is dequantized once with its grid, the same values as dequantizing each
    source weight first: every element is its weight times its block's scale. None when an output has
    no grid beside it."""
    by_text = {p.text: v for v, p in r.outputs}
    pairs = {v: by_text.get(q.scale_of_target(p.text)) for v, p in r.outputs}
    grids = {s for s in pairs.values() if s is not None}
    if not grids:
        return None
    nodes, outputs = list(r.nodes), []
    for v, p in r.outputs:
        if v in grids:
            continue
        if pairs[v] is None:
            return None
        nodes.append(dequant_node(q, v, pairs[v], r.where))
        outputs.append((nodes[-1].outputs[0], p, None))
    return replace(
        check_convert(r.index, r.where, list(r.inputs), outputs, nodes, dict(r.types)), undoes=r.undoes
    )


def _first(r: PlanRule, q) -> PlanRule:
    """A convert with its weights dequantized first and its scales' ops and outputs left out."""
    by_text = {p.text: n for n, p in r.inputs}
    pairs = {}
    for n, p in r.inputs:
        scale = q.scale_of(p.text)
        if not q.is_companion(p.text) and scale in by_text:
            pairs[n] = by_text[scale]
    if not pairs:
        return r
    scales = {n for n, p in r.inputs if q.is_companion(p.text)}
    nodes, renamed = [], {}
    for w, s in pairs.items():
        nodes.append(dequant_node(q, w, s, r.where))
        renamed[w] = nodes[-1].outputs[0]
    for node in r.nodes:
        if any(a in scales for a in node.inputs):
            scales.update(node.outputs)
            continue
        nodes.append(replace(node, inputs=tuple(renamed.get(a, a) for a in node.inputs)))
    inputs = [(n, p) for n, p in r.inputs if n not in scales or n in pairs.values()]
    outputs = [(renamed.get(v, v), p, None) for v, p in r.outputs if v not in scales]
    types = dict(r.types)
    return replace(check_convert(r.index, r.where, inputs, outputs, nodes, types), undoes=r.undoes)
