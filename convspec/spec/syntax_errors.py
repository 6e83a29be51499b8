"""lark's parse errors -> a SpecSyntaxError a person can act on.

Most errors say what came and what was expected. The mistakes spec authors make most (an `=` for
`->`, a rule without its target, an unclosed `{`, a missing `,` between arguments, a misspelt
keyword) are recognised the way lark's `UnexpectedInput.match_examples` does it: each is written
down as a few bad examples, and an error that leaves the parser in the same state, at the same kind
of token, as one of them gets that mistake's own message. The table of examples is built once, on
the first syntax error of a process, so a spec that parses pays nothing for it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import cache

from lark import Token, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ..errors import SpecSyntaxError
from .grammar import parser
from .source import Embedded, Source

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


def syntax_error(exc: UnexpectedInput, where: Source | Embedded, what: str) -> SpecSyntaxError:
    """The error for `exc`, raised parsing `what` ("spec", "key template" or "expression")."""
    line, col = getattr(exc, "line", 1) or 1, getattr(exc, "column", 1) or 1
    if isinstance(exc, UnexpectedCharacters):
        msg = f"unexpected character {exc.char!r} in {what}"
        expected = getattr(exc, "allowed", None) or set()
    elif isinstance(exc, UnexpectedEOF):
        msg = f"{what} ends too early"
        expected = set(exc.expected)
        line, col = _end_position(where)
    elif isinstance(exc, UnexpectedToken):
        if exc.token.type == "$END":
            msg = f"{what} ends too early"
            line, col = _end_position(where)
        else:
            msg = f"unexpected {exc.token.value!r} in {what}"
        expected = set(exc.expected)
    else:  # pragma: no cover - lark has no other kinds
        msg, expected = f"cannot parse {what}", set()
    hint = f"expected {_describe_expected(expected)}" if expected else None
    if what == "spec" and isinstance(exc, UnexpectedToken):
        msg, hint = known_mistake(exc) or (msg, hint)
    return SpecSyntaxError(msg, span=where.span(line, col), hint=hint)


def _terminal_text(name: str) -> str:
    if name in _TOKEN_NAMES:
        return _TOKEN_NAMES[name]
    text = _literal_terminals().get(name)
    if text is not None:  # anonymous terminals such as '->' and '??' by their text
        return f"'{text}'"
    return f"'{name.lower()}'" if name.isupper() else name


def _describe_expected(expected: set[str]) -> str:
    names = sorted({_terminal_text(t) for t in expected})
    if len(names) > 8:
        names = names[:8] + ["..."]
    return ", ".join(names)


def _end_position(where: Source | Embedded) -> tuple[int, int]:
    text = where.text if isinstance(where, Source) else where.string
    lines = text.splitlines() or [""]
    return len(lines), len(lines[-1]) + 1


@cache
def _literal_terminals() -> dict[str, str]:
    """Terminal name -> its literal text, for every terminal written as a string in the grammar."""
    return {t.name: t.pattern.value for t in parser().terminals if t.pattern.type == "str"}


@cache
def _keyword_terminals() -> dict[str, str]:
    """The literal terminals that are words: `rename`, `convert`, `let`, `ops`, ..."""
    return {name: text for name, text in _literal_terminals().items() if text.isidentifier()}


# ---- the mistakes authors make ---------------------------------------------------------------

_REWRITE = "write it as: rename SOURCE -> TARGET (alias alike); a key template has no spaces"
_OUTPUT = (
    "each output of a convert is a line '-> TARGETS = EXPR' or '-> TARGETS ops [CALLS]'; "
    "a convert's inputs are separated by ','"
)
_STATEMENTS = (
    "rename",
    "alias",
    "convert",
    "drop",
    "include",
    "doc",
    "model_types",
    "base_prefix",
    "quantization",
    "companion",
)

# mistake -> bad `.cspec` texts that show it; an error in the same parser state at the same kind of
# token is that mistake. The forms the tests pin to their general message (`=>` for `->` in a
# rename, a convert that reaches the end of the file without an output) are deliberately not here.
EXAMPLES: dict[str, list[str]] = {
    "rename_equals": ["spec s\nrename a = b\n", "spec s\nalias a = b\n"],
    "rename_no_arrow": [
        "spec s\nrename a b\n",
        "spec s\nalias {p:path}.a {p}.b\n",
        "spec s\nrename a\n",
        *(f"spec s\nrename a\n{kw} x\n" for kw in _STATEMENTS),
    ],
    "companion_no_arrow": [
        "spec s\nquantization q\ncompanion a b\n",
        "spec s\nquantization q\ncompanion a = b\n",
        "spec s\nquantization q\ncompanion a\n",
        *(f"spec s\nquantization q\ncompanion a\n{kw} x\n" for kw in _STATEMENTS),
    ],
    "output_arrow": [
        "spec s\nconvert x = a\n = b = x\n",
        "spec s\nconvert x = a\n => b = x\n",
        "spec s\nconvert x = a\nlet y = x\n = b = x\n",
        "spec s\nconvert x = a\nlet y = x\n => b = x\n",
        "spec s\nconvert x = a\n -> b = x\n = c = x\n",
        "spec s\nconvert x = a\n -> b = x\n => c = x\n",
    ],
    "output_no_arrow": [
        "spec s\nconvert x = a\n b = x\n",
        "spec s\nconvert x = a\nlet y = x\n b = x\n",
        *(f"spec s\nconvert x = a\n{kw} x\n" for kw in _STATEMENTS),
    ],
    "output_no_body": [
        "spec s\nconvert x = a\n -> b\n",
        *(f"spec s\nconvert x = a\n -> b\n{kw} x\n" for kw in _STATEMENTS),
    ],
    "unclosed_brace": [
        "spec s\nrename {p:path.a -> b\n",
        "spec s\nrename a -> {p.b\n",
        "spec s\nrename a -> b unless {p.c\n",
        "spec s\nrename a -> b unless c, {p.d\n",
        "spec s\ndrop {p.a\n",
        "spec s\nconvert x = {p.a\n",
        "spec s\nconvert x = a, y = {p.b\n",
        "spec s\nconvert x = a\n -> {p.b = x\n",
        "spec s\nconvert x = a\n -> b, {p.c = x\n",
    ],
    "between_arguments": [
        f"spec s\nconvert x = a\n -> b = {call}{end}"
        for call in (
            "f(x",
            "f(x, 1",
            'f(x, "s"',
            "f(g(x)",
            "f([x]",
            "f(k=x",
            "f(k=1",
            "f(x.y",
            "f([x",
            "f([1",
        )
        for end in (" y)\n", " 1)\n", ' "s")\n', "\n", "\ndrop c\n")
    ],
}


@cache
def _mistake_states() -> dict[tuple[int, str], tuple[str, ...]]:
    """(parser state, token type) -> the mistakes whose examples end there, built on the first syntax
    error. LALR merges states, so one state can serve several mistakes; each one's message checks
    what the parser accepts there (a ')' inside a call, a '->' after a convert's inputs)."""
    table: dict[tuple[int, str], tuple[str, ...]] = {}
    for mistake, texts in EXAMPLES.items():
        for text in texts:
            try:
                parser().parse(text, start="spec")
            except UnexpectedToken as exc:
                if mistake not in table.get(_key(exc), ()):
                    table[_key(exc)] = (*table.get(_key(exc), ()), mistake)
            else:  # pragma: no cover - an example that parses is a bug in the table
                raise AssertionError(f"the example of {mistake} parses: {text!r}")
    return table


def _key(exc: UnexpectedToken) -> tuple[int, str]:
    return getattr(exc.state, "position", exc.state), exc.token.type


def known_mistake(exc: UnexpectedToken) -> tuple[str, str] | None:
    """The message and hint of a recognised mistake, or None for the general ones."""
    tok = exc.token
    typo = _misspelt_keyword(exc)
    if typo is not None:
        return (
            f"unknown word {tok.value!r}: did you mean {typo!r}?",
            f"expected {_describe_expected(set(exc.expected))}",
        )
    for mistake in _mistake_states().get(_key(exc), ()):
        found = _MESSAGES[mistake](exc)
        if found is not None:
            return found
    return None


def _misspelt_keyword(exc: UnexpectedToken) -> str | None:
    """The keyword the parser expected here that the token's text is a near miss of, if any."""
    word = exc.token.value
    if exc.token.type == "$END" or not word.isidentifier():
        return None
    keywords = [_keyword_terminals()[t] for t in exc.accepts if t in _keyword_terminals()]
    swapped = [k for k in keywords if sorted(k) == sorted(word.lower())]  # `lte` for `let`
    close = swapped or difflib.get_close_matches(word.lower(), keywords, n=1, cutoff=0.75)
    return close[0] if close and close[0] != word else None


def _next_statement(tok: Token) -> bool:
    return tok.type == "$END" or tok.value in _STATEMENTS


def _accepts(exc: UnexpectedToken, *texts: str) -> bool:
    """Whether the parser would have taken one of these literal tokens here."""
    return any(_literal_terminals().get(name) in texts for name in exc.accepts)


def _after_inputs(exc: UnexpectedToken) -> bool:
    """Where a convert's next output may start: after its inputs, a `let` or an output, not in a call."""
    return _accepts(exc, "->") and not _accepts(exc, ")", "]")


def _rename_equals(exc: UnexpectedToken) -> tuple[str, str] | None:
    if not _accepts(exc, "->") or _accepts(exc, ","):
        return None
    return "'=' where '->' belongs: a rename maps its source to its target with '->'", _REWRITE


def _rename_no_arrow(exc: UnexpectedToken) -> tuple[str, str] | None:
    if not _accepts(exc, "->"):
        return None
    if _next_statement(exc.token):
        return "the rename or alias before this point has no '->' and no target", _REWRITE
    return f"missing '->' before {exc.token.value!r}", _REWRITE


def _companion_no_arrow(exc: UnexpectedToken) -> tuple[str, str] | None:
    if not _accepts(exc, "->"):
        return None
    hint = "write it as: companion WEIGHT -> COMPANION, ... (e.g. companion {w} -> {w}_scale_inv)"
    if _next_statement(exc.token):
        return "the companion statement before this point has no '->' and no companion", hint
    return f"missing '->' before {exc.token.value!r} in a companion statement", hint


def _output_arrow(exc: UnexpectedToken) -> tuple[str, str] | None:
    if exc.token.value not in ("=", "=>") or not _after_inputs(exc):
        return None  # template text that merely starts with them, or an `=` inside a call
    return f"an output of a convert starts with '->', not {exc.token.value!r}", _OUTPUT


def _output_no_arrow(exc: UnexpectedToken) -> tuple[str, str] | None:
    if not _after_inputs(exc):
        return None
    if _next_statement(exc.token):
        return (
            "the convert before this point has no output: its inputs must be followed by '-> TARGETS = EXPR'",
            _OUTPUT,
        )
    return (
        f"missing '->' before the output {exc.token.value!r}",
        _OUTPUT,
    )


def _between_arguments(exc: UnexpectedToken) -> tuple[str, str] | None:
    """After an argument of a call or an item of a list: a missing ',', or a missing ')' or ']'."""
    if not _accepts(exc, ",") or not _accepts(exc, ")", "]"):
        return None  # not inside a call or a list
    call = _accepts(exc, ")")
    hint = "write op arguments as f(a, b, dim=1) and lists as [a, b]"
    if _next_statement(exc.token):
        return (
            "an op call before this point is not closed: ')' is missing"
            if call
            else "a list before this point is not closed: ']' is missing"
        ), hint
    return (
        f"missing ',' before {exc.token.value!r}: {'arguments' if call else 'list items'} are separated by commas",
        hint,
    )


_MESSAGES: dict[str, Callable[[UnexpectedToken], tuple[str, str] | None]] = {
    "rename_equals": _rename_equals,
    "rename_no_arrow": _rename_no_arrow,
    "companion_no_arrow": _companion_no_arrow,
    "output_arrow": _output_arrow,
    "output_no_arrow": _output_no_arrow,
    "output_no_body": lambda exc: (
        "the output before this point has no expression: its targets must be followed by '= EXPR' or 'ops [CALLS]'",
        _OUTPUT,
    ),
    "unclosed_brace": lambda exc: (
        "unclosed '{' in a key template",
        "close each capture with '}', as in {p:path}.weight; a key template has no spaces",
    ),
    "between_arguments": _between_arguments,
}
