"""The lark front end: DSL text, key templates and op expressions -> Spec IR.

lark parses; `Transformer`s with `v_args(meta=True)` build the IR bottom up, each node with the span
of its rule. Expressions are checked top down first (`_check_expr`), so an error is the first one in
reading order and deep nesting is refused before the builder recurses into it."""

from __future__ import annotations

import re
from typing import NamedTuple

from lark import Token, Transformer, Tree, UnexpectedInput, v_args
from lark.exceptions import VisitError

from ..errors import Span, SpecError, SpecSyntaxError, SpecValidationError
from . import quant
from .grammar import parser as _parser
from .lexicon import is_dotted_prefix
from .model import (
    Binding,
    BinOp,
    Call,
    Cap,
    Convert,
    Drop,
    Expr,
    Include,
    KwArg,
    Let,
    ListExpr,
    Lit,
    Neg,
    Num,
    Output,
    Quantization,
    Ref,
    Rename,
    Spec,
    Str,
    Template,
)
from .source import MAX_SPEC_CHARS, Embedded, Source
from .syntax_errors import syntax_error

CAPTURE_TYPES = ("path", "path?", "int", "seg")
MAX_EXPR_DEPTH = 64
MAX_INT_BITS = 64  # the evaluator's bound; a literal past it could only overflow later

# ---- key templates ---------------------------------------------------------------------------


def parse_template(text: str, where: Embedded) -> Template:
    """Parse a key template such as `{p:path}.experts.{e:int}.w1.weight`."""
    where.string = text
    if not text.strip():
        raise SpecValidationError("a key template is empty", span=where.span(1, 1))
    if text != text.strip() or any(c.isspace() for c in text):
        col = next(i for i, c in enumerate(text) if c.isspace()) + 1
        raise SpecSyntaxError(
            "a key template contains whitespace", span=where.span(1, col), hint="keys have no spaces"
        )
    try:
        tree = _parser().parse(text, start="template")
    except UnexpectedInput as exc:
        raise syntax_error(exc, where, "key template") from None
    return _transform(_TemplateBuilder(where, text), tree)


def _transform(builder: Transformer, tree: Tree):
    """Run a builder; an error a callback raises comes out as itself, not wrapped in lark's VisitError."""
    try:
        return builder.transform(tree)
    except VisitError as exc:
        raise exc.orig_exc from None


@v_args(meta=True)
class _TemplateBuilder(Transformer):
    """Template parse tree -> Template; the checks need the captures before each one, so `template` runs them."""

    def __init__(self, where: Embedded, text: str):
        super().__init__()
        self.where = where
        self.text = text

    def TLIT(self, tok: Token) -> Lit:
        return Lit(text=str(tok), span=self.where.span(1, tok.column))

    def capture(self, meta, children) -> tuple:
        return tuple(children)  # (name, type, `?`, offset): `template` checks it among the others

    def template(self, meta, children) -> Template:
        parts: list[Lit | Cap] = []
        seen: set[str] = set()
        for child in children:
            parts.append(child if isinstance(child, Lit) else self._cap(child, parts, seen))
        for i, part in enumerate(parts):
            if isinstance(part, Cap) and part.type in ("path", "path?"):
                _check_whole_segments(parts, i)
        return Template(text=self.text, parts=parts, span=self.where.span(1, 1))

    def _cap(self, raw: tuple, parts: list[Lit | Cap], seen: set[str]) -> Cap:
        name_tok, type_tok, opt_tok, offset_tok = raw
        span = self.where.span(1, name_tok.column)
        ctype = str(type_tok) + ("?" if opt_tok is not None else "") if type_tok is not None else None
        if ctype is not None and ctype not in CAPTURE_TYPES:
            raise SpecValidationError(
                f"unknown capture type {ctype!r} for {{{name_tok}}}",
                span=self.where.span(1, type_tok.column),
                hint="a capture type is one of: path (dot-separated segments), path? (zero or more "
                "segments), int (a decimal index), seg (one segment fragment)",
            )
        if str(name_tok) in seen:
            raise SpecValidationError(
                f"capture {{{name_tok}}} appears twice in one template",
                span=span,
                hint="give each capture its own name",
            )
        seen.add(str(name_tok))
        if parts and isinstance(parts[-1], Cap):
            raise SpecValidationError(
                f"captures {{{parts[-1].name}}} and {{{name_tok}}} touch: nothing tells where one ends",
                span=span,
                hint="separate captures with literal text such as '.'",
            )
        offset = 0
        if offset_tok is not None:
            offset = int64(str(offset_tok), str(offset_tok), "offset", self.where.span(1, offset_tok.column))
        return Cap(name=str(name_tok), type=ctype, offset=offset, span=span)


