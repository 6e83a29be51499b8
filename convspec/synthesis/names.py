"""Names of a layout as templates (numbers taken out), and which names are alike: what the synthesis
search pairs by, compared per family of names within a budget."""

from __future__ import annotations

import difflib
import functools
import re
from collections import defaultdict
from dataclasses import dataclass

Shape = tuple[int, ...]


Layout = dict[str, tuple[Shape, str]]


NUMBER = re.compile(r"\d+")


SLOT = "#"


# capture names by the segment a number follows (model.layers.{i}, experts.{e}); else n, m, ...
CAPTURE_AFTER = {"layers": "i", "layer": "i", "h": "i", "blocks": "i", "block": "i", "experts": "e"}


@dataclass(frozen=True)
class Template:
    """A key with its numbers taken out: `model.layers.#.mlp.experts.#.w1.weight`."""

    segments: tuple[str, ...]

    @functools.cached_property
    def slots(self) -> int:
        return sum(s == SLOT for s in self.segments)

    def text(self, names: list[str], typed: bool) -> str:
        it = iter(names)
        return ".".join(
            (f"{{{next(it)}:int}}" if typed else f"{{{next(it)}}}") if s == SLOT else s for s in self.segments
        )

    def key(self, index: tuple[str, ...]) -> str:
        it = iter(index)
        return ".".join(next(it) if s == SLOT else s for s in self.segments)


Members = dict[tuple[str, ...], tuple[Shape, str]]


def templates(layout: Layout) -> dict[Template, Members]:
    """Every key of a layout under its template, by its numbers."""
    out: dict[Template, Members] = defaultdict(dict)
    for key, (shape, dtype) in layout.items():
        segs = key.split(".")
        index = tuple(s for s in segs if NUMBER.fullmatch(s))
        t = Template(tuple(SLOT if NUMBER.fullmatch(s) else s for s in segs))
        out[t][index] = (tuple(shape), dtype)
    return dict(out)


def capture_names(t: Template) -> list[str]:
    """The capture of each slot of `t`, named by the segment before it, distinct."""
    names, used = [], set()
    for k, s in enumerate(t.segments):
        if s != SLOT:
            continue
        prev = t.segments[k - 1] if k else ""
        name = CAPTURE_AFTER.get(prev, "n")
        base, n = name, 1
        while name in used:
            n += 1
            name = f"{base}{n}"
        used.add(name)
        names.append(name)
    return names


@functools.lru_cache(maxsize=1 << 16)  # every step asks of the same pairs again
def similarity(a: Template, b: Template) -> float:
    """How alike two names are, segment by segment: what ranks candidates."""
    return difflib.SequenceMatcher(None, a.segments, b.segments, autojunk=False).ratio()


@functools.lru_cache(maxsize=1 << 16)
def letters(a: Template, b: Template) -> float:
    """How alike two names are letter by letter (`wq` ~ `q_proj` more than ~ `o_proj`): ties' breaker."""
    return difflib.SequenceMatcher(None, ".".join(a.segments), ".".join(b.segments), autojunk=False).ratio()


def alike(a: Template, b: Template) -> bool:
    """Names alike enough to pair by: their segments, or their letters (`c_attn` ~ `attn`); decided
    on their families, so that names differing only in numbers are alike or not together."""
    return _alike_families(family(a), family(b))


MAX_NAME_PAIRS = 100_000  # family pairs one search compares by name (~2 s); past it, none pairs by name


class Names:
    """Which families are alike, each pair compared once per search, within MAX_NAME_PAIRS: layouts
    of thousands of unrelated names end unexplained in seconds, and the report says the budget ran out."""

    def __init__(self) -> None:
        self.seen: dict[tuple[Template, Template], bool] = {}  # both orders of each pair compared
        self.true: list[tuple[Template, Template]] = []
        self.spent = False

    def alike(self, a: Template, b: Template) -> bool:
        got = self.seen.get((a, b))
        if got is None:
            if len(self.seen) >= 2 * MAX_NAME_PAIRS:
                self.spent = True
                return False
            got = self.seen[(a, b)] = self.seen[(b, a)] = _alike_families(a, b)
            if got:
                self.true.append((a, b))
        return got

    def pairs(self, fl: dict, fr: dict):
        """The family pairs to visit: all of them, or once the budget is spent, those found alike."""
        if self.spent:
            for a, b in self.true:
                for x, y in ((a, b), (b, a)):
                    if x in fl and y in fr:
                        yield x, y
            return
        for fs in fl:
            for ft in fr:
                if self.spent:
                    return
                yield fs, ft


