"""The life of one key through a plan: its renames, the rule that claims it, its group, the op DAG and
the keys it becomes. What a spec author reaches for first; it returns values and never prints."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Any

from .bind import as_infos
from .companions import owner_of
from .compile.patterns import OffsetError, Pattern
from .compile.plan import Plan, PlanRule
from .errors import ConvspecError, NotInvertibleError
from .interpret import GroupError, index_order, infer_group
from .ops import TensorInfo
from .quantization import Quant
from .routing import route_all
from .style import PLAIN, Style, table

Index = tuple[str, ...]
_MARK = 7_190_000_001  # stands for a free capture while an output pattern goes through the renames


@dataclass(frozen=True)
class Rename:
    """One rename on a key's way. `after` is None when the pattern matched but `unless` held it back."""

    rule: PlanRule
    before: str
    after: str | None
    unless: str | None = None  # the `unless` template that held the key back

    def to_dict(self) -> dict:
        return {
            "rule": self.rule.number,
            "where": str(self.rule.where),
            "kind": "alias" if self.rule.one_way else "rename",
            "pattern": self.rule.inputs[0][1].text,
            "target": self.rule.outputs[0][1].display(),
            "before": self.before,
            "after": self.after,
            "applied": self.after is not None,
            "unless": self.unless,
        }


@dataclass(frozen=True)
class Member:
    """A checkpoint key of the group; with no layout, an input's pattern with the group's captures filled in."""

    input: str
    key: str
    index: Index = ()
    info: TensorInfo | None = None


@dataclass(frozen=True)
class Output:
    """One key the rule writes: as its pattern formats it, then after the renames that follow the rule."""

    value: str
    pattern: str
    key: str
    final: str
    renames: tuple[Rename, ...] = ()
    index: Index = ()
    info: TensorInfo | None = None


@dataclass(frozen=True)
class Quantized:
    """What the plan's quantization makes of the key: a companion of `weight` (`role` names which), or
    a quantized weight (`role` "weight") of `dtype` with its scale `scale`."""

    quant: Quant
    role: str  # weight | scale | input_scale | ... (a companion's name, its suffix)
    weight: str
    scale: str | None = None
    dtype: str | None = None
    passes: bool = False  # a companion no rule claims: it goes (or is dequantized) with its weight

    def to_dict(self) -> dict:
        q = self.quant
        return {
            "scheme": q.scheme,
            "block": list(q.block) if q.block else None,
            "dequantize": q.dequantize,
            "role": self.role,
            "weight": self.weight,
            "scale": self.scale,
            "dtype": self.dtype,
            "passes": self.passes,
        }

    def text(self, s: Style = PLAIN) -> str:
        q = self.quant
        if self.role == "weight":
            scale = f"its scale {s.key(self.scale)}"
            tail = f"; dequantized to {q.dequantize}" if q.dequantize else ""
            return f"{s.bold('quantized')}: {self.dtype}, {scale}{tail}"
        how = f", blocks of {list(q.block)}" if q.block else ""
        head = f"{s.bold('companion')}: the {self.role} of {s.key(self.weight)} ({q.scheme}{how})"
        if not self.passes:
            return head
        if q.dequantize and self.role == "scale":
            return f"{head}: dequantized with its weight (to {q.dequantize})"
        return f"{head}: passes through with its weight"