def _check_whole_segments(parts: list[Lit | Cap], i: int) -> None:
    """A path capture stands between dots or at an end of the key, never inside a segment."""
    part = parts[i]
    before_ok = i == 0 or (isinstance(parts[i - 1], Lit) and parts[i - 1].text.endswith("."))
    after_ok = i == len(parts) - 1 or (isinstance(parts[i + 1], Lit) and parts[i + 1].text.startswith("."))
    if not (before_ok and after_ok):
        raise SpecValidationError(
            f"path capture {{{part.name}:{part.type}}} must stand for whole segments",
            span=part.span,
            hint="put it at the start or end of the key, or between dots: '{p:path}.mlp.weight'",
        )


# ---- op expressions --------------------------------------------------------------------------


def parse_expr(text: str, where: Embedded) -> Expr:
    """Parse an op expression such as `cat(stack(gate, over=e), stack(up, over=e), dim=1)`."""
    where.string = text
    if not text.strip():
        raise SpecValidationError("an expression is empty", span=where.span(1, 1))
    try:
        tree = _parser().parse(text, start="expr")
    except UnexpectedInput as exc:
        raise syntax_error(exc, where, "expression") from None
    _check_expr(tree, where)
    return _transform(_ExprBuilder(where), tree)


def _span(where: Source | Embedded, node: Tree | Token):
    meta = node if isinstance(node, Token) else node.meta
    return where.span(getattr(meta, "line", 1), getattr(meta, "column", 1))


def _check_expr(node: Tree, where: Source | Embedded, depth: int = 0) -> None:
    """The checks of an expression tree, in reading order, before it is built: the first error found
    reading left to right is the one reported, and nesting is refused before the builder recurses."""
    if depth > MAX_EXPR_DEPTH:
        raise SpecValidationError(
            f"expression nested deeper than {MAX_EXPR_DEPTH} levels", span=_span(where, node)
        )
    if node.data == "call":
        _check_call(node, where, depth + 1)
        return
    if node.data == "number":
        text = str(node.children[0])
        int64(text.split(".")[0], text, "number", _span(where, node))
    for child in node.children:
        if isinstance(child, Tree):
            _check_expr(child, where, depth + 1)


def _check_call(node: Tree, where: Source | Embedded, depth: int) -> None:
    """An op call's arguments: positional ones first, each parameter named once."""
    name, *args = node.children
    keywords: list[str] = []
    for arg in args:
        if arg is None:
            continue
        if arg.data == "kwarg":
            kname, value = arg.children
            if str(kname) in keywords:
                raise SpecValidationError(
                    f"parameter {kname!s} is given twice to {name!s}()", span=_span(where, kname)
                )
            _check_expr(value, where, depth)
            keywords.append(str(kname))
        else:
            if keywords:
                raise SpecSyntaxError(
                    f"a positional argument follows a keyword argument in {name!s}()",
                    span=_span(where, arg),
                    hint="put positional arguments first",
                )
            _check_expr(arg.children[0], where, depth)


def _binop(op: str):
    def build(self, meta, children) -> BinOp:
        return BinOp(op=op, left=children[0], right=children[1], span=self._span(meta))

    return build


