"""`convspec check`: lint a spec (and, given one, against a checkpoint's headers) with stable rule codes.

Each rule below has a code, a severity and a one-line reason; `RULES` is the reference
(docs/authoring.md lists it). Errors make `check` exit 1; warnings and notes do not.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from typing import Any

from . import api
from .compile.compiler import _dequantizes, bounded_automata, compile_all
from .compile.patterns import OffsetError, Pattern, Unknown, _matches, meet, witness
from .compile.plan import Plan
from .errors import BindError, CompileError, ConfigError, Diagnostic, Span, SpecError
from .io.config import load_config
from .keyshapes import compact_keys
from .ops import OPS, NotInvertible
from .ops.quant import Dequantize
from .quantization import Quant
from .style import PLAIN, Style


@dataclass(frozen=True)
class LintRule:
    code: str
    name: str
    severity: str  # error | warning | info
    summary: str


RULES: dict[str, LintRule] = {
    r.code: r
    for r in (
        LintRule("E001", "parse-error", "error", "the spec does not parse"),
        LintRule(
            "E002", "compile-error", "error", "the spec parses but a static check of the compiler fails"
        ),
        LintRule("E101", "overlapping-converts", "error", "two converts (or two inputs) can claim one key"),
        LintRule("E102", "unused-binding", "error", "a capture, input or value is bound but never used"),
        LintRule(
            "E103", "bind-error", "error", "the checkpoint does not fit the plan (checked from headers)"
        ),
        LintRule("W201", "unreachable-rule", "warning", "earlier rules claim every key the rule matches"),
        LintRule("W202", "rename-chain", "warning", "a later rename renames every key a rename makes"),
        LintRule("W203", "identity-rename", "warning", "a rename whose target is its source"),
        LintRule("W204", "lossy-rule", "warning", "a rule whose inverse cannot give the source back"),
        LintRule("W205", "not-invertible", "warning", "an op with no inverse: the spec cannot save back"),
        LintRule("W206", "dead-rule", "warning", "no key of the checkpoint reaches the rule"),
        LintRule(
            "W207",
            "not-undone",
            "warning",
            "saving back would not undo a rule (the inverse takes its keys elsewhere)",
        ),
        LintRule(
            "W208",
            "companion-by-hand",
            "warning",
            "a convert binds a quantized weight's companion: the compiler derives every companion's ops",
        ),
        LintRule(
            "W209",
            "dequantizes",
            "warning",
            "a convert dequantizes a weight itself: the plan cannot save back",
        ),
        LintRule("I301", "unclaimed-keys", "info", "checkpoint keys no rule claims (they pass through)"),
    )
}

_NOQA = re.compile(r"#\s*noqa(?::\s*(?P<codes>[A-Z][0-9]{3}(?:\s*,\s*[A-Z][0-9]{3})*))?", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    """One problem: where (file, line, column), which rule, what, and what to do."""

    code: str
    message: str
    file: str | None = None
    line: int | None = None
    col: int | None = None
    hint: str | None = None

    @property
    def severity(self) -> str:
        return RULES[self.code].severity

    def location(self) -> str:
        if self.line is None:
            return self.file or "<spec>"
        return f"{self.file or '<spec>'}:{self.line}:{self.col or 1}"

    def text(self, s: Style = PLAIN) -> str:
        colour = {"error": s.error, "warning": s.warning, "info": s.dim}[self.severity]
        tail = f"; {self.hint}" if self.hint else ""
        return f"{s.bold(self.location())}: {colour(self.code)} {self.message}{tail}"

    def to_dict(self) -> dict:
        return {**asdict(self), "severity": self.severity, "rule": RULES[self.code].name}


@dataclass(frozen=True)
class KeyShape:
    """Keys that differ only in their numbers, written once: `model.layers.{0..31}.norm.weight`."""

    text: str
    count: int
    example: str
    closest: str | None = None  # the rule input pattern the keys nearly match, if any
    tensor: str = ""  # their shape and dtype (`[48, 32] bfloat16`), or how many kinds they have


@dataclass
class Report:
    """The findings for one spec, and with a checkpoint its coverage and unclaimed key shapes."""

    spec: str
    findings: list[Finding] = field(default_factory=list)
    coverage: dict[str, Any] | None = None
    checkpoint: str | None = None
    unclaimed: list[KeyShape] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def counts(self) -> dict[str, int]:
        out = {"error": 0, "warning": 0, "info": 0}
        for f in self.findings:
            out[f.severity] += 1
        return out

    def to_dict(self) -> dict:
        return {
            "spec": self.spec,
            "findings": [f.to_dict() for f in self.findings],
            "counts": self.counts(),
            "checkpoint": self.checkpoint,
            "coverage": self.coverage,
            "unclaimed": [asdict(u) for u in self.unclaimed],
        }

    def text(self, s: Style = PLAIN) -> str:
        lines = [f.text(s) for f in self.findings]
        if self.coverage is not None:
            c = self.coverage
            lines.append(
                f"{self.checkpoint}: {c['keys'] - c['unmatched']} of {c['keys']} keys claimed "
                f"({c['claimed_share']:.1%}): {c['converted']} converted, {c['renamed']} renamed, "
                f"{c['dropped']} dropped, {c['unmatched']} unclaimed"
                + (f" ({c['already']} of them in the target layout already)" if c.get("already") else "")
            )
        n = self.counts()
        summary = ", ".join(f"{v} {k}{'s' if v != 1 else ''}" for k, v in n.items() if v)
        lines.append(f"{self.spec}: {summary or s.ok('no problems')}")
        return "\n".join(lines)


def check_spec(
    spec: str,
    config: Any = None,
    layout: dict | None = None,
    select: tuple[str, ...] | None = None,
    ignore: tuple[str, ...] | None = None,
    checkpoint: str | None = None,
) -> Report:
    """Lint `spec` (a built-in name or a file); with `layout` ({key: TensorInfo}), also against it.
    A spec that cannot be found, or a config that cannot be read, raises: that is not a finding."""
    report = Report(spec, checkpoint=checkpoint or ("<checkpoint>" if layout is not None else None))
    findings: list[Finding] = []
    try:
        parsed = api.load_spec(spec)
    except SpecError as exc:
        findings.append(_from_diagnostic(exc.diagnostic()))
        return _finish(report, findings, select, ignore, {})
    state = compile_all(parsed, load_config(config), api._resolver(parsed))
    findings += [_from_diagnostic(d) for d in state.diagnostics]  # every one, overlaps (E101) included
    plan, flat, origins = state.plan, state.flat, state.origins
    lines = _lines(flat)
    findings += _by_hand(state.quant, flat, origins)  # needs no plan: it explains why one failed
    if plan is None:  # a rule failed: the analyses below need every rule
        return _finish(report, findings, select, ignore, lines)
    try:
        with bounded_automata(flat):  # the analyses compare templates pairwise: their cost is bounded
            derived = state.companion_rules
            analysis = _Analysis(plan, flat, origins, derived)
            findings += analysis.unreachable()
            findings += analysis.renames()
            findings += analysis.lossy()
            if plan.inverse_rules is not None:
                inverse = plan.inverse(allow_lossy=True)
                forward = [r.number - 1 for r in inverse.rules]  # the spec's rule each inverse rule undoes
                back = _Analysis(
                    inverse,
                    [flat[i] for i in forward],
                    [origins[i] for i in forward],
                    {k for k, i in enumerate(forward) if i in derived},
                )
                findings += back.not_undone()
    except CompileError as exc:
        findings.append(_from_diagnostic(exc.diagnostic()))
        return _finish(report, findings, select, ignore, lines)
    if layout is not None:
        shadowed = {(f.file, f.line) for f in findings if f.code == "W201"}
        findings += [
            f
            for f in _against(plan, flat, origins, parsed, layout, report, findings, derived)
            if not (f.code == "W206" and (f.file, f.line) in shadowed)  # said already, and why
        ]
    return _finish(report, findings, select, ignore, lines)


def _finish(report: Report, findings: list[Finding], select, ignore, spans) -> Report:
    def wanted(code: str) -> bool:
        if select is not None and not any(code.startswith(c) for c in select):
            return False
        return not (ignore is not None and any(code.startswith(c) for c in ignore))

    report.findings = [f for f in findings if wanted(f.code) and not _suppressed(f, spans)]
    return report


def _lines(flat: list) -> dict:
    """Where each rule, and each input and output of a convert, was written: a `# noqa` on any of
    those lines silences the findings placed there."""
    spans: dict = {i: r.span for i, r in enumerate(flat)}
    for i, r in enumerate(flat):
        parts = [*r.inputs, *r.outputs] if getattr(r, "kind", "") == "convert" else []
        spans.update({(i, j): p.span for j, p in enumerate(parts)})
    return spans


def _suppressed(f: Finding, spans: dict) -> bool:
    """A `# noqa` or `# noqa: W201` comment on the finding's line silences it."""
    text = next(
        (s.text for s in spans.values() if s is not None and s.file == f.file and s.line == f.line), None
    )
    m = _NOQA.search(text or "")
    if m is None:
        return False
    codes = m.group("codes")
    return codes is None or f.code in {c.strip().upper() for c in codes.split(",")}


