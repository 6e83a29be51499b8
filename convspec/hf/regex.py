"""transformers' key regexes -> convspec key templates.

transformers renames by `re.search` + replace-first on regexes written by hand (`*.` wildcards,
`(\\d+)` groups, `(a|b)` alternations, lookarounds). A template matches whole keys, so a regex
becomes: an optional prefix capture, the matched text, an optional suffix capture. Alternations
become one template each; lookarounds become `unless` templates. Anything else is reported.
"""

from __future__ import annotations

import re
import re._constants as C
import re._parser as P
from dataclasses import dataclass, field


class NotExpressible(Exception):
    """A transformers pattern (or op) with no exact convspec equivalent; the message says why."""


@dataclass
class Match:
    """One alternative of a regex: whether it is anchored at the key start, its parts, and the
    text each backreference stands for."""

    anchored: bool = False
    parts: list[tuple] = field(default_factory=list)
    # ("lit", s) | ("cap", gid, "path" | "int") | ("wild", min) | ("digits", min)
    # | ("guard", +1 lookahead / -1 lookbehind, [literal texts the key must not have there])
    backrefs: dict[int, str] = field(default_factory=dict)  # group -> literal (expanded alternation)

    def text(self) -> str:
        return "".join(p[1] for p in self.parts if p[0] == "lit")

    def copy(self) -> Match:
        return Match(self.anchored, list(self.parts), dict(self.backrefs))


def preprocess(pattern: str) -> str:
    """What transformers does to a source pattern before compiling it: `*.` is `.*\\.`."""
    return pattern.replace("*.", r".*\.")


def parse(pattern: str) -> list[Match]:
    """Every alternative of `pattern` as a Match (alternations of literals are expanded)."""
    try:
        items = list(P.parse(pattern))
    except re.error as exc:
        raise NotExpressible(f"pattern {pattern!r} is not a valid regex: {exc}") from None
    out = []
    for m in _seq(items, pattern):
        m.parts = _merge(m.parts)
        out.append(m)
    return out


def _merge(parts: list[tuple]) -> list[tuple]:
    out: list[tuple] = []
    for p in parts:
        if p[0] == "lit" and out and out[-1][0] == "lit":
            out[-1] = ("lit", out[-1][1] + p[1])
        elif not (p[0] == "lit" and p[1] == ""):
            out.append(p)
    return out


def _literals(items, pattern: str) -> list[str]:
    """A sub-pattern that must be a plain literal or an alternation of literals."""
    alts = _seq(list(items), pattern)
    texts = []
    for m in alts:
        if any(p[0] != "lit" for p in m.parts) or m.anchored:
            raise NotExpressible(f"pattern {pattern!r}: a lookaround or alternation that is not literal text")
        texts.append("".join(p[1] for p in m.parts))
    return texts


def _seq(items, pattern: str) -> list[Match]:
    alts = [Match()]
    for op, av in items:
        if op is C.LITERAL:
            for m in alts:
                m.parts.append(("lit", chr(av)))
        elif op is C.ANY:  # an unescaped dot: meant as a dot in every mapping transformers ships
            for m in alts:
                m.parts.append(("lit", "."))
        elif op is C.AT and av is C.AT_BEGINNING:
            for m in alts:
                if any(p[0] != "guard" for p in m.parts):
                    raise NotExpressible(f"pattern {pattern!r}: '^' not at the start")
                m.anchored = True
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, _, sub = av
            sub = list(sub)
            if sub == [(C.ANY, None)]:
                for m in alts:
                    m.parts.append(("wild", lo))
            elif len(sub) == 1 and sub[0][0] is C.IN and list(sub[0][1]) == [(C.CATEGORY, C.CATEGORY_DIGIT)]:
                for m in alts:
                    m.parts.append(("digits", lo))
            else:
                raise NotExpressible(f"pattern {pattern!r}: a repetition other than .* .+ or \\d+")
        elif op is C.SUBPATTERN:
            gid, _, _, sub = av
            inner = _seq(list(sub), pattern)
            if gid is None:
                alts = [_join(a, b) for a in alts for b in inner]
                continue
            new = []
            for a in alts:
                for b in inner:
                    kinds = [p[0] for p in b.parts]
                    if all(k == "lit" for k in kinds):
                        m = _join(a, b)
                        m.backrefs[gid] = "".join(p[1] for p in b.parts)
                    elif kinds == ["wild"]:
                        m = a.copy()
                        m.parts.append(("cap", gid, "path"))
                    elif kinds == ["digits"]:
                        m = a.copy()
                        m.parts.append(("cap", gid, "int"))
                    elif all(k in ("lit", "digits", "wild") for k in kinds):
                        # a group of text and indices: the target repeats the same text and captures
                        m = _join(a, Match(parts=[("open", gid), *b.parts, ("close", gid)]))
                    else:
                        raise NotExpressible(f"pattern {pattern!r}: group {gid} is not text, .+ or \\d+")
                    new.append(m)
            alts = new
        elif op is C.BRANCH:
            _, branches = av
            alts = [_join(a, b) for a in alts for br in branches for b in _seq(list(br), pattern)]
        elif op is C.IN and all(k is C.LITERAL for k, _ in av):
            alts = [_join(a, Match(parts=[("lit", chr(c))])) for a in alts for _, c in av]
        elif op is C.ASSERT_NOT and _is_boundary(av):
            continue  # "not after a name character": the segment boundary templates assume anyway
        elif op is C.ASSERT_NOT:
            direction, sub = av
            texts = _literals(sub, pattern)
            for m in alts:
                m.parts.append(("guard", direction, texts))
        else:
            raise NotExpressible(f"pattern {pattern!r}: regex construct {op} has no template equivalent")
    return alts


def _is_boundary(av) -> bool:
    direction, sub = av
    sub = list(sub)
    if direction != -1 or len(sub) != 1:
        return False
    op, arg = sub[0]
    if op is C.LITERAL and chr(arg) == "_":
        return True
    return op is C.IN and list(arg) == [(C.CATEGORY, C.CATEGORY_WORD)]


def _join(a: Match, b: Match) -> Match:
    m = a.copy()
    empty = not any(p[0] != "guard" for p in m.parts)
    m.parts.extend(b.parts)
    m.backrefs.update(b.backrefs)
    m.anchored = m.anchored or (b.anchored and empty)
    return m


def target_text(target: str, match: Match, names: dict[int, str], spans: dict[int, str] | None = None) -> str:
    """A transformers replacement string as template text: `\\.` -> `.`, `\\1` -> `{name}`."""
    text = target.removeprefix("^").replace("\\.", ".")

    def sub(m: re.Match) -> str:
        gid = int(m.group(1))
        if gid in match.backrefs:
            return match.backrefs[gid]
        if gid in names:
            return "{" + names[gid] + "}"
        if spans and gid in spans:
            return spans[gid]
        raise NotExpressible(f"target {target!r} refers to group {gid}, which its source does not capture")

    text = re.sub(r"\\(\d)", sub, text)
    if re.search(r"[\\()\[\]|+^$]", re.sub(r"\{[^{}]*\}", "", text)):
        raise NotExpressible(f"target {target!r} is not plain text")
    return text
