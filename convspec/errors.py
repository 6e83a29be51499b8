"""Typed errors: every failure a user can cause is one of these, and renders as one clear message."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from .style import PLAIN, Style


@dataclass(frozen=True)
class Span:
    """Where something came from in a spec file: 1-based line and column."""

    file: str | None
    line: int
    col: int
    text: str | None = None  # the whole source line, for the caret display

    def location(self) -> str:
        return f"{self.file or '<spec>'}:{self.line}:{self.col}"

    def __str__(self) -> str:
        """How a plan shows where a rule or op was written: `file:line:col`; a place known only by
        name (line 0, as a plan read from JSON may hold) as its name."""
        if not self.line:
            return "<spec>" if self.file is None else self.file
        return self.location()

    @classmethod
    def from_location(cls, text: str) -> Span:
        """The Span that prints as `text` (a plan's JSON writes `str(span)`): `file:line:col` read
        back, else a place known only by name."""
        file, line, col = (text.rsplit(":", 2) + ["", ""])[:3]
        if line.isascii() and line.isdigit() and col.isascii() and col.isdigit() and len(line + col) < 40:
            span = cls(None if file == "<spec>" else file, int(line), int(col))
            if str(span) == text:
                return span
        return cls(None if text == "<spec>" else text, 0, 0)


def render_message(
    span: Span | None, label: str, message: str, hint: str | None, style: Style = PLAIN
) -> str:
    """`file:line:col: LABEL: message`, the source line with a caret under the column, and a hint."""
    lines = []
    if span is not None:
        lines.append(f"{style.bold(span.location())}: {label}: {message}")
        if span.text is not None:
            src = span.text.rstrip("\n").expandtabs(1)
            lines.append(f"    {src}")
            lines.append("    " + " " * max(span.col - 1, 0) + style("^", "bold", "green"))
    else:
        lines.append(f"{label}: {message}")
    if hint:
        lines.append(f"  {style.dim('hint')}: {hint}")
    return "\n".join(lines)


class Severity(StrEnum):
    """How bad a diagnostic is: an error fails `check` (exit 1); a warning or a note does not."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class ErrorLevel(Enum):
    """What the compiler does with an error (sqlglot's `ErrorLevel`): raise the first one, as the API
    and every command but `check` want, or collect every diagnostic, as `check` reports them."""

    IMMEDIATE = "immediate"
    COLLECT = "collect"


@dataclass(frozen=True)
class Diagnostic:
    """One problem found in a spec, as data: a stable code (lint's `E101`, ...), its severity, where,
    what and what to do. Lint's findings are made from these, never from the message's words."""

    code: str
    severity: Severity
    message: str
    span: Span | None = None
    hint: str | None = None


class ConvspecError(Exception):
    """Base of every error convspec raises on purpose."""

    code: str | None = None  # the stable diagnostic code of this kind of error, where it has one

    def __init__(
        self, message: str, *, span: Span | None = None, hint: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        if code is not None:
            self.code = code

    def diagnostic(self) -> Diagnostic:
        """This error as a diagnostic (an error whose kind has no code of its own is `E002`)."""
        return Diagnostic(self.code or "E002", Severity.ERROR, self.message, self.span, self.hint)

    def __str__(self) -> str:
        return self.render()

    def render(self, style: Style = PLAIN) -> str:
        """The message a person reads: location, message, the offending line with a caret, a hint."""
        return render_message(self.span, style.error("error"), self.message, self.hint, style)


class SpecError(ConvspecError):
    """A spec file is wrong: syntax, structure or meaning."""

    code = "E001"  # parse-error


class SpecSyntaxError(SpecError):
    """The text of a spec does not parse."""


class SpecValidationError(SpecError):
    """A spec parses but a value has the wrong type or shape."""


class CompileError(SpecError):
    """A spec is well formed but a static check of the compiler fails. `code` says which kind (lint's
    stable codes): `E002` unless the check is one lint names (`E101` overlap, `E102` unused binding)."""

    code = "E002"  # compile-error


# The codes of compile errors that lint reports under their own rule (lint.RULES has the rest).
OVERLAP = "E101"  # two converts, or two inputs of one, can claim one key
UNUSED = "E102"  # a capture, input or value is bound but never used


class ConfigError(ConvspecError):
    """The model config lacks a field, or has the wrong type, for an expression of the spec. `where`
    is the op the expression belongs to and `detail` the message without it, for reports that place
    the problem themselves (lint)."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        where: Span | str | None = None,
        detail: str | None = None,
    ):
        super().__init__(message, hint=hint)
        self.where = where
        self.detail = detail if detail is not None else message


class DeviceError(ConvspecError):
    """A device (`--device`, `device=`) that cannot be used: unknown, absent on this machine, or the
    meta device where the tensors' data is needed."""


class Problem(str):
    """One problem of a BindError: its text, and the number of the spec rule it is about (None when it
    is about no one rule), so that a report can point at the rule without reading the text."""

    rule: int | None

    def __new__(cls, text: str, rule: int | None = None) -> Problem:
        self = super().__new__(cls, text)
        self.rule = rule
        return self


class BindError(ConvspecError):
    """A checkpoint layout does not fit the plan; names the keys. Raised before any data is read."""

    code = "E103"  # bind-error

    def __init__(self, problems: list[str], *, hint: str | None = None):
        self.problems = list(problems)
        head = (
            self.problems[0] if len(self.problems) == 1 else f"{len(self.problems)} problems binding the plan"
        )
        super().__init__(head, hint=hint)

    def render(self, style: Style = PLAIN) -> str:
        if len(self.problems) == 1:
            return super().render(style)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        body = "\n".join(f"  - {p}" for p in shown)
        tail = f"\n  ... and {more} more" if more else ""
        hint = f"\n  hint: {self.hint}" if self.hint else ""
        return f"{style.error('error')}: {self.message}:\n{body}{tail}{hint}"


class NotInvertibleError(ConvspecError):
    """The plan cannot be undone exactly: names the rule and the op that loses information."""


class SpecNotFoundError(ConvspecError):
    """No built-in spec or file by that name."""


class TransformersMissing(ConvspecError):
    """A part that needs transformers (the importer, the exporter) ran where it is not installed."""


class PlanError(ConvspecError):
    """A plan read from JSON is not one convspec can run: names the field (`rules[2].nodes[0].op`)
    and what is wrong with it."""