def _by_hand(q: Quant | None, flat: list, origins: list) -> list[Finding]:
    """W208: the spec's own converts that bind a companion (a scale) as an input and do not dequantize:
    the compiler binds each weight's companions beside it and derives their ops, so a rule of its own
    for a scale writes its targets twice (or claims the keys the weight's rule binds)."""
    out = []
    for i, rule in enumerate(flat):
        if q is None or origins[i] or getattr(rule, "kind", "") != "convert" or _dequantizes(rule):
            continue
        for b in rule.inputs:
            if q.is_companion(b.template.text):
                out.append(
                    _at(
                        "W208",
                        b.span or rule.span,
                        f"rule {i + 1} binds input {b.name} = {b.template.text}, a companion of the "
                        f"{q.scheme} quantization: the compiler binds it beside its weight and derives its "
                        "ops already, so the rule writes its targets twice",
                        "drop the input: companions follow their weights (docs/quantization.md)",
                    )
                )
    return out


def _from_diagnostic(d: Diagnostic) -> Finding:
    """A finding is a diagnostic under lint's name for it: same code, place, message and hint."""
    span = d.span
    return Finding(
        d.code,
        d.message,
        span.file if span else None,
        span.line if span else None,
        span.col if span else None,
        d.hint,
    )


def _at(code: str, span: Span | None, message: str, hint: str | None = None) -> Finding:
    if span is None:
        return Finding(code, message, hint=hint)
    return Finding(code, message, span.file, span.line, span.col, hint)