@v_args(meta=True)
class _ExprBuilder(Transformer):
    """Expression parse tree -> Expr, bottom up; `_check_expr` has already refused what is wrong."""

    def __init__(self, where: Source | Embedded):
        super().__init__()
        self.where = where

    def _span(self, meta):
        return self.where.span(getattr(meta, "line", 1), getattr(meta, "column", 1))

    def number(self, meta, children) -> Num:
        text = str(children[0])
        return Num(value=float(text) if "." in text else int(text), span=self._span(meta))

    def string(self, meta, children) -> Str:
        return Str(value=_unquote(str(children[0])), span=self._span(meta))

    def dotted(self, meta, children) -> Ref:
        return Ref(path=[str(t) for t in children], span=self._span(meta))

    def list(self, meta, children) -> ListExpr:
        return ListExpr(items=[c for c in children if c is not None], span=self._span(meta))

    def neg(self, meta, children) -> Neg:
        return Neg(operand=children[0], span=self._span(meta))

    add, sub, mul, floordiv, mod, coalesce = map(_binop, ("+", "-", "*", "//", "%", "??"))

    def kwarg(self, meta, children) -> KwArg:
        name, value = children
        return KwArg(name=str(name), value=value, span=self.where.span(name.line, name.column))

    def posarg(self, meta, children) -> Expr:
        return children[0]

    def call(self, meta, children) -> Call:
        name, *args = children
        pos = [a for a in args if a is not None and not isinstance(a, KwArg)]
        kws = [a for a in args if isinstance(a, KwArg)]
        return Call(op=str(name), args=pos, kwargs=kws, span=self._span(meta))


def int64(digits: str, literal: str, what: str, span) -> int:
    """A literal's decimal digits as an int, refused past 64 bits before int() meets thousands of them."""
    if len(digits.lstrip("+-").lstrip("0")) > 20 or int(digits).bit_length() > MAX_INT_BITS:
        shown = literal if len(literal) <= 24 else f"{literal[:20]}... ({len(literal)} characters)"
        raise SpecValidationError(f"{what} {shown} does not fit in {MAX_INT_BITS} bits", span=span)
    return int(digits)


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


# ---- the DSL ---------------------------------------------------------------------------------


def parse_dsl(text: str, file: str | None = None) -> Spec:
    """Parse a `.cspec` file into the Spec IR."""
    source = Source(text, file)
    if len(text) > MAX_SPEC_CHARS:
        raise SpecValidationError(f"spec is larger than {MAX_SPEC_CHARS} characters", span=source.span(1, 1))
    try:
        tree = _parser().parse(text, start="spec")
    except UnexpectedInput as exc:
        raise syntax_error(exc, source, "spec") from None
    _guard_expressions(tree, source)
    return _transform(_DslBuilder(source), tree)


def _guard_expressions(tree: Tree, source: Source) -> None:
    """Check each expression of the spec before it is built, and put an expression that fails in place
    as an `invalid_expr` node: the builder raises its error where the expression stands, so errors
    still come in reading order (a bad target template before a bad expression after it)."""
    for statement in tree.children[1:]:
        if statement.data == "quantization" and statement.children[1] is not None:
            try:
                _check_expr(statement.children[1], source)
            except SpecError as exc:
                statement.children[1] = Tree("invalid_expr", [exc])
        for part in statement.children if statement.data == "convert" else ():
            if part.data == "binding":
                continue
            body = part.children[-1]
            try:
                if part.data == "output_chain":
                    for call in body.children:
                        _check_call(call, source, 1)
                else:
                    _check_expr(body, source)
            except SpecError as exc:
                part.children[-1] = Tree("invalid_expr", [exc])