@dataclass
class Explanation:
    """Everything `explain` found about one key; `explanation_text` and `to_dict` only render it."""

    plan: Plan
    key: str
    renames: list[Rename]
    final: str  # the key the renames leave
    claim: str = "pass"  # convert | drop | pass | error
    rule: PlanRule | None = None  # the convert or drop that claims the key
    input: str | None = None
    captures: dict[str, str] = field(default_factory=dict)
    group: dict[str, str] = field(default_factory=dict)
    members: list[Member] = field(default_factory=list)
    values: dict[str, dict[Index, TensorInfo]] = field(default_factory=dict)  # node output -> inferred
    outputs: list[Output] = field(default_factory=list)
    info: TensorInfo | None = None  # the key's own shape and dtype, with a layout
    bound: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    quant: Quantized | None = None  # the key as a companion or a quantized weight, when the plan has one

    @property
    def group_name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.group.items()) or "(all)"

    def to_dict(self) -> dict:
        """Plain JSON types only: every member and output key is listed, none folded."""
        rule = self.rule
        free = rule.free_of if rule is not None else {}
        return {
            "spec": self.plan.name,
            "reverse": self.plan.is_inverse,
            "key": self.key,
            "bound": self.bound,
            **_info_dict(self.info),
            "renames": [r.to_dict() for r in self.renames],
            "final_key": self.final,
            "claim": {
                "kind": self.claim,
                "rule": None if rule is None else rule.number,
                "where": None if rule is None else str(rule.where),
                "input": self.input,
                "pattern": None if rule is None else dict(rule.inputs)[self.input].text,
                "captures": self.captures,
                "error": self.error,
            },
            "group": self.group if self.claim == "convert" else None,
            "members": [
                {"input": m.input, "key": m.key, "index": list(m.index), **_info_dict(m.info)}
                for m in self.members
            ],
            "ops": [
                {
                    "node": str(n),
                    "where": str(n.where),
                    "values": {
                        v: [
                            {"index": dict(zip(free[v], i, strict=False)), **_info_dict(x)}
                            for i, x in _sorted(self.values.get(v, {}))
                        ]
                        for v in n.outputs
                    },
                }
                for n in (rule.nodes if self.claim == "convert" else ())
            ],
            "outputs": [
                {
                    "value": o.value,
                    "pattern": o.pattern,
                    "key": o.key,
                    "final": o.final,
                    "renames": [r.to_dict() for r in o.renames],
                    "index": list(o.index),
                    **_info_dict(o.info),
                }
                for o in self.outputs
            ],
            "quantization": None if self.quant is None else self.quant.to_dict(),
            "notes": self.notes,
            "problems": self.problems,
        }


def explain(plan: Plan, key: str, layout: dict | None = None) -> Explanation:
    """Follow one key through the plan; with a layout ({key: TensorInfo}), bind its group for real
    shapes. Raises ConvspecError for a key the layout lacks, naming close matches."""
    infos = None if layout is None else as_infos(layout)
    if infos is not None and key not in infos:
        raise _not_found(plan, key, infos)
    steps, final, hit, error = _walk(plan, key)
    e = Explanation(plan, key, steps, final, bound=infos is not None, info=infos[key] if infos else None)
    e.quant = _quantized(plan.quant, key, hit is None and error is None, infos)
    if error is not None:
        e.claim, e.error = "error", error
        return e
    if hit is None:
        other = None if any(s.after for s in steps) else _other_claim(plan, key)
        if other is not None:
            flag = "without --reverse" if plan.is_inverse else "with --reverse"
            e.notes.append(f"the {other}: this looks like a key of the other layout (explain it {flag})")
        return e
    ri, e.input, e.captures = hit
    e.rule = rule = plan.rules[ri]
    if rule.kind == "drop":
        e.claim = "drop"
        return e
    e.claim = "convert"
    e.group = {c: e.captures[c] for c in rule.keep}
    if infos is None:
        e.members = [Member(n, _fill(p, e.group)) for n, p in rule.inputs]
        _pattern_outputs(e)
    else:
        _bind_group(e, infos)
    return e


def _quantized(q: Quant | None, key: str, passes: bool, infos: dict | None) -> Quantized | None:
    """The key as the plan's quantization sees it: a companion (any key its templates name), or, with a
    layout, a weight of the scheme's dtype."""
    if q is None:
        return None
    owner = owner_of(q, key)
    if owner is not None:
        weight, role, companion = owner
        name = "scale" if role == 0 else companion.lstrip("._")
        return Quantized(q, name, weight, q.scale_of(weight), passes=passes)
    info = None if infos is None else infos[key]
    if info is None or info.dtype not in q.kind.weight_dtypes or q.form_of(key) is None:
        return None
    return Quantized(q, "weight", key, q.scale_of(key), info.dtype)


