"""The synthesis search: from two layouts' templates, the rules of a spec, cheapest explanation first
(renames, stacks, joins and cuts, transposes, moved numbers, one key at a time); what it cannot
explain is left, and what the shapes cannot decide is asked."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass, field

from .names import (
    MAX_NAME_PAIRS,
    NUMBER,
    SLOT,
    Layout,
    Members,
    Names,
    Template,
    alike,
    capture_names,
    families,
    letters,
    near,
    similarity,
    templates,
)

MAX_TRANSFORMS_TRIED = 64  # value transforms a rename's data is tried with (rope: every head count)


MAX_PARTS_TRIED = 8  # the most alike candidates a join is looked for among (C(8, 4) = 70 tries at most)


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


UNWRITABLE = re.compile(r"[\s{}]")  # what a key template cannot hold


def quoted(s: str) -> str:
    """A template as a YAML scalar: single-quoted, so a backslash or a double quote is itself."""
    return "'" + s.replace("'", "''") + "'"


def _listed(names: list[str], most: int = 3) -> str:
    """Names for a question, the first few and how many more."""
    more = f", and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def shown(t: Template) -> str:
    return t.text(capture_names(t), False)


def one_convert(s: Template, t: Template, n: int, expr: str) -> str:
    """A convert of one input `x` to one output, `expr` of it: a transpose, a squeeze, a permutation."""
    names = capture_names(s)
    return (
        f"  - convert:  # {n} keys\n      x: {quoted(s.text(names, True))}\n    to:\n"
        f"      {quoted(t.text(names, False))}: {expr}"
    )


def _rivals(pairs: list) -> tuple[dict, dict]:
    """Each source's candidate targets and each target's candidate sources, in the pairs' order."""
    of_s: dict[Template, list] = defaultdict(list)
    of_t: dict[Template, list] = defaultdict(list)
    for _, s, t in pairs:
        of_s[s].append(t)
        of_t[t].append(s)
    return of_s, of_t


