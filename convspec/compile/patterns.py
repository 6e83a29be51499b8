"""Key patterns: templates compiled to regexes, formatted back to keys, and intersected exactly."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache

CAPTURE_REGEX = {
    "path": r"[^.]+(?:\.[^.]+)*",
    "path?": r"[^.]+(?:\.[^.]+)*",
    "int": r"(?:0|[1-9][0-9]*)",
    "seg": r"[^.]+",
}


MAX_OPEN_CAPTURES = 2  # real templates have at most 2 (`{p:path?}.x.{rest:path?}`); each one more multiplies
# the worst backtracking cost of matching a key by the key's length (1,024 chars: 20 ms at 2, seconds at 3)


def open_captures(parts: tuple[tuple[str, str, str | None], ...]) -> list[int]:
    """The indices (in `parts`) of the captures whose extent the text beside them does not fix, in order:
    every path and path? (it may take any number of segments), and every capture of a segment that
    holds two or more (`{a}_{b}`: which `_` splits them is open). A regex backtracking over a key tries
    about (key length) ** len(open_captures) ways before it gives up, so the compiler bounds their
    number (MAX_OPEN_CAPTURES). Captures without a type count as one segment."""
    out: list[int] = []
    segment: list[int] = []  # the seg and int captures of the current segment

    def close() -> None:
        if len(segment) > 1:
            out.extend(segment)
        segment.clear()

    for i, (kind, text, typ) in enumerate(parts):
        if kind == "lit":
            if "." in text:
                close()
        elif typ in ("path", "path?"):
            close()
            out.append(i)
        else:
            segment.append(i)
    close()
    return sorted(out)


def adjacent_paths(parts: tuple[tuple[str, str, str | None], ...]) -> int | None:
    """The index of a path capture that follows another with only a dot between them
    (`{a:path}.{b:path?}`): nothing tells where one ends. None when there is none."""
    for i in range(2, len(parts)):
        a, mid, b = parts[i - 2], parts[i - 1], parts[i]
        if (
            a[0] == b[0] == "cap"
            and a[2] in ("path", "path?")
            and b[2] in ("path", "path?")
            and mid == ("lit", ".", None)
        ):
            return i
    return None


MAX_AUTOMATA = 5_000  # exact intersections of two templates built as automata (each up to ~1 ms) that one
# compile or lint may ask for; the built-in specs ask for at most a few hundred, and templates that are
# all alike (the same literal ends and segment shapes) would otherwise ask for one per pair of rules

_AUTOMATA: ContextVar[list[int] | None] = ContextVar("convspec_automata", default=None)


class TooManyAutomata(ValueError):
    """A compile or lint needed more exact template intersections than MAX_AUTOMATA allows."""


@contextmanager
def automata_budget(limit: int = MAX_AUTOMATA) -> Iterator[None]:
    """Within this block, at most `limit` template intersections are built; one more raises
    TooManyAutomata, so the cost of checking a spec is bounded whatever its templates."""
    token = _AUTOMATA.set([limit])
    try:
        yield
    finally:
        _AUTOMATA.reset(token)


def too_many_automata_message() -> str:
    return (
        f"the spec's templates are so alike that checking which keys they share would take more than "
        f"{MAX_AUTOMATA:,} exact comparisons"
    )


class OffsetError(ValueError):
    """`{i-1}` of a key whose index is 0: no key has a negative index."""


def split_offset(name: str) -> tuple[str, int]:
    """`i+1` -> ("i", 1); `i` -> ("i", 0)."""
    m = re.fullmatch(r"(.+?)([+-][0-9]+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


def with_offset(name: str, offset: int) -> str:
    return f"{name}{offset:+d}" if offset else name


@dataclass(frozen=True)
class Pattern:
    """A whole-key template: literal parts and typed captures, e.g. `{p:path}.experts.{e:int}.w1.weight`."""

    text: str
    parts: tuple[tuple[str, str, str | None], ...]  # ("lit", text, None) | ("cap", name, type)

    @property
    def captures(self) -> tuple[str, ...]:
        return tuple(split_offset(name)[0] for kind, name, _ in self.parts if kind == "cap")

    @property
    def offsets(self) -> dict[str, int]:
        """Captures written with a constant added (`{i+1}`, in a rename target): name -> constant."""
        return {b: o for kind, name, _ in self.parts if kind == "cap" for b, o in [split_offset(name)] if o}

    def typed(self, types: dict[str, str]) -> Pattern:
        """The same pattern with capture types filled in from `types` (where a target borrows them)."""
        parts = tuple(
            (k, a, (b or types.get(split_offset(a)[0], "seg")) if k == "cap" else None)
            for k, a, b in self.parts
        )
        text = "".join(a if k == "lit" else f"{{{a}:{b}}}" for k, a, b in parts)
        return Pattern(text, parts)

    @cached_property
    def elements(self) -> tuple[tuple[str, str, str | None], ...]:
        """The parts with every optional path (`path?`) owning the dot beside it:
        ("lit", text, None) | ("cap", name, type) | ("opt", name, "after" | "before" | None)."""
        out: list[list] = [list(p) for p in self.parts]
        for i, (kind, name, typ) in enumerate(out):
            if kind != "cap" or typ != "path?":
                continue
            nxt = out[i + 1] if i + 1 < len(out) else None
            prv = out[i - 1] if i > 0 else None
            if nxt is not None and nxt[1].startswith("."):
                nxt[1], side = nxt[1][1:], "after"
            elif prv is not None and prv[1].endswith("."):
                prv[1], side = prv[1][:-1], "before"
            else:
                side = None
            out[i] = ["opt", name, side]
        return tuple(tuple(e) for e in out if not (e[0] == "lit" and e[1] == ""))

    def regex(self, prefix: str = "", named: bool = True) -> str:
        out = []
        for i, (kind, a, b) in enumerate(self.elements):
            if kind == "lit":
                out.append(re.escape(a))
                continue
            group = f"?P<{prefix}{a}>" if named else "?:"
            if kind == "cap":
                body = CAPTURE_REGEX[b or "seg"]
                if i == 0 and b == "path":
                    body += "?"  # a leading path takes the first occurrence of what follows
                out.append(f"({group}{body})")
                continue
            lazy = "?" if i == 0 else ""  # a leading optional path takes the first occurrence
            body = f"({group}[^.]+(?:\\.[^.]+)*{lazy})"
            out.append(
                f"(?:{body}\\.)?{lazy}"
                if b == "after"
                else f"(?:\\.{body})?"
                if b == "before"
                else f"{body}?"
            )
        return "".join(out)

    @cached_property
    def compiled(self) -> re.Pattern:
        return re.compile(self.regex())

    def match(self, key: str) -> dict[str, str] | None:
        m = self.compiled.fullmatch(key)
        return m.groupdict() if m else None

    def format(self, values: dict[str, str]) -> str:
        out = []
        for kind, a, b in self.elements:
            if kind == "lit":
                out.append(a)
            elif kind == "cap":
                name, offset = split_offset(a)
                if offset:
                    n = int(values[name]) + offset
                    if n < 0:
                        raise OffsetError(f"{{{a}}} is {n} for {name}={values[name]}")
                    out.append(str(n))
                else:
                    out.append(values[a])
            elif values.get(a):
                out.append(
                    values[a] + "." if b == "after" else "." + values[a] if b == "before" else values[a]
                )
        return "".join(out)

    def display(self) -> str:
        """The pattern with bare captures, as a target is written: `{p}.mlp.gate.weight`."""
        return "".join(a if k == "lit" else f"{{{a}}}" for k, a, _ in self.parts)


# ---- exact intersection of two patterns (both regular languages) -----------------------------

_PRED = {
    "notdot": lambda c: c != ".",
    "digit": lambda c: c.isascii() and c.isdigit(),
    "nonzero": lambda c: c in "123456789",
    "zero": lambda c: c == "0",
}


class _NFA:
    """The keys one or more patterns match, as an automaton over characters (state 0 starts)."""

    def __init__(self, pattern: Pattern | None = None, union: tuple[Pattern, ...] = ()):
        self.edges: list[list[tuple[object, int]]] = [[]]  # state -> [(predicate or char, next)]
        self.eps: list[list[int]] = [[]]
        if pattern is not None:
            self.accept = self._build(pattern, 0)
            self.accepts = frozenset([self.accept])
        else:  # any of several patterns: one branch each from the start
            ends = []
            for p in union:
                s = self._new()
                self.eps[0].append(s)
                ends.append(self._build(p, s))
            self.accept = -1
            self.accepts = frozenset(ends)
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    def accepting(self, states: frozenset[int]) -> bool:
        return not self.accepts.isdisjoint(states)

    def _new(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def _edge(self, a: int, label, b: int) -> None:
        self.edges[a].append((label, b))

    def _path(self, s: int) -> int:
        seg, dot = self._new(), self._new()
        self._edge(s, "notdot", seg)
        self._edge(seg, "notdot", seg)
        self._edge(seg, ".", dot)
        self._edge(dot, "notdot", seg)
        return seg

    def _build(self, pattern: Pattern, s: int) -> int:
        for kind, a, b in pattern.elements:
            if kind == "opt":
                end = self._new()
                self.eps[s].append(end)
                if b == "before":
                    d = self._new()
                    self._edge(s, ".", d)
                    self.eps[self._path(d)].append(end)
                elif b == "after":
                    x, d = self._path(s), end
                    self._edge(x, ".", d)
                else:
                    self.eps[self._path(s)].append(end)
                s = end
            elif kind == "lit":
                for ch in a:
                    t = self._new()
                    self._edge(s, ch, t)
                    s = t
            elif (b or "seg") == "seg":
                t = self._new()
                self._edge(s, "notdot", t)
                self._edge(t, "notdot", t)
                s = t
            elif b == "int":
                zero, many, end = self._new(), self._new(), self._new()
                self._edge(s, "zero", zero)
                self._edge(s, "nonzero", many)
                self._edge(many, "digit", many)
                self.eps[zero].append(end)
                self.eps[many].append(end)
                s = end
            else:  # path
                s = self._path(s)
        return s

    def closure(self, states: frozenset[int]) -> frozenset[int]:
        todo, seen = list(states), set(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def step(self, states: frozenset[int], ch: str) -> frozenset[int]:
        key = (states, ch)
        cached = self._steps.get(key)
        if cached is None:
            cached = self._steps[key] = self._step(states, ch)
        return cached

    def _step(self, states: frozenset[int], ch: str) -> frozenset[int]:
        nxt = set()
        for s in states:
            for label, t in self.edges[s]:
                if (label == ch) if len(label) == 1 else _PRED[label](ch):
                    nxt.add(t)
        return self.closure(frozenset(nxt))


def _alphabet(*patterns: Pattern) -> list[str]:
    """One representative character for each class of characters the patterns cannot tell apart."""
    lits = {ch for p in patterns for k, a, _ in p.parts if k == "lit" for ch in a}
    reps = set(lits) | {".", "0"}
    reps.add(next((d for d in "123456789" if d not in lits), "1"))
    reps.add(next(c for c in "xyzqXYZQ_~" + "".join(map(chr, range(0x100, 0x200))) if c not in lits))
    return sorted(reps)


def _path_to(prev: dict, state) -> str:
    """The key a breadth-first search over automaton states spelled on its way to `state`."""
    return "".join(_symbols_to(prev, state))


def _symbols_to(prev: dict, state) -> list[str]:
    out = []
    while prev[state] is not None:
        state, symbol = prev[state]
        out.append(symbol)
    return out[::-1]


def intersection_witness(a: Pattern, b: Pattern, limit: int = 100_000) -> str | None:
    """A key both patterns match, or None when no key can match both (decided exactly). Counts against
    the automata budget where one is set (`automata_budget`)."""
    left = _AUTOMATA.get()
    if left is not None:
        left[0] -= 1
        if left[0] < 0:
            raise TooManyAutomata(too_many_automata_message())
    na, nb = _NFA(a), _NFA(b)
    alphabet = _alphabet(a, b)
    start = (na.closure(frozenset([0])), nb.closure(frozenset([0])))
    prev: dict[tuple, tuple | None] = {start: None}
    queue = deque([start])
    while queue and len(prev) < limit:
        state = queue.popleft()
        sa, sb = state
        if na.accept in sa and nb.accept in sb:
            return _path_to(prev, state)
        for ch in alphabet:
            nxt = (na.step(sa, ch), nb.step(sb, ch))
            if nxt[0] and nxt[1] and nxt not in prev:
                prev[nxt] = (state, ch)
                queue.append(nxt)
    return None


_SAMPLE_VALUES = {
    "seg": ("x", "zq_7", "weight"),
    "int": ("0", "7", "10"),
    "path": ("x", "zq.y", "model.layers.0"),
    "path?": ("", "x", "zq.y"),
}


@lru_cache(maxsize=4096)
def samples(pattern: Pattern) -> tuple[str, ...]:
    """A few keys the pattern matches, its captures filled with plain values (each capture type's
    first value in every key, then its second, ...)."""
    caps = [(split_offset(a)[0], b or "seg") for k, a, b in pattern.parts if k == "cap"]
    out = []
    for i in range(3):
        values = {name: _SAMPLE_VALUES[t][i] for name, t in caps}
        try:
            key = pattern.format(values)
        except (OffsetError, ValueError):
            continue
        if _matches(pattern, key):
            out.append(key)
    return tuple(dict.fromkeys(out))


@lru_cache(maxsize=4096)
def _matcher(pattern: Pattern) -> re.Pattern:
    return re.compile(pattern.regex(named=False))


def _matches(pattern: Pattern, key: str) -> bool:
    return _matcher(pattern).fullmatch(key) is not None


@lru_cache(maxsize=4096)
def _nfa(pattern: Pattern) -> _NFA:
    """One automaton per pattern, its steps cached: the linter asks many questions of each rule."""
    return _NFA(pattern)


@lru_cache(maxsize=1024)
def _union(patterns: tuple[Pattern, ...]) -> _NFA:
    return _NFA(union=patterns)


class Unknown(Exception):
    """A language question too large to decide within the search limit."""


def witness(
    must: list[Pattern],
    avoid: list[tuple[Pattern, tuple[Pattern, ...]]] = (),
    limit: int = 50_000,
    by_segment: bool | None = None,
) -> str | None:
    """A key every `must` pattern matches and no `avoid` rule does (a rule: a pattern less the keys
    its `unless` patterns match), or None when there is none. Decided exactly; raises Unknown when
    the search passes `limit` states. The linter asks whether a rule can ever see a key with it."""
    for key in samples(must[0]) if by_segment is None else ():  # an easy yes first: a few keys
        if all(_matches(p, key) for p in must[1:]) and not any(
            _matches(p, key) and not any(_matches(u, key) for u in unless) for p, unless in avoid
        ):
            return key
    plain = tuple(sorted({p for p, unless in avoid if not unless}, key=lambda p: p.text))
    guarded = [(p, unless) for p, unless in avoid if unless]
    everything = [*must, *plain, *(q for p, unless in guarded for q in (p, *unless))]
    # whole-segment patterns (nearly all) are searched a segment at a time: far fewer states
    if by_segment is None:
        by_segment = all(_segment_simple(p) for p in everything)
    one, union = (_seg_nfa, _seg_union) if by_segment else (_nfa, _union)
    flat = [one(p) for p in must]
    m = len(flat)
    if plain:
        flat.append(union(plain))
    pairs = []  # (index of the rule's automaton, indices of its unless automata)
    for p, unless in guarded:
        flat.append(one(p))
        at = len(flat) - 1
        flat.extend(one(u) for u in unless)
        pairs.append((at, range(at + 1, len(flat))))
    alphabet = _segment_alphabet(everything) if by_segment else _alphabet(*everything)
    join = ".".join if by_segment else "".join
    start = tuple(n.closure(frozenset([0])) for n in flat)

    def accepted(state: tuple) -> bool:
        if not all(flat[i].accepting(state[i]) for i in range(m)):
            return False
        if plain and flat[m].accepting(state[m]):
            return False
        return not any(
            flat[a].accepting(state[a]) and not any(flat[u].accepting(state[u]) for u in us)
            for a, us in pairs
        )

    prev: dict[tuple, tuple | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        if accepted(state):
            return join(_symbols_to(prev, state))
        for ch in alphabet:
            nxt = tuple(n.step(s, ch) if s else s for n, s in zip(flat, state, strict=True))
            if all(nxt[:m]) and nxt not in prev:
                if len(prev) >= limit:
                    raise Unknown(f"more than {limit} states")
                prev[nxt] = (state, ch)
                queue.append(nxt)
    return None


# ---- whether two patterns meet, decided segment by segment -----------------------------------


def meet(a: Pattern, b: Pattern) -> bool:
    """Whether some key matches both patterns. Exact, like `intersection_witness`, and fast: keys are
    dot-separated segments, path captures are runs of whole segments, so this is a match of two
    segment sequences with wildcards, asking the automata only whether two single segments meet."""
    (ha, ta), (hb, tb) = literal_ends(a), literal_ends(b)
    if not ((ha.startswith(hb) or hb.startswith(ha)) and (ta.endswith(tb) or tb.endswith(ta))):
        return False  # every key starts with its pattern's leading literal and ends with its trailing one
    if _odd(a) or _odd(b):  # an optional path with no dot of its own: leave it to the automata
        return intersection_witness(a, b) is not None
    sa, sb = _segments(a), _segments(b)

    @cache
    def can(i: int, j: int) -> bool:
        if i == len(sa) and j == len(sb):
            return True
        x = sa[i] if i < len(sa) else None
        y = sb[j] if j < len(sb) else None
        if x == "*" and can(i + 1, j):  # a path? that stands for no segment
            return True
        if y == "*" and can(i, j + 1):
            return True
        if x is None or y is None:
            return False
        if x == "*":  # it takes the other side's next segment, whatever it is
            return can(i, j + 1) if y != "*" else False
        if y == "*":
            return can(i + 1, j)
        return _segments_meet(x, y) and can(i + 1, j + 1)

    return can(0, 0)


@lru_cache(maxsize=16384)
def literal_ends(p: Pattern) -> tuple[str, str]:
    """The text every key the pattern matches starts with, and ends with (an optional path's dot is
    its own: `a.{p:path?}` matches `a`)."""
    els = p.elements
    if not els:
        return "", ""
    head = els[0][1] if els[0][0] == "lit" else ""
    tail = els[-1][1] if els[-1][0] == "lit" else ""
    return head, tail


_ANY_SEGMENT = (("cap", "_", "seg"),)


def _odd(p: Pattern) -> bool:
    """A `path?` that cannot take a dot with it when empty (two in a row, say): its empty form
    leaves an empty segment, which the segment view does not model."""
    return len(p.elements) > 1 and any(k == "opt" and side is None for k, _, side in p.elements)


@lru_cache(maxsize=4096)
def _segments(p: Pattern) -> tuple:
    """The pattern as segments: "*" for any run of segments (a path is one segment then "*"), else
    the fragments of one segment (literal text and seg/int captures)."""
    out: list = []
    cur: list | None = []  # None: just after a path, whose closing dot is the next literal's first
    for kind, a, b in p.parts:
        if kind == "cap" and b in ("path", "path?"):
            if cur:
                out.append(tuple(cur))
            if b == "path":
                out.append(_ANY_SEGMENT)
            out.append("*")
            cur = None
            continue
        if kind == "cap":
            cur = [] if cur is None else cur
            cur.append((kind, a, b or "seg"))
            continue
        for k, piece in enumerate(a.split(".")):
            if k > 0:
                if cur is not None:
                    out.append(tuple(cur))
                cur = []
            if piece:
                cur = [] if cur is None else cur
                cur.append(("lit", piece, None))
    if cur is not None:
        out.append(tuple(cur))
    return tuple(out)


@lru_cache(maxsize=16384)
def _segments_meet(x: tuple, y: tuple) -> bool:
    if len(x) == 1 and len(y) == 1:  # the usual segments, decided without an automaton
        (kx, ax, tx), (ky, ay, ty) = x[0], y[0]
        if kx == ky == "lit":
            return ax == ay
        if kx == "lit" or ky == "lit":
            lit, typ = (ax, ty) if kx == "lit" else (ay, tx)
            return typ != "int" or _INT.fullmatch(lit) is not None
        return True  # two captures of one segment: `0` is both a seg and an int
    hx, tx_ = _fragment_ends(x)
    hy, ty_ = _fragment_ends(y)
    if not ((hx.startswith(hy) or hy.startswith(hx)) and (tx_.endswith(ty_) or ty_.endswith(tx_))):
        return False  # a segment starts with its leading literal and ends with its trailing one

    def pat(frags: tuple) -> Pattern:
        return Pattern("".join(a if k == "lit" else "{" + a + "}" for k, a, _ in frags), frags)

    return intersection_witness(pat(x), pat(y)) is not None


def _fragment_ends(frags: tuple) -> tuple[str, str]:
    """The literal text a segment of these fragments must start with, and end with."""
    head = frags[0][1] if frags and frags[0][0] == "lit" else ""
    tail = frags[-1][1] if frags and frags[-1][0] == "lit" else ""
    return head, tail


# ---- the same automata a segment at a time ---------------------------------------------------

_INT = re.compile(r"0|[1-9][0-9]*")


def _segment_simple(p: Pattern) -> bool:
    """Every segment of the pattern is one literal, one seg or int capture, or a path."""
    return not _odd(p) and all(x == "*" or len(x) == 1 for x in _segments(p))


class _SegNFA:
    """Keys as sequences of segments: state (branch, position); a path loops on any segment."""

    def __init__(self, patterns: tuple[Pattern, ...]):
        self.branches = [_segments(p) for p in patterns]
        self.accepts = frozenset((b, len(items)) for b, items in enumerate(self.branches))
        self._steps: dict = {}

    def accepting(self, states: frozenset) -> bool:
        return not self.accepts.isdisjoint(states)

    def closure(self, states: frozenset) -> frozenset:
        if states == frozenset([0]):  # the start: every branch at its first segment
            states = frozenset((b, 0) for b in range(len(self.branches)))
        out, todo = set(states), list(states)
        while todo:
            b, i = todo.pop()
            items = self.branches[b]
            if i < len(items) and items[i] == "*" and (b, i + 1) not in out:
                out.add((b, i + 1))
                todo.append((b, i + 1))
        return frozenset(out)

    def step(self, states: frozenset, segment: str) -> frozenset:
        key = (states, segment)
        if key not in self._steps:
            nxt = set()
            for b, i in states:
                items = self.branches[b]
                if i == len(items):
                    continue
                if items[i] == "*":
                    nxt.add((b, i))
                elif _segment_matches(items[i][0], segment):
                    nxt.add((b, i + 1))
            self._steps[key] = self.closure(frozenset(nxt)) if nxt else frozenset()
        return self._steps[key]


def _segment_matches(fragment: tuple, segment: str) -> bool:
    kind, a, b = fragment
    if kind == "lit":
        return segment == a
    return b != "int" or _INT.fullmatch(segment) is not None


@lru_cache(maxsize=4096)
def _seg_nfa(pattern: Pattern) -> _SegNFA:
    return _SegNFA((pattern,))


@lru_cache(maxsize=1024)
def _seg_union(patterns: tuple[Pattern, ...]) -> _SegNFA:
    return _SegNFA(patterns)


def _segment_alphabet(patterns: list[Pattern]) -> list[str]:
    """One segment for each class the patterns cannot tell apart: each literal segment, a number
    none of them spells, and a word none of them spells."""
    lits = {x[0][1] for p in patterns for x in _segments(p) if x != "*" and x[0][0] == "lit"}
    number = next(str(n) for n in range(987654321, 987654400) if str(n) not in lits)
    word = next(w for w in ("zq", "zqx", "zqxw", "zqxwv") if w not in lits)
    return sorted(lits) + [number, word]
