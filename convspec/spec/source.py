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

    def __init__(self, source: Source, line: int, col: int, pieces: list[tuple[int, int, int]] | None = None):
        self.source = source
        self.line = line  # 1-based position of the string's first character
        self.col = col
        self.pieces = pieces  # for folded block scalars: (offset in string, file line, file col)

    @staticmethod
    def block(source: Source, first_line: int, last_line: int) -> Embedded:
        """A folded or literal YAML block scalar: each source line's text joined by one character."""
        pieces, offset = [], 0
        for ln in range(first_line, last_line + 1):
            text = source.lines[ln - 1] if ln <= len(source.lines) else ""
            if not text.strip():
                continue
            indent = len(text) - len(text.lstrip())
            pieces.append((offset, ln, indent + 1))
            offset += len(text.strip()) + 1
        if not pieces:
            pieces = [(0, first_line, 1)]
        return Embedded(source, pieces[0][1], pieces[0][2], pieces)

    def span(self, line: int, col: int) -> Span:
        if self.pieces is not None and line == 1:
            start, ln, c = max((p for p in self.pieces if p[0] <= col - 1), default=self.pieces[0])
            return self.source.span(ln, c + (col - 1 - start))
        if line == 1:
            return self.source.span(self.line, self.col + col - 1)
        return self.source.span(self.line + line - 1, col)
