"""The lark front end: DSL text, key templates and op expressions -> Spec IR."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from lark import Lark, Token, Tree, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ..errors import SpecSyntaxError, SpecValidationError
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
    Ref,
    Rename,
    Spec,
    Str,
    Template,
)
from .source import MAX_SPEC_CHARS, Embedded, Source

CAPTURE_TYPES = ("path", "path?", "int", "seg")
MAX_EXPR_DEPTH = 64
MAX_INT_BITS = 64  # the evaluator's bound; a literal past it could only overflow later

# What lark calls a terminal, as a person would say it.
_TOKEN_NAMES = {
    "TEMPLATE": "a key template",
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": 'a "quoted string"',
    "TLIT": "template text",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "COMMA": "','",
    "EQUAL": "'='",
    "COLON": "':'",
    "DOT": "'.'",
    "MINUS": "'-'",
    "PLUS": "'+'",
    "STAR": "'*'",
    "PERCENT": "'%'",
    "$END": "the end of the input",
}


@cache
def _parser() -> Lark:
    grammar = resources.files("convspec.spec").joinpath("grammar.lark").read_text()
    return Lark(
        grammar,
        start=["spec", "template", "expr"],
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
    )


def _terminal_text(name: str) -> str:
    if name in _TOKEN_NAMES:
        return _TOKEN_NAMES[name]
    for term in _parser().terminals:  # anonymous terminals such as '->' and '??' by their text
        if term.name == name and term.pattern.type == "str":
            return f"'{term.pattern.value}'"
    return f"'{name.lower()}'" if name.isupper() else name


def _describe_expected(expected: set[str]) -> str:
    names = sorted({_terminal_text(t) for t in expected})
    if len(names) > 8:
        names = names[:8] + ["..."]
    return ", ".join(names)


def _syntax_error(exc: UnexpectedInput, where: Source | Embedded, what: str) -> SpecSyntaxError:
    line, col = getattr(exc, "line", 1) or 1, getattr(exc, "column", 1) or 1
    if isinstance(exc, UnexpectedCharacters):
        ch = exc.char
        msg = f"unexpected character {ch!r} in {what}"
        expected = getattr(exc, "allowed", None) or set()
    elif isinstance(exc, UnexpectedEOF):
        msg = f"{what} ends too early"
        expected = set(exc.expected)
        line, col = _end_position(where)
    elif isinstance(exc, UnexpectedToken):
        tok = exc.token
        if tok.type == "$END":
            msg = f"{what} ends too early"
            line, col = _end_position(where)
        else:
            msg = f"unexpected {tok.value!r} in {what}"
        expected = set(exc.expected)
    else:  # pragma: no cover - lark has no other kinds
        msg, expected = f"cannot parse {what}", set()
    hint = f"expected {_describe_expected(expected)}" if expected else None
    return SpecSyntaxError(msg, span=where.span(line, col), hint=hint)


def _end_position(where: Source | Embedded) -> tuple[int, int]:
    text = where.text if isinstance(where, Source) else where.string
    lines = text.splitlines() or [""]
    return len(lines), len(lines[-1]) + 1


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
        raise _syntax_error(exc, where, "key template") from None
    parts: list[Lit | Cap] = []
    seen: set[str] = set()
    for child in tree.children:
        if isinstance(child, Token):
            parts.append(Lit(text=str(child), span=where.span(1, child.column)))
            continue
        name_tok, type_tok, opt_tok, offset_tok = child.children
        span = where.span(1, name_tok.column)
        ctype = str(type_tok) + ("?" if opt_tok is not None else "") if type_tok is not None else None
        if ctype is not None and ctype not in CAPTURE_TYPES:
            raise SpecValidationError(
                f"unknown capture type {ctype!r} for {{{name_tok}}}",
                span=where.span(1, type_tok.column),
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
            offset = _int64(str(offset_tok), str(offset_tok), "offset", where.span(1, offset_tok.column))
        parts.append(Cap(name=str(name_tok), type=ctype, offset=offset, span=span))
    for i, part in enumerate(parts):
        if isinstance(part, Cap) and part.type in ("path", "path?"):
            before_ok = i == 0 or (isinstance(parts[i - 1], Lit) and parts[i - 1].text.endswith("."))
            after_ok = i == len(parts) - 1 or (
                isinstance(parts[i + 1], Lit) and parts[i + 1].text.startswith(".")
            )
            if not (before_ok and after_ok):
                raise SpecValidationError(
                    f"path capture {{{part.name}:{part.type}}} must stand for whole segments",
                    span=part.span,
                    hint="put it at the start or end of the key, or between dots: '{p:path}.mlp.weight'",
                )
    return Template(text=text, parts=parts, span=where.span(1, 1))


# ---- op expressions --------------------------------------------------------------------------


def parse_expr(text: str, where: Embedded) -> Expr:
    """Parse an op expression such as `cat(stack(gate, over=e), stack(up, over=e), dim=1)`."""
    where.string = text
    if not text.strip():
        raise SpecValidationError("an expression is empty", span=where.span(1, 1))
    try:
        tree = _parser().parse(text, start="expr")
    except UnexpectedInput as exc:
        raise _syntax_error(exc, where, "expression") from None
    return _ExprBuilder(where).build(tree)


class _ExprBuilder:
    def __init__(self, where: Source | Embedded):
        self.where = where

    def span(self, node):
        meta = node if isinstance(node, Token) else node.meta
        return self.where.span(getattr(meta, "line", 1), getattr(meta, "column", 1))

    def build(self, node, depth: int = 0) -> Expr:
        if depth > MAX_EXPR_DEPTH:
            raise SpecValidationError(
                f"expression nested deeper than {MAX_EXPR_DEPTH} levels", span=self.span(node)
            )
        span = self.span(node)
        d = depth + 1
        if isinstance(node, Token):  # pragma: no cover - every token is wrapped by a rule
            raise SpecSyntaxError(f"unexpected {node!r}", span=span)
        kind = node.data
        ch = node.children
        if kind == "number":
            text = str(ch[0])
            whole = _int64(text.split(".")[0], text, "number", span)
            return Num(value=float(text) if "." in text else whole, span=span)
        if kind == "string":
            return Str(value=_unquote(str(ch[0])), span=span)
        if kind == "dotted":
            return Ref(path=[str(t) for t in ch], span=span)
        if kind == "list":
            items = [self.build(c, d) for c in ch if c is not None]
            return ListExpr(items=items, span=span)
        if kind == "neg":
            return Neg(operand=self.build(ch[0], d), span=span)
        ops = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%", "coalesce": "??"}
        if kind in ops:
            return BinOp(op=ops[kind], left=self.build(ch[0], d), right=self.build(ch[1], d), span=span)
        if kind == "call":
            return self.call(node, d)
        raise SpecSyntaxError(f"unexpected {kind}", span=span)  # pragma: no cover

    def call(self, node, depth: int) -> Call:
        name, *args = node.children
        pos: list = []
        kws: list[KwArg] = []
        for arg in args:
            if arg is None:
                continue
            if arg.data == "kwarg":
                kname, value = arg.children
                if any(k.name == str(kname) for k in kws):
                    raise SpecValidationError(
                        f"parameter {kname!s} is given twice to {name!s}()", span=self.span(kname)
                    )
                kws.append(KwArg(name=str(kname), value=self.build(value, depth), span=self.span(kname)))
            else:
                if kws:
                    raise SpecSyntaxError(
                        f"a positional argument follows a keyword argument in {name!s}()",
                        span=self.span(arg),
                        hint="put positional arguments first",
                    )
                pos.append(self.build(arg.children[0], depth))
        return Call(op=str(name), args=pos, kwargs=kws, span=self.span(node))


def _int64(digits: str, literal: str, what: str, span) -> int:
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
        raise _syntax_error(exc, source, "spec") from None
    return _DslBuilder(source).spec(tree)


class _DslBuilder(_ExprBuilder):
    def __init__(self, source: Source):
        super().__init__(source)
        self.source = source

    def template(self, tok: Token) -> Template:
        return parse_template(str(tok), Embedded(self.source, tok.line, tok.column))

    def spec(self, tree: Tree) -> Spec:
        header, *stmts = tree.children
        name_tok, doc_tok = header.children
        doc = _unquote(str(doc_tok)) if doc_tok is not None else ""
        model_types: list[str] = []
        base_prefix = ""
        rules = []
        for st in stmts:
            kind = st.data
            span = self.span(st)
            if kind == "model_types":
                model_types.extend(str(t) for t in st.children)
            elif kind == "doc":
                doc = _unquote(str(st.children[0]))
            elif kind == "base_prefix":
                base_prefix = str(st.children[0])
            elif kind in ("rename", "alias"):
                src, dst, unless = st.children
                rules.append(
                    Rename(
                        source=self.template(src),
                        target=self.template(dst),
                        unless=[self.template(t) for t in unless.children] if unless is not None else [],
                        one_way=kind == "alias",
                        span=span,
                    )
                )
            elif kind == "include":
                name, *prefixes, only = st.children
                if only is not None and str(only) not in ("renames", "converts"):
                    raise SpecValidationError(
                        f"include ... only {only}: expected 'renames' or 'converts'",
                        span=span,
                        hint="`only renames` takes the renames and aliases, `only converts` the converts",
                    )
                under = [
                    _unquote(str(p)) if str(p).startswith('"') else str(p) for p in prefixes if p is not None
                ]
                bad = [u for u in under if u and not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", u)]
                if bad:
                    raise SpecValidationError(
                        f"prefix {bad[0]!r} is not a dotted name",
                        span=span,
                        hint='a prefix is literal key text such as model.language_model, or "" for every key',
                    )
                rules.append(
                    Include(spec=str(name), under=under, only=str(only) if only else "all", span=span)
                )
            elif kind == "drop":
                rules.append(Drop(source=self.template(st.children[0]), span=span))
            elif kind == "convert":
                rules.append(self.convert(st))
        return Spec(
            name=str(name_tok),
            doc=doc,
            model_types=model_types,
            base_prefix=base_prefix,
            rules=rules,
            file=self.source.file,
            span=self.span(tree),
        )

    def convert(self, st: Tree) -> Convert:
        inputs, lets, outputs = [], [], []
        for part in st.children:
            if part.data == "binding":
                name, tok = part.children
                inputs.append(Binding(name=str(name), template=self.template(tok), span=self.span(name)))
            elif part.data == "let":
                *names, expr = part.children
                lets.append(Let(names=[str(n) for n in names], expr=self.build(expr), span=self.span(part)))
            else:
                targets_tree, body = part.children
                targets = [self.template(t) for t in targets_tree.children]
                if part.data == "output_expr":
                    outputs.append(Output(targets=targets, expr=self.build(body), span=self.span(part)))
                else:
                    chain = [self.call(c, 1) for c in body.children]
                    outputs.append(Output(targets=targets, chain=chain, span=self.span(part)))
        return Convert(inputs=inputs, lets=lets, outputs=outputs, span=self.span(st))
