"""Plans as JSON: the format's versions, the upgrade from each to the next, and the checks that make
a plan read back one the compiler could have made (a plan from a file is input, like a spec).

The format is versioned by its `convspec_plan` field. Format 1 is what convspec wrote before the
version was counted: some fields were added to it over time, and a plan may lack them. Format 2
writes every field. Reading upgrades an older plan one version at a time, by the steps in
UPGRADES, then checks it: its shape field by field, then with the compiler's own checks (ops,
parameters, templates, captures, data flow, the recorded inverse). Anything else is a PlanError.
"""

from __future__ import annotations

import difflib
import json
import re
import reprlib
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from typing import Any

from ..errors import ConfigError, ConvspecError, PlanError, Span
from ..ops import OpError
from .expr import ConfigExpr, ListOf, config_expr_json, from_json, needs_config
from .frozen import thaw
from .patterns import Pattern, split_offset
from .plan import Node, Plan, PlanRule

FORMAT = 2  # the version to_json writes
MARKER = "convspec_plan"  # the field that says a JSON object is a plan, and which format
KINDS = ("rename", "convert", "drop")

# ---- writing -----------------------------------------------------------------------------------


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON object of the current format. `regex` is derived, for people reading it."""
    return {
        MARKER: FORMAT,
        "name": plan.name,
        "doc": plan.doc,
        "model_types": list(plan.model_types),
        "config": plan.config,
        "rules": [_rule_json(r) for r in plan.rules],
        "inverse_rules": None if plan.inverse_rules is None else [_rule_json(r) for r in plan.inverse_rules],
        "inverse_error": plan.inverse_error,
        "lossy": list(plan.lossy),
        "is_inverse": plan.is_inverse,
        "base_prefix": plan.base_prefix,
        "regex": plan.regex,
    }


def _rule_json(r: PlanRule) -> dict:
    d = asdict(r)
    d["where"] = str(r.where)
    d["inputs"] = [[n, _pat_json(p)] for n, p in r.inputs]
    d["unless"] = [_pat_json(p) for p in r.unless]
    d["outputs"] = [[n, _pat_json(p)] for n, p in r.outputs]
    d["nodes"] = [
        {
            "op": n.op,
            "inputs": list(n.inputs),
            "outputs": list(n.outputs),
            "params": [[k, _value_json(v)] for k, v in n.params],
            "where": str(n.where),
        }
        | ({"exprs": [[k, _value_json(v)] for k, v in n.exprs]} if n.exprs else {})
        for n in r.nodes
    ]
    return d


def _value_json(v: Any) -> Any:
    return config_expr_json(v) if isinstance(v, ConfigExpr) else v


def _pat_json(p: Pattern) -> dict:
    return {"text": p.text, "parts": [list(x) for x in p.parts]}


# ---- reading -----------------------------------------------------------------------------------


def loads(text: str | bytes) -> Plan:
    """The plan a JSON text holds, upgraded to the current format and checked; or a PlanError."""
    try:
        d = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise PlanError(f"not a convspec plan: the text is not JSON ({exc})") from None
    except RecursionError:
        raise PlanError("not a convspec plan: the JSON is nested too deeply") from None
    try:
        plan = _read(upgrade(d))
        check_plan(plan)
    except RecursionError:  # pragma: no cover - json.loads refuses deeper nesting first
        raise PlanError("the plan is nested too deeply") from None
    return plan


def version(d: Any) -> int:
    """The format version of a plan object, refused when it is not one this convspec reads."""
    if not isinstance(d, dict) or MARKER not in d:
        raise PlanError(
            f"not a convspec plan: no {MARKER!r} field",
            hint="a plan is what Plan.to_json() or `convspec compile SPEC --format json` writes",
        )
    v = d[MARKER]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise PlanError(f"{MARKER}: {_short(v)} is not a plan format version (1, 2, ...)")
    if v > FORMAT:
        raise PlanError(
            f"{MARKER}: plan format {v} is newer than this convspec reads (formats 1 to {FORMAT})",
            hint="upgrade convspec, or compile the spec again with this version",
        )
    return v


def _from_1(d: dict) -> dict:
    """Format 1 -> 2. Format 1 plans may lack the fields added to it over time: config,
    inverse_error, lossy, is_inverse and base_prefix; a rule's unless, one_way and undoes. They get
    the values that those plans meant; an inverse rule undoes the forward rules that have an
    inverse (not drops, not aliases), last first."""
    d = {**d, MARKER: 2}
    for key, default in (
        ("config", None),
        ("inverse_error", None),
        ("lossy", []),
        ("is_inverse", False),
        ("base_prefix", ""),
    ):
        d.setdefault(key, default)
    sides = ("inverse_rules", "rules") if d["is_inverse"] is True else ("rules", "inverse_rules")
    forward, backward = (_dicts(d.get(side)) for side in sides)
    for side, rules in zip(sides, (forward, backward), strict=True):
        if rules is not None:
            d[side] = rules = [{"unless": [], "one_way": False, **r} for r in rules]
    if forward is not None:
        d[sides[0]] = [{"undoes": 0, **r} for r in d[sides[0]]]
        undone = [
            _number(r) for r in reversed(d[sides[0]]) if r.get("kind") != "drop" and not r.get("one_way")
        ]
        if backward is not None and len(undone) == len(backward):
            d[sides[1]] = [{"undoes": n, **r} for r, n in zip(d[sides[1]], undone, strict=True)]
    return d


def _dicts(v: Any) -> list[dict] | None:
    """v when it is a list of objects (rules an upgrade can fill in), else None: the checks after
    the upgrade report what is wrong with it."""
    return v if isinstance(v, list) and all(isinstance(r, dict) for r in v) else None


def _number(r: dict) -> Any:
    """A forward rule's number, as PlanRule.number counts: its undoes, else its index + 1."""
    u, i = r.get("undoes"), r.get("index")
    return u or (i + 1 if isinstance(i, int) and not isinstance(i, bool) else i)