def _walk(
    plan: Plan, key: str, start: int = 0, renames_only: bool = False
) -> tuple[list[Rename], str, tuple | None, str | None]:
    """The renames a key goes through from rule `start` on (and those `unless` held back), the key they
    leave, the match of the rule that then claims it (or None), and a route error (or None)."""
    steps: list[Rename] = []
    while True:
        hit = plan.first_match(key, start, renames_only)
        stop = len(plan.rules) if hit is None else hit[0]
        steps += [r for rule in plan.rules[start:stop] if (r := _held_back(rule, key))]
        if hit is None or plan.rules[hit[0]].kind != "rename":
            return steps, key, hit, None
        rule = plan.rules[hit[0]]
        try:
            after = rule.outputs[0][1].format(hit[2])
        except OffsetError as exc:
            return steps, key, None, f"{rule.label}: {key}: {exc}"
        steps.append(Rename(rule, key, after))
        key, start = after, hit[0] + 1


def _held_back(rule: PlanRule, key: str) -> Rename | None:
    """A rename whose pattern matches the key but whose `unless` leaves it alone."""
    if rule.kind != "rename" or not rule.unless or rule.inputs[0][1].match(key) is None:
        return None
    u = next((u for u in rule.unless if u.match(key) is not None), None)
    return None if u is None else Rename(rule, key, None, u.text)


def _fill(pat: Pattern, values: dict[str, str]) -> str:
    """The pattern with the given captures filled in and the others left as `{name}`."""
    return pat.format({**{c: f"{{{c}}}" for c in pat.captures}, **values})


def _pattern_outputs(e: Explanation) -> None:
    """Output keys with no layout: the group's captures filled in, free captures left as `{e}`."""
    rule = e.rule
    for value, pat in rule.outputs:
        marks = {c: str(_MARK + i) for i, c in enumerate(rule.free_of[value])}

        def unmark(text: str | None, marks=marks) -> str | None:
            for c, m in marks.items():
                text = text and text.replace(m, f"{{{c}}}")
            return text

        o = _output(e, value, pat, {**e.group, **marks})
        steps = tuple(replace(r, before=unmark(r.before), after=unmark(r.after)) for r in o.renames)
        e.outputs.append(replace(o, key=unmark(o.key), final=unmark(o.final), renames=steps))


def _output(e: Explanation, value: str, pat: Pattern, values: dict, index: Index = (), info=None) -> Output:
    key = pat.format(values)
    steps, final, _, error = _walk(e.plan, key, e.rule.index + 1, renames_only=True)
    if error is not None:
        e.problems.append(error)
    return Output(value, pat.display(), key, final, tuple(steps), index, info)


def _bind_group(e: Explanation, infos: dict[str, TensorInfo]) -> None:
    """The key's group in the checkpoint: its member keys, each op's inferred values, its output keys."""
    rule = e.rule
    routes = route_all(e.plan, list(infos))
    members = routes.members.get((rule.index, tuple(e.group.values())), {})
    e.members = [
        Member(n, k, idx, infos[k]) for n, _ in rule.inputs for idx, k in _sorted(members.get(n, {}))
    ]
    missing = [(n, p) for n, p in rule.inputs if n not in members]
    if missing:
        n, p = missing[0]
        e.problems.append(
            f"{rule.label}: group {e.group_name} has no {n!r} key (expected {_fill(p, e.group)})"
        )
        return _pattern_outputs(e)
    try:
        env = infer_group(e.plan, rule, members, infos)
    except GroupError as exc:
        e.problems.append(f"{rule.label}: group {e.group_name}: {exc}")
        return _pattern_outputs(e)
    except ConvspecError as exc:  # an op's check, or a config expression the config cannot answer
        e.problems.append(f"{rule.label}: group {e.group_name}: {exc.message}")
        if exc.hint:
            e.problems[-1] += f" (hint: {exc.hint})"
        return _pattern_outputs(e)
    e.values = {v: env[v] for n in rule.nodes for v in n.outputs}
    for value, pat in rule.outputs:
        free = rule.free_of[value]
        for idx, info in _sorted(env[value]):
            e.outputs.append(
                _output(e, value, pat, {**e.group, **dict(zip(free, idx, strict=True))}, idx, info)
            )


def _sorted(value: dict[Index, Any]) -> list[tuple[Index, Any]]:
    return sorted(value.items(), key=lambda kv: index_order(kv[0]))


