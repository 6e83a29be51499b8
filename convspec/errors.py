"""Typed errors: every failure a user can cause is one of these, and renders as one clear message."""

from __future__ import annotations

from dataclasses import dataclass

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


class ConvspecError(Exception):
    """Base of every error convspec raises on purpose."""

    def __init__(self, message: str, *, span: Span | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint

    def __str__(self) -> str:
        return self.render()

    def render(self, style: Style = PLAIN) -> str:
        """The message a person reads: location, message, the offending line with a caret, a hint."""
        return render_message(self.span, style.error("error"), self.message, self.hint, style)


class SpecError(ConvspecError):
    """A spec file is wrong: syntax, structure or meaning."""


class SpecSyntaxError(SpecError):
    """The text of a spec does not parse."""


class SpecValidationError(SpecError):
    """A spec parses but a value has the wrong type or shape."""


class CompileError(SpecError):
    """A spec is well formed but a static check of the compiler fails."""


class ConfigError(ConvspecError):
    """The model config lacks a field, or has the wrong type, for an expression of the spec."""


class DeviceError(ConvspecError):
    """A device (`--device`, `device=`) that cannot be used: unknown, absent on this machine, or the
    meta device where the tensors' data is needed."""


class BindError(ConvspecError):
    """A checkpoint layout does not fit the plan; names the keys. Raised before any data is read."""

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
