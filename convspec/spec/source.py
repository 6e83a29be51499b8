"""Spec source text and the spans that point into it."""

from __future__ import annotations

from ..errors import Span


class Source:
    """The text of one spec file, so errors can quote the offending line."""

    def __init__(self, text: str, file: str | None):
        self.text = text
        self.file = file
        self.lines = text.splitlines()

    def span(self, line: int, col: int) -> Span:
        text = self.lines[line - 1] if 1 <= line <= len(self.lines) else None
        return Span(self.file, line, col, text)


class Embedded:
    """A string embedded in a larger source (a YAML scalar): maps its positions to the file's."""

    def __init__(self, source: Source, line: int, col: int):
        self.source = source
        self.line = line  # 1-based position of the string's first character
        self.col = col

    def span(self, line: int, col: int) -> Span:
        if line == 1:
            return self.source.span(self.line, self.col + col - 1)
        return self.source.span(self.line + line - 1, col)
