"""Expressions over the model config in a plan: typed, immutable IR nodes (a parameter that waits for
the config, or the expression a value was evaluated from), with one printer (`show`) and one JSON
form (the spec model's dump, `{"kind": ...}`, which plans have always written)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..ops import OpError


@dataclass(frozen=True)
class Num:
    value: int | float


@dataclass(frozen=True)
class Str:
    value: str


@dataclass(frozen=True)
class Ref:
    """A dotted name: `config.a.b` (a config field), or a bare name (`true`, a capture, a dtype)."""

    path: tuple[str, ...]


@dataclass(frozen=True)
class ListOf:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * // % ??
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Neg:
    operand: Expr


@dataclass(frozen=True)
class Call:
    """An op call where a value was expected: kept so that evaluating it says so."""

    op: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[tuple[str, Expr], ...] = ()


Expr = Num | Str | Ref | ListOf | BinOp | Neg | Call


@dataclass(frozen=True)
class ConfigExpr:
    """A parameter's expression over the model config, with its text as `show` prints it. `counted`:
    a list expression for a list parameter, whose items tell how many values there are before the
    config does (written as `"$len"` in JSON)."""

    ir: Expr
    text: str
    counted: bool = False

    @classmethod
    def of(cls, ir: Expr, counted: bool = False) -> ConfigExpr:
        return cls(ir, show(ir), counted and isinstance(ir, ListOf))

    @property
    def length(self) -> int | None:
        """How many items the list expression has, for a counted one."""
        return len(self.ir.items) if self.counted and isinstance(self.ir, ListOf) else None

    def __str__(self) -> str:
        return self.text


# ---- from the spec model, to and from JSON ---------------------------------------------------------


def from_spec(e: Any) -> Expr:
    """The typed IR of a spec model expression (`convspec.spec.model.Expr`)."""
    return from_json(e.model_dump())


def from_json(d: dict) -> Expr:
    """The typed IR of an expression's JSON form (checked by the caller to be one the spec model
    dumps)."""
    kind = d["kind"]
    if kind == "num":
        return Num(d["value"])
    if kind == "str":
        return Str(d["value"])
    if kind == "ref":
        return Ref(tuple(d["path"]))
    if kind == "list":
        return ListOf(tuple(from_json(i) for i in d["items"]))
    if kind == "binop":
        return BinOp(d["op"], from_json(d["left"]), from_json(d["right"]))
    if kind == "neg":
        return Neg(from_json(d["operand"]))
    if kind == "call":
        kwargs = tuple((k["name"], from_json(k["value"])) for k in d["kwargs"])
        return Call(d["op"], tuple(from_json(a) for a in d["args"]), kwargs)
    raise ValueError(f"unknown expression kind {kind!r}")


def to_json(e: Expr) -> dict:
    """The JSON form of an expression, key for key as the spec model dumps it."""
    if isinstance(e, Num):
        return {"kind": "num", "value": e.value}
    if isinstance(e, Str):
        return {"kind": "str", "value": e.value}
    if isinstance(e, Ref):
        return {"kind": "ref", "path": list(e.path)}
    if isinstance(e, ListOf):
        return {"kind": "list", "items": [to_json(i) for i in e.items]}
    if isinstance(e, BinOp):
        return {"kind": "binop", "op": e.op, "left": to_json(e.left), "right": to_json(e.right)}
    if isinstance(e, Neg):
        return {"kind": "neg", "operand": to_json(e.operand)}
    if isinstance(e, Call):
        kwargs = [{"name": k, "value": to_json(v)} for k, v in e.kwargs]
        return {"kind": "call", "op": e.op, "args": [to_json(a) for a in e.args], "kwargs": kwargs}
    raise TypeError(f"not an expression: {e!r}")  # pragma: no cover


def config_expr_json(c: ConfigExpr) -> dict:
    """A ConfigExpr as plans write it: `{"$expr": IR, "text": ..., "$len": [items] when counted}`."""
    out: dict[str, Any] = {"$expr": to_json(c.ir), "text": c.text}
    if c.counted:
        out["$len"] = out["$expr"]["items"]
    return out


# ---- the one printer, and what an expression reads ---------------------------------------------


def show(e: Expr) -> str:
    """An expression as the spec writes it (outer parentheses left off)."""
    s = _show(e)
    return s[1:-1] if s.startswith("(") and s.endswith(")") else s


def _show(e: Expr) -> str:
    if isinstance(e, Ref):
        return ".".join(e.path)
    if isinstance(e, Num):
        return str(e.value)
    if isinstance(e, Str):
        return repr(e.value)
    if isinstance(e, ListOf):
        return "[" + ", ".join(_show(i) for i in e.items) + "]"
    if isinstance(e, Neg):
        return "-" + _show(e.operand)
    if isinstance(e, BinOp):
        return f"({_show(e.left)} {e.op} {_show(e.right)})"
    return e.op + "(...)"


def children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, ListOf):
        return e.items
    if isinstance(e, BinOp):
        return (e.left, e.right)
    if isinstance(e, Neg):
        return (e.operand,)
    if isinstance(e, Call):
        return e.args + tuple(v for _, v in e.kwargs)
    return ()


def needs_config(e: Expr) -> bool:
    """Whether the expression reads a config field anywhere."""
    if isinstance(e, Ref):
        return e.path[:1] == ("config",)
    return any(needs_config(c) for c in children(e))


# ---- the JSON form read back (a plan from a file is input) ------------------------------------

# the JSON forms of a config expression: a parameter's (a list's items counted), a value's source
PARAM_FORM = ({"$expr", "text", "$len"}, '{"$expr": ..., "text": "...", "$len": [...] for a list}')
SOURCE_FORM = ({"$expr", "text"}, '{"$expr": ..., "text": "..."}')
LEN_MESSAGE = '"$len" lists the items of a list expression for a list parameter, and only there'


def read_config_expr(v: dict, form: tuple[set[str], str]) -> ConfigExpr:
    """The ConfigExpr a JSON object spells in `form` (PARAM_FORM, SOURCE_FORM), or an OpError that
    says what is wrong: the spec model's dump of an expression that needs the config, its text."""
    keys, shown = form
    _expr_form(v, keys, shown)
    ir = from_json(v["$expr"])
    if "$len" in v and not (isinstance(ir, ListOf) and v["$len"] == v["$expr"]["items"]):
        raise OpError(LEN_MESSAGE)
    return ConfigExpr(ir, v["text"], "$len" in v)


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
    ir = from_json(v["$expr"])
    if any(isinstance(e, Ref) and not e.path for e in _walk(ir)):
        raise OpError("not an expression: a name with no parts")
    if expr.model_dump() != v["$expr"] or not needs_config(ir):
        raise OpError("not an expression as the compiler writes it (one that needs the config)")


def _walk(e: Expr):
    """Every node of an expression, without recursion."""
    stack = [e]
    while stack:
        x = stack.pop()
        yield x
        stack.extend(children(x))


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