# Version N -> N+1, applied in order from a plan's version up to FORMAT; each step is one function.
UPGRADES: dict[int, Callable[[dict], dict]] = {1: _from_1}


def upgrade(d: Any) -> dict:
    """A plan object of any format this convspec reads, as an object of the current format."""
    v = version(d)
    while v < FORMAT:
        d = UPGRADES[v](d)
        v += 1
    return d


# ---- the shape of a plan, field by field --------------------------------------------------------

_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a string"),
    "int": ((int,), "an integer"),
    "bool": ((bool,), "true or false"),
    "list": ((list,), "a list"),
    "object": ((dict,), "an object"),
}


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number"
    )


def _is(v: Any, kind: str) -> bool:
    if kind == "any":  # any JSON value: what it must be is checked by what reads it
        return True
    if kind == "null":
        return v is None
    if kind == "int" and isinstance(v, bool):
        return False
    return isinstance(v, _TYPES[kind][0])


def _expect(v: Any, path: str, *kinds: str) -> Any:
    if not any(_is(v, k) for k in kinds):
        what = " or ".join("null" if k == "null" else _TYPES[k][1] for k in kinds)
        raise PlanError(f"{path}: expected {what}, got {_kind(v)}")
    return v


def _fields(d: Any, path: str, required: dict[str, tuple[str, ...]], optional: tuple[str, ...] = ()) -> dict:
    """The object at `path` with exactly the `required` fields (each of one of its kinds)."""
    _expect(d, path, "object")
    for key in d:
        if key not in required and key not in optional:
            close = difflib.get_close_matches(str(key), list(required), 1)
            raise PlanError(
                f"{_at(path, key)}: unknown field", hint=f"did you mean {close[0]!r}?" if close else None
            )
    for key, kinds in required.items():
        if key not in d:
            raise PlanError(f"{_at(path, key)}: missing field")
        _expect(d[key], _at(path, key), *kinds)
    return d


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _strings(v: Any, path: str) -> tuple[str, ...]:
    return tuple(_expect(x, f"{path}[{i}]", "str") for i, x in enumerate(_expect(v, path, "list")))


