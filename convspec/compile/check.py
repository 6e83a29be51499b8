"""The invariants of a plan, checked as the compiler would have made it (torch.fx's `Graph.lint()` is
the model): `Plan.check()` and `Plan.from_json` run them. Every rule is one the compiler could have
made from its templates and ops (each op known, its parameters and arity, templates, captures, the
data flow), and the recorded inverse is the one the rules give. Anything else is a PlanError that
names the field (`rules[2].nodes[0].op`)."""

from __future__ import annotations

import re
from dataclasses import fields, replace
from typing import Any

from ..errors import CompileError, ConfigError, ConvspecError, PlanError, Span
from ..frozen import thaw
from ..ops import OpError
from ..ops.base import REQUIRED, short
from ..spec.parse import parse_template
from ..spec.source import Embedded, Source
from .compiler import (
    MAX_OP_VALUES,
    bounded_template,
    check_arity,
    check_convert,
    check_param,
    drop_rule,
    find_op,
    inverse_of,
    pattern_of,
    rename_rule,
    values_yielded,
)
from .evaluate import evaluate
from .expr import LEN_MESSAGE, PARAM_FORM, SOURCE_FORM, ConfigExpr, ListOf, read_config_expr
from .patterns import Pattern, split_offset
from .plan import Node, Plan, PlanRule


def check_plan(plan: Plan) -> None:
    """Raise PlanError unless every rule is one the compiler could have made and the recorded
    inverse is the one the compiler derives from the rules."""
    sides = [("rules", plan.rules, plan.is_inverse)]
    if plan.inverse_rules is not None:
        sides.append(("inverse_rules", plan.inverse_rules, not plan.is_inverse))
    for side, rules, undoing in sides:
        for i, rule in enumerate(rules):
            _check_rule(rule, i, f"{side}[{i}]", plan.config, undoing)
    _check_inverse(plan)
    try:
        plan.regex  # noqa: B018 - compiles the rules' combined regex, once, as binding would
    except (re.error, OverflowError, RecursionError) as exc:  # pragma: no cover - the templates are checked
        raise PlanError(f"the rules' templates make no regular expression: {exc}") from None


def _check_rule(r: PlanRule, i: int, path: str, config: dict | None, undoing: bool) -> None:

    if r.index != i:
        raise PlanError(f"{path}.index: {r.index}, but the rule is number {i} of its list (counting from 0)")
    if undoing and r.undoes < 1:
        raise PlanError(
            f"{path}.undoes: {r.undoes}, but an inverse rule names the rule it undoes (1, 2, ...)"
        )
    if not undoing and r.undoes != 0:
        raise PlanError(f"{path}.undoes: {r.undoes}, but a forward rule undoes none (0)")
    for name, patterns in (("inputs", r.inputs), ("outputs", r.outputs)):
        for j, (_, p) in enumerate(patterns):
            _check_template(p, f"{path}.{name}[{j}][1]")
    for j, p in enumerate(r.unless):
        _check_template(p, f"{path}.unless[{j}]")
    names = [n for n, _ in r.inputs]
    if len(set(names)) != len(names) or not r.inputs:
        raise PlanError(f"{path}.inputs: {short(names)}: a rule has one or more inputs, each named once")
    try:
        if r.kind == "drop":
            _shape(r, path, inputs=1, outputs=0)
            want = drop_rule(i, r.where, r.inputs[0][1])
        elif r.kind == "rename":
            _shape(r, path, inputs=1, outputs=1)
            want = rename_rule(i, r.where, r.inputs[0][1], r.outputs[0][1], list(r.unless), r.one_way)
        else:
            if r.unless or r.one_way:
                raise PlanError(f"{path}: a convert has no unless and is never one way")
            types: dict[str, str] = {}
            for _, p in r.inputs:
                for k, c, t in p.parts:
                    if k == "cap" and types.setdefault(c, t or "seg") != (t or "seg"):
                        raise PlanError(
                            f"{path}.inputs: capture {{{c}}} is {types[c]} in one input and {t} in another"
                        )
            _check_nodes(r, path, config, every_param=not undoing)
            want = check_convert(
                i, r.where, list(r.inputs), [(v, p, None) for v, p in r.outputs], list(r.nodes), types
            )
    except CompileError as exc:
        raise PlanError(f"{path}: {exc.message}", hint=exc.hint) from None
    want = replace(want, undoes=r.undoes)
    if undoing and r.kind == "rename":  # an inverse rename keeps its forward rule's texts and order
        got, want = _loose(r), _loose(want)
    else:
        got = r
    for f in fields(PlanRule):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if a != b:
            raise PlanError(
                f"{path}.{f.name}: {short(_plain(a))}, but the rule's templates and ops give {short(_plain(b))}"
            )


