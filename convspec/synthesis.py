"""Spec synthesis: from a source layout and a target layout (keys, shapes, dtypes), the spec that maps
one to the other, cheapest explanation first (renames, stacks, concatenations, transposes), proved by
binding it both ways; what it cannot explain is reported, never guessed. `convspec infer`."""

from __future__ import annotations

import difflib
import functools
import itertools
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

Shape = tuple[int, ...]
Layout = dict[str, tuple[Shape, str]]
NUMBER = re.compile(r"\d+")
SLOT = "#"
MAX_TRANSFORMS_TRIED = 64  # value transforms a rename's data is tried with (rope: every head count)
MAX_PARTS_TRIED = 8  # the most alike candidates a join is looked for among (C(8, 4) = 70 tries at most)

MAX_LAYOUT_BYTES = 256 << 20  # a layout file of 10^6 keys is ~100 MB

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


def capture_names(t: Template, extra: dict[int, str] | None = None) -> list[str]:
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


MAX_NAME_PAIRS = 200_000  # family pairs one search compares by name (~2 s); past it, none pairs by name


class Names:
    """Which families are alike, each pair compared once per search, within MAX_NAME_PAIRS: layouts
    of thousands of unrelated names end unexplained in seconds, and the report says the budget ran out."""

    def __init__(self) -> None:
        self.seen: dict[tuple[Template, Template], bool] = {}
        self.true: list[tuple[Template, Template]] = []
        self.spent = False

    def alike(self, a: Template, b: Template) -> bool:
        got = self.seen.get((a, b))
        if got is None:
            if len(self.seen) >= MAX_NAME_PAIRS:
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


@dataclass
class Explained:
    """One rule of the synthesized spec, in YAML, and the source keys it explains."""

    yaml: str
    keys: int
    kind: str
    square: bool = False  # a rename of square 2-D weights: a transpose would fit the shapes too
    label: str = ""  # the source template, as a person reads it
    alternatives: list[str] = field(default_factory=list)  # other rules the shapes allow: data decides
    question: str = ""  # what is asked of this rule, while data has not decided it
    pair: tuple[Template, Template] | None = None  # a rename's source and target: data may re-pair them
    members: tuple = ()  # a rename's members (numbers, shapes, dtypes): what it may be re-paired within


@dataclass
class Synthesis:
    """What `infer` found: the spec's rules, the keys explained and not, decisions and questions."""

    rules: list[Explained] = field(default_factory=list)
    unexplained_source: Layout = field(default_factory=dict)
    unexplained_target: Layout = field(default_factory=dict)
    questions: list[str] = field(default_factory=list)
    decided: list[str] = field(default_factory=list)  # choices the data made (a checkpoint pair)
    heads: list = field(default_factory=list)  # module paths the renames moved (source, target)
    unchanged: int = 0

    def spec_text(self, name: str = "inferred", doc: str = "") -> str:
        head = [f"spec: {name}", f"doc: {doc or 'synthesized by convspec infer'}"]
        if not self.rules:
            return "\n".join(head) + "\nrules: []\n"
        body = "\n".join(r.yaml for r in self.rules)
        return "\n".join(head) + "\nrules:\n" + body + "\n"


def _q(s: str) -> str:
    return '"' + s + '"'


def _listed(names: list[str], most: int = 3) -> str:
    """Names for a question, the first few and how many more."""
    more = f", and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _shown(t: Template) -> str:
    return t.text(capture_names(t), False)


def _rename_yaml(s: Template, t: Template, n: int) -> str:
    names = capture_names(s)
    return (
        f"  - rename: {_q(s.text(names, True))}  # {n} key{'s' if n != 1 else ''}\n"
        f"    to: {_q(t.text(names, False))}"
    )


def _marked(s: Template, t: Template, rival_s: list[Template], rival_t: list[Template]) -> bool:
    """Whether the names settle a pairing among names of one shape: a segment of the source that no
    rival source has is in the target and in no rival target (`...q_proj` -> `...q_proj`, not
    `attn_q` -> `q_proj` beside `o_proj`: there only data can say which is which)."""
    for seg in s.segments:
        if seg == SLOT or any(seg in r.segments for r in rival_s):
            continue
        if seg in t.segments and not any(seg in r.segments for r in rival_t):
            return True
    return False