@functools.lru_cache(maxsize=1 << 16)
def _alike_families(a: Template, b: Template) -> bool:
    """`alike`, with difflib's cheap upper bounds first: most unrelated pairs stop there. By letters,
    the names must also share a word (`c_attn`, `attn`): random names match half their letters often
    enough by chance."""
    for x, y in ((a.segments, b.segments), (".".join(a.segments), ".".join(b.segments))):
        if isinstance(x, str) and not _words(a) & _words(b):
            continue
        m = difflib.SequenceMatcher(None, x, y, autojunk=False)
        if m.real_quick_ratio() >= ALIKE and m.quick_ratio() >= ALIKE and m.ratio() >= ALIKE:
            return True
    return False


def _words(t: Template) -> set[str]:
    return {w for s in t.segments for w in re.split(r"[_\W\d]+", s) if len(w) >= 2}


@functools.lru_cache(maxsize=1 << 18)
def family(t: Template) -> Template:
    """A template with the numbers inside segments taken out too (`block12` -> `block#`)."""
    return Template(tuple(NUMBER.sub(SLOT, s) for s in t.segments))


@functools.lru_cache(maxsize=1 << 18)
def digits(t: Template) -> tuple[str, ...]:
    """The numbers inside a template's segments (`block12.conv3` -> 12, 3): what pairs a family's names."""
    return tuple(n for s in t.segments if s != SLOT for n in NUMBER.findall(s))


FAMILY_PAIRS = 4096  # above this many pairs between two families, names pair only with their own numbers


class Family(list):
    """Templates of one family, with an index by their numbers, made once when first asked."""

    @functools.cached_property
    def by_digits(self) -> dict[tuple[str, ...], list[Template]]:
        out: dict[tuple[str, ...], list[Template]] = defaultdict(list)
        for t in self:
            out[digits(t)].append(t)
        return out


def families(templates, seen=None) -> dict[Template, Family]:
    """Templates by family (of the name `seen` gives each, if given): what `near` compares names by."""
    out: dict[Template, Family] = defaultdict(Family)
    for t in templates:
        out[family(seen(t) if seen else t)].append(t)
    return out


def near(left, right, names: Names, fits=lambda s, t: True, left_families=None, seen=(None, None)):
    """Pairs (s, t) of templates, one from each side, that `fits` and whose names are alike. Names are
    compared per pair of families, once (`encoder.block0` .. `encoder.block999` are one family), and a
    family pair found unalike is skipped whole: unrelated numbered layouts cost little, not n^2 ratios.
    `left_families`: the left side's `families`, made once by a caller that asks many times (members
    since removed from `left` are skipped). `seen`: how each side's names are read (a source name with
    the module path renames have shown replaced by the target's: `Search.seen`)."""
    fl = families(left, seen[0]) if left_families is None else left_families
    fr = families(right, seen[1])
    for fs, ft in names.pairs(fl, fr):
        ss, ts = fl[fs], fr[ft]
        if ss[0].slots != ts[0].slots:  # a family's templates have one number of slots
            continue
        if len(ss) * len(ts) > FAMILY_PAIRS:  # a numbered family: each name with its own numbers
            if len(ts) <= len(ss):
                block = ((s, t) for t in ts for s in ss.by_digits.get(digits(t), ()))
            else:
                block = ((s, t) for s in ss for t in ts.by_digits.get(digits(s), ()))
        else:
            block = ((s, t) for s in ss for t in ts)
        decided = None
        for s, t in block:
            if s not in left or not fits(s, t):
                continue
            if decided is None:
                decided = names.alike(fs, ft)
            if not decided:
                break
            yield s, t


# a pairing by shapes needs names at least this alike: unrelated layouts stay unexplained, even where
# shapes happen to agree (a spec that binds is not thereby right)
ALIKE = 0.5