def _other_claim(plan: Plan, key: str) -> str | None:
    """Which rule of the opposite plan (the inverse, or the forward plan of an inverse) claims the key."""
    try:
        other = plan.inverse(allow_lossy=True)
    except NotInvertibleError:
        return None
    hit = other.first_match(key)
    if hit is None:
        return None
    which = "forward plan" if plan.is_inverse else "inverse plan"
    return f"{which} claims it ({other.rules[hit[0]].label})"


def _not_found(plan: Plan, key: str, infos: dict[str, TensorInfo]) -> ConvspecError:
    """The key is not in the checkpoint: say whether the other plan would claim it, and what is close."""
    message, hints = f"{key} is not in the checkpoint ({len(infos)} keys)", []
    other = _other_claim(plan, key)
    if other is not None:
        message += f", but the {other}: it looks like a key of the other layout"
        flag = "drop --reverse" if plan.is_inverse else "pass --reverse"
        hints.append(f"{flag} to explain it through that plan, against a checkpoint in that layout")
    close = difflib.get_close_matches(key, infos, n=3, cutoff=0.6)
    if close:
        hints.append("close matches: " + ", ".join(close))
    elif other is None:
        hints.append("no key of the checkpoint is close; `convspec compile SPEC --against DIR` lists them")
    return ConvspecError(message, hint="; ".join(hints))


# ---- text ------------------------------------------------------------------------------------


def explanation_text(e: Explanation, style: Style = PLAIN) -> str:
    """The explanation for a person, in the order the key lives it; colour only when `style` has it."""
    s = style
    through = f"the inverse of spec {e.plan.name}" if e.plan.is_inverse else f"spec {e.plan.name}"
    lines = [f"{s.key(e.key)} through {s.bold(through)}" + (f"  {_show(e.info)}" if e.info else "")]
    lines += [e.quant.text(s)] if e.quant is not None else []
    lines += ["", s.bold("renames:")]
    lines += [ln for r in e.renames for ln in _rename_lines(r, s)] or ["  none"]
    lines.append("")
    rule = e.rule
    if e.claim == "error":
        lines.append(f"{s.error('error')}: {e.error}")
    elif e.claim == "pass":
        how = "unchanged" if e.final == e.key else f"as {s.key(e.final)}"
        lines.append(s.bold("no rule claims it") + f": passes through {how}")
    elif e.claim == "drop":
        lines.append(s.bold("dropped by ") + _rule_head(rule, s) + f": {rule.inputs[0][1].text}")
    else:
        lines.append(s.bold("claimed by ") + _rule_head(rule, s))
        lines.append(f"  input     {e.input} = {dict(rule.inputs)[e.input].text}")
        lines.append("  captures  " + (", ".join(f"{k}={v}" for k, v in e.captures.items()) or "none"))
        n = len(e.members)
        what = f"{n} key{'s' * (n != 1)} of the checkpoint" if e.bound else "its keys as the rule sees them"
        lines += ["", s.bold(f"group {e.group_name}") + f" ({what}):"]
        lines += _member_lines(e, s)
        lines += ["", s.bold("ops:")]
        lines += table([(str(n), _values(e, n.outputs)) for n in rule.nodes], "  ") or ["  none"]
        lines += ["", s.bold("outputs:")]
        lines += _output_lines(e, s)
    lines += [f"{s.warning('note')}: {n}" for n in e.notes]
    lines += [f"{s.error('problem')}: {p}" for p in e.problems]
    return "\n".join(lines)


def _rule_head(rule: PlanRule, s: Style) -> str:
    kind = "alias, one-way" if rule.one_way else rule.kind
    return f"rule {rule.number} ({s(kind, 'magenta')}, {s.dim(rule.where)})"


def _rename_lines(r: Rename, s: Style) -> list[str]:
    head = f"  {_rule_head(r.rule, s)}: {r.rule.inputs[0][1].text} -> {r.rule.outputs[0][1].display()}"
    if r.after is None:
        return [head, f"      matches, but unless {r.unless} leaves {s.key(r.before)} alone"]
    return [head, f"      {r.before}", f"   -> {s.key(r.after)}"]