def rename_yaml(s: Template, t: Template, n: int) -> str:
    names = capture_names(s)
    return (
        f"  - rename: {quoted(s.text(names, True))}  # {n} key{'s' if n != 1 else ''}\n"
        f"    to: {quoted(t.text(names, False))}"
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
        # a key a spec cannot write (a space, a brace) is left as it is, and said
        self.unwritable = [
            {k: v for k, v in side.items() if UNWRITABLE.search(k)} for side in (source, target)
        ]
        self.src = templates({k: v for k, v in source.items() if k not in self.unwritable[0]})
        self.dst = templates({k: v for k, v in target.items() if k not in self.unwritable[1]})
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
        pairs = self._ranked(lambda s, t: self.src[s] == self.dst[t])
        pairs.sort(key=lambda p: (-p[0], -letters(self.seen(p[1]), p[2]), p[1].segments, p[2].segments))
        of_s, of_t = _rivals(pairs)
        taken_s, taken_t = set(), set()
        chosen = []
        for _, s, t in pairs:
            if s in taken_s or t in taken_t:
                continue
            rival_s = [x for x in of_t[t] if x != s]
            rival_t = [x for x in of_s[s] if x != t]
            unsettled = bool(rival_s or rival_t) and not _marked(s, t, rival_s, rival_t)
            if settled and unsettled:
                continue
            taken_s.add(s)
            taken_t.add(t)
            question = ""
            if unsettled:
                others = _listed([shown(x) for x in dict.fromkeys(rival_t + rival_s)])
                question = (
                    f"{shown(s)} -> {shown(t)}: paired by name among names of one shape ({others}); "
                    "only data can confirm it"
                )
                self.out.questions.append(question)
            chosen.append((s, t, question))
        for s, t, question in chosen:
            self._rename(s, t, self.src.pop(s), question)
            del self.dst[t]

    def _ranked(self, fits) -> list[tuple[float, Template, Template]]:
        """The pairs of templates left that `fits` and whose names are alike, each with how alike
        (the source's name as the learned module paths read it)."""
        seen = self.seen
        return [
            (similarity(seen(s), t), s, t)
            for s, t in near(self.src, self.dst, self.names, fits, seen=(seen, None))
        ]

    def _one_to_one(self, pairs: list, expr, kind: str) -> None:
        """The pairs, in order, each source and target taken once: a convert of `expr(s, t)`."""
        for _, s, t in pairs:
            if s not in self.src or t not in self.dst:
                continue
            form = expr(s, t)
            n = len(self.src.pop(s))
            del self.dst[t]
            self.out.rules.append(Explained(one_convert(s, t, n, form), n, kind))

    def _rename(self, s: Template, t: Template, members: Members, question: str = "") -> None:
        n = len(members)
        names = capture_names(s)
        square = all(len(shape) == 2 and shape[0] == shape[1] for shape, _ in members.values())
        self.out.rules.append(
            Explained(
                rename_yaml(s, t, n),
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
            ins = "\n".join(f"      {v}: {quoted(text)}" for v, text in inputs)
            head = f"  - convert:  # {n} keys\n{ins}\n    to:\n      {quoted(t.text(names, False))}: "
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
        if len({s[1:] for s in shapes}) != 1 or len({d for _, d in mt.values()}) != 1:
            return None  # the count may differ from member to member (4, 8, 12 experts a block)
        shape = next(iter(shapes))
        if len(shape) < 2:
            return None
        dtype = next(iter(mt.values()))[1]
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
                    sorted(g, key=int) == [str(x) for x in range(mt[k][0][0])] and len(set(g.values())) == 1
                    for k, g in groups.items()
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
                    ins = "\n".join(f"      x{k}: {quoted(p.text(names, True))}" for k, p in enumerate(parts))
                    sizes = [next(iter(part_side[p].values()))[0][dim] for p in parts]
                    head = f"{ins}\n    to:\n      {quoted(w.text(names, False))}: "
                    orders = [
                        head + f"cat({', '.join(order)}, dim={dim}, {_sized(sizes)})"
                        for order in itertools.permutations(f"x{k}" for k in range(len(parts)))
                    ]
                else:
                    sizes = [next(iter(part_side[p].values()))[0][dim] for p in parts]
                    orders = [
                        f"      x: {quoted(w.text(names, True))}\n    to:\n      "
                        f"{quoted(', '.join(p.text(names, False) for p in order))}: "
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

        pairs = sorted(self._ranked(fits), key=lambda p: (-p[0], p[1].segments))
        self._one_to_one(pairs, lambda s, t: "transpose(x, dim0=0, dim1=1)", "transposed")

    def renumbered(self) -> None:
        """Templates whose members are the same but for one number moved by a constant
        (`attn_queries.0` .. `.46` -> `layers.1` .. `.47`): a rename that writes `{i+1}`."""
        pairs = sorted(
            self._ranked(lambda s, t: len(self.src[s]) == len(self.dst[t])),
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
                    f"{shown(s)} -> {t.text(to, False)}: its numbers moved by {shift:+d}, paired by name"
                )
                self.out.questions.append(question)
            self.out.rules.append(
                Explained(
                    f"  - rename: {quoted(s.text(names, True))}  # {n} keys\n    to: {quoted(t.text(to, False))}",
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
        of_s, of_t = _rivals(pairs)
        done_s, done_t = set(), set()
        for _, a, b in pairs:
            k, t = ".".join(a.segments), ".".join(b.segments)
            if k in done_s or t in done_t:
                continue
            rival_s = [x for x in of_t[b] if x != a]
            rival_t = [x for x in of_s[a] if x != b]
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
                f"{shown(s)} -> {shown(t)}: paired by shape alone, the only one of its shape on each side"
            )
            self.out.questions.append(question)
            self._rename(s, t, self.src.pop(s), question)
            del self.dst[t]
        self._modules()
        self._unique_keys()

    def _modules(self) -> None:
        """Modules left (keys by their parent: `mlp1.0` -> weight, bias) whose parameters' shapes
        match a module left on the other side: one such module each side is a pair, several are
        paired in the order of their names (`nn.Sequential`'s `mlp1.1`, `mlp1.3` -> `linear_1`,
        `linear_2`); each key renamed, each pairing asked."""
        sides = []
        for side in (self.src, self.dst):
            mods: dict[str, dict[str, tuple]] = defaultdict(dict)
            where: dict[str, tuple] = {}
            for t, ms in side.items():
                for i, v in ms.items():
                    key = t.key(i)
                    parent, _, leaf = key.rpartition(".")
                    mods[parent][leaf] = v
                    where[key] = (t, i)
            by: dict[frozenset, list[str]] = defaultdict(list)
            for parent, leaves in mods.items():
                if parent:
                    by[frozenset(leaves.items())].append(parent)
            sides.append((by, where))
        (sby, swhere), (tby, twhere) = sides
        for sig, ss in sorted(sby.items(), key=lambda kv: sorted(kv[1])):
            ts = tby.get(sig, [])
            if len(ss) != len(ts):
                continue
            ss, ts = sorted(ss, key=_natural), sorted(ts, key=_natural)
            how = "its parameters' shapes alone" if len(ss) == 1 else f"the order of {len(ss)} alike modules"
            for a, b in zip(ss, ts, strict=True):
                question = f"{a} -> {b}: module paired by {how}"
                self.out.questions.append(question)
                for leaf, v in sorted(sig):
                    sk, tk = f"{a}.{leaf}", f"{b}.{leaf}"
                    self._rename(
                        Template(tuple(sk.split("."))), Template(tuple(tk.split("."))), {(): v}, question
                    )
                    for side, where, key in ((self.src, swhere, sk), (self.dst, twhere, tk)):
                        t, i = where[key]
                        del side[t][i]
                        if not side[t]:
                            del side[t]

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

    def squeezes(self) -> None:
        """One-to-one pairs whose shapes differ by one dim of size 1, at one place for every member
        (`cls_token` [1, 1, 384] -> `mask_token` [1, 384]): `squeeze`, or `unsqueeze` the other way."""

        def dropped(a: tuple, b: tuple) -> int | None:  # the dim of size 1 that a has and b lacks
            if len(a) != len(b) + 1:
                return None
            return next((d for d in range(len(a)) if a[d] == 1 and a[:d] + a[d + 1 :] == b), None)

        def form(s: Template, t: Template) -> str | None:
            ms, mt = self.src[s], self.dst[t]
            if ms.keys() != mt.keys() or any(ms[i][1] != mt[i][1] for i in ms):
                return None
            for op, extra in (
                ("squeeze", lambda i: (ms[i][0], mt[i][0])),
                ("unsqueeze", lambda i: (mt[i][0], ms[i][0])),
            ):
                dims = {dropped(*extra(i)) for i in ms}
                if len(dims) == 1 and None not in dims:
                    return f"{op}(x, dim={dims.pop()})"
            return None

        pairs = self._ranked(lambda s, t: form(s, t) is not None)
        pairs.sort(key=lambda p: (-p[0], p[1].segments, p[2].segments))
        self._one_to_one(pairs, form, "squeezed")

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
                r.alternatives = [r.yaml, one_convert(*r.pair, r.keys, "transpose(x, dim0=0, dim1=1)")]

    def run(self) -> Synthesis:
        self.unchanged()
        self.renames(settled=True)
        self.learn_heads()
        self.stacks()
        self.joins(named=True)
        self.joins()
        self.renames()
        self.transposes()
        self.squeezes()
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
        n = sum(len(u) for u in self.unwritable)
        if n:
            self.out.unexplained_source.update(self.unwritable[0])
            self.out.unexplained_target.update(self.unwritable[1])
            self.out.questions.append(
                f"{n} key(s) hold a space or a brace, which no spec template can write: left unexplained"
            )
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
            ins = "\n".join(f"      x{k}: {quoted(p.text(names, True))}" for k, p in enumerate(parts))
            cat = f"cat({x0}, x1, x2, dim={dim}, sizes=[{q}, {kv}, {kv}])"
            body = (
                f"{ins}\n    to:\n      {quoted(w.text(names, False))}: regroup_heads({cat}, "
                f"groups={per + 2}, size={groups}, rows={d}, dim={dim})"
            )
        else:
            outs = [quoted(p.text(names, False)) for p in parts]
            qx = f"regroup_heads(q, groups={per}, size={groups}, rows={d}, dim={dim})" if per > 1 else "q"
            body = (
                f'      x: {quoted(w.text(names, True))}\n    let:\n      "q, k, v": split(regroup_heads(x, '
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


def _natural(name: str) -> list:
    """A name's order with its numbers as numbers (`mlp1.3` before `mlp1.10`)."""
    return [(int(x), "") if x.isdigit() else (-1, x) for x in re.split(r"(\d+)", name)]


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
        rule = Explained(f"  - rename: {quoted(src)}  # {n} keys\n    to: {quoted(dst)}", n, "moved")
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