# ---- static analysis: the languages the rules match ------------------------------------------


class _Analysis:
    """Questions about which keys reach which rule, answered exactly on the rules' patterns."""

    def __init__(self, plan: Plan, flat: list, origins: list, derived: AbstractSet[int] = frozenset()):
        self.plan, self.flat, self.origins, self.derived = plan, flat, origins, derived
        self.rules = plan.rules
        self._meets: dict[tuple[Pattern, Pattern], bool] = {}

    def meets(self, a: Pattern, b: Pattern) -> bool:
        """Whether some key matches both (decided exactly, segment by segment)."""
        key = (a, b) if a.text <= b.text else (b, a)
        if key not in self._meets:
            self._meets[key] = meet(a, b)
        return self._meets[key]

    def own(self, i: int) -> bool:
        """Rule i is the linted spec's own, not an included spec's (those are linted on their own)."""
        return self.origins[i] == "" and i not in self.derived

    def claims(self, k: int) -> list[tuple[Pattern, tuple[Pattern, ...]]]:
        """What rule k takes from the keys that reach it: each input, less its `unless` keys."""
        r = self.rules[k]
        return [(p, r.unless) for _, p in r.inputs]

    def span(self, i: int, input_name: str | None = None) -> Span | None:
        rule = self.flat[i]
        if input_name is not None and rule.kind == "convert":
            for b in rule.inputs:
                if b.name == input_name:
                    return b.span or rule.span
        return rule.span

    def reaches(self, i: int, pat: Pattern) -> bool:
        """Whether any key can reach rule i and match `pat`."""
        return next(self.sources(i, pat), None) is not None

    def sources(self, i: int, pat: Pattern):
        """Where the keys that reach rule i and match `pat` can come from: -1 for the checkpoint's
        own keys (that no earlier rule takes), j for the keys rename j makes (that no rule between
        takes). Undecided questions count as a source."""
        own = [(u, ()) for u in self.rules[i].unless]
        origins: list[tuple[int, int, list[Pattern]]] = [(-1, 0, [pat])]
        for j in range(i):
            r = self.rules[j]
            if r.kind == "rename" and self.meets(r.outputs[0][1], pat):
                origins.append((j, j + 1, [r.outputs[0][1], pat]))
        for origin, lo, must in origins:
            avoid = [c for k in range(lo, i) for c in self.claims(k) if self.meets(c[0], pat)]
            try:
                found = witness(must, avoid + own) is not None
            except Unknown:
                found = True
            if found:
                yield origin

    def _blind(self):
        """The linted spec's own rules with an input no key can reach: (index, rule, that input's
        name, its pattern, the first rule that alone takes every key it matches, or None)."""
        for i, rule in enumerate(self.rules):
            if not self.own(i):
                continue
            dead = [name for name, pat in rule.inputs if not self.reaches(i, pat)]
            if dead:
                pat = dict(rule.inputs)[dead[0]]
                yield i, rule, dead[0], pat, self._shadowed_by(i, pat)

    def unreachable(self) -> list[Finding]:
        out = []
        for i, rule, name, pat, by in self._blind():
            several = len(rule.inputs) > 1
            what = f"input {name} of rule {i + 1}" if several else f"rule {i + 1} ({rule.kind})"
            who = f"rule {by + 1} ({self.rules[by].kind}) claims" if by is not None else "earlier rules claim"
            out.append(
                _at(
                    "W201",
                    self.span(i, name if several else None),
                    f"{what} can never see a key: {who} every key {pat.text} matches first",
                    "remove it, or move it before the rule that shadows it",
                )
            )
        return out

    def not_undone(self) -> list[Finding]:
        """On the inverse plan: forward rules whose inverse can never see a key, because the inverse
        of another rule, which runs before it on the way back, takes every key it should undo."""
        out = []
        for k, rule, _, pat, by in self._blind():
            n = rule.number  # the spec's rule this one undoes
            other = self.rules[by].number if by is not None else None
            who = f"the inverse of rule {other}" if by is not None else "other rules"
            hint = (
                "rules are undone in reverse order: make the outputs disjoint, or rename the common "
                "part first and the specific part of its output after"
            )
            if by is not None and self.rules[by].inputs[0][1].text == pat.text:
                hint = (
                    f"rules {n} and {other} make the same keys and saving back can write "
                    f"only one source: make rule {n} an alias (applied on load only)"
                )
            out.append(
                _at(
                    "W207",
                    self.span(k),
                    f"saving back never undoes rule {n}: on the way back {who} takes every key "
                    f"it makes ({pat.display()}) first",
                    hint,
                )
            )
        return out

    def _shadowed_by(self, i: int, pat: Pattern) -> int | None:
        for k in range(i):
            if not any(self.meets(p, pat) for p, _ in self.claims(k)):
                continue
            try:
                if witness([pat], self.claims(k)) is None:
                    return k
            except Unknown:
                continue
        return None

    def renames(self) -> list[Finding]:
        out = []
        for i, rule in enumerate(self.rules):
            if rule.kind != "rename" or not self.own(i):
                continue
            src, dst = rule.inputs[0][1], rule.outputs[0][1]
            if src.text == dst.text:
                out.append(
                    _at("W203", self.span(i), f"rule {i + 1} renames {src.text} to itself", "remove it")
                )
                continue
            k = self._next_claim(i, dst)
            if k is None:
                continue
            later = self.rules[k]
            if later.kind != "rename" or self.origins[k] != self.origins[i]:
                continue
            try:
                if witness([dst], self.claims(k)) is not None:
                    continue
            except Unknown:
                continue
            ldst, lsrc = later.outputs[0][1], later.inputs[0][1]
            undo = ldst.text == src.text and lsrc.text == dst.text
            # a rename that also sees other keys (a prefix for every key, say) is a layer, not a chain
            if not undo and set(self.sources(k, lsrc)) != {i}:
                continue
            if undo:
                msg = f"rule {k + 1} renames every key rule {i + 1} makes back: {dst.text} -> {src.text}"
                hint = "remove both"
            else:
                msg = (
                    f"every key rule {i + 1} makes ({dst.display()}) is renamed again by rule {k + 1} "
                    f"(to {ldst.display()})"
                )
                hint = f"rename {src.display()} to the final name in one rule"
            out.append(_at("W202", self.span(i), msg, hint))
        return out

    def _next_claim(self, i: int, made: Pattern) -> int | None:
        """The first rule after i that can take a key matching `made` (the rename's output)."""
        for k in range(i + 1, len(self.rules)):
            for p, unless in self.claims(k):
                if not self.meets(p, made):
                    continue
                try:
                    if witness([made, p], [(u, ()) for u in unless]) is not None:
                        return k
                except Unknown:
                    return k
        return None

    def lossy(self) -> list[Finding]:
        out = []
        for i, rule in enumerate(self.rules):
            if rule.kind == "drop" and i not in self.derived:  # a companion's drop: its weight's says it
                out.append(
                    _at(
                        "W204",
                        self.span(i),
                        f"rule {i + 1} drops {rule.inputs[0][1].text}: saving back cannot recreate those keys",
                        "add `# noqa: W204` to the rule's line if the loss is intended",
                    )
                )
            dequantizing = [n for n in rule.nodes if isinstance(OPS[n.op], Dequantize)]
            if dequantizing:  # the more specific W209 says it, once for the rule
                node = dequantizing[0]
                out.append(
                    _where(
                        "W209",
                        node.where,
                        f"rule {i + 1} dequantizes ({node}): the plan cannot save back",
                        "keep the weights quantized (their scales follow them) and dequantize at load time "
                        "with --dequantize / dequantize=True",
                    )
                )
            for node in rule.nodes:
                op, params = OPS[node.op], dict(node.params)
                reason = op.loses(params)
                if reason is not None and dequantizing:  # W209 said it
                    continue
                if reason is not None:  # it inverts, but not exactly
                    out.append(_where("W204", node.where, f"rule {i + 1}: {node}: {reason}"))
                    continue
                try:
                    op.inverse(params, len(node.inputs))
                except NotInvertible as exc:
                    out.append(_where("W205", node.where, f"rule {i + 1}: {node}: {exc}"))
        return out