class Search:
    """The search, step by step, over the templates not yet explained on each side."""

    def __init__(self, source: Layout, target: Layout):
        self.src = templates(source)
        self.dst = templates(target)
        self.out = Synthesis()
        self._families: dict[int, dict] = {}
        self.names = Names()
        self.heads: list[tuple[tuple[str, ...], tuple[str, ...]]] = []  # source path -> target path
        self._sides: tuple = (None, None)
        self._named = False

    def learn_heads(self) -> None:
        """Module paths the renames so far agree on (`radio_model.model.blocks.#` -> `encoder.layer.#`,
        seen in two renames or more): later steps read source names with them replaced, so that a
        part under a renamed path (`blocks.#.attn.qkv.bias`) is compared as if it were already there."""
        counts: dict[tuple, int] = defaultdict(int)
        for r in self.out.rules:
            if r.pair is None or r.question:
                continue
            a, b = r.pair
            k = 0
            while k < min(len(a.segments), len(b.segments)) - 1 and a.segments[-1 - k] == b.segments[-1 - k]:
                k += 1
            if k and a.segments[:-k] != b.segments[:-k]:
                ha, hb = a.segments[:-k], b.segments[:-k]
                counts[(ha, hb)] += 1
                # a path the target nests deeper (`layers.#` -> `model.language_model.layers.#`),
                # seen in the start of a longer head (`layers.#.attention` -> `...layers.#.self_attn`)
                for at in range(1, len(hb)):
                    m = 0
                    while m < min(len(ha), len(hb) - at) and ha[m] == hb[at + m]:
                        m += 1
                    if m:
                        counts[(ha[:m], hb[: at + m])] += 1
                        break
                if (
                    SLOT in ha and SLOT in hb
                ):  # the paths up to the first number: `blocks.#` -> `model.layer.#`
                    i, j = ha.index(SLOT), hb.index(SLOT)
                    if (ha[: i + 1], hb[: j + 1]) != (ha, hb) and ha[: i + 1] != hb[: j + 1]:
                        counts[(ha[: i + 1], hb[: j + 1])] += 1
        best: dict[tuple, tuple[int, tuple]] = {}
        for (a, b), n in counts.items():
            if n >= 2 and n > best.get(a, (0, ()))[0]:
                best[a] = (n, b)
        self.heads = sorted(((a, b) for a, (_, b) in best.items()), key=lambda h: -len(h[0]))
        self.out.heads = self.heads

    def seen(self, t: Template) -> Template:
        """A source template as later steps read it: its module path replaced by the target's."""
        for a, b in self.heads:
            if t.segments[: len(a)] == a:
                return Template(b + t.segments[len(a) :])
        return t

    # ---- one-to-one ---------------------------------------------------------------------------

    def unchanged(self) -> None:
        for t in [t for t in self.src if self.dst.get(t) == self.src[t]]:
            self.out.unchanged += len(self.src.pop(t))
            del self.dst[t]

    def renames(self, settled: bool = False) -> None:
        """Template pairs with the same members (numbers, shapes, dtypes): renames, most alike first.
        `settled`: only those the names settle, the rest left to joins and stacks first (`attn.proj`
        may be `q_proj` by its shape, but `q_proj` is a part of `attn.qkv`)."""
        fits = lambda s, t: self.src[s] == self.dst[t]  # noqa: E731
        seen = self.seen
        pairs = [
            (similarity(seen(s), t), s, t)
            for s, t in near(self.src, self.dst, self.names, fits, seen=(seen, None))
        ]
        pairs.sort(key=lambda p: (-p[0], -letters(seen(p[1]), p[2]), p[1].segments, p[2].segments))
        taken_s, taken_t = set(), set()
        chosen = []
        for _, s, t in pairs:
            if s in taken_s or t in taken_t:
                continue
            rival_s = [p[1] for p in pairs if p[2] == t and p[1] != s]
            rival_t = [p[2] for p in pairs if p[1] == s and p[2] != t]
            unsettled = bool(rival_s or rival_t) and not _marked(s, t, rival_s, rival_t)
            if settled and unsettled:
                continue
            taken_s.add(s)
            taken_t.add(t)
            question = ""
            if unsettled:
                others = _listed([_shown(x) for x in dict.fromkeys(rival_t + rival_s)])
                question = (
                    f"{_shown(s)} -> {_shown(t)}: paired by name among names of one shape ({others}); "
                    "only data can confirm it"
                )
                self.out.questions.append(question)
            chosen.append((s, t, question))
        for s, t, question in chosen:
            self._rename(s, t, self.src.pop(s), question)
            del self.dst[t]

    def _rename(self, s: Template, t: Template, members: Members, question: str = "") -> None:
        n = len(members)
        names = capture_names(s)
        square = all(len(shape) == 2 and shape[0] == shape[1] for shape, _ in members.values())
        self.out.rules.append(
            Explained(
                _rename_yaml(s, t, n),
                n,
                "rename",
                square,
                s.text(names, False),
                question=question,
                pair=(s, t),
                members=tuple(sorted(members.items())),
            )
        )

    # ---- many-to-one and one-to-many ----------------------------------------------------------

    def stacks(self) -> None:
        """A target of leading dim N from source templates with one more number, running 0..N-1, of
        the target's shape without that dim: stack; several of them joined along a dim: cat(stack)."""
        self._by_slots = defaultdict(list)
        for s in self.src:
            self._by_slots[s.slots].append(s)
        for t in sorted(self.dst, key=lambda t: t.segments):
            mt = self.dst[t]
            found = self._stack_parts(t, mt)
            if found is None:
                continue
            parts, dim, extra = found
            names = capture_names(t)
            over = "e"
            n = sum(len(self.src[p]) for p, _, _ in parts)
            inputs = []
            for k, (p, pos, _) in enumerate(parts):
                pn = names[:pos] + [over] + names[pos:]
                inputs.append((f"x{k}" if len(parts) > 1 else "x", p.text(pn, True)))
            ins = "\n".join(f"      {v}: {_q(text)}" for v, text in inputs)
            head = f"  - convert:  # {n} keys\n{ins}\n    to:\n      {_q(t.text(names, False))}: "
            if len(parts) == 1:
                rule = Explained(head + f"stack({inputs[0][0]}, over={over})", n, "stack")
            else:
                sizes = [size for _, _, size in parts]
                stacks = [f"stack({v}, over={over})" for v, _ in inputs]
                orders = [
                    head + f"cat({', '.join(order)}, dim={dim}, {_sized(sizes)})"
                    for order in itertools.permutations(stacks)
                ]
                rule = Explained(orders[0], n, "stack")
                if len(set(sizes)) == 1:
                    rule.question = _order_question(t, [p for p, _, _ in parts])
                    self.out.questions.append(rule.question)
                    rule.alternatives = orders
            self.out.rules.append(rule)
            for p, _, _ in parts:
                del self.src[p]
            del self.dst[t]

    def _stack_parts(self, t: Template, mt: Members):
        shapes = {s for s, _ in mt.values()}
        if len(shapes) != 1:
            return None
        (shape,) = shapes
        if len(shape) < 2:
            return None
        dtype = next(iter(mt.values()))[1]
        n = shape[0]
        candidates = []  # (template, slot position of the stacked number, member shape)
        for s in self._by_slots.get(t.slots + 1, ()):
            ms = self.src.get(s)
            if ms is None:
                continue
            for pos in range(s.slots):
                groups: dict[tuple, dict[str, tuple]] = defaultdict(dict)
                for idx, v in ms.items():
                    groups[idx[:pos] + idx[pos + 1 :]][idx[pos]] = v
                if set(groups) != set(mt):
                    continue
                ok = all(
                    sorted(g, key=int) == [str(x) for x in range(n)] and len({v for v in g.values()}) == 1
                    for g in groups.values()
                )
                vals = {v for g in groups.values() for v in g.values()}
                if ok and len(vals) == 1 and next(iter(vals))[1] == dtype:
                    candidates.append((s, pos, next(iter(vals))[0]))
        # names alike first; else the structure alone (an index running 0..N-1 over parts of the
        # stacked shape) is the evidence, where it leaves few candidates
        named = [c for c in candidates if alike(self.seen(c[0]), t)]
        candidates = named or (candidates if len(candidates) <= 2 else [])
        if not candidates:
            return None
        inner = shape[1:]
        exact = [c for c in candidates if c[2] == inner]
        if exact:
            best = max(exact, key=lambda c: similarity(self.seen(c[0]), t))
            return [(best[0], best[1], None)], 0, None
        # parts joined along one dim of the stacked shape: the dims but one equal, the sizes adding up
        for d in range(len(inner)):
            fits = [c for c in candidates if len(c[2]) == len(inner) and all(
                a == b for k, (a, b) in enumerate(zip(c[2], inner, strict=True)) if k != d)]  # fmt: skip
            fits.sort(key=lambda c: -similarity(self.seen(c[0]), t))
            for size in range(2, min(len(fits), 4) + 1):
                for combo in _combinations(fits, size):
                    if sum(c[2][d] for c in combo) == inner[d] and len({c[1] for c in combo}) == 1:
                        ordered = _order_parts(t, list(combo))
                        return [(c[0], c[1], c[2][d]) for c in ordered], d + 1, None
        return None

    def joins(self, named: bool = False) -> None:
        """Targets made of sibling sources whose shapes add up along one dim (fused qkv): cat; and a
        source cut into sibling targets: split. `named`: only wholes whose name mentions every part
        (`w_qkv`: q, k, v), before any other (an `fc1` of w_qkv + out_proj rows is a coincidence)."""
        self._named = named
        for joining in (True, False):  # a whole target of source parts; then a whole source cut
            whole_side, part_side = (self.dst, self.src) if joining else (self.src, self.dst)
            self._sides = (self.seen, None) if joining else (None, self.seen)  # (parts, whole)
            self._families = {id(part_side): families(part_side, self._sides[0])}
            for w in sorted(whole_side, key=lambda t: t.segments):
                if w not in whole_side or self._counterpart(w, whole_side[w], part_side):
                    continue
                found = self._parts(w, whole_side[w], part_side)
                if found is None:
                    continue
                parts, dim = found
                names = capture_names(w)
                n = len(whole_side[w]) * (len(parts) if joining else 1)
                if joining:
                    ins = "\n".join(f"      x{k}: {_q(p.text(names, True))}" for k, p in enumerate(parts))
                    sizes = [next(iter(part_side[p].values()))[0][dim] for p in parts]
                    head = f"{ins}\n    to:\n      {_q(w.text(names, False))}: "
                    orders = [
                        head + f"cat({', '.join(order)}, dim={dim}, {_sized(sizes)})"
                        for order in itertools.permutations(f"x{k}" for k in range(len(parts)))
                    ]
                else:
                    sizes = [next(iter(part_side[p].values()))[0][dim] for p in parts]
                    orders = [
                        f"      x: {_q(w.text(names, True))}\n    to:\n      "
                        f"{_q(', '.join(p.text(names, False) for p in order))}: "
                        f"split(x, dim={dim}, sizes=[{', '.join(map(str, sizes))}])"
                        for order in itertools.permutations(parts)
                    ]
                rule = Explained(f"  - convert:  # {n} keys\n{orders[0]}", n, "join" if joining else "cut")
                grouped = _grouped_heads(w, parts, names, sizes, dim, joining)
                if len(set(sizes)) == 1:
                    rule.question = _order_question(w, parts)
                    if grouped:
                        rule.question += (
                            "; or the heads of each key/value group together (Megatron's fused QKV)"
                        )
                elif grouped:
                    rule.question = (
                        f"{'.'.join(w.segments)}: parts one after another, as the names' order says; the "
                        "heads of each key/value group together (Megatron's fused QKV) fit the shapes "
                        "too, and only data can tell"
                    )
                    orders = orders[:1]
                if rule.question:
                    self.out.questions.append(rule.question)
                    rule.alternatives = [f"  - convert:  # {n} keys\n{b}" for b in orders + grouped]
                self.out.rules.append(rule)
                for p in parts:
                    del part_side[p]
                del whole_side[w]

    def _counterpart(self, w: Template, mw: Members, others: dict[Template, Members]) -> bool:
        """Whether `w` has an alike name of its very members on the other side: then it is renamed,
        not joined from parts that happen to add up to its shape (k + v of an o_proj's size)."""
        fits = lambda p, _: others[p] == mw  # noqa: E731
        found = near(others, {w: mw}, self.names, fits, self._families.get(id(others)), self._sides)
        return any(True for _ in found)

    def _parts(self, w: Template, mw: Members, others: dict[Template, Members]):
        """Templates of the other side, of the same numbers and dtype, whose shapes add up to `w`'s
        along one dim: the most alike first (siblings of the whole), a few of them tried together."""
        shapes = {s for s, _ in mw.values()}
        if len(shapes) != 1:
            return None
        (shape,) = shapes
        dtype = next(iter(mw.values()))[1]
        sibs = []
        fits = lambda p, _: others[p].keys() == mw.keys()  # noqa: E731
        seen_p, seen_w = (f or (lambda t: t) for f in self._sides)
        for p, _ in near(others, {w: mw}, self.names, fits, self._families.get(id(others)), self._sides):
            vals = set(others[p].values())
            if len(vals) == 1:
                ((pshape, pdtype),) = vals
                if len(pshape) == len(shape) and pdtype == dtype and _leaf_kind(p) == _leaf_kind(w):
                    sibs.append((similarity(seen_p(p), seen_w(w)), p, pshape))
        sibs.sort(key=lambda c: (-_mentioned(c[1], w), -c[0], c[1].segments))
        for d in range(len(shape)):
            fits = [
                c
                for c in sibs
                if all(a == b for k, (a, b) in enumerate(zip(c[2], shape, strict=True)) if k != d)
            ]
            fits = fits[:MAX_PARTS_TRIED]
            combos = [
                combo
                for size in range(2, min(len(fits), 4) + 1)
                for combo in _combinations(fits, size)
                if sum(c[2][d] for c in combo) == shape[d]
            ]
            if combos:  # the least alike part as alike as can be; then the most parts (q, k, v, not o, q)
                best = max(
                    combos,
                    key=lambda cs: (
                        min(c[0] for c in cs),
                        sum(_mentioned(c[1], w) for c in cs),
                        len(cs),
                        sum(letters(c[1], w) for c in cs),
                    ),
                )
                if self._named and not all(_mentioned(c[1], w) for c in best):
                    continue
                ordered = _order_parts(w, [(c[1], 0, None) for c in best])
                return [c[0] for c in ordered], d
        return None

    def transposes(self) -> None:
        """One-to-one pairs whose 2-D shapes are each other's transpose (not square): rename + transpose."""

        def fits(s: Template, t: Template) -> bool:
            ms, mt = self.src[s], self.dst[t]
            return ms.keys() == mt.keys() and all(
                len(ms[i][0]) == 2 and ms[i][0][::-1] == mt[i][0] and ms[i][0][0] != ms[i][0][1]
                and ms[i][1] == mt[i][1] for i in ms)  # fmt: skip

        seen = self.seen
        pairs = [
            (similarity(seen(s), t), s, t)
            for s, t in near(self.src, self.dst, self.names, fits, seen=(seen, None))
        ]
        pairs.sort(key=lambda p: (-p[0], p[1].segments))
        for _, s, t in pairs:
            if s not in self.src or t not in self.dst:
                continue
            n = len(self.src.pop(s))
            del self.dst[t]
            names = capture_names(s)
            self.out.rules.append(
                Explained(
                    f"  - convert:  # {n} keys\n      x: {_q(s.text(names, True))}\n    to:\n"
                    f"      {_q(t.text(names, False))}: transpose(x, dim0=0, dim1=1)",
                    n,
                    "transposed",
                )
            )

    def renumbered(self) -> None:
        """Templates whose members are the same but for one number moved by a constant
        (`attn_queries.0` .. `.46` -> `layers.1` .. `.47`): a rename that writes `{i+1}`."""
        fits = lambda s, t: len(self.src[s]) == len(self.dst[t])  # noqa: E731
        seen = self.seen
        pairs = sorted(
            (
                (similarity(seen(s), t), s, t)
                for s, t in near(self.src, self.dst, self.names, fits, seen=(seen, None))
            ),
            key=lambda p: (-p[0], p[1].segments, p[2].segments),
        )
        for _, s, t in pairs:
            if s not in self.src or t not in self.dst:
                continue
            ms, mt = self.src[s], self.dst[t]
            for pos in range(s.slots):
                shift = min(int(i[pos]) for i in mt) - min(int(i[pos]) for i in ms)
                moved = {i[:pos] + (str(int(i[pos]) + shift),) + i[pos + 1 :]: v for i, v in ms.items()}
                if shift and moved == mt:
                    break
            else:
                continue
            names = capture_names(s)
            to = list(names)
            to[pos] = f"{names[pos]}{shift:+d}"
            n = len(self.src.pop(s))
            del self.dst[t]
            question = ""
            if len(set(ms.values())) == 1:  # one shape throughout: only the names and the ranges agree
                question = (
                    f"{_shown(s)} -> {t.text(to, False)}: its numbers moved by {shift:+d}, paired by name"
                )
                self.out.questions.append(question)
            self.out.rules.append(
                Explained(
                    f"  - rename: {_q(s.text(names, True))}  # {n} keys\n    to: {_q(t.text(to, False))}",
                    n,
                    "renumbered",
                    label=s.text(names, False),
                    question=question,
                )
            )

    def literal_renames(self) -> None:
        """Keys left on both sides, one by one: a number that is a module's name, not an index
        (`mlp1.0.weight` -> `projector.linear_1.weight`), renamed where the shape and dtype have one
        alike name on each side."""
        left = {t.key(i): v for t, ms in self.src.items() for i, v in ms.items()}
        right = {t.key(i): v for t, ms in self.dst.items() for i, v in ms.items()}
        ls = {Template(tuple(k.split("."))): v for k, v in left.items()}
        rs = {Template(tuple(k.split("."))): v for k, v in right.items()}
        pairs = [(similarity(a, b), a, b) for a, b in near(ls, rs, self.names, lambda a, b: ls[a] == rs[b])]
        pairs.sort(key=lambda p: (-p[0], p[1].segments, p[2].segments))
        done_s, done_t = set(), set()
        for _, a, b in pairs:
            k, t = ".".join(a.segments), ".".join(b.segments)
            if k in done_s or t in done_t:
                continue
            rival_s = [p[1] for p in pairs if p[2] == b and p[1] != a]
            rival_t = [p[2] for p in pairs if p[1] == a and p[2] != b]
            question = ""
            if (rival_s or rival_t) and not _marked(a, b, rival_s, rival_t):
                others = _listed([".".join(x.segments) for x in dict.fromkeys(rival_t + rival_s)])
                question = (
                    f"{k} -> {t}: paired by name among keys of one shape ({others}); only data can confirm it"
                )
                self.out.questions.append(question)
            done_s.add(k)
            done_t.add(t)
            self._rename(a, b, {(): ls[a]}, question)
        for side, done in ((self.src, done_s), (self.dst, done_t)):
            for tpl in list(side):
                for idx in [i for i in side[tpl] if tpl.key(i) in done]:
                    del side[tpl][idx]
                if not side[tpl]:
                    del side[tpl]

    def shape_renames(self, explained: int) -> None:
        """Templates left whose members (numbers, shapes, dtypes) are unique on both sides: renamed
        by shape alone (`output.weight` -> `lm_head.weight`), and asked about; only where names
        explained most of the layout already, so that unrelated layouts stay unexplained."""
        total = explained + sum(len(m) for m in self.src.values())
        if not total or explained < total / 2:
            return
        key = lambda m: tuple(sorted(m.items()))  # noqa: E731
        src_by, dst_by = defaultdict(list), defaultdict(list)
        for t, m in self.src.items():
            src_by[key(m)].append(t)
        for t, m in self.dst.items():
            dst_by[key(m)].append(t)
        for k, ss in sorted(src_by.items(), key=lambda kv: kv[1][0].segments):
            ts = dst_by.get(k, [])
            if len(ss) != 1 or len(ts) != 1 or ss[0].slots != ts[0].slots:
                continue
            s, t = ss[0], ts[0]
            question = (
                f"{_shown(s)} -> {_shown(t)}: paired by shape alone, the only one of its shape on each side"
            )
            self.out.questions.append(question)
            self._rename(s, t, self.src.pop(s), question)
            del self.dst[t]
        self._unique_keys()

    def _unique_keys(self) -> None:
        """Keys left whose shape and dtype no other key left has, on either side: one key each
        (`ctc_timestamp.decoder.decoder_layers.0.bias` -> `word_timestamp_head.bias`), asked."""
        left = {t.key(i): (t, i, v) for t, ms in self.src.items() for i, v in ms.items()}
        right = {t.key(i): (t, i, v) for t, ms in self.dst.items() for i, v in ms.items()}
        by: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
        for side, keys in ((0, left), (1, right)):
            for k, (_, _, v) in keys.items():
                by[v][side].append(k)
        for v, (ks, kt) in sorted(by.items(), key=lambda kv: kv[1][0][:1]):
            if len(ks) != 1 or len(kt) != 1:
                continue
            (ts, i, _), (tt, j, _) = left[ks[0]], right[kt[0]]
            a, b = Template(tuple(ks[0].split("."))), Template(tuple(kt[0].split(".")))
            question = (
                f"{ks[0]} -> {kt[0]}: paired by shape alone, the only key of its shape left on each side"
            )
            self.out.questions.append(question)
            self._rename(a, b, {(): v}, question)
            for side, t, idx in ((self.src, ts, i), (self.dst, tt, j)):
                del side[t][idx]
                if not side[t]:
                    del side[t]

    def square_questions(self) -> None:
        """Where weights were found transposed, a square 2-D weight renamed as it is may have been
        transposed too: its shape cannot tell, so it is asked."""
        if not any(r.kind == "transposed" for r in self.out.rules):
            return
        for r in self.out.rules:
            if r.kind == "rename" and r.square:
                r.question = (
                    f"{r.label}: square, renamed as it is; weights "
                    "beside it are transposed, so it may be too (only data can tell)"
                )
                self.out.questions.append(r.question)
                src = r.yaml.split("rename:")[1].split("#")[0].strip()
                dst = r.yaml.split("to:")[1].strip()
                r.alternatives = [
                    r.yaml,
                    f"  - convert:  # {r.keys} keys\n      x: {src}\n    to:\n      {dst}: transpose(x, dim0=0, dim1=1)",
                ]

    def run(self) -> Synthesis:
        self.unchanged()
        self.renames(settled=True)
        self.learn_heads()
        self.stacks()
        self.joins(named=True)
        self.joins()
        self.renames()
        self.transposes()
        self.square_questions()
        self.renumbered()
        self.literal_renames()
        self.shape_renames(self.out.unchanged + sum(r.keys for r in self.out.rules))
        if self.names.spent:
            self.out.questions.append(
                f"names: more than {MAX_NAME_PAIRS:,} pairs of names to compare; the rest were not "
                "compared, and the keys they would have paired are left unexplained"
            )
        for t, ms in self.src.items():
            for idx, v in ms.items():
                self.out.unexplained_source[t.key(idx)] = v
        for t, ms in self.dst.items():
            for idx, v in ms.items():
                self.out.unexplained_target[t.key(idx)] = v
        return self.out


