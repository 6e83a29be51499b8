"""Routes: where each checkpoint key goes through a plan. Keys that differ only in whole-segment
numbers (`layers.3.mlp` and `layers.41.mlp`) take the same route, so bind matches one key per shape."""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate, groupby
from operator import itemgetter

from .compile.patterns import OffsetError
from .compile.plan import Plan
from .derived import derived
from .errors import BindError, Problem
from .io.safetensors import MAX_KEY_CHARS, shown_key

# A route is ("pass", final key, renamed?, aliased?) | ("drop",) | ("member", rule, input, captures)
# | ("error", message).


def base_lead(plan: Plan, keys) -> str:
    """For a base-model checkpoint (the spec has a `base_prefix` and no key is under it): the stand-in
    segment (`<model>.`) a key is also matched behind, so that a leading capture (`{p:path}.x`,
    transformers' pattern that matches anywhere in a key) may match nothing. "" otherwise."""
    pre = plan.base_prefix
    if not pre or any(k.startswith(pre + ".") for k in keys):
        return ""
    return f"<{pre}>."


def match(plan: Plan, key: str, start: int = 0, renames_only: bool = False, lead: str = ""):
    """`plan.first_match`, and with `lead`, the key behind it too: the earlier rule wins (on a tie,
    the key as it is). A match behind the lead counts only where a leading capture holds the lead
    alone (it matched nothing), the rule's `unless` does not name the key under the real prefix,
    and the key's own first match is not a rule that starts with a literal (one written for keys
    at the root). Captures keep the lead; `unlead` takes it off what they make."""
    hit = plan.first_match(key, start, renames_only)
    if lead:
        alt = plan.first_match(lead + key, start, renames_only)
        if (
            alt is not None
            and (hit is None or (alt[0] < hit[0] and not _at_root(plan, hit)))
            and lead[:-1] in alt[2].values()
            and not _unless_under_prefix(plan, alt[0], key)
        ):
            return alt
    return hit


def _at_root(plan: Plan, hit) -> bool:
    """Whether the matched input pattern starts with a literal (it names keys at the root)."""
    pat = dict(plan.rules[hit[0]].inputs)[hit[1]]
    return bool(pat.parts) and pat.parts[0][0] == "lit"


def _unless_under_prefix(plan: Plan, ri: int, key: str) -> bool:
    rule = plan.rules[ri]
    if not rule.unless:
        return False
    unless = derived(
        plan, ("unless", ri), lambda: re.compile("|".join(u.regex(named=False) for u in rule.unless))
    )
    return unless.fullmatch(f"{plan.base_prefix}.{key}") is not None


def unlead(key: str, lead: str) -> str:
    return key[len(lead) :] if lead and key.startswith(lead) else key


def route_one(plan: Plan, key: str, lead: str = "") -> tuple:
    """One key through the plan: the renames in order, then the convert or drop that claims it."""
    cur, pos, touched, aliased = key, 0, False, False
    rules = plan.rules
    while True:
        hit = match(plan, cur, pos, lead=lead)
        if hit is None:
            return ("pass", cur, touched, aliased)
        ri, name, caps = hit
        rule = rules[ri]
        if rule.kind == "rename":
            try:
                cur = unlead(rule.outputs[0][1].format(caps), lead)
            except OffsetError as exc:
                return ("error", Problem(f"{rule.label}: {key}: {exc}", rule.number))
            pos, touched, aliased = ri + 1, True, aliased or rule.one_way
            continue
        if rule.kind == "drop":
            return ("drop",)
        return ("member", ri, name, caps)


def follow_renames(
    plan: Plan, key: str, start: int = 0, renames_only: bool = False, lead: str = ""
) -> tuple[str, tuple | None]:
    """A key through the plan's renames from rule `start` on: the key they leave, and the match of
    the rule that then claims it (a convert or a drop), or None when none does."""
    while (hit := match(plan, key, start, renames_only, lead)) is not None:
        ri, _, caps = hit
        rule = plan.rules[ri]
        if rule.kind != "rename":
            return key, hit
        key, start = unlead(rule.outputs[0][1].format(caps), lead), ri + 1
    return key, None


def inverse_back(inverse: Plan, key: str, lead: str = "") -> str | None:
    """Where the inverse plan's renames take a key, or None when a convert of the inverse claims it."""
    key, claimed = follow_renames(inverse, key, lead=lead)
    return None if claimed else key