def _where(code: str, where: Span | str, message: str, hint: str | None = None) -> Finding:
    """A finding where an op was written (a plan node's Span; a message's `file:line:col`)."""
    if isinstance(where, str):  # a ConfigError's message leads with its node's location
        where = Span.from_location(where)
    if not where.line:
        return Finding(code, message, str(where) or None, hint=hint)
    return Finding(code, message, where.file or "<spec>", where.line, where.col, hint)


# ---- against a checkpoint ----------------------------------------------------------------------


def _against(
    plan: Plan,
    flat: list,
    origins: list,
    spec,
    layout: dict,
    report: Report,
    prior: list[Finding],
    derived: AbstractSet[int] = frozenset(),
) -> list[Finding]:
    out: list[Finding] = []
    try:
        bound = plan.bind(layout)
    except BindError as exc:
        for problem, more in _alike(exc.problems):
            rule = getattr(problem, "rule", None)  # a Problem says which rule it is about
            span = flat[rule - 1].span if rule else None
            tail = f" (and {more} more like it)" if more else ""
            out.append(_at("E103", span, problem + tail, exc.hint))
        bound = None
    except ConfigError as exc:  # the spec needs a config value to bind, and none was given
        out.append(_where("E103", exc.where or "", exc.detail, exc.hint))
        bound = None
    hits, later = _trace(plan, list(layout))
    includes: dict[int, list[int]] = defaultdict(list)  # include rule of the spec -> the rules it gave
    for i, origin in enumerate(origins):
        if origin:  # "/N...": rule N of the spec included it (under each of its prefixes)
            includes[int(origin.split("/")[1].split("@")[0])].append(i)
    for n, members in includes.items():
        if not any(hits[i] for i in members):
            inc = spec.rules[n]
            out.append(
                _at(
                    "W206",
                    inc.span,
                    f"no key of the checkpoint reaches any rule of include {inc.spec} "
                    f"({len(members)} rule{'s' if len(members) != 1 else ''})",
                    "check its prefixes against the checkpoint's keys, or remove it",
                )
            )
    for i, rule in enumerate(plan.rules):
        if hits[i] or origins[i] or i in derived:  # an included rule: its include is reported as a whole
            continue
        hint = None
        if i in later:
            j, before, after = later[i]
            hint = (
                f"keys match it only after rule {j + 1} renames them ({before} -> {after}), "
                f"which comes later: move rule {i + 1} after rule {j + 1}"
            )
        out.append(
            _at(
                "W206",
                flat[i].span,
                f"no key of the checkpoint reaches rule {i + 1} ({rule.kind} {rule.inputs[0][1].text})",
                hint,
            )
        )
    if bound is not None:
        static = any(f.code == "W207" for f in prior)  # the keys below only show what it explains
        for warning, more in [] if static else _alike(bound.warnings):
            tail = f" (and {more} more key{'s' if more != 1 else ''} like it)" if more else ""
            out.append(Finding("W207", warning + tail, report.checkpoint))
        report.coverage = bound.coverage()
        report.unclaimed = key_shapes(bound.unmatched, plan, bound.layout)
        for shape in report.unclaimed:
            near = f"; nearest rule input: {shape.closest}" if shape.closest else ""
            count = f"{shape.count} key{'s' if shape.count != 1 else ''}"
            out.append(
                Finding(
                    "I301",
                    f"no rule claims {shape.text} ({count}, {shape.tensor}): passed through unchanged{near}",
                    report.checkpoint,
                )
            )
    return out