def _shape(r: PlanRule, path: str, inputs: int, outputs: int) -> None:
    """A rename or a drop: `inputs` and `outputs` values named x, no ops."""
    if [n for n, _ in r.inputs] != ["x"] * inputs or [n for n, _ in r.outputs] != ["x"] * outputs or r.nodes:
        raise PlanError(
            f"{path}: a {r.kind} has {inputs} input and {outputs} output named x, and no ops",
        )
    if r.kind == "drop" and (r.unless or r.one_way):
        raise PlanError(f"{path}: a drop has no unless and is never one way")


def _loose(r: PlanRule) -> PlanRule:
    """What an inverse rename must share with its check: the same sets, the texts aside."""
    strip = lambda p: Pattern("", p.parts)  # noqa: E731
    return replace(
        r,
        inputs=tuple((n, strip(p)) for n, p in r.inputs),
        outputs=tuple((n, strip(p)) for n, p in r.outputs),
        keep=tuple(sorted(r.keep)),
        types=tuple(sorted(r.types)),
        where=Span(None, 0, 0),
    )


def _plain(v: Any) -> Any:
    """A rule's field as it reads in JSON, for a message."""
    if isinstance(v, Pattern):
        return v.text or v.parts
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def _check_template(p: Pattern, path: str) -> None:
    """A pattern's parts are exactly what the spec grammar parses from the template they spell."""
    text = "".join(a if k == "lit" else _capture_text(a, b) for k, a, b in p.parts)
    try:
        template = parse_template(text, Embedded(Source(text, path), 1, 1))
        parsed = pattern_of(template)
        bounded_template(template, {})  # matched in bounded time, as a compiled spec's templates
    except ConvspecError as exc:
        raise PlanError(f"{path}: template {text!r}: {exc.message}", hint=exc.hint) from None
    if parsed.parts != p.parts:
        raise PlanError(f"{path}.parts: {short(_plain(p.parts))} do not spell one template (as {text!r})")


def _capture_text(name: str, typ: str | None) -> str:
    base, offset = split_offset(name)
    return "{" + base + (f":{typ}" if typ else "") + (f"{offset:+d}" if offset else "") + "}"


def _check_nodes(r: PlanRule, path: str, config: dict | None, every_param: bool) -> None:
    """Each op: known, with its number of inputs, its parameters (values or config expressions) and
    the number of values it yields; each value defined once, before it is used. Compiling writes
    every parameter of an op; an op's inverse only those it needs (`every_param` False)."""
    defined = {n for n, _ in r.inputs}
    for j, node in enumerate(r.nodes):
        at = f"{path}.nodes[{j}]"
        try:
            op = find_op(node.op)
        except OpError as exc:
            raise PlanError(f"{at}.op: {exc.message}", hint=exc.hint) from None
        for v in node.inputs:
            if v not in defined:
                raise PlanError(f"{at}.inputs: {v!r} is not an input of the rule or a value of an op before")
        for v in node.outputs:
            if v in defined:
                raise PlanError(f"{at}.outputs: {v!r} is defined twice")
            defined.add(v)
        given = _check_params(node, op, at, config, every_param)
        _check_sources(node, at, config)
        try:
            check_arity(op, len(node.inputs))
            if not any(_is_expr(v) for v in given.values()):
                op.check(given)
            n = values_yielded(op, given)
        except OpError as exc:
            raise PlanError(f"{at}: {exc.message}", hint=exc.hint) from None
        if (n is not None and n != len(node.outputs)) or not 1 <= len(node.outputs) <= MAX_OP_VALUES:
            raise PlanError(
                f"{at}.outputs: {len(node.outputs)} values, but {op.name} with these parameters yields "
                + (str(n) if n is not None else f"1 to {MAX_OP_VALUES}")
            )
    for v, _ in r.outputs:
        if v not in defined:
            raise PlanError(f"{path}.outputs: {v!r} is not an input of the rule or a value of an op")


