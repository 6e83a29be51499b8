"""The Hugging Face side of a GGUF spec in the layout `save_pretrained` writes (the Hub's), not the
model's in-memory state_dict: the importer's rules composed with the inverse of convspec's built-in
spec for the model type, which encodes transformers' conversion mapping (what save_pretrained reverses).

Composition is by the plan IR: a state_dict key routed through the inverse plan is renamed, or claimed
by a convert whose ops then follow the importer's expression; a leading op that undoes the expression's
own (chunk after cat) cancels, so `cat(gate_exps, up_exps)` then `chunk; unstack` becomes
`unstack(gate_exps, over=e)` and `unstack(up_exps, over=e)`: exact, a pure byte move both ways.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..errors import ConvspecError

_SENTINEL = "7190000017"  # stands for a capture the saved key keeps free (an expert index) while routing


def saved_inverse(model_type: str):
    """The inverse of the built-in spec for `model_type`: state_dict keys -> the keys save_pretrained
    writes (None where the built-in spec is the identity)."""
    import convspec

    plan = convspec.compile(model_type)
    return plan.inverse() if plan.rules else None


def to_saved(entries: list, inverse) -> list:
    """Each entry (GGUF sources -> state_dict key) as the entries that give the saved key(s) instead."""
    if inverse is None:
        return entries
    return [x for e in entries for x in _compose(e, inverse)]


def saved_key(key: str, inverse) -> str:
    """Where the inverse's renames take a key no convert claims (the key itself without an inverse)."""
    from ..routing import follow_renames

    return key if inverse is None else follow_renames(inverse, key)[0]


def _compose(entry, inverse) -> list:
    from ..routing import follow_renames

    key, hit = follow_renames(inverse, entry.target)
    if hit is None:
        return [replace(entry, target=key)]
    ri, name, caps = hit
    rule = inverse.rules[ri]
    values: dict[str, tuple[list, str]] = {name: (entry.sources, entry.expr or "x")}
    nodes = list(rule.nodes)
    first = next((n for n in nodes if name in n.inputs), None)
    if first is not None and entry.expr and _undoes(first, entry):
        nodes.remove(first)
        del values[name]
        if len(first.outputs) != len(entry.sources):
            raise _cannot(entry, rule, "the op that undoes the expression has another number of outputs")
        for out, src in zip(first.outputs, entry.sources, strict=True):
            values[out] = ([src], src[0])
    elif entry.expr or entry.let:
        raise _cannot(entry, rule, "an expression the inverse's ops do not start by undoing")
    for node in nodes:
        if len(node.inputs) != 1:
            raise _cannot(entry, rule, "an op of several inputs")
        srcs, expr = values.pop(node.inputs[0])
        for out in node.outputs:
            values[out] = (srcs, _render(node, expr))
    out = []
    for var, pattern in rule.outputs:
        srcs, expr = values[var]
        free = dict(rule.free).get(var, ())
        target = pattern.format({**caps, **{c: _SENTINEL for c in free}})
        target = follow_renames(inverse, target, ri + 1)[0]
        for c in free:
            target = target.replace(_SENTINEL, "{" + c + "}")
        single = len(srcs) == 1 and expr == srcs[0][0]
        out.append(
            replace(
                entry,
                sources=[("x", srcs[0][1])] if len(srcs) == 1 else srcs,
                target=target,
                expr=None if single else _rename_var(expr, srcs),
                let=None,
            )
        )
    return out


def _undoes(node, entry) -> bool:
    """Whether the inverse's op undoes the last op of the entry's expression (chunk after cat)."""
    from ..ops import OPS, NotInvertible

    last = _entry_node(entry)
    if last is None:
        return False
    try:
        op, params = OPS[node.op].inverse(dict(node.params), len(node.inputs))
    except NotInvertible:  # an op with no inverse cannot cancel
        return False
    mine = dict(last.params)
    return op == last.op and all(mine.get(k) == v for k, v in params.items())


def _entry_node(entry) -> Any:
    """The entry's expression compiled by convspec itself: the node that makes its output."""
    import convspec

    from ..spec import parse_spec

    srcs = ",\n        ".join(f"{v} = {g}" for v, g in entry.sources)
    text = f'spec t "t"\n\nconvert {srcs}\n     -> {entry.target}\n        = {entry.expr}\n'
    try:
        rule = convspec.compile(parse_spec(text, "t.cspec")).rules[0]
    except ConvspecError:  # an expression reading the config: not one the inverse undoes
        return None
    return rule.nodes[-1] if rule.nodes else None


def _render(node, expr: str) -> str:
    """One op applied to an expression, with the parameters that differ from the op's defaults."""
    from ..ops import OPS

    defaults = {p.name: p.default for p in OPS[node.op].params}
    args = [f"{k}={_value(v)}" for k, v in node.params if defaults.get(k) != v]
    return f"{node.op}({', '.join([expr, *args])})"


def _value(v: Any) -> str:
    return "true" if v is True else "false" if v is False else str(v)


def _rename_var(expr: str, srcs: list) -> str:
    """A single source is called `x` in the spec."""
    import re

    if len(srcs) != 1:
        return expr
    return re.sub(rf"\b{re.escape(srcs[0][0])}\b", "x", expr)


def _cannot(entry, rule, why: str) -> ConvspecError:
    return ConvspecError(
        f"the GGUF importer cannot compose {entry.target} with {rule.label} of the built-in spec: {why}"
    )