@v_args(meta=True)
class _DslBuilder(_ExprBuilder):
    """DSL parse tree -> Spec; statements give rules, or (field, value) pairs for the spec's header."""

    def __init__(self, source: Source):
        super().__init__(source)
        self.source = source

    def invalid_expr(self, meta, children):
        raise children[0]

    def TEMPLATE(self, tok: Token) -> Template:
        return parse_template(str(tok), Embedded(self.source, tok.line, tok.column))

    def header(self, meta, children) -> tuple[str, str]:
        name, doc = children
        return str(name), _unquote(str(doc)) if doc is not None else ""

    def model_types(self, meta, children) -> tuple[str, list[str]]:
        return "model_types", [str(t) for t in children]

    def doc(self, meta, children) -> tuple[str, str]:
        return "doc", _unquote(str(children[0]))

    def base_prefix(self, meta, children) -> tuple[str, str]:
        return "base_prefix", str(children[0])

    def quantization(self, meta, children) -> _Quant:
        scheme, block = children
        span = self._span(meta)
        block_span = block.span if block is not None else None
        return _Quant(quant.check_scheme(str(scheme), _span(self.source, scheme)), block, block_span, span)

    def companion(self, meta, children) -> _Companions:
        weight, *comps = children
        for t, what in [(weight, "weight template")] + [(c, "companion template") for c in comps]:
            quant.check_template(t, what)  # here, so its error comes before those of later statements
        return _Companions(weight, comps, self._span(meta))

    def rename(self, meta, children, one_way: bool = False) -> Rename:
        source, target, unless = children
        return Rename(
            source=source, target=target, unless=unless or [], one_way=one_way, span=self._span(meta)
        )

    def alias(self, meta, children) -> Rename:
        return self.rename(meta, children, one_way=True)

    def unless(self, meta, children) -> list[Template]:
        return list(children)

    def include(self, meta, children) -> Include:
        name, *prefixes, only = children
        span = self._span(meta)
        if only is not None and str(only) not in ("renames", "converts"):
            raise SpecValidationError(
                f"include ... only {only}: expected 'renames' or 'converts'",
                span=span,
                hint="`only renames` takes the renames and aliases, `only converts` the converts",
            )
        under = [_unquote(str(p)) if str(p).startswith('"') else str(p) for p in prefixes if p is not None]
        bad = [u for u in under if u and not is_dotted_prefix(u)]
        if bad:
            raise SpecValidationError(
                f"prefix {bad[0]!r} is not a dotted name",
                span=span,
                hint='a prefix is literal key text such as model.language_model, or "" for every key',
            )
        return Include(spec=str(name), under=under, only=str(only) if only else "all", span=span)

    def drop(self, meta, children) -> Drop:
        return Drop(source=children[0], span=self._span(meta))

    def binding(self, meta, children) -> Binding:
        name, template = children
        return Binding(name=str(name), template=template, span=self.where.span(name.line, name.column))

    def let(self, meta, children) -> Let:
        *names, expr = children
        return Let(names=[str(n) for n in names], expr=expr, span=self._span(meta))

    def targets(self, meta, children) -> list[Template]:
        return list(children)

    def chain(self, meta, children) -> list[Call]:
        return list(children)

    def output_expr(self, meta, children) -> Output:
        return Output(targets=children[0], expr=children[1], span=self._span(meta))

    def output_chain(self, meta, children) -> Output:
        return Output(targets=children[0], chain=children[1], span=self._span(meta))

    def convert(self, meta, children) -> Convert:
        return Convert(
            inputs=[c for c in children if isinstance(c, Binding)],
            lets=[c for c in children if isinstance(c, Let)],
            outputs=[c for c in children if isinstance(c, Output)],
            span=self._span(meta),
        )

    def spec(self, meta, children) -> Spec:
        (name, doc), *statements = children
        fields = {"doc": doc, "model_types": [], "base_prefix": ""}
        rules = []
        head: _Quant | None = None
        entries: list[_Companions] = []
        for st in statements:
            if isinstance(st, _Quant):
                if head is not None:
                    raise SpecValidationError(
                        "a second 'quantization' statement",
                        span=st.span,
                        hint=f"a spec has one quantization section (the first is at line {head.span.line})",
                    )
                head = st
            elif isinstance(st, _Companions):
                entries.append(st)
            elif isinstance(st, tuple):
                key, value = st
                fields[key] = fields[key] + value if key == "model_types" else value
            else:
                rules.append(st)
        fields["quantization"] = _quantization(head, entries)
        return Spec(name=name, **fields, rules=rules, file=self.source.file, span=self._span(meta))


class _Quant(NamedTuple):
    """A `quantization SCHEME [block EXPR]` statement, until the spec gathers its companions."""

    scheme: str
    block: Expr | None
    block_span: Span | None
    span: Span


class _Companions(NamedTuple):
    """A `companion WEIGHT -> COMPANION, ...` statement."""

    weight: Template
    companions: list[Template]
    span: Span


def _quantization(head: _Quant | None, entries: list[_Companions]) -> Quantization | None:
    """The section of a `quantization` statement and the `companion` statements, wherever they stand."""
    if head is None:
        if entries:
            raise SpecValidationError(
                "a 'companion' statement without a 'quantization' statement",
                span=entries[0].span,
                hint="declare the scheme first, e.g. quantization fp8_blocks",
            )
        return None
    parts = [(e.weight, e.companions, e.span) for e in entries]
    return quant.build(head.scheme, head.block, head.block_span, parts, head.span)