def _pair(v: Any, path: str, second: tuple[str, ...]) -> tuple[str, Any]:
    _expect(v, path, "list")
    if len(v) != 2:
        raise PlanError(f"{path}: expected a pair [name, value], got {len(v)} items")
    return _expect(v[0], f"{path}[0]", "str"), _expect(v[1], f"{path}[1]", *second)


_PLAN = {
    MARKER: ("int",),
    "name": ("str",),
    "doc": ("str",),
    "model_types": ("list",),
    "config": ("object", "null"),
    "rules": ("list",),
    "inverse_rules": ("list", "null"),
    "inverse_error": ("str", "null"),
    "lossy": ("list",),
    "is_inverse": ("bool",),
    "base_prefix": ("str",),
}
_RULE = {
    "index": ("int",),
    "kind": ("str",),
    "where": ("str",),
    "inputs": ("list",),
    "outputs": ("list",),
    "nodes": ("list",),
    "keep": ("list",),
    "free": ("list",),
    "types": ("list",),
    "unless": ("list",),
    "one_way": ("bool",),
    "undoes": ("int",),
}
_NODE = {"op": ("str",), "inputs": ("list",), "outputs": ("list",), "params": ("list",), "where": ("str",)}
_PATTERN = {"text": ("str",), "parts": ("list",)}


def _read(d: dict) -> Plan:
    _fields(d, "", _PLAN, optional=("regex",))
    if "regex" in d:  # derived from the rules: written for people, not read back
        _expect(d["regex"], "regex", "str")
    inverse = d["inverse_rules"]
    return Plan(
        name=d["name"],
        doc=d["doc"],
        model_types=_strings(d["model_types"], "model_types"),
        rules=tuple(_rule(r, f"rules[{i}]") for i, r in enumerate(d["rules"])),
        config=d["config"],
        inverse_rules=None
        if inverse is None
        else tuple(_rule(r, f"inverse_rules[{i}]") for i, r in enumerate(inverse)),
        inverse_error=d["inverse_error"],
        lossy=_strings(d["lossy"], "lossy"),
        is_inverse=d["is_inverse"],
        base_prefix=d["base_prefix"],
    )


def _rule(d: Any, path: str) -> PlanRule:
    _fields(d, path, _RULE)
    if d["kind"] not in KINDS:
        raise PlanError(f"{path}.kind: {_short(d['kind'])} is not a rule kind ({', '.join(KINDS)})")
    return PlanRule(
        index=d["index"],
        kind=d["kind"],
        where=Span.from_location(d["where"]),
        inputs=_named_patterns(d["inputs"], f"{path}.inputs"),
        outputs=_named_patterns(d["outputs"], f"{path}.outputs"),
        nodes=tuple(_node(n, f"{path}.nodes[{j}]") for j, n in enumerate(d["nodes"])),
        keep=_strings(d["keep"], f"{path}.keep"),
        free=tuple(_free(x, f"{path}.free[{j}]") for j, x in enumerate(d["free"])),
        types=tuple(_pair(x, f"{path}.types[{j}]", ("str",)) for j, x in enumerate(d["types"])),
        unless=tuple(_pattern(p, f"{path}.unless[{j}]") for j, p in enumerate(d["unless"])),
        one_way=d["one_way"],
        undoes=d["undoes"],
    )


def _free(v: Any, path: str) -> tuple[str, tuple[str, ...]]:
    name, caps = _pair(v, path, ("list",))
    return name, _strings(caps, f"{path}[1]")


def _named_patterns(v: list, path: str) -> tuple[tuple[str, Pattern], ...]:
    out = []
    for j, x in enumerate(v):
        name, pat = _pair(x, f"{path}[{j}]", ("object",))
        out.append((name, _pattern(pat, f"{path}[{j}][1]")))
    return tuple(out)


