"""Spec source text and the spans that point into it."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConvspecError, Span, SpecSyntaxError
from ..io.sidefile import read_capped

MAX_SPEC_CHARS = 2_000_000  # the largest built-in spec is ~20 KB; a hundred times the largest seen anywhere
MAX_SPEC_BYTES = 4 * MAX_SPEC_CHARS  # UTF-8 spends at most 4 bytes a character: a larger file cannot fit


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


def read_spec_text(path: str | Path) -> str:
    """A spec file's text; a file that is not UTF-8 is a syntax error at the first bad byte."""
    path = Path(path)
    if path.is_dir():
        raise ConvspecError(f"{path} is a directory, not a spec file", hint="pass a .yaml or .cspec file")
    data = read_capped(path, MAX_SPEC_BYTES, what="spec file")  # a pipe or device is refused, not read
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8", errors="replace")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        raise SpecSyntaxError(
            f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x})",
            span=Span(str(path), line, col),
            hint="save the spec as UTF-8",
        ) from None
