"""The comments of a spec file, which both parsers drop: found by scanning the text, and attached by
line number to the part of the spec they sit on or precede, so the emitters can write them back.

A *slot* names one part of a spec that the canonical layouts put on a line of its own (or share):
`("doc",)` for a top-level field; `(i, "head")` for rule i's first line; `(i, "to")`, `(i, "unless")`,
`(i, "under")`, `(i, "only")`, `(i, "let")`, `(i, "ops")` for its other keys; `(i, "in", j)`,
`(i, "let", j)`, `(i, "out", j)` for the j-th input, let and output of a convert.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field

import yaml
from lark import Token, Tree

from .parse import _parser

Slot = tuple[str | int, ...]


@dataclass
class Attached:
    """The comments of one slot: whole lines above it, and one comment at the end of its line."""

    above: list[str] = field(default_factory=list)
    trailing: str | None = None

    def add_trailing(self, text: str) -> None:
        """A line holds one trailing comment; a second one for the same slot goes above it."""
        if self.trailing is None:
            self.trailing = text
        else:
            self.above.append(text)

    def lines(self) -> list[str]:
        return self.above + ([self.trailing] if self.trailing is not None else [])


@dataclass
class Comments:
    """Every comment of a file: the header before the spec, those attached to slots, the footer."""

    header: list[str] = field(default_factory=list)
    slots: dict[Slot, Attached] = field(default_factory=dict)
    footer: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        """Every comment's text, header first (for counting: nothing is ever dropped)."""
        return self.header + [t for a in self.slots.values() for t in a.lines()] + self.footer


@dataclass(frozen=True)
class _Raw:
    line: int  # 1-based
    text: str  # from '#' to the end of the line, trailing blanks removed
    trailing: bool  # code comes before it on its line


def extract_comments(text: str, syntax: str) -> Comments:
    """The comments of spec text that parses (`syntax` "yaml" or "cspec"), attached to slots."""
    if syntax == "yaml":
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raws = sorted(_yaml_raw(text, root) + _expr_comments(root), key=lambda r: r.line)
        return _attach(raws, _yaml_slots(root))
    tree = _parser().parse(text, start="spec")
    return _attach(_dsl_raw(text), _dsl_slots(tree))


def _attach(raws: list[_Raw], slots: list[tuple[Slot, int, int]]) -> Comments:
    """A comment inside a slot's lines belongs to that slot (the innermost: the latest to start);
    a whole-line comment between slots to the next one; before every slot, the header; after, the footer."""
    out = Comments()
    if not slots:  # pragma: no cover - a spec always has its `spec` line
        out.header = [r.text for r in raws]
        return out
    first = min(start for _, start, _ in slots)
    last = max(end for _, _, end in slots)
    for r in raws:
        inside = [s for s in slots if s[1] <= r.line <= s[2]]
        if inside:
            slot = max(inside, key=lambda s: s[1])[0]  # max keeps the first of equals: the outer part
        elif r.line < first:
            out.header.append(r.text)
            continue
        elif r.line > last:
            out.footer.append(r.text)
            continue
        elif not r.trailing:
            slot = min((s for s in slots if s[1] > r.line), key=lambda s: s[1])[0]
        else:
            slot = max((s for s in slots if s[1] <= r.line), key=lambda s: s[1])[0]
        att = out.slots.setdefault(slot, Attached())
        if r.trailing:
            att.add_trailing(r.text)
        else:
            att.above.append(r.text)
    return out


def _line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer("\n", text)]


# ---- YAML ------------------------------------------------------------------------------------

_YAML_COMMENT = re.compile(r"(?<![^ \t\n])#")  # '#' at a line start or after a blank


def _yaml_raw(text: str, root: yaml.Node | None) -> list[_Raw]:
    """Comments outside quoted and block scalars (the only places where ' #' is not a comment)."""
    protected = sorted(_protected(text, root))
    starts = [a for a, _ in protected]
    lines = _line_starts(text)
    out: list[_Raw] = []
    for m in _YAML_COMMENT.finditer(text):
        i = m.start()
        k = bisect_right(starts, i) - 1
        line = bisect_right(lines, i)
        if (k >= 0 and i < protected[k][1]) or (out and out[-1].line == line):
            continue  # inside a string, or after the comment that began on this line
        end = text.find("\n", i)
        comment = text[i : end if end >= 0 else len(text)].rstrip()
        out.append(_Raw(line, comment, bool(text[lines[line - 1] : i].strip())))
    return out


def _protected(text: str, root: yaml.Node | None) -> list[tuple[int, int]]:
    """The character ranges of quoted scalars and of block scalars' content."""
    ranges, stack, seen = [], [root] if root is not None else [], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif node.style in ("'", '"'):
            ranges.append((node.start_mark.index, node.end_mark.index))
        elif node.style in ("|", ">"):  # the header line `>-  # comment` may hold a comment
            ranges.append((text.find("\n", node.start_mark.index) + 1, node.end_mark.index))
    return ranges


def _expr_comments(root: yaml.MappingNode) -> list[_Raw]:
    """Comments of the expression language inside YAML strings (`|` blocks may hold them): the
    emitter writes expressions without them, so they go above the expression's line."""
    out = []
    section = next((v for k, v in root.value if k.value == "quantization"), None)
    if isinstance(section, yaml.MappingNode):
        out += _scalar_comments(v for k, v in section.value if k.value == "block")
    rules = next((v for k, v in root.value if k.value == "rules"), None)
    for item in rules.value if isinstance(rules, yaml.SequenceNode) else []:
        fields = {k.value: v for k, v in item.value}
        if "convert" not in fields:
            continue
        scalars = [
            v
            for key in ("let", "to")
            if isinstance(fields.get(key), yaml.MappingNode)
            for _, v in fields[key].value
        ]
        scalars += fields["ops"].value if "ops" in fields else []
        out += _scalar_comments(scalars)
    return out