def _grouped_heads(w: Template, parts: list, names: list, sizes: list, dim: int, joining: bool) -> list[str]:
    """A fused q, k, v (sizes [q, kv, kv]) may hold its heads by key/value group instead, each group
    its q heads then its k and v head (Megatron-LM's linear_qkv): the forms of that for each head
    size the sizes allow (two groups or more), as alternatives only data can choose among."""
    if len(parts) != 3 or sizes[1] != sizes[2] or sizes[0] % sizes[1]:
        return []
    q, kv = sizes[0], sizes[1]
    out = []
    for d in (d for d in range(1, kv // 2 + 1) if kv % d == 0):
        groups, per = kv // d, q // kv  # key/value heads, and query heads per group
        if len(out) >= MAX_TRANSFORMS_TRIED:
            break
        by_group = f"groups={groups}, size={per + 2}, rows={d}, dim={dim}"
        if joining:
            x0 = f"regroup_heads(x0, groups={groups}, size={per}, rows={d}, dim={dim})" if per > 1 else "x0"
            ins = "\n".join(f"      x{k}: {_q(p.text(names, True))}" for k, p in enumerate(parts))
            cat = f"cat({x0}, x1, x2, dim={dim}, sizes=[{q}, {kv}, {kv}])"
            body = (
                f"{ins}\n    to:\n      {_q(w.text(names, False))}: regroup_heads({cat}, "
                f"groups={per + 2}, size={groups}, rows={d}, dim={dim})"
            )
        else:
            outs = [_q(p.text(names, False)) for p in parts]
            qx = f"regroup_heads(q, groups={per}, size={groups}, rows={d}, dim={dim})" if per > 1 else "q"
            body = (
                f'      x: {_q(w.text(names, True))}\n    let:\n      "q, k, v": split(regroup_heads(x, '
                f"{by_group}), dim={dim}, sizes=[{q}, {kv}, {kv}])\n    to:\n      {outs[0]}: {qx}\n"
                f"      {outs[1]}: k\n      {outs[2]}: v"
            )
        out.append(body)
    return out


def _mentioned(part: Template, whole: Template) -> bool:
    """Whether the whole's own name mentions the part (`qkv` or `linear_qkv` the `q` of `q_proj`,
    `gate_up_proj` the `gate` of `gate_proj`): what tells the parts of a fused weight from others of
    their shape (`o_proj`)."""
    own_w = [s for s in whole.segments if s != SLOT and s not in part.segments]
    own_p = [s for s in part.segments if s != SLOT and s not in whole.segments]
    if not own_w or not own_p:
        return False
    word = own_p[-1].split("_")[0]
    tokens = own_w[-1].split("_")
    return word in tokens or (len(word) == 1 and any(len(t) <= 3 and word in t for t in tokens))


def _leaf_kind(t: Template) -> str:
    """What a key holds, as far as joining goes: a bias (`bias`, `in_proj_bias`) or a weight (all else:
    `weight`, `gate_up_proj`, `embedding`); parts of a whole hold what it holds."""
    return "bias" if t.segments[-1].endswith("bias") else "weight"


def _sized(sizes: list[int]) -> str:
    """What a cat says of its parts, so that its inverse can cut them apart again."""
    return "equal=true" if len(set(sizes)) == 1 else f"sizes=[{', '.join(map(str, sizes))}]"


def _order_question(whole: Template, parts: list) -> str:
    names = ", ".join(".".join(p.segments) for p in parts)
    return (
        f"{'.'.join(whole.segments)}: parts of one size ({names}); their order is taken from the names, "
        "and only data can confirm it"
    )


def _combinations(items: list, size: int):
    yield from itertools.combinations(items, size)


def _order_parts(whole: Template, parts: list) -> list:
    """Parts in the order the whole's own name mentions them (`gate_up_proj`: gate, then up;
    `qkv_proj`: q, k, v), else in their names' natural order (w1 before w3)."""
    mine = [s for s in whole.segments if s != SLOT and all(s not in p[0].segments for p in parts)]
    leaf = mine[-1] if mine else "_".join(s for s in whole.segments if s != SLOT)

    def own(p) -> str:  # what tells this part from the others (`w1`, `q_proj`)
        diff = [a for a in p[0].segments if a != SLOT and not all(a in q[0].segments for q in parts)]
        return diff[-1] if diff else ".".join(p[0].segments)

    def where(p) -> tuple:
        word = own(p).split("_")[0]
        pos = leaf.find(word) if word else -1
        natural = [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", own(p))]
        return (pos if pos >= 0 else len(leaf) + 1, str(natural))

    return sorted(parts, key=where)


def search(source: Layout, target: Layout) -> Synthesis:
    """The synthesized spec's rules and what they leave, for layouts {key: (shape, dtype)}."""
    return Search(source, target).run()


@dataclass
class Inferred:
    """What `infer` made: the spec (canonical YAML, each rule with how many keys it explains), what
    the search found and left, and the proof on the layouts it was made from."""

    spec: str
    found: Synthesis
    proof: Proof
    source_keys: int
    target_keys: int
    source_layout: Layout = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """Every key explained, and the spec binds both ways exactly."""
        return self.proof.ok and not self.found.unexplained_source and not self.found.unexplained_target

    def to_dict(self) -> dict:
        f = self.found
        return {
            "ok": self.ok,
            "source_keys": self.source_keys,
            "target_keys": self.target_keys,
            "unchanged": f.unchanged,
            "rules": [{"kind": r.kind, "keys": r.keys} for r in f.rules],
            "unexplained_source": grouped(f.unexplained_source),
            "unexplained_target": grouped(f.unexplained_target),
            "questions": f.questions,
            "decided": f.decided,
            "proof": {
                "forward": self.proof.forward,
                "inverse": self.proof.inverse,
                "error": self.proof.error,
            },
            "spec": self.spec,
        }


def grouped(layout: Layout) -> list[dict]:
    """Keys by template and shape, as `check` groups the keys no rule claims."""
    out: dict[tuple, list[str]] = defaultdict(list)
    for key, (shape, dtype) in layout.items():
        t = ".".join(SLOT if NUMBER.fullmatch(s) else s for s in key.split("."))
        out[(t, tuple(shape), dtype)].append(key)
    return [
        {"template": t, "shape": list(shape), "dtype": dtype, "keys": len(keys), "first": keys[0]}
        for (t, shape, dtype), keys in sorted(out.items())
    ]


# config fields a size or a head count is written with, in order of preference: a size that is heads
# times head_dim is written so before it is taken for hidden_size, which often equals it
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads")
SIZE_FIELDS = ("intermediate_size", "moe_intermediate_size", "hidden_size", "vocab_size")


def config_terms(config: dict) -> tuple[dict[int, str], dict[int, str]]:
    """(sizes, head counts) the config names, each value with the expression a spec writes for it:
    `config.num_key_value_heads * config.head_dim`, `config.intermediate_size`; the first in order
    of preference where two agree."""

    def value(k: str) -> int | None:
        v = config.get(k)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 1 else None

    heads: dict[int, str] = {}
    for k in HEAD_FIELDS:
        if value(k):
            heads.setdefault(value(k), f"config.{k}")
    sizes: dict[int, str] = {}
    if value("head_dim"):
        for v, expr in heads.items():
            sizes.setdefault(v * value("head_dim"), f"{expr} * config.head_dim")
    for k in SIZE_FIELDS:
        if value(k):
            sizes.setdefault(value(k), f"config.{k}")
    return sizes, heads


def configured(found: Synthesis, config: dict) -> None:
    """The sizes of joins and cuts, and the head counts of row permutations, written with the
    config's names where it names them, so that the spec holds for the model's other sizes too."""
    sizes, heads = config_terms(config)

    def sized(m: re.Match) -> str:
        values = [int(v) for v in m.group(1).split(",")]
        return "sizes=[" + ", ".join(sizes.get(v, str(v)) for v in values) + "]"

    for rule in found.rules:
        if rule.kind in ("join", "cut", "transformed"):
            yaml = re.sub(r"sizes=\[([\d, ]+)\]", sized, rule.yaml)
            rule.yaml = re.sub(
                r"\bheads=(\d+)", lambda m: "heads=" + heads.get(int(m.group(1)), m.group(1)), yaml
            )


def infer(source, target, *, name: str = "inferred", config=None) -> Inferred:
    """The spec that maps the layout `source` to `target` (each a {key: (shape, dtype)} dict, a layout
    .json file or a checkpoint), proved by binding it both ways on them; see docs/synthesis.md. With
    `config` (a dict or a config.json), the sizes and head counts it names are written with its names.

    Example:
        >>> src = {f"model.layers.0.experts.{e}.w1.weight": ((8, 4), "float32") for e in range(2)}
        >>> dst = {"model.layers.0.experts.w1": ((2, 8, 4), "float32")}
        >>> r = convspec.infer(src, dst)
        >>> r.ok, [rule.kind for rule in r.found.rules]
        (True, ['stack'])
    """
    from .io.checkpoint import Checkpoint
    from .io.config import load_config
    from .spec.format import format_text

    config = load_config(config)
    source, target = _opened(source), _opened(target)  # a checkpoint's headers are read once
    src, dst = layout_of(source), layout_of(target)
    found = search(src, dst)
    if isinstance(source, Checkpoint) and isinstance(target, Checkpoint):
        decide(found, source, target)
    if config:
        configured(found, config)
    text = format_text(found.spec_text(name), f"{name}.yaml")
    proof = prove(text, src, dst, config)
    folded = fold_paths(found, src, dst) if proof.ok else None
    if folded is not None:  # fewer rules, kept only where they prove as the many did
        folded_text = format_text(folded.spec_text(name), f"{name}.yaml")
        folded_proof = prove(folded_text, src, dst, config)
        if folded_proof.ok:
            found, text, proof = folded, folded_text, folded_proof
    return Inferred(text, found, proof, len(src), len(dst), src)


MIN_FOLDED = 3  # renames under one module path folded into one `{rest:path}` rule


def fold_paths(found: Synthesis, layout: Layout, target: Layout) -> Synthesis | None:
    """The renames that only move a module path (`vit.blocks.{i}.X` -> `encoder.layer.{i}.X` for many
    X) as one rule `vit.blocks.{i:int}.{rest:path}` -> `encoder.layer.{i}.{rest}`, where the path holds
    those keys alone on both sides (a convert's key under it would be taken by the rule in one
    direction or the other); None if nothing folds."""
    from dataclasses import replace

    groups: dict[tuple, list[int]] = defaultdict(list)
    for k, r in enumerate(found.rules):
        if r.kind == "rename" and r.pair and not r.question:
            for ha, hb in found.heads:
                a, b = r.pair
                if a.segments[: len(ha)] == ha and b.segments[: len(hb)] == hb:
                    if a.segments[len(ha) :] == b.segments[len(hb) :] and len(a.segments) > len(ha):
                        groups[(ha, hb)].append(k)
                    break
    groups = {h: ks for h, ks in groups.items() if len(ks) >= MIN_FOLDED}
    if not groups:
        return None
    folded, gone = [], set()
    for (ha, hb), ks in groups.items():
        mine = [found.rules[k] for k in ks]
        sources = {r.pair[0].key(i) for r in mine for i, _ in r.members}
        targets = {r.pair[1].key(i) for r in mine for i, _ in r.members}
        # the path holds these keys alone, on both sides (the inverse meets the rule first)
        if {key for key in layout if _under(key, ha)} != sources or any(
            _under(key, hb) and key not in targets for key in target
        ):
            continue
        head = Template(ha)
        names = capture_names(head)
        n = sum(found.rules[k].keys for k in ks)
        src = ".".join([head.text(names, True), "{rest:path}"])
        dst = ".".join([Template(hb).text(names, False), "{rest}"])
        rule = Explained(f"  - rename: {_q(src)}  # {n} keys\n    to: {_q(dst)}", n, "moved")
        folded.append(rule)
        gone.update(ks)
    if not gone:
        return None
    return replace(found, rules=[r for k, r in enumerate(found.rules) if k not in gone] + folded)


def _under(key: str, head: tuple[str, ...]) -> bool:
    segs = key.split(".")
    return len(segs) > len(head) and all(
        (NUMBER.fullmatch(s) is not None) if h == SLOT else s == h for s, h in zip(segs, head, strict=False)
    )


@dataclass
class Proof:
    """The synthesized spec bound both ways on the layouts it was made from: what differs, if anything."""

    forward: list[str]
    inverse: list[str]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.forward or self.inverse or self.error)


def prove(text: str, source: Layout, target: Layout, config: dict | None = None) -> Proof:
    """Compile the spec (with the config its `config.*` sizes read) and bind it: the source must give
    exactly the target (keys, shapes, dtypes), and the inverse the source."""
    from . import api
    from .errors import ConvspecError
    from .spec import parse_spec

    try:
        plan = api.compile(parse_spec(text, "inferred.yaml"), config=config)
        fwd = plan.bind(source).outputs
        inv = plan.inverse().bind(target).outputs
    except ConvspecError as exc:
        return Proof([], [], exc.render().splitlines()[0])
    return Proof(_differ(fwd, target), _differ(inv, source))


def _differ(got: dict, want: Layout, limit: int = 5) -> list[str]:
    out = [f"missing {k}" for k in want if k not in got][:limit]
    out += [f"extra {k}" for k in got if k not in want][:limit]
    out += [
        f"{k}: {list(got[k][0])} {got[k][1]}, want {list(want[k][0])} {want[k][1]}"
        for k in want
        if k in got and (tuple(got[k][0]), got[k][1]) != (tuple(want[k][0]), want[k][1])
    ][:limit]
    return out


def layout_of(source) -> Layout:
    """A layout from a dict (as it is), a layout `.json` file (`{key: [shape, dtype]}`, checked key by
    key), or a checkpoint (a directory or a file: its headers, no data)."""
    from .io.checkpoint import Checkpoint

    if isinstance(source, dict):
        return {k: (tuple(v[0]), v[1]) for k, v in source.items()}
    if isinstance(source, Checkpoint):
        return {k: (tuple(v.shape), v.dtype) for k, v in source.layout.items()}
    path = Path(source)
    if path.suffix == ".json" and path.is_file():
        return _layout_file(path)
    from .io.formats import open_checkpoint

    return {k: (tuple(v.shape), v.dtype) for k, v in open_checkpoint(path).layout.items()}


def _layout_file(path: Path) -> Layout:
    from .dtypes import DTYPES
    from .errors import ConfigError
    from .io.sidefile import load_json

    data = load_json(path, MAX_LAYOUT_BYTES, ConfigError, "layout file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a layout is a JSON object of key -> [shape, dtype]")
    out = {}
    for key, v in data.items():
        ok = (
            isinstance(v, list)
            and len(v) == 2
            and isinstance(v[0], list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v[0])
            and v[1] in DTYPES
        )
        if not ok:
            raise ConfigError(
                f"{path}: {key!r}: {json.dumps(v)[:80]} is not [shape, dtype]",
                hint='e.g. "model.embed.weight": [[32000, 4096], "bfloat16"]',
            )
        out[key] = (tuple(v[0]), v[1])
    return out


def _opened(x):
    """A checkpoint opened (its tensors can decide what shapes cannot); a dict or a layout file as is."""
    if isinstance(x, dict) or not Path(x).exists() or (Path(x).suffix == ".json" and Path(x).is_file()):
        return x
    from .io.formats import open_checkpoint

    return open_checkpoint(Path(x))


def decide(found: Synthesis, source, target) -> None:
    """Where the shapes allowed several rules (parts of one size in some order, a square weight
    transposed or not), keep the one that gives the target's tensors bit for bit from the source's,
    tried on one group of each rule; the question becomes a decision, or says that no choice fits."""
    from dataclasses import replace

    source, target = Tensors(source), Tensors(target)
    for k, rule in enumerate(found.rules):
        if len(rule.alternatives) < 2:
            continue
        fits = [alt for alt in rule.alternatives if _fits(alt, source, target)]
        if rule.question in found.questions:
            found.questions.remove(rule.question)
        where = rule.question.split(":")[0]
        if len(fits) == 1:
            found.rules[k] = replace(rule, yaml=fits[0], alternatives=[], question="")
            found.decided.append(f"{where}: decided from the data, bit for bit")
        elif not fits:
            found.questions.append(f"{where}: no choice the shapes allow gives the target's data")
        else:
            found.questions.append(f"{where}: {len(fits)} choices give the target's data; took the first")
    _pairings(found, source, target)


class Tensors:
    """A checkpoint whose tensors are read once each while choices are tried on them (a rename may be
    tried with dozens of permutations against several targets: one read of a 128 MB weight, not one
    per try), the last few kept."""

    KEPT = 8

    def __init__(self, checkpoint) -> None:
        self.checkpoint = checkpoint
        self.layout = checkpoint.layout
        self.read: dict = {}

    def get(self, key: str):
        if key not in self.read:
            if len(self.read) >= self.KEPT:
                del self.read[next(iter(self.read))]
            self.read[key] = self.checkpoint.get(key)
        return self.read[key]


def _pairings(found: Synthesis, source, target) -> None:
    """Renames tried on the data. One that gives the target's tensors is confirmed (its question, if
    any, answered); the others are paired again among themselves, targets of the same members, as
    they are and then with the row permutations a checkpoint may hold (rope halves <-> interleaved
    pairs for every head count, interleaved parts), the first that fits bit for bit kept: names
    that shapes could not tell apart (`attn_q` ~ `q_proj` or `o_proj`) are told apart by the data."""
    from dataclasses import replace

    misfits = []
    for k, rule in enumerate(found.rules):
        if rule.kind == "renumbered" and rule.question and _fits(rule.yaml, source, target):
            _answered(found, rule, f"{rule.label}: its renumbering confirmed by the data")
        if rule.kind != "rename" or rule.alternatives or rule.pair is None:
            continue
        if not _fits(rule.yaml, source, target):
            misfits.append(k)
        elif rule.question:
            _answered(found, rule, f"{rule.label}: its pairing confirmed by the data")
    free = {found.rules[k].pair[1]: found.rules[k].members for k in misfits}
    for k in misfits:
        rule = found.rules[k]
        s, was = rule.pair
        candidates = [t for t, m in free.items() if m == rule.members]
        candidates.sort(key=lambda t: t != was)  # its own target first
        got = _repaired(rule, s, candidates, source, target)
        if got is None:
            found.questions.append(
                f"{rule.label}: renamed, but its values differ from the target's (no pairing of its "
                "shape, and no transform tried, gives them)"
            )
            continue
        t, yaml, expr = got
        del free[t]
        found.rules[k] = replace(rule, yaml=yaml, kind="transformed" if expr else "rename", pair=(s, t))
        what = f"{expr.split('(')[0]} found" if expr else "paired"
        moved = f" with {_shown(t)} (the names said {_shown(was)})" if t != was else ""
        _answered(found, rule, f"{rule.label}: {what}{moved} by the data, bit for bit")


def _answered(found: Synthesis, rule: Explained, decided: str) -> None:
    if rule.question in found.questions:
        found.questions.remove(rule.question)
    found.decided.append(decided)


def _repaired(rule: Explained, s: Template, candidates: list, source, target):
    """The first (target, yaml, transform) among the candidates, renamed as is and then transformed,
    that gives the target's tensors; None if none does."""
    names = capture_names(s)
    shape = rule.members[0][1][0] if rule.members else ()
    rows = shape[0] if shape else 0
    for t in candidates:
        yaml = _rename_yaml(s, t, rule.keys)
        if _fits(yaml, source, target):
            return t, yaml, ""
    for t in candidates:
        for expr in _transforms(rows):
            yaml = (
                f"  - convert:  # {rule.keys} keys\n      x: {_q(s.text(names, True))}\n    to:\n"
                f"      {_q(t.text(names, False))}: {expr}"
            )
            if _fits(yaml, source, target):
                return t, yaml, expr
    return None


def _transforms(rows: int) -> list[str]:
    """The row permutations a checkpoint may hold, for a weight of `rows` rows."""
    tries = []
    for heads in (h for h in range(1, rows // 2 + 1) if rows % (2 * h) == 0):
        tries += [f"permute_rope(x, heads={heads})", f"unpermute_rope(x, heads={heads})"]
    tries += [f"interleave(x, dim=0, parts={n})" for n in (2, 3) if rows % n == 0]
    tries += [f"deinterleave(x, dim=0, parts={n})" for n in (2, 3) if rows % n == 0]
    return tries[:MAX_TRANSFORMS_TRIED]


def _trial(rule_yaml: str):
    """One rule of a synthesized spec, compiled on its own to be tried."""
    from . import api
    from .spec import parse_spec

    return api.compile(parse_spec(f"spec: trial\nrules:\n{rule_yaml}\n", "trial.yaml"))


def _fits(rule_yaml: str, source, target) -> bool:
    """Whether the one-rule spec gives, from the source's tensors, the target's, on one group."""
    import torch

    from .errors import ConvspecError

    try:
        plan = _trial(rule_yaml)
        bound = plan.bind(source.layout)
    except ConvspecError:
        return False
    if bound.groups:
        g = bound.groups[0]
        keys = [key for members in g.members.values() for key in members.values()]
        out = plan.apply({key: source.get(key) for key in keys})
        pairs = [(out[key], key) for key in g.outputs]
    else:
        renamed = [(a, b) for a, b in bound.passthrough.items() if a != b]
        if not renamed:
            return False
        a, b = renamed[0]
        pairs = [(source.get(a), b)]
    for got, key in pairs:
        if key not in target.layout:
            return False
        want = target.get(key)
        if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
            return False
    return True


def routes(plan, layout: Layout) -> dict[str, frozenset]:
    """Where each source key goes under `plan`, from headers: a renamed or unchanged key its new
    name; a key a convert moves, the byte ranges it fills in which outputs (so parts joined in
    another order differ); one a convert computes from, the outputs it is part of."""
    from .blocks import block_runs

    bound = plan.bind(layout)
    out: dict[str, frozenset] = {k: frozenset([v]) for k, v in bound.passthrough.items()}
    for g in bound.groups:
        runs = block_runs(bound, g, 0)
        placed: dict[str, set] = defaultdict(set)
        for output, rs in (runs or {}).items():
            for run in rs:
                placed[run.source].add((output, run.src, run.dst, run.size))
        for members in g.members.values():
            for key in members.values():
                out[key] = frozenset(placed[key]) if runs is not None else frozenset(g.outputs)
    return out


def compare(text: str, other, layout: Layout, config=None) -> list[str]:
    """Where the synthesized spec and `other` (a compiled plan) behave differently on `layout`: each
    source key that goes elsewhere, or nowhere under one of them. Text may differ freely."""
    from . import api
    from .spec import parse_spec

    ours = routes(api.compile(parse_spec(text, "inferred.yaml"), config=config), layout)
    theirs = routes(other, layout)
    diffs = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if a != b:
            diffs.append(f"{key}: inferred -> {_where(a)}; the spec -> {_where(b)}")
    return diffs


def _where(route: frozenset | None) -> str:
    if route is None:
        return "dropped"
    return ", ".join(
        sorted({x if isinstance(x, str) else f"{x[0]}[bytes {x[2]}..{x[2] + x[3]}]" for x in route})
    )
