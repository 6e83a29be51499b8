"""Plans as JSON: the format's versions, the upgrade from each to the next, and reading a plan back
field by field; then the plan's own checks (compile/check.py) make it one the compiler could have
made (a plan from a file is input, like a spec).

The format is versioned by its `convspec_plan` field. Format 1 is what convspec wrote before the
version was counted: some fields were added to it over time, and a plan may lack them. Format 2
writes every field. Reading upgrades an older plan one version at a time, by the steps in
UPGRADES, then checks it: its shape field by field, then with the compiler's own checks (ops,
parameters, templates, captures, data flow, the recorded inverse). Anything else is a PlanError.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..errors import PlanError, Span
from ..ops import OpError
from ..ops.base import short
from .check import check_plan

if TYPE_CHECKING:
    from ..quantization import Quant
from .expr import PARAM_FORM, SOURCE_FORM, ConfigExpr, config_expr_json, read_config_expr
from .patterns import Pattern
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
        **({"quant": plan.quant.to_dict()} if plan.quant is not None else {}),
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
        raise PlanError(f"{MARKER}: {short(v)} is not a plan format version (1, 2, ...)")
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
    _fields(d, "", _PLAN, optional=("regex", "quant"))
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
        quant=_quant(d["quant"]) if d.get("quant") is not None else None,
    )


def _quant(d: Any) -> Quant:
    """A plan's quantization, every field checked (a plan file is untrusted input)."""
    from ..dtypes import DTYPES
    from ..quantization import SCHEMES, Quant

    _fields(
        d,
        "quant",
        {
            "scheme": ("str",),
            "companions": ("object",),
            "block": ("list", "null"),
            "dequantize": ("str", "null"),
        },
    )
    if d["scheme"] not in SCHEMES:
        raise PlanError(f"quant.scheme: {short(d['scheme'])} is not a scheme ({', '.join(SCHEMES)})")
    for w, cs in d["companions"].items():
        _strings(cs, f"quant.companions[{short(w)}]")
        if not cs or not all(cs):
            raise PlanError(
                f"quant.companions[{short(w)}]: a weight needs companions, each a non-empty suffix"
            )
    block = d["block"]
    if block is not None and (
        len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 1 << 20 for b in block)
    ):
        raise PlanError(f"quant.block: {short(block)} is not two block sizes between 1 and {1 << 20}")
    if d["dequantize"] is not None and d["dequantize"] not in DTYPES:
        raise PlanError(f"quant.dequantize: {short(d['dequantize'])} is not a dtype")
    return Quant.from_dict(d)


def _rule(d: Any, path: str) -> PlanRule:
    _fields(d, path, _RULE)
    if d["kind"] not in KINDS:
        raise PlanError(f"{path}.kind: {short(d['kind'])} is not a rule kind ({', '.join(KINDS)})")
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
                f'{where}: expected ["lit", text, null] or ["cap", name, type], got {short(part)}'
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
            _read_expr(_pair(x, f"{path}.params[{j}]", ("any",)), PARAM_FORM)
            for j, x in enumerate(d["params"])
        ),
        Span.from_location(d["where"]),
        tuple(
            _read_expr(_pair(x, f"{path}.exprs[{j}]", ("object",)), SOURCE_FORM)
            for j, x in enumerate(_expect(d.get("exprs", []), f"{path}.exprs", "list"))
        ),
    )


def _read_expr(pair: tuple[str, Any], form: tuple[set[str], str]) -> tuple[str, Any]:
    """A parameter whose value is a config expression in `form`, typed (a ConfigExpr); one not in
    that form is left as it is, for the checks to refuse where they look at it."""
    name, v = pair
    if isinstance(v, dict) and "$expr" in v:
        try:
            return name, read_config_expr(v, form)
        except OpError:
            pass
    return pair