def inverse_claims(inverse: Plan | None, key: str, lead: str = "") -> bool:
    """Whether the inverse plan would rename or convert `key`: it reads as a key of the target layout."""
    return inverse is not None and inverse_back(inverse, key, lead) != key


@dataclass
class Routes:
    """Every key's route: renamed or passed through, dropped, or a member of a convert's group."""

    passthrough: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    aliased: list[str] = field(default_factory=list)
    members: dict[tuple[int, tuple[str, ...]], dict[str, dict]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    collisions: list[tuple[str, str, str | None]] = field(default_factory=list)  # src, dst, back
    ambiguous: list[str] = field(default_factory=list)  # claimed here, and the inverse would claim them too
    shapes: int = 0  # how many keys were matched by the regex (one per shape on the fast path)
    lead: str = ""  # a base-model checkpoint's stand-in segment (base_lead), or ""

    def add_member(self, rule: int, keep: tuple, name: str, idx: tuple, key: str) -> None:
        self.members.setdefault((rule, keep), {}).setdefault(name, {})[idx] = key


def route_all(plan: Plan, keys: list[str], inverse: Plan | None = None, lead: str = "") -> Routes:
    """Route every key; with `inverse`, also list pass-through keys the inverse would not give back.
    With `lead` (see base_lead), keys are matched behind it too."""
    check_key_lengths(keys)
    out = Routes(lead=lead)
    pinned = fold_info(plan)
    if pinned is None or len(keys) < 32:
        _route_each(plan, keys, inverse, out)
        return out
    big = "\n".join(keys)
    if _PLACEHOLDER in big or big.count("\n") != len(keys) - 1:
        _route_each(plan, keys, inverse, out)
        return out
    if _LEADING_ZERO.search(big):  # `layers.01`: not an {i:int}, so it cannot share a route with `layers.11`
        ends = list(accumulate(len(k) + 1 for k in keys))
        alone = {bisect_right(ends, m.start()) for m in _LEADING_ZERO.finditer(big)}
        _route_each(plan, [keys[i] for i in sorted(alone)], inverse, out)
        keys = [k for i, k in enumerate(keys) if i not in alone]
        big = "\n".join(keys)
    shapes = big.encode().translate(_FOLD).split(b"\n")  # bytes: one fewer copy of every key
    buckets: dict[bytes, list[str]] = {}
    for k, s in zip(keys, shapes, strict=True):
        b = buckets.get(s)
        if b is None:
            buckets[s] = [k]
        else:
            b.append(k)
    widths = {len(p) for p in pinned}
    for shape, ks in buckets.items():
        fold, maybe, other = [], [], []  # maybe: as wide as a number the spec spells out
        for m in _RUN.finditer(shape):  # ASCII digits are one byte in UTF-8: byte offsets are str offsets
            a, b = m.span()
            whole = (a == 0 or shape[a - 1] == 46) and (b == len(shape) or shape[b] == 46)  # "."
            (other if not whole else maybe if b - a in widths else fold).append((a, b))
        if not other and not maybe:
            _route_unit(plan, ks, fold, inverse, out)
            continue
        units: dict[tuple, list[str]] = {}
        for k in ks:
            sub = tuple(k[a:b] for a, b in other) + tuple(
                v if (v := k[a:b]) in pinned else None for a, b in maybe
            )
            units.setdefault(sub, []).append(k)
        for sub, unit in units.items():
            kept = [r for r, v in zip(maybe, sub[len(other) :], strict=True) if v is None]
            _route_unit(plan, unit, sorted(fold + kept), inverse, out)
    return out


_PLACEHOLDER = "\x1f"
_FOLD = bytes.maketrans(b"0123456789", _PLACEHOLDER.encode() * 10)
_RUN = re.compile(_PLACEHOLDER.encode() + b"+")
_LEADING_ZERO = re.compile(r"0(?<![^.\n]0)[0-9]")  # a whole-segment number written with a leading 0
_SENTINEL = 7_190_000_001  # stands for the j-th number of a key shape while its route is found


def fold_info(plan: Plan) -> frozenset[str] | None:
    """The numbers a plan's templates spell out as whole segments (keys keep those as they are), or
    None when a template could tell two numbers apart otherwise (then every key is matched alone)."""
    return derived(plan, "fold", lambda: _fold_info(plan))


def _fold_info(plan: Plan) -> frozenset[str] | None:
    pinned: set[str] = set()
    ok = True
    for rules in (plan.rules, plan.inverse_rules or ()):
        for r in rules:
            for p in [p for _, p in r.inputs] + [p for _, p in r.outputs] + list(r.unless):
                ok = ok and not p.offsets and _scan(p.elements, pinned)
    return frozenset(pinned) if ok else None


def _scan(els: tuple, pinned: set[str]) -> bool:
    for i, (kind, a, _) in enumerate(els):
        if kind != "lit":
            if i + 1 < len(els) and els[i + 1][0] != "lit":
                return False  # two captures side by side could split a number between them
            continue
        for m in re.finditer(r"[0-9]+", a):
            s, e = m.span()
            if (s and a[s - 1] != ".") or (e < len(a) and a[e] != "."):
                continue  # inside a word (`w1`): never matches a whole number segment
            left = s > 0 or i == 0 or els[i - 1][:1] == ("opt",) and els[i - 1][2] == "after"
            right = (
                e < len(a) or i == len(els) - 1 or els[i + 1][:1] == ("opt",) and els[i + 1][2] == "before"
            )
            if not (left and right):
                return False  # `{x}0`: a capture and a literal digit share one segment
            pinned.add(m.group())
    return True


def _route_each(plan: Plan, keys, inverse: Plan | None, out: Routes) -> None:
    """The plain path: one regex match per key (and per rename)."""
    for key in keys:
        _add(plan, key, route_one(plan, key, out.lead), inverse, out)
        out.shapes += 1


def _add(plan: Plan, key: str, r: tuple, inverse: Plan | None, out: Routes) -> None:
    kind = r[0]
    if kind == "pass":
        _, cur, touched, aliased = r
        out.passthrough[key] = cur
        if not touched:
            out.unmatched.append(key)
        if aliased:
            out.aliased.append(key)
        elif inverse is not None:
            back = inverse_back(inverse, cur, out.lead)
            if back != key:
                out.collisions.append((key, cur, back))
            if touched and inverse_claims(inverse, key, out.lead):
                out.ambiguous.append(key)
    elif kind == "drop":
        out.dropped.append(key)
    elif kind == "error":
        out.problems.append(r[1])
    else:
        _, ri, name, caps = r
        rule = plan.rules[ri]
        out.add_member(
            ri, tuple(caps[c] for c in rule.keep), name, tuple(caps[c] for c in rule.free_of[name]), key
        )
        if inverse_claims(inverse, key, out.lead):
            out.ambiguous.append(key)


def check_key_lengths(keys) -> None:
    """Refuse every key longer than MAX_KEY_CHARS before any is matched: a regex may backtrack over
    a long key for a time that grows as its length squared (see MAX_OPEN_CAPTURES)."""
    longest = max(keys, key=len, default="")
    if len(longest) > MAX_KEY_CHARS:
        long = [k for k in keys if len(k) > MAX_KEY_CHARS]
        raise BindError(
            [
                f"key {shown_key(k)} is {len(k):,} characters long; at most {MAX_KEY_CHARS:,} are allowed"
                for k in long
            ],
            hint="no model has such keys: the checkpoint is damaged or hostile",
        )


def _template(text: str, sentinels: list[str]):
    """A string that may hold sentinels -> an int j (it is exactly the j-th number), or a format string."""
    if text in sentinels:
        return sentinels.index(text)
    pieces = re.split("(" + "|".join(sentinels) + ")", text) if sentinels else [text]
    return "".join(
        "{" + str(sentinels.index(p)) + "}" if i % 2 else p.replace("{", "{{").replace("}", "}}")
        for i, p in enumerate(pieces)
    )


def _fill(t, vals) -> str:
    """A template filled with a key's numbers (`vals[j]` is the j-th)."""
    return vals[t] if type(t) is int else t.format(*vals)


def _route_unit(plan: Plan, ks: list[str], fold: list, inverse: Plan | None, out: Routes) -> None:
    """Keys that differ only in the numbers at `fold`: route one stand-in key, apply it to all."""
    rep = ks[0]
    sentinels = [str(_SENTINEL + j) for j in range(len(fold))]
    parts, last = [], 0
    for (a, b), s in zip(fold, sentinels, strict=True):
        parts += [rep[last:a], s]
        last = b
    stand_in = "".join(parts) + rep[last:]
    r = route_one(plan, stand_in, out.lead)
    out.shapes += 1
    rep_vals = tuple(rep[a:b] for a, b in fold)
    kind = r[0]
    if kind == "pass":
        final = _template(r[1], sentinels)
        if (r[0], _fill(final, rep_vals), *r[2:]) != route_one(plan, rep, out.lead):
            return _route_each(plan, ks, inverse, out)
        _, _, touched, aliased = r
        if final == _template(stand_in, sentinels):
            out.passthrough.update(zip(ks, ks, strict=True))
        elif type(final) is int:
            out.passthrough.update((k, k[fold[final][0] : fold[final][1]]) for k in ks)
        elif "{" not in final.replace("{{", ""):
            const = final.format()
            out.passthrough.update((k, const) for k in ks)
        else:
            rows = _rows(ks, fold)
            fmt = final.format
            out.passthrough.update(zip(ks, (fmt(*v) for v in rows), strict=True))
        if not touched:
            out.unmatched.extend(ks)
        if aliased:
            out.aliased.extend(ks)
        elif inverse is not None and inverse_back(inverse, r[1], out.lead) != stand_in:
            for k in ks:
                cur = out.passthrough[k]
                out.collisions.append((k, cur, inverse_back(inverse, cur, out.lead)))
        if touched and not aliased and inverse_claims(inverse, stand_in, out.lead):
            out.ambiguous.extend(ks)
        return
    if kind == "drop":
        if route_one(plan, rep, out.lead) != r:
            return _route_each(plan, ks, inverse, out)
        out.dropped.extend(ks)
        return
    if kind == "error":
        return _route_each(plan, ks, inverse, out)
    _, ri, name, caps = r
    rule = plan.rules[ri]
    keep_t = [_template(caps[c], sentinels) for c in rule.keep]
    idx_t = [_template(caps[c], sentinels) for c in rule.free_of[name]]
    expect = ("member", ri, name, {c: _fill(_template(v, sentinels), rep_vals) for c, v in caps.items()})
    if route_one(plan, rep, out.lead) != expect:
        return _route_each(plan, ks, inverse, out)
    if inverse_claims(inverse, stand_in, out.lead):
        out.ambiguous.extend(ks)
    deps = sorted({j for t in keep_t for j in ([t] if type(t) is int else _fields(t))})
    if len(deps) <= 1 and all(type(t) is int for t in idx_t):
        _members_by_runs(ks, fold, ri, name, keep_t, idx_t, deps, out.members)
        return
    by_dep: dict = {}  # the numbers a group's name depends on: keys that share them share the group
    for k, v in zip(ks, _rows(ks, fold), strict=True):
        d = tuple(v[j] for j in deps)
        m = by_dep.get(d)
        if m is None:
            keep = tuple(_fill(t, v) for t in keep_t)
            m = by_dep[d] = out.members.setdefault((ri, keep), {}).setdefault(name, {})
        m[tuple(_fill(t, v) for t in idx_t)] = k


def _members_by_runs(ks, fold, ri: int, name: str, keep_t, idx_t, deps, members) -> None:
    """The common case in bulk: a group named by at most one number, indexed by numbers. Keys come
    in runs that share the group (checkpoints list a layer's keys together), each run added at once."""
    cols = {j: list(map(itemgetter(slice(*fold[j])), ks)) for j in {*deps, *idx_t}}
    idxs = list(zip(*(cols[j] for j in idx_t), strict=True)) if idx_t else [()] * len(ks)
    runs = groupby(cols[deps[0]]) if deps else [(None, ks)]
    i = 0
    for d, run in runs:
        n = len(list(run))
        vals = [""] * len(fold)  # the group's name needs only its own number
        if deps:
            vals[deps[0]] = d
        keep = tuple(_fill(t, vals) for t in keep_t)
        m = members.setdefault((ri, keep), {}).setdefault(name, {})
        m.update(zip(idxs[i : i + n], ks[i : i + n], strict=True))
        i += n


def _fields(fmt: str) -> list[int]:
    return [int(x) for x in re.findall(r"(?<!\{)\{(\d+)\}", fmt.replace("{{", ""))]


def _rows(ks: list[str], fold: list) -> list[tuple]:
    """Each key's numbers at the folded positions, as a tuple of strings."""
    if not fold:
        return [()] * len(ks)
    if len(fold) == 1:
        (a, b) = fold[0]
        return [(k[a:b],) for k in ks]
    cols = [[k[a:b] for k in ks] for a, b in fold]
    return list(zip(*cols, strict=True))