def _scalar_comments(nodes) -> list[_Raw]:
    """The expression comments inside these YAML scalars, each at its scalar's first line."""
    out = []
    for node in nodes:
        if not isinstance(node, yaml.ScalarNode):
            continue
        for piece in node.value.split("\n"):
            i = _comment_start(piece)
            if i is not None:
                out.append(_Raw(node.start_mark.line + 1, piece[i:].rstrip(), False))
    return out


def _last_line(node: yaml.Node) -> int:
    """The 1-based last line holding the node's text (an end mark at column 0 is the next line's)."""
    end = node.end_mark
    line = end.line - 1 if end.column == 0 and end.line > node.start_mark.line else end.line
    return line + 1


def _yaml_slots(root: yaml.Node) -> list[tuple[Slot, int, int]]:
    slots: list[tuple[Slot, int, int]] = []
    for key, value in root.value:
        line = key.start_mark.line + 1
        if key.value == "quantization" and isinstance(value, yaml.MappingNode):
            slots.append((("quantization",), line, line))  # its keys have slots of their own
            slots.extend(_yaml_quant_slots(value))
            continue
        if key.value != "rules":
            slots.append(((key.value,), line, _last_line(value)))
            continue
        slots.append((("rules",), line, line))
        for i, item in enumerate(value.value):
            slots.extend(_yaml_rule_slots(i, item))
    return slots


def _yaml_quant_slots(section: yaml.MappingNode) -> list[tuple[Slot, int, int]]:
    """One slot per key of `quantization:`, and one per weight of its `companions:`."""
    slots: list[tuple[Slot, int, int]] = []
    for key, value in section.value:
        line = key.start_mark.line + 1
        if key.value == "companions" and isinstance(value, yaml.MappingNode):
            slots.append((("quantization", key.value), line, line))  # a comment below it: the companion's
            slots.extend(
                (("companion", j), k.start_mark.line + 1, _last_line(v))
                for j, (k, v) in enumerate(value.value)
            )
    return slots


def _yaml_rule_slots(i: int, item: yaml.MappingNode) -> list[tuple[Slot, int, int]]:
    """The head starts where the rule does, whatever key comes first; then one slot per line."""
    head: list[tuple[Slot, int, int]] = []
    rest: list[tuple[Slot, int, int]] = []
    first = item.start_mark.line + 1
    for key, value in item.value:
        line = key.start_mark.line + 1
        name = key.value
        if name == "convert":
            head.append(((i, "head"), first, line))
            rest.extend(
                ((i, "in", j), k.start_mark.line + 1, _last_line(v)) for j, (k, v) in enumerate(value.value)
            )
        elif name in ("rename", "alias", "drop", "include"):
            head.append(((i, "head"), first, _last_line(value)))
        elif name == "let" or (name == "to" and isinstance(value, yaml.MappingNode)):
            sub = "let" if name == "let" else "out"
            rest.append(((i, name), line, line))
            rest.extend(
                ((i, sub, j), k.start_mark.line + 1, _last_line(v)) for j, (k, v) in enumerate(value.value)
            )
        elif name == "to" and any(k.value == "convert" for k, _ in item.value):
            rest.append(((i, "out", 0), line, _last_line(value)))  # `to: KEY` beside `ops: [...]`
        else:  # to (of a rename), unless, under, only, ops
            rest.append(((i, name), line, _last_line(value)))
    return head + rest


# ---- the DSL ---------------------------------------------------------------------------------


def _dsl_raw(text: str) -> list[_Raw]:
    """`#` starts a comment except inside a "string" (strings end on their line; templates hold no `#`)."""
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        i = _comment_start(line)
        if i is not None:
            out.append(_Raw(n, line[i:].rstrip(), bool(line[:i].strip())))
    return out


def _comment_start(line: str) -> int | None:
    in_string = escaped = False
    for i, ch in enumerate(line):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "#":
            return i
    return None


def _dsl_slots(tree: Tree) -> list[tuple[Slot, int, int]]:
    header, *statements = tree.children
    slots: list[tuple[Slot, int, int]] = [(("spec",), header.meta.line, header.meta.end_line)]
    if header.children[1] is not None:
        slots.append((("doc",), header.meta.line, header.meta.end_line))
    i = companions = 0
    for st in statements:
        if st.data in ("model_types", "doc", "base_prefix", "quantization"):
            slots.append(((st.data,), st.meta.line, st.meta.end_line))
            continue
        if st.data == "companion":
            slots.append((("companion", companions), st.meta.line, st.meta.end_line))
            companions += 1
            continue
        slots.extend(_dsl_rule_slots(i, st))
        i += 1
    return slots


def _dsl_rule_slots(i: int, st: Tree) -> list[tuple[Slot, int, int]]:
    """A rename's head runs to its target; a convert's is its first line; then one slot per part."""
    start = st.meta.line
    if st.data in ("rename", "alias"):
        src, dst, unless = st.children
        slots = [((i, "head"), start, dst.end_line or dst.line)]
        if unless is not None:
            slots.append(((i, "unless"), unless.meta.line, unless.meta.end_line))
        return slots
    if st.data != "convert":
        return [((i, "head"), start, st.meta.end_line)]
    slots = [((i, "head"), start, start)]
    count = {"in": 0, "let": 0, "out": 0}
    for part in st.children:
        if isinstance(part, Token):  # pragma: no cover - a convert's children are all trees
            continue
        sub = {"binding": "in", "let": "let"}.get(part.data, "out")
        slots.append(((i, sub, count[sub]), part.meta.line, part.meta.end_line))
        count[sub] += 1
    return slots
