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
    def block(source: Source, first_line: int, last_line: int, value: str) -> Embedded:
        """A folded or literal YAML block scalar: each source line's text is found in the value.

        Folding joins lines with a space or a newline and keeps the extra indentation of more
        indented lines, so each line's text (less the block's indentation) is located in `value`.
        """
        lines = [
            (ln, source.lines[ln - 1])
            for ln in range(first_line, min(last_line, len(source.lines)) + 1)
            if source.lines[ln - 1].strip()
        ]
        if not lines:
            return Embedded(source, first_line, 1, [(0, first_line, 1)])
        indent = len(lines[0][1]) - len(lines[0][1].lstrip())
        pieces, pos = [], 0
        for ln, text in lines:
            if len(text) - len(text.lstrip()) < indent:
                break  # the block has ended
            content = text[indent:].rstrip()
            found = value.find(content, pos)
            if found < 0:
                continue
            pieces.append((found, ln, indent + 1))
            pos = found + len(content)
        return Embedded(source, lines[0][0], indent + 1, pieces or [(0, first_line, 1)])

    def span(self, line: int, col: int) -> Span:
        if self.pieces is not None:
            string = getattr(self, "string", "")
            offset = sum(len(s) + 1 for s in string.split("\n")[: line - 1]) + col - 1
            start, ln, c = max((p for p in self.pieces if p[0] <= offset), default=self.pieces[0])
            return self.source.span(ln, c + (offset - start))
        if line == 1:
            return self.source.span(self.line, self.col + col - 1)
        return self.source.span(self.line + line - 1, col)
