"""A whitelist interpreter for parameter expressions over the model config. Never `eval`."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, Span
from ..frozen import thaw
from ..ops.base import short
from .expr import BinOp, Call, Expr, ListOf, Neg, Num, Ref, Str, needs_config

__all__ = ["evaluate", "needs_config"]

MAX_INT_BITS = 64


class Missing(Exception):
    """A config field is absent (or null); `a ?? b` catches it, anything else reports it."""

    def __init__(self, path: str):
        self.path = path


def evaluate(expr: Expr, config: dict | None, where: Span | str = "") -> Any:
    """Evaluate a parameter expression (typed IR, `convspec.compile.expr`) to a plain value."""
    try:
        return _eval(expr, config)
    except ConfigError as exc:  # every message names the parameter, as a missing field's does
        raise _at(where, exc.message, exc.hint, bare=not where) from None
    except Missing as m:
        if config is None:
            raise _at(
                where,
                f"this parameter needs {m.path}, but no config was given",
                "give the model config: --config FILE on the command line (or a config.json beside the checkpoint), config= in Python",
            ) from None
        raise _at(
            where,
            f"the config has no field {m.path}",
            f"add it to the config, or give a default: {m.path} ?? VALUE",
        ) from None


def _at(where: Span | str, detail: str, hint: str | None, bare: bool = False) -> ConfigError:
    """A ConfigError whose message leads with the op's location (unless `bare`), which it also
    carries typed."""
    message = detail if bare else f"{where}: {detail}"
    return ConfigError(message, hint=hint, where=where or None, detail=detail)


def _eval(e: Expr, config: dict | None) -> Any:
    if isinstance(e, Num):
        return _fits(e.value, "a number")
    if isinstance(e, Str):
        return e.value
    if isinstance(e, ListOf):
        return [_eval(i, config) for i in e.items]
    if isinstance(e, Neg):
        return -_int(_eval(e.operand, config), "-")
    if isinstance(e, Ref):
        return _ref(e.path, config)
    if isinstance(e, BinOp):
        return _binop(e, config)
    if isinstance(e, Call):
        raise ConfigError(f"an op call ({e.op}) cannot stand where a parameter value is expected")
    raise ConfigError(f"unknown expression kind {type(e).__name__}")  # pragma: no cover


def _ref(path: tuple[str, ...], config: dict | None) -> Any:
    if path[0] == "config":
        return _fits(_lookup(config, path), ".".join(path))
    if len(path) == 1:
        if path[0] == "true":
            return True
        if path[0] == "false":
            return False
        return _Name(path[0])
    raise ConfigError(f"unknown name {'.'.join(path)}: only config.<field> may be dotted")


def _binop(e: BinOp, config: dict | None) -> Any:
    op = e.op
    if op == "??":
        try:
            return _eval(e.left, config)
        except Missing:
            if config is None:  # no config at all is not "field absent": never default silently
                raise
            return _eval(e.right, config)
    a, b = _int(_eval(e.left, config), op), _int(_eval(e.right, config), op)
    if op in ("//", "%") and b == 0:
        raise ConfigError(f"division by zero in {op}")
    r = {"+": a + b, "-": a - b, "*": a * b}.get(op) if op in "+-*" else (a // b if op == "//" else a % b)
    return _fits(r)


class _Name(str):
    """A bare name in a parameter position: a capture, a dtype, or a typo the caller reports."""


def _lookup(config: dict | None, path: tuple[str, ...]) -> Any:
    """The config field at `path`, as a plain value (a plan's config is a frozen copy)."""
    if config is None:
        raise Missing(".".join(path))
    node: Any = config
    for i, part in enumerate(path[1:], start=1):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            raise Missing(".".join(path[: i + 1]))
        node = node[part]
    return thaw(node)


def _int(v: Any, op: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"'{op}' needs integers, got {short(v)}")
    return v


def _fits(v: Any, what: str = "") -> Any:
    """Every integer in or out of the arithmetic stays within 64 bits, so no product of two config
    values can grow without bound (a config dict may hold 10**10**6)."""
    if isinstance(v, list):
        for item in v:
            _fits(item, what)
    elif isinstance(v, int) and not isinstance(v, bool) and abs(v).bit_length() > MAX_INT_BITS:
        if not what:
            raise ConfigError(f"integer overflow: result has more than {MAX_INT_BITS} bits")
        raise ConfigError(
            f"integer overflow: {what} has {abs(v).bit_length()} bits, more than {MAX_INT_BITS}"
        )
    return v
