"""Choices the shapes left open, decided by a checkpoint pair's tensors: each form tried on one group
and kept where it gives the target bit for bit (part orders, transposes, pairings, row permutations)."""

from __future__ import annotations

from .names import Template
from .search import MAX_TRANSFORMS_TRIED, Explained, Synthesis, one_convert, rename_yaml, shown


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
        moved = f" with {shown(t)} (the names said {shown(was)})" if t != was else ""
        _answered(found, rule, f"{rule.label}: {what}{moved} by the data, bit for bit")


def _answered(found: Synthesis, rule: Explained, decided: str) -> None:
    if rule.question in found.questions:
        found.questions.remove(rule.question)
    found.decided.append(decided)


def _repaired(rule: Explained, s: Template, candidates: list, source, target):
    """The first (target, yaml, transform) among the candidates, renamed as is and then transformed,
    that gives the target's tensors; None if none does."""
    shape = rule.members[0][1][0] if rule.members else ()
    rows = shape[0] if shape else 0
    for t in candidates:
        yaml = rename_yaml(s, t, rule.keys)
        if _fits(yaml, source, target):
            return t, yaml, ""
    for t in candidates:
        for expr in _transforms(rows):
            yaml = one_convert(s, t, rule.keys, expr)
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
    from .. import api
    from ..spec import parse_spec

    return api.compile(parse_spec(f"spec: trial\nrules:\n{rule_yaml}\n", "trial.yaml"))


def _fits(rule_yaml: str, source, target) -> bool:
    """Whether the one-rule spec gives, from the source's tensors, the target's, on one group."""
    import torch

    from ..errors import ConvspecError

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