def _pattern(d: Any, path: str) -> Pattern:
    _fields(d, path, _PATTERN)
    parts = []
    for j, part in enumerate(d["parts"]):
        where = f"{path}.parts[{j}]"
        _expect(part, where, "list")
        if len(part) != 3 or part[0] not in ("lit", "cap"):
            raise PlanError(
                f'{where}: expected ["lit", text, null] or ["cap", name, type], got {_short(part)}'
            )
        _expect(part[1], f"{where}[1]", "str")
        _expect(part[2], f"{where}[2]", "str", "null")
        parts.append(tuple(part))
    return Pattern(d["text"], tuple(parts))


def _node(d: Any, path: str) -> Node:
    _fields(d, path, _NODE, optional=("exprs",))
    return Node(
        d["op"],
        _strings(d["inputs"], f"{path}.inputs"),
        _strings(d["outputs"], f"{path}.outputs"),
        tuple(
            _read_expr(_pair(x, f"{path}.params[{j}]", ("any",)), _PARAM) for j, x in enumerate(d["params"])
        ),
        Span.from_location(d["where"]),
        tuple(
            _read_expr(_pair(x, f"{path}.exprs[{j}]", ("object",)), _SOURCE)
            for j, x in enumerate(_expect(d.get("exprs", []), f"{path}.exprs", "list"))
        ),
    )


# the JSON forms of a config expression: a parameter's (a list's items counted), a value's source
_PARAM = ({"$expr", "text", "$len"}, '{"$expr": ..., "text": "...", "$len": [...] for a list}')
_SOURCE = ({"$expr", "text"}, '{"$expr": ..., "text": "..."}')


def _read_expr(pair: tuple[str, Any], form: tuple[set[str], str]) -> tuple[str, Any]:
    """A parameter whose value is a config expression in `form`, typed (a ConfigExpr); one not in
    that form is left as it is, for the checks to refuse where they look at it."""
    name, v = pair
    if isinstance(v, dict) and "$expr" in v:
        try:
            return name, _config_expr(v, form)
        except OpError:
            pass
    return pair


def _config_expr(v: dict, form: tuple[set[str], str]) -> ConfigExpr:
    """The ConfigExpr a JSON object spells in `form`, or an OpError that says what is wrong."""
    keys, shown = form
    _expr_form(v, keys, shown)
    ir = from_json(v["$expr"])
    if "$len" in v and not (isinstance(ir, ListOf) and v["$len"] == v["$expr"]["items"]):
        raise OpError(_LEN)
    return ConfigExpr(ir, v["text"], "$len" in v)


_LEN = '"$len" lists the items of a list expression for a list parameter, and only there'


# ---- what the compiler checks, on a plan read back ----------------------------------------------


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
    from ..errors import CompileError
    from .compiler import check_convert, drop_rule, rename_rule

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
        raise PlanError(f"{path}.inputs: {_short(names)}: a rule has one or more inputs, each named once")
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
                f"{path}.{f.name}: {_short(_plain(a))}, but the rule's templates and ops give {_short(_plain(b))}"
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
    from ..spec.parse import parse_template
    from ..spec.source import Embedded, Source
    from .compiler import bounded_template, pattern_of

    text = "".join(a if k == "lit" else _capture_text(a, b) for k, a, b in p.parts)
    try:
        template = parse_template(text, Embedded(Source(text, path), 1, 1))
        parsed = pattern_of(template)
        bounded_template(template, {})  # matched in bounded time, as a compiled spec's templates
    except ConvspecError as exc:
        raise PlanError(f"{path}: template {text!r}: {exc.message}", hint=exc.hint) from None
    if parsed.parts != p.parts:
        raise PlanError(f"{path}.parts: {_short(_plain(p.parts))} do not spell one template (as {text!r})")


def _capture_text(name: str, typ: str | None) -> str:
    base, offset = split_offset(name)
    return "{" + base + (f":{typ}" if typ else "") + (f"{offset:+d}" if offset else "") + "}"


def _check_nodes(r: PlanRule, path: str, config: dict | None, every_param: bool) -> None:
    """Each op: known, with its number of inputs, its parameters (values or config expressions) and
    the number of values it yields; each value defined once, before it is used. Compiling writes
    every parameter of an op; an op's inverse only those it needs (`every_param` False)."""
    from ..ops.base import REQUIRED
    from .compiler import MAX_OP_VALUES, check_arity, check_param, find_op, values_yielded

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