def _member_lines(e: Explanation, s: Style) -> list[str]:
    rows = []
    for name, _ in e.rule.inputs:
        ms = [m for m in e.members if m.input == name]
        for i, (keys, n, info) in enumerate(_fold([((m.key,), m.info) for m in ms])):
            rows.append((name if i == 0 else "", s.key(keys[0]), _show(info, n)))
    return table(rows, "  ")


def _output_lines(e: Explanation, s: Style) -> list[str]:
    renamed = any(r.after for o in e.outputs for r in o.renames)
    rows, last = [], None
    for (key, final), n, info, o in _fold_outputs(e.outputs):
        via = ", ".join(str(r.rule.number) for r in o.renames if r.after)
        row = [o.value if o.value != last else "", key if via else s.key(key)]
        if renamed:
            row.append(f"-> {s.key(final)}  (rule {via})" if via else "")
        rows.append((*row, _show(info, n)))
        last = o.value
    return table(rows, "  ")


def _fold_outputs(outputs: list[Output]) -> list[tuple[tuple[str, ...], int, TensorInfo | None, Output]]:
    """Each value's output keys folded (see `_fold`), with the first output of each folded row."""
    out = []
    for value in dict.fromkeys(o.value for o in outputs):
        same = [o for o in outputs if o.value == value]
        i = 0
        for keys, n, info in _fold([((o.key, o.final), o.info) for o in same]):
            out.append((keys, n, info, same[i]))
            i += n
    return out


def _fold(rows: list[tuple[tuple[str, ...], TensorInfo | None]]) -> list[tuple[tuple[str, ...], int, Any]]:
    """Rows whose keys differ from the row before in one whole-number segment, one up, with the same
    info, folded into one row written `{a..b}`: eleven experts read as one line."""
    runs: list[list] = []  # [segments of each key of the first row, positions, count, info]
    for keys, info in rows:
        segs = [k.split(".") for k in keys]
        if runs and runs[-1][3] == info and (pos := _next(runs[-1], segs)) is not None:
            runs[-1][1], runs[-1][2] = pos, runs[-1][2] + 1
        else:
            runs.append([segs, None, 1, info])
    out = []
    for first, pos, n, info in runs:
        if n == 1:
            out.append((tuple(".".join(f) for f in first), 1, info))
            continue
        keys = []
        for f, p in zip(first, pos, strict=True):
            f = list(f)
            f[p] = f"{{{f[p]}..{int(f[p]) + n - 1}}}"
            keys.append(".".join(f))
        out.append((tuple(keys), n, info))
    return out


def _next(run: list, segs: list[list[str]]) -> list[int] | None:
    """Where each key of `segs` continues the run (one number segment, counting up), or None."""
    first, pos, n, _ = run
    out = []
    for j, (f, k) in enumerate(zip(first, segs, strict=True)):
        diff = [i for i, (a, b) in enumerate(zip(f, k, strict=False)) if a != b]
        if len(f) != len(k) or len(diff) != 1 or (pos is not None and diff[0] != pos[j]):
            return None
        a, b = f[diff[0]], k[diff[0]]
        if not (a.isdigit() and b.isdigit() and str(int(b)) == b and int(b) == int(a) + n):
            return None
        out.append(diff[0])
    return out


def _values(e: Explanation, names: tuple[str, ...]) -> str:
    """The inferred infos of a node's outputs (nothing without a layout)."""
    shown = []
    for v in names:
        infos = e.values.get(v)
        if not infos:
            return ""
        if list(infos) == [()]:
            shown.append(_show(infos[()]))
            continue
        counts: dict[TensorInfo, int] = {}
        for x in infos.values():
            counts[x] = counts.get(x, 0) + 1
        shown.append(", ".join(_show(x, n) for x, n in counts.items()))
    if len(shown) == 1:
        return shown[0]
    return "; ".join(f"{v}: {x}" for v, x in zip(names, shown, strict=True))


def _show(info: TensorInfo | None, n: int = 1) -> str:
    if info is None:
        return ""
    text = f"{list(info.shape)} {info.dtype}"
    return f"[{n} x {text}]" if n > 1 else text


def _info_dict(info: TensorInfo | None) -> dict:
    return {
        "shape": None if info is None else list(info.shape),
        "dtype": None if info is None else info.dtype,
    }