def _alike(messages: list[str]) -> list[tuple[str, int]]:
    """Messages that differ only in their numbers (one per layer, one per expert), once each, with
    how many more there were."""
    groups: dict[str, list[str]] = {}
    for m in messages:
        groups.setdefault(re.sub(r"\d+", "#", m), []).append(m)
    return [(ms[0], len(ms) - 1) for ms in groups.values()]


def _trace(plan: Plan, keys: list[str]) -> tuple[list[int], dict[int, tuple[int, str, str]]]:
    """How many keys reach each rule, and for rules a key matches only once a later rename has
    renamed it: that rename, and one key before and after it."""
    rules = plan.rules
    hits = [0] * len(rules)
    names: list[tuple[str, int, str]] = []  # (name, rename that made it, the name before)
    for key in keys:
        cur, pos = key, 0
        while (hit := plan.first_match(cur, pos)) is not None:
            ri, _, caps = hit
            hits[ri] += 1
            if rules[ri].kind != "rename":
                break
            try:
                nxt = rules[ri].outputs[0][1].format(caps)
            except OffsetError:
                break
            names.append((nxt, ri, cur))
            cur, pos = nxt, ri + 1
    later: dict[int, tuple[int, str, str]] = {}
    dead = [i for i, h in enumerate(hits) if not h]
    for name, j, before in names:
        for i in dead:
            if i < j and i not in later and any(_matches(p, name) for _, p in rules[i].inputs):
                later[i] = (j, before, name)
    return hits, later