def _is_expr(v: Any) -> bool:
    """A config expression: typed, or one reading left as written (the checks refuse it)."""
    return isinstance(v, ConfigExpr) or (isinstance(v, dict) and "$expr" in v)


def _typed(v: Any, form: tuple[set[str], str]) -> ConfigExpr:
    """v as a ConfigExpr; an OpError saying what is wrong with one left as written."""
    if isinstance(v, ConfigExpr):
        return v
    _config_expr(thaw(v), form)
    raise OpError("a config expression in a plan is a ConfigExpr (convspec.compile.expr), not a dict")


def _check_expr(v: Any, op, p, config: dict | None) -> None:
    """A config expression left for bind: only where compiling leaves one (no config; a parameter
    that may wait for it), in the form the compiler writes (the spec IR, its text, a list's items)."""

    if config is not None:
        raise OpError("a config expression, but the plan was compiled with a config (which evaluates them)")
    if p.kind in ("capture", "dtype"):
        raise OpError(f"a {p.kind} parameter is written out in the spec, never a config expression")
    v = _typed(v, _PARAM)
    if v.counted != (p.kind in ("ints", "shape") and isinstance(v.ir, ListOf)):
        raise OpError(_LEN)


def _check_sources(node: Node, at: str, config: dict | None) -> None:
    """The config expressions that parameters compiled with a config were evaluated from (what the
    transformers exporter reads): only in a plan compiled with a config, one per parameter given,
    each giving that parameter's value with the plan's config."""
    from .evaluate import evaluate

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
            v = _typed(v, _SOURCE)
            if v.counted:
                raise OpError(f"a config expression is {_SOURCE[1]}")
            value = evaluate(v.ir, config)
        except (OpError, ConfigError) as exc:
            raise PlanError(f"{where}[1]: {exc.message}", hint=exc.hint) from None
        if _plain(value) != _plain(given[name]):
            raise PlanError(
                f"{where}[1]: {v.text} is {_short(value)} with the plan's config, but {name} is "
                f"{_short(given[name])}"
            )


def _expr_form(v: dict, keys: set[str], form: str) -> None:
    """A config expression as the compiler writes it: the spec IR of one that needs the config, and
    its text."""
    from pydantic import TypeAdapter, ValidationError

    from ..spec.model import Expr
    from ..spec.parse import MAX_EXPR_DEPTH

    if set(v) - keys or "$expr" not in v or not isinstance(v.get("text"), str):
        raise OpError(f"a config expression is {form}")
    if _depth(v["$expr"]) > MAX_EXPR_DEPTH:
        raise OpError(f"the expression is nested more than {MAX_EXPR_DEPTH} deep")
    try:
        expr = TypeAdapter(Expr).validate_python(v["$expr"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise OpError(f"not an expression: {where + ': ' if where else ''}{first['msg']}") from None
    if expr.model_dump() != v["$expr"] or not needs_config(from_json(v["$expr"])):
        raise OpError("not an expression as the compiler writes it (one that needs the config)")


def _depth(e: Any) -> int:
    """How deeply JSON data nests, without recursion."""
    deepest, stack = 0, [(e, 1)]
    while stack:
        x, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(x, dict):
            stack.extend((y, d + 1) for y in x.values())
        elif isinstance(x, list):
            stack.extend((y, d + 1) for y in x)
    return deepest


def _check_inverse(plan: Plan) -> None:
    """The inverse a plan records is the one the compiler derives: a forward plan's inverse rules,
    the reason it has none, why it is lossy; an inverse plan's rules, from its forward rules."""
    from .compiler import inverse_of

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
        raise PlanError(f"{name}: {_short(_plain(a))}, but inverting the rules gives {_short(_plain(b))}")


def _short(v: Any) -> str:
    try:
        return reprlib.repr(thaw(v))
    except ValueError:  # pragma: no cover - an int too long to show
        return f"a {type(v).__name__} too large to show"