def _check_params(node: Node, op, at: str, config: dict | None, every_param: bool) -> dict[str, Any]:
    """The node's parameters by name: each one the op has, given once, a value of its kind or a
    config expression where compiling leaves one."""
    spec = {p.name: p for p in op.params}
    given = dict(node.params)
    if len(given) != len(node.params):
        raise PlanError(f"{at}.params: a parameter is given twice")
    for name in given:
        if name not in spec:
            raise PlanError(
                f"{at}.params: {op.name} has no parameter {name!r}",
                hint=f"parameters: {', '.join(spec) or 'none'}",
            )
    for p in op.params:
        if p.name not in given:
            if every_param or p.default is REQUIRED:
                raise PlanError(f"{at}.params: missing parameter {p.name} of {op.name}")
            continue
        v = given[p.name]
        try:
            if _is_expr(v):
                _check_expr(v, op, p, config)
            elif not (v is None and p.default is None):
                check_param(op, p, v)
        except OpError as exc:
            raise PlanError(f"{at}.params.{p.name}: {exc.message}", hint=exc.hint) from None
    return given


def _is_expr(v: Any) -> bool:
    """A config expression: typed, or one reading left as written (the checks refuse it)."""
    return isinstance(v, ConfigExpr) or (isinstance(v, dict) and "$expr" in v)


def _typed(v: Any, form: tuple[set[str], str]) -> ConfigExpr:
    """v as a ConfigExpr; an OpError saying what is wrong with one left as written."""
    if isinstance(v, ConfigExpr):
        return v
    read_config_expr(thaw(v), form)
    raise OpError("a config expression in a plan is a ConfigExpr (convspec.compile.expr), not a dict")


def _check_expr(v: Any, op, p, config: dict | None) -> None:
    """A config expression left for bind: only where compiling leaves one (no config; a parameter
    that may wait for it), in the form the compiler writes (the spec IR, its text, a list's items)."""
    if config is not None:
        raise OpError("a config expression, but the plan was compiled with a config (which evaluates them)")
    if p.kind in ("capture", "dtype"):
        raise OpError(f"a {p.kind} parameter is written out in the spec, never a config expression")
    v = _typed(v, PARAM_FORM)
    if v.counted != (p.kind in ("ints", "shape") and isinstance(v.ir, ListOf)):
        raise OpError(LEN_MESSAGE)


def _check_sources(node: Node, at: str, config: dict | None) -> None:
    """The config expressions that parameters compiled with a config were evaluated from (what the
    transformers exporter reads): only in a plan compiled with a config, one per parameter given,
    each giving that parameter's value with the plan's config."""
    given = dict(node.params)
    seen: set[str] = set()
    for j, (name, v) in enumerate(node.exprs):
        where = f"{at}.exprs[{j}]"
        if config is None:
            raise PlanError(f"{where}: the expression a value came from, but the plan has no config")
        if name not in given or _is_expr(given[name]) or name in seen:
            raise PlanError(f"{where}[0]: {name!r} is not a parameter of {node.op} evaluated from the config")
        seen.add(name)
        try:
            v = _typed(v, SOURCE_FORM)
            if v.counted:
                raise OpError(f"a config expression is {SOURCE_FORM[1]}")
            value = evaluate(v.ir, config)
        except (OpError, ConfigError) as exc:
            raise PlanError(f"{where}[1]: {exc.message}", hint=exc.hint) from None
        if _plain(value) != _plain(given[name]):
            raise PlanError(
                f"{where}[1]: {v.text} is {short(value)} with the plan's config, but {name} is "
                f"{short(given[name])}"
            )


def _check_inverse(plan: Plan) -> None:
    """The inverse a plan records is the one the compiler derives: a forward plan's inverse rules,
    the reason it has none, why it is lossy; an inverse plan's rules, from its forward rules."""
    if not plan.is_inverse:
        got = (plan.inverse_rules, plan.inverse_error, plan.lossy)
        want = inverse_of(plan.rules)
    elif plan.inverse_rules is not None:
        rules, error, lossy = inverse_of(plan.inverse_rules)
        got, want = (plan.rules, plan.inverse_error, plan.lossy), (rules, error, lossy)
        if error is None and lossy:
            want = (None, None, ())  # a lossy forward plan is not recorded beside its inverse
    else:
        if plan.lossy or plan.inverse_error is None:
            raise PlanError(
                "an inverse plan without its forward rules records why (inverse_error) and no lossy"
            )
        return
    names = (
        ("rules", "inverse_error", "lossy")
        if plan.is_inverse
        else ("inverse_rules", "inverse_error", "lossy")
    )
    for name, a, b in zip(names, got, want, strict=True):
        if a == b:
            continue
        if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
            k = next(k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            raise PlanError(f"{name}[{k}]: is not what inverting the other side's rules gives")
        raise PlanError(f"{name}: {short(_plain(a))}, but inverting the rules gives {short(_plain(b))}")