# ---- keys grouped by shape ---------------------------------------------------------------------


def key_shapes(
    keys: list[str], plan: Plan | None = None, layout: dict | None = None, limit: int = 200
) -> list[KeyShape]:
    """Keys grouped by shape, each group one template whose whole-segment numbers are ranges (32 keys
    `model.layers.N.foo.weight` -> `model.layers.{0..31}.foo.weight`), the largest groups first."""
    out = [
        KeyShape(text, len(members), members[0], _closest(members[0], plan), _tensors(members, layout))
        for text, members in compact_keys(keys, segments=True)
    ]
    out.sort(key=lambda s: (-s.count, s.text))
    return out[:limit]


def _tensors(keys: list[str], layout: dict | None) -> str:
    if layout is None:
        return ""
    kinds = {(tuple(layout[k].shape), layout[k].dtype) for k in keys}
    if len(kinds) == 1:
        shape, dtype = next(iter(kinds))
        return f"{list(shape)} {dtype}"
    return f"{len(kinds)} shapes"


def _closest(key: str, plan: Plan | None) -> str | None:
    """The convert or drop input whose literal text the key holds nearly all of, in order: the
    rule the author probably meant these keys for (a typo, a suffix, a renamed block)."""
    if plan is None:
        return None
    import difflib

    best, score = None, 0.9
    for r in plan.rules:
        if r.kind == "rename":
            continue
        for _, p in r.inputs:
            lits = "".join(a for k, a, _ in p.parts if k == "lit")
            if not lits:
                continue
            blocks = difflib.SequenceMatcher(None, key, lits, autojunk=False).get_matching_blocks()
            ratio = sum(b.size for b in blocks) / len(lits)
            if ratio > score:
                best, score = f"rule {r.index + 1} {p.text}", ratio
    return best
