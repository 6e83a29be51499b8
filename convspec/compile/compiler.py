"""Spec IR -> Plan: lower expressions to op DAGs, run the static checks, derive the inverse."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import quantization
from ..errors import (
    OVERLAP,
    UNUSED,
    CompileError,
    ConfigError,
    Diagnostic,
    ErrorLevel,
    Severity,
    Span,
    SpecNotFoundError,
)
from ..ops import OPS, NotInvertible, Op, OpError
from ..ops.base import REQUIRED
from ..spec.model import Call, Convert, Drop, Expr, Include, Lit, Ref, Rename, Spec, Template
from .evaluate import _Name, evaluate
from .expr import ConfigExpr, from_spec, needs_config, show
from .patterns import (
    MAX_OPEN_CAPTURES,
    Pattern,
    TooManyAutomata,
    adjacent_paths,
    automata_budget,
    intersection_witness,
    literal_ends,
    meet,
    open_captures,
    split_offset,
    with_offset,
)
from .plan import Node, Plan, PlanRule

if TYPE_CHECKING:
    from ..quantization import Quant

MAX_OP_VALUES = 4096  # values one op may yield (chunk n=, stack parts=, split sizes=): each is a name
MAX_RULE_VALUES = 65_536  # values one convert may make: an ops chain multiplies them
MAX_EXPANDED_RULES = 1_000  # rules made expanding includes (built-in specs: at most 180, inkling2); compiling
# and checking costs grow with this (an `include X under p0, ..., p9999` would repeat X 10,000 times)
MAX_OVERLAP_PAIRS = 20_000  # pairs of convert inputs whose literal ends agree, each checked exactly (~40 us;
# built-in specs have at most 15): converts that all begin and end alike would otherwise cost n**2 checks


@contextmanager
def bounded_automata(flat: list) -> Iterator[None]:
    """Checking which keys templates share costs at most MAX_AUTOMATA exact comparisons: past that,
    one error at the spec's first rule (the cost belongs to the spec as a whole)."""
    try:
        with automata_budget():
            yield
    except TooManyAutomata as exc:
        raise CompileError(
            str(exc),
            span=flat[0].span if flat else None,
            hint="give the rules' templates distinct literal text (`{p:path}.w1.weight`), or split the spec",
        ) from None


def pattern_of(t: Template) -> Pattern:
    return Pattern(
        t.text,
        tuple(
            ("lit", p.text, None) if p.kind == "lit" else ("cap", with_offset(p.name, p.offset), p.type)
            for p in t.parts
        ),
    )


def _no_offsets(t: Template, what: str) -> None:
    for p in t.parts:
        if p.kind == "cap" and p.offset:
            raise CompileError(
                f"{{{p.name}{p.offset:+d}}}: a constant can be added to a capture only in a rename target",
                span=p.span or t.span,
                hint=f"write {{{p.name}}} in {what}",
            )


def check_templates(rule) -> None:
    """Every template of a rule can be matched in bounded time: no two path captures side by side and
    at most MAX_OPEN_CAPTURES captures whose extent nothing fixes (see `open_captures`). Targets
    count too: the inverse matches keys with them. A bare capture takes its type from the inputs."""
    if isinstance(rule, Include):
        return
    if isinstance(rule, Convert):
        sources = [b.template for b in rule.inputs]
        others = [t for o in rule.outputs for t in o.targets]
    else:
        sources, others = [rule.source], [*([rule.target] if isinstance(rule, Rename) else [])]
    types: dict[str, str] = {}
    for t in sources:
        for p in t.parts:
            if p.kind == "cap":
                types.setdefault(p.name, p.type or "seg")
    for t in [*sources, *others]:
        bounded_template(t, types)
    for t in rule.unless if isinstance(rule, Rename) else ():
        bounded_template(t, {})


def bounded_template(t: Template, types: dict[str, str]) -> None:
    """Refuse a template whose matching could take more than (key length) ** MAX_OPEN_CAPTURES steps."""
    parts = pattern_of(t).typed(types).parts
    at = adjacent_paths(parts)
    if at is not None:
        raise CompileError(
            f"{t.text}: path captures {{{parts[at - 2][1]}}} and {{{parts[at][1]}}} are side by side: "
            "nothing tells where one ends",
            span=t.parts[at].span or t.span,
            hint="put a literal segment between them, or use one path capture",
        )
    opened = open_captures(parts)
    if len(opened) > MAX_OPEN_CAPTURES:
        at = opened[MAX_OPEN_CAPTURES]
        names = ", ".join(f"{{{parts[i][1]}}}" for i in opened)
        raise CompileError(
            f"{t.text}: {len(opened)} captures can stretch ({names}); at most {MAX_OPEN_CAPTURES} may, "
            "so that matching a key stays fast",
            span=t.parts[at].span or t.span,
            hint="a capture stretches when it is a path or path?, or shares its segment with another "
            "capture: split the rule or spell out a segment",
        )


def _where(span: Span | None) -> Span:
    """Where a rule or op was written, as its plan keeps it (the source line left out)."""
    return Span(span.file, span.line, span.col) if span else Span(None, 0, 0)


def compile_spec(
    spec: Spec,
    config: dict | None = None,
    resolve: Callable[[str], Spec] | None = None,
    check_overlaps: bool = True,
) -> Plan:
    """Compile a Spec into a Plan; with a config, every config expression is checked and evaluated.
    `resolve` finds the specs that `include` rules name (by default: none may be included).
    `check_overlaps=False` leaves out the overlap check. Raises the first error (a CompileError);
    `compile_all` collects every diagnostic instead."""
    state = Compilation(spec, config, resolve, ErrorLevel.IMMEDIATE, check_overlaps)
    run_passes(state)
    assert state.plan is not None  # an error would have been raised
    return state.plan


def compile_all(
    spec: Spec, config: dict | None = None, resolve: Callable[[str], Spec] | None = None
) -> Compilation:
    """Run every pass, collecting the diagnostics instead of raising the first (what `check` reports):
    the state holds them, and the plan when no rule failed (overlaps do not stop one being made)."""
    state = Compilation(spec, config, resolve, ErrorLevel.COLLECT)
    run_passes(state)
    return state


# ---- the passes -------------------------------------------------------------------------------


@dataclass
class Compilation:
    """What the passes share: the spec and its options, what each pass made, and its diagnostics.
    A rule with an error is `failed`: later passes leave it out, and no plan is made."""

    spec: Spec
    config: dict | None
    resolve: Callable[[str], Spec] | None
    level: ErrorLevel = ErrorLevel.IMMEDIATE
    check_overlaps: bool = True
    quant: Quant | None = None  # the plan's quantization, resolved by the quantization pass
    included: list = field(default_factory=list)  # the quantization sections of included specs, in order
    companion_rules: set[int] = field(default_factory=set)  # the renames and drops the quantization added
    flat: list = field(default_factory=list)  # the rules, includes expanded
    origins: list = field(default_factory=list)  # for each, the include it came from ("" the spec's own)
    rules: list[PlanRule] = field(default_factory=list)  # the rules lowered so far, in order
    failed: set[int] = field(default_factory=set)
    inverse: tuple = (None, None, ())  # inverse_of's: the inverse rules, why none, why lossy
    diagnostics: list[Diagnostic] = field(default_factory=list)
    stopped: bool = False  # an error no later pass can work past (an include that cannot expand)
    plan: Plan | None = None

    def report(self, exc: CompileError, rule: int | None = None) -> None:
        """Raise the error (IMMEDIATE) or record its diagnostic; `rule` failed with it."""
        if self.level is ErrorLevel.IMMEDIATE:
            raise exc
        self.diagnostics.append(exc.diagnostic())
        if rule is not None:
            self.failed.add(rule)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.ERROR]


def expand_includes(state: Compilation) -> None:
    """Pass: the spec's rules with every include expanded; an include that cannot be is fatal."""
    try:
        state.flat, state.origins = _flatten(state.spec, state.resolve, quantizations=state.included)
    except CompileError as exc:
        state.stopped = True
        state.report(exc)


def quantize_rules(state: Compilation) -> None:
    """Pass: the plan's quantization (the spec's, an include's, or the config's quant_method), and the
    companion renames and drops it derives: a rename or drop of a weight by its full name does the
    same to the weight's companions (a path capture at the end carries them already)."""
    try:
        q = quantization.resolve_quant(
            state.spec.quantization
            or next(iter(state.included), None)  # the first included spec's, depth first
            or quantization.from_config(state.config),
            state.config,
        )
    except (CompileError, ConfigError) as exc:
        state.stopped = True
        state.report(exc if isinstance(exc, CompileError) else CompileError(exc.message, hint=exc.hint))
        return
    state.quant = q
    if q is None:
        return
    flat, origins = [], []
    for rule, origin in zip(state.flat, state.origins, strict=True):
        flat.append(rule)
        origins.append(origin)
        for derived_rule in _companion_rules(rule, q):
            state.companion_rules.add(len(flat))
            flat.append(derived_rule)
            origins.append(origin)
    state.flat, state.origins = flat, origins


def _companion_rules(rule, q: Quant) -> list:
    """The renames and drops a rename or drop of quantized weights by full name implies."""
    if not isinstance(rule, (Rename, Drop)) or not isinstance(rule.source.parts[-1], Lit):
        return []
    src = rule.source.text
    form = q.form_of(src)
    if form is None or q.is_companion(src):
        return []
    if isinstance(rule, Drop):
        return [Drop(source=_template(form.stem(src) + c), span=rule.span) for c in form.companions]
    dst = rule.target.text
    if form.stem(dst) is None:
        return []
    return [
        Rename(
            source=_template(form.stem(src) + c),
            target=_template(form.stem(dst) + c),
            one_way=rule.one_way,
            span=rule.span,
        )
        for c in form.companions
    ]


def lower_rules(state: Compilation) -> None:
    """Pass: each rename, drop and convert becomes a PlanRule (a convert's expressions an op DAG),
    its templates checked first. One pass, rule by rule, so that the first error raised is the one
    of the first rule that has one, whichever check finds it."""
    for i, rule in enumerate(state.flat):
        try:
            state.rules.append(lower_rule(i, rule, state.config, state.quant))
        except CompileError as exc:
            state.report(exc, i)


def lower_rule(i: int, rule, config: dict | None, quant: Quant | None = None) -> PlanRule:
    """One rule of the expanded spec, lowered and checked (a convert's quantized weights with their
    companions, when the plan has a quantization)."""
    check_templates(rule)
    if isinstance(rule, Rename):
        return _rename(i, rule)
    if isinstance(rule, Drop):
        return drop_rule(i, _where(rule.span), pattern_of(rule.source))
    return _Lowering(i, rule, config, quant).build()


def check_claims(state: Compilation) -> None:
    """Pass: no two converts of one spec (or two inputs of one) can claim a key. Raising, the first
    overlap is placed at the later rule; collected, each at the input that claims the key."""
    if not state.check_overlaps:
        return
    if state.level is ErrorLevel.IMMEDIATE:
        _check_overlaps(state.rules, state.flat, state.origins)
        return
    found: list[CompileError] = []  # all or nothing: past the automata budget, that is the one error
    try:
        for ra, na, rb, nb, w in overlaps(state.rules, state.origins, [r.span for r in state.flat]):
            found.append(overlap_error(ra, na, rb, nb, w, _input_span(state.flat[rb.index], nb)))
    except CompileError as exc:  # more pairs to check than MAX_OVERLAP_PAIRS
        found.append(exc)
    for exc in found:
        state.report(exc)


def _input_span(rule, name: str) -> Span | None:
    """Where a convert binds input `name` (or the rule, failing that)."""
    for b in rule.inputs if isinstance(rule, Convert) else ():
        if b.name == name:
            return b.span or rule.span
    return rule.span


def derive_inverse(state: Compilation) -> None:
    """Pass: the rules that undo the plan's, or why there are none, and why they are lossy."""
    if not state.failed:
        state.inverse = inverse_of(state.rules)


def make_plan(state: Compilation) -> None:
    """Pass: the plan, with what it records of its inverse; none when a rule failed."""
    if state.failed:
        return
    inverse_rules, inverse_error, lossy = state.inverse
    spec = state.spec
    state.plan = Plan(
        name=spec.name,
        doc=spec.doc,
        model_types=tuple(spec.model_types),
        rules=tuple(state.rules),
        config=state.config,
        inverse_rules=inverse_rules,
        inverse_error=inverse_error,
        lossy=lossy,
        base_prefix=spec.base_prefix,
        quant=state.quant,
    )


@dataclass(frozen=True)
class Pass:
    """One step of compiling. `bounded`: it compares templates pairwise, so it runs within the
    automata budget (one budget for the run of such passes, see `bounded_automata`)."""

    name: str
    run: Callable[[Compilation], None]
    bounded: bool = False


PASSES: tuple[Pass, ...] = (
    Pass("includes", expand_includes),
    Pass("quantization", quantize_rules),
    Pass("rules", lower_rules),
    Pass("overlaps", check_claims, bounded=True),
    Pass("inverse", derive_inverse, bounded=True),
    Pass("plan", make_plan),
)


def run_passes(state: Compilation, passes: tuple[Pass, ...] = PASSES) -> Compilation:
    """Run the passes in order over `state`. Collecting, a pass past the automata budget ends the
    compile with that one error (its findings so far are not reported: they are incomplete)."""
    try:
        with ExitStack() as budget:
            bounded = False
            for p in passes:
                if state.stopped:
                    break
                if p.bounded != bounded:  # the bounded passes are contiguous: one budget for them all
                    if p.bounded:
                        budget.enter_context(bounded_automata(state.flat))
                    else:
                        budget.close()
                    bounded = p.bounded
                p.run(state)
    except CompileError as exc:  # collecting, only the budget's error gets here: it ends the block
        state.stopped = True
        state.report(exc)
    return state


def inverse_of(rules) -> tuple[tuple[PlanRule, ...] | None, str | None, tuple[str, ...]]:
    """What a plan records of its inverse: the inverse rules (None when there is none), why there
    is none, and why it is lossy. A plan read from JSON must record the same."""
    try:
        inverse_rules, lossy = invert(list(rules))
    except NotInvertible as exc:
        return None, str(exc), ()
    return inverse_rules, None, tuple(lossy)


def _rename(i: int, rule: Rename) -> PlanRule:
    _no_offsets(rule.source, "a rename source")
    for u in rule.unless:
        _no_offsets(u, "an unless template")
    return rename_rule(
        i,
        _where(rule.span),
        pattern_of(rule.source),
        pattern_of(rule.target),
        [pattern_of(t) for t in rule.unless],
        rule.one_way,
        rule.target.span,
    )


def drop_rule(i: int, where: Span, src: Pattern) -> PlanRule:
    """A drop's rule: its one input, typed (an untyped capture is one segment)."""
    types = {c: t or "seg" for k, c, t in src.parts if k == "cap"}
    return PlanRule(i, "drop", where, (("x", src.typed(types)),), types=tuple(types.items()))


def rename_rule(
    i: int,
    where: Span,
    src: Pattern,
    dst: Pattern,
    unless: list[Pattern],
    one_way: bool,
    span: Span | None = None,
) -> PlanRule:
    """A rename's rule after its checks: the target uses exactly the captures the source binds, with
    their types; a constant is added only to an int. Also checks the renames of a plan read from JSON."""
    types = {c: t or "seg" for k, c, t in src.parts if k == "cap"}
    for c in dst.offsets:
        if types.get(c) != "int":
            raise CompileError(
                f"{{{c}}} is {types.get(c, 'unbound')}, so no constant can be added to it",
                span=span,
                hint=f"bind it as {{{c}:int}} in the source",
            )
    for k, c, t in dst.parts:
        c = split_offset(c)[0]
        if k == "cap" and c not in types:
            raise CompileError(
                f"capture {{{c}}} in the rename target is not bound by its source",
                span=span,
                hint=f"bound captures: {', '.join(types) or 'none'}",
            )
        if k == "cap" and t is not None and t != types[c]:
            raise CompileError(
                f"capture {{{c}}} is {types[c]} in the source but {t} in the target", span=span
            )
    lost = [c for c in types if c not in dst.captures]
    if lost:
        raise CompileError(
            f"rename drops capture {{{lost[0]}}}: different keys would get the same name",
            span=span,
            code=UNUSED,
            hint=f"use {{{lost[0]}}} in the target",
        )
    return PlanRule(
        i,
        "rename",
        where,
        (("x", src.typed(types)),),
        (("x", dst.typed(types)),),
        keep=tuple(types),
        free=(("x", ()),),
        types=tuple(types.items()),
        unless=tuple(
            u.typed({**types, **{c: ty for k, c, ty in u.parts if k == "cap" and ty}}) for u in unless
        ),
        one_way=one_way,
    )


class _Lowering:
    """Lowers one convert rule: expressions -> nodes, with capture and arity checks."""

    def __init__(self, index: int, rule: Convert, config: dict | None, quant: Quant | None = None):
        self.index, self.rule, self.config = index, rule, config
        self.quant = quant if quant is not None and not _dequantizes(rule) else None
        self.scales: dict[str, str] = {}  # a quantized weight's value -> its scale grid's value
        self.nodes: list[Node] = []
        self.spans: list[Span | None] = []  # the call that made each node, for error carets
        self.env: dict[str, str] = {}
        self.n = 0
        self.types: dict[str, str] = {}

    def err(self, msg: str, span, hint: str | None = None):
        return CompileError(f"rule {self.index + 1} (convert): {msg}", span=span or self.rule.span, hint=hint)

    def build(self) -> PlanRule:
        r = self.rule
        for b in r.inputs:
            _no_offsets(b.template, "a convert input")
        for o in r.outputs:
            for t in o.targets:
                _no_offsets(t, "a convert target")
        inputs = []
        for b in r.inputs:
            if b.name in self.env:
                raise self.err(f"input name {b.name!r} is used twice", b.span)
            pat = pattern_of(b.template)
            for k, c, t in pat.parts:
                if k == "cap":
                    t = t or "seg"
                    if self.types.setdefault(c, t) != t:
                        raise self.err(
                            f"capture {{{c}}} is {self.types[c]} in one input and {t} in another",
                            b.template.span,
                        )
            self.env[b.name] = b.name
            inputs.append((b.name, pat))
        inputs += self.companion_inputs()
        inputs = [(n, p.typed(self.types)) for n, p in inputs]
        for let in r.lets:
            vals = self.lower(let.expr, want=len(let.names))
            if len(vals) != len(let.names):
                raise self.err(
                    f"let binds {len(let.names)} names but the expression yields {len(vals)} values", let.span
                )
            for name, v in zip(let.names, vals, strict=False):
                if name in self.env:
                    raise self.err(f"name {name!r} is bound twice", let.span)
                self.env[name] = v
        outputs = []
        for out in r.outputs:
            if out.chain is not None:
                vals = self.lower_chain(out.chain, [b.name for b in r.inputs], len(out.targets), out.span)
            else:
                vals = self.lower(out.expr, want=len(out.targets))
            if len(vals) != len(out.targets):
                raise self.err(
                    f"{len(out.targets)} target(s) for an expression that yields {len(vals)} value(s)",
                    out.span,
                    hint="list one target per value",
                )
            for t, v in zip(out.targets, vals, strict=False):
                outputs.append((v, pattern_of(t), t.span))
        outputs += self.companion_outputs(outputs)
        return self.check(inputs, outputs)

    # ---- quantized weights (convspec.quantization) ---------------------------------------------

    def companion_inputs(self) -> list[tuple[str, Pattern]]:
        """Each quantized weight input's scale, bound beside it: `gate.scale` = `{...}_scale_inv`."""
        q, out = self.quant, []
        for b in self.rule.inputs if q is not None else ():
            scale = q.scale_of(b.template.text)
            if scale is None or q.is_companion(b.template.text):
                continue
            name = f"{b.name}.scale"
            self.env[name] = self.scales[b.name] = name
            out.append((name, pattern_of(_template(scale)).typed(self.types)))
        return out

    def companion_outputs(self, outputs: list) -> list:
        """Keeping the weights quantized: each scale grid follows its weight through the same ops
        (`Op.on_grid`), and is written beside it as the scheme names it."""
        q, scales = self.quant, self.scales
        if q is None or not scales:
            return []
        blocks = dict.fromkeys(scales, q.blocks)
        for node, span in zip(list(self.nodes), list(self.spans), strict=True):
            quantized = [a for a in node.inputs if a in scales]
            if not quantized:
                continue
            if len(quantized) < len(node.inputs):
                raise self.err(f"{node.op} joins a quantized weight with a tensor that is not", span)
            op, p = OPS[node.op], dict(node.params)
            try:
                grid = op.on_grid(p, blocks[node.inputs[0]])
                after = op.carry_blocks(p, None, blocks[node.inputs[0]])
            except (OpError, TypeError) as exc:
                msg = exc.message if isinstance(exc, OpError) else f"{node.op} needs numbers here"
                raise self.err(msg, span, getattr(exc, "hint", None)) from None
            outs = self.node(node.op, [scales[a] for a in node.inputs], grid, span, len(node.outputs))
            for o, g in zip(node.outputs, outs, strict=True):
                scales[o], blocks[o] = g, after
        extra = []
        for v, pat, span in outputs:
            if v in scales:
                extra.append((scales[v], pattern_of(_template(q.scale_of_target(pat.text))), span))
        return extra

    def node(self, op: str, args: list[str], params: dict, span, n_out: int = 1) -> list[str]:
        """A node the compiler adds (not written in the spec): its params are final."""
        outs = [self.fresh() for _ in range(n_out)]
        self.nodes.append(Node(op, tuple(args), tuple(outs), tuple(params.items()), _where(span)))
        self.spans.append(span)
        return outs

    # ---- lowering -----------------------------------------------------------------------------

    def fresh(self) -> str:
        self.n += 1
        return f"%{self.n}"

    def is_tensor(self, e: Expr) -> bool:
        return isinstance(e, Call) or (isinstance(e, Ref) and len(e.path) == 1 and e.path[0] in self.env)

    def lower(self, e: Expr, want: int | None = None) -> list[str]:
        if isinstance(e, Ref) and len(e.path) == 1 and e.path[0] in self.env:
            return [self.env[e.path[0]]]
        if not isinstance(e, Call):
            name = ".".join(e.path) if isinstance(e, Ref) else None
            hint = None
            if name:
                close = difflib.get_close_matches(name, list(self.env), 1)
                hint = f"did you mean {close[0]!r}?" if close else f"inputs: {', '.join(self.env)}"
            raise self.err(
                f"{name!r} is not an input or a let value" if name else "expected a tensor expression",
                e.span,
                hint,
            )
        n_tensors = 0
        for a in e.args:
            if not self.is_tensor(a):
                break
            n_tensors += 1
        op = OPS.get(e.op)
        if op is not None and n_tensors < min(op.min_inputs, len(e.args)):
            missing = e.args[n_tensors]
            if (
                isinstance(missing, Ref)
                and len(missing.path) == 1
                and missing.path[0] not in ("true", "false")
            ):
                self.lower(missing)  # a misspelt input: say so rather than count tensor inputs
        args = []
        for a in e.args[:n_tensors]:
            vals = self.lower(a)
            if len(vals) != 1:
                raise self.err(
                    f"{a.op} yields {len(vals)} values where one tensor is expected",
                    a.span,
                    hint="name them first: let a, b = ...",
                )
            args.append(vals[0])
        return self.emit(e, args, e.args[n_tensors:], want)

    def emit(self, call: Call, args: list[str], pos_params: list[Expr], want: int) -> list[str]:
        try:
            op = find_op(call.op)
            check_arity(op, len(args))
        except OpError as exc:
            raise self.err(exc.message, call.span, exc.hint) from None
        params, exprs = self.params(op, call, pos_params, want)
        try:
            n_out = values_yielded(op, params)
        except OpError as exc:
            raise self.err(exc.message, call.span, exc.hint) from None
        if n_out is None:
            if want is None:
                raise self.err(
                    f"{op.name} needs {op.count_param or 'n'}= here: only an op whose values go straight "
                    "to targets or let names takes its count from them",
                    call.span,
                )
            n_out = want
            count = op.count_param  # chunk's n; a config expression for it stays: bind checks it
            if count is not None and params.get(count) is None:
                params[count] = want
        if not 1 <= n_out <= MAX_OP_VALUES:
            raise self.err(
                f"{op.name} would yield {n_out} values: an op yields 1 to {MAX_OP_VALUES}",
                call.span,
                hint="check its n=, parts= or sizes=",
            )
        if self.n + n_out > MAX_RULE_VALUES:
            raise self.err(
                f"the rule makes more than {MAX_RULE_VALUES} values",
                call.span,
                hint="an ops [...] chain applies each op to every value the one before yields",
            )
        outs = [self.fresh() for _ in range(n_out)]
        self.nodes.append(
            Node(op.name, tuple(args), tuple(outs), tuple(params.items()), _where(call.span), exprs)
        )
        self.spans.append(call.span)
        return outs

    def params(
        self, op, call: Call, pos: list[Expr], want: int
    ) -> tuple[dict[str, Any], tuple[tuple[str, Any], ...]]:
        """The op's parameter values, and the config expressions those compiled with a config came from."""
        spec = {p.name: p for p in op.params}
        given: dict[str, Expr] = {}
        if len(pos) > len(op.params):
            raise self.err(
                f"{op.name} takes at most {len(op.params)} parameter(s) after its tensor inputs, "
                f"got {len(pos)}",
                call.span,
                hint=f"parameters: {', '.join(spec)}",
            )
        for p, e in zip(op.params, pos, strict=False):
            given[p.name] = e
        for kw in call.kwargs:
            if kw.name not in spec:
                close = difflib.get_close_matches(kw.name, list(spec), 1)
                raise self.err(
                    f"{op.name} has no parameter {kw.name!r}",
                    kw.span,
                    hint=(f"did you mean {close[0]!r}? " if close else "")
                    + f"parameters: {', '.join(spec) or 'none'}",
                )
            if kw.name in given:
                raise self.err(f"parameter {kw.name} of {op.name} is given twice", kw.span)
            given[kw.name] = kw.value
        out: dict[str, Any] = {}
        exprs: list[tuple[str, Any]] = []
        for p in op.params:
            if p.name not in given:
                if p.default is REQUIRED:
                    raise self.err(f"{op.name} needs parameter {p.name}", call.span)
                out[p.name] = p.default
                continue
            ir = from_spec(given[p.name])
            out[p.name] = self.param_value(op, p, given[p.name], ir)
            if self.config is not None and needs_config(ir):
                exprs.append((p.name, ConfigExpr.of(ir)))
        concrete = {k: v for k, v in out.items() if not _is_expr(v)}
        try:
            if len(concrete) == len(out):
                op.check(concrete)
        except OpError as exc:
            raise self.err(f"{op.name}: {exc.message}", call.span) from None
        return out, tuple(exprs)

    def param_value(self, op, p, e: Expr, ir) -> Any:
        """The value of parameter `p` written as `e` (typed as `ir`): evaluated, or without a config,
        a ConfigExpr that bind evaluates."""
        where = _where(e.span)
        if needs_config(ir) and self.config is None:
            if p.kind == "capture":  # a capture is named in the spec: no config can supply one
                raise self.err(
                    f"parameter {p.name} of {op.name} must be a capture name, got {show(ir)}", e.span
                )
            if p.kind == "dtype":  # the inverse (and whether the cast loses values) depends on it
                raise self.err(
                    f"parameter {p.name} of {op.name} must be a dtype name without a config, got {show(ir)}",
                    e.span,
                    hint="write the dtype, or compile with the config",
                )
            return ConfigExpr.of(ir, counted=p.kind in ("ints", "shape"))
        try:
            v = evaluate(ir, self.config, where)
        except ConfigError as exc:
            raise CompileError(
                f"rule {self.index + 1} (convert): {exc.message.split(': ', 1)[-1]}",
                span=e.span,
                hint=exc.hint,
            ) from None
        return self.typed_value(op, p, v, e)

    def typed_value(self, op, p, v: Any, e: Expr) -> Any:
        try:
            check_param(op, p, v, names=_Name)
        except OpError as exc:
            raise self.err(exc.message, e.span, exc.hint) from None
        return str(v) if p.kind in ("dtype", "capture") else v

    def lower_chain(self, chain: list[Call], inputs: list[str], n_targets: int, span) -> list[str]:
        values = [self.env[i] for i in inputs]
        for k, call in enumerate(chain):
            op = OPS.get(call.op)
            last = k == len(chain) - 1
            if op is None or op.max_inputs == 1:
                per = n_targets // max(len(values), 1) if last else None
                values = [v for val in values for v in self.emit(call, [val], call.args, per)]
            else:
                values = self.emit(call, values, call.args, n_targets if last else None)
        return values

    # ---- checks -----------------------------------------------------------------------------

    def check(self, inputs, outputs) -> PlanRule:
        r = self.rule
        return check_convert(
            self.index,
            _where(r.span),
            inputs,
            outputs,
            self.nodes,
            self.types,
            self.spans,
            r.span,
            {b.name: b.span for b in r.inputs},
        )


# ---- checks shared with plans read from JSON --------------------------------------------------


def _dequantizes(rule: Convert) -> bool:
    """Whether the spec's own expressions already dequantize (then the compiler adds nothing)."""
    from ..ops.quant import Dequantize

    def calls(e) -> bool:
        if isinstance(e, Call):
            return isinstance(OPS.get(e.op), Dequantize) or any(calls(a) for a in e.args)
        return False

    exprs = [x.expr for x in rule.lets] + [o.expr for o in rule.outputs if o.expr is not None]
    chained = [c for o in rule.outputs for c in o.chain or ()]
    return any(calls(e) for e in exprs + chained)


def find_op(name: str) -> Op:
    """The op of that name, or an OpError that suggests the closest one."""
    op = OPS.get(name)
    if op is None:
        close = difflib.get_close_matches(name, list(OPS), 1)
        raise OpError(
            f"unknown op {name!r}",
            hint=(f"did you mean {close[0]!r}? " if close else "") + f"ops: {', '.join(sorted(OPS))}",
        )
    return op


def check_arity(op: Op, n: int) -> None:
    """Raise OpError unless `op` takes `n` tensor inputs."""
    if n < op.min_inputs or (op.max_inputs is not None and n > op.max_inputs):
        need = (
            str(op.min_inputs)
            if op.max_inputs == op.min_inputs
            else f"at least {op.min_inputs}"
            if op.max_inputs is None
            else f"{op.min_inputs} to {op.max_inputs}"
        )
        raise OpError(f"{op.name} takes {need} tensor input(s), got {n}")


def values_yielded(op, params: dict[str, Any]) -> int | None:
    """How many values `op` yields with these parameters (config expressions included); None when
    the count follows the targets. Raise OpError when an expression would leave it unknown."""
    count = op.count_param
    if count is not None and _is_expr(params.get(count)):
        return op.n_outputs_configured(params[count])
    return op.n_outputs(params)


def check_param(op, p, v: Any, names: type = str) -> None:
    """Raise OpError unless `v` is a value of parameter `p` of `op` (a capture name: an instance
    of `names`, which compiling passes as the evaluator's bare-name type)."""
    p.check(op.name, v, names)


def check_convert(
    index: int,
    where: Span,
    inputs: list,
    outputs: list,
    nodes: list[Node],
    types: dict[str, str],
    spans: list[Span | None] | None = None,
    span: Span | None = None,
    binding_span: dict[str, Span | None] | None = None,
) -> PlanRule:
    """A convert's rule after the checks of its data flow: every op's inputs are collections over
    the same captures, a stack reduces an int capture its input has, every target names exactly the
    captures its value still varies over, nothing is written twice, every value is used. `outputs`
    are (value, pattern, span); `types` (capture -> type) grows by the captures unstack adds. Also
    checks the converts of a plan read from JSON, whose `where` stands for the spans."""
    spans = spans or [None] * len(nodes)
    in_caps = [set(p.captures) for _, p in inputs]
    bound_by_all = set.intersection(*in_caps) if in_caps else set()
    out_caps = set().union(*(set(p.captures) for _, p, _ in outputs)) if outputs else set()
    keep = sorted(out_caps & bound_by_all)
    free: dict[str, tuple[str, ...]] = {n: tuple(sorted(set(p.captures) - set(keep))) for n, p in inputs}
    uses: dict[str, int] = {}
    for node, node_span in zip(nodes, spans, strict=True):
        for a in node.inputs:
            uses[a] = uses.get(a, 0) + 1
        out_free = _node_free(index, node, free, keep, types, node_span or span)
        for o in node.outputs:
            free[o] = out_free
    _check_targets(index, outputs, keep, free, in_caps, uses)
    if outputs:  # the use checks point at the last target
        span = outputs[-1][2]
    _check_all_used(index, inputs, nodes, spans, uses, binding_span or {}, span)
    types = {c: types.get(c, "seg") for c in sorted(set(types) | out_caps)}
    return PlanRule(
        index=index,
        kind="convert",
        where=where,
        inputs=tuple((n, p) for n, p in inputs),
        outputs=tuple((v, p.typed(types)) for v, p, _ in outputs),
        nodes=tuple(nodes),
        keep=tuple(keep),
        free=tuple(sorted(free.items())),
        types=tuple(types.items()),
    )


def _node_free(
    index: int, node: Node, free: dict, keep: list[str], types: dict[str, str], span: Span | None
) -> tuple[str, ...]:
    """The captures a node's values vary over: its inputs' (which must agree), less the one a stack
    reduces, plus the one an unstack adds (typed int in `types`)."""
    op = OPS[node.op]
    arg_free = [set(free[a]) for a in node.inputs]
    params = dict(node.params)
    base = arg_free[0]
    if any(f != base for f in arg_free[1:]):
        desc = ", ".join(
            f"{a} over {{{', '.join(sorted(f)) or 'nothing'}}}"
            for a, f in zip(node.inputs, arg_free, strict=False)
        )
        raise CompileError(
            f"rule {index + 1} (convert): {node.op} mixes collections: {desc}",
            span=span,
            hint="stack each input over the same captures first",
        )
    if op.reduces:
        over = params["over"]
        if over not in base:
            raise CompileError(
                f"rule {index + 1} (convert): {node.op}(over={over}) but its input is not a collection "
                f"over {{{over}}}" + (f" (it is over {{{', '.join(sorted(base))}}})" if base else ""),
                span=span,
                hint="stack over a capture that the input has and the target does not",
            )
        if types.get(over) != "int":
            raise CompileError(
                f"rule {index + 1} (convert): stack over {{{over}}} needs an int "
                f"capture ({{{over}:int}}) to order its members",
                span=span,
                hint=f"declare it as {{{over}:int}} in the input templates",
            )
        return tuple(sorted(base - {over}))
    if op.expands:
        over = params["over"]
        if over in base or over in keep:
            raise CompileError(
                f"rule {index + 1} (convert): unstack over {{{over}}}, which is already bound",
                span=span,
            )
        types.setdefault(over, "int")
        return tuple(sorted(base | {over}))
    return tuple(sorted(base))


def _check_targets(
    index: int, outputs: list, keep: list[str], free: dict, in_caps: list[set], uses: dict[str, int]
) -> None:
    """Every target names exactly the captures its value varies over, and none is written twice;
    counts each value's uses."""
    seen_out: set[str] = set()
    for v, pat, span in outputs:
        uses[v] = uses.get(v, 0) + 1
        caps = set(pat.captures)
        for c in pat.captures:
            if c not in keep and c not in free[v]:
                why = (
                    "it is not bound by every input"
                    if any(c in ic for ic in in_caps)
                    else "no input binds it"
                )
                raise CompileError(
                    f"rule {index + 1} (convert): capture {{{c}}} in target {pat.text} is not bound: {why}",
                    span=span,
                    hint="use only captures that every input binds",
                )
        extra = set(free[v]) - caps
        if extra:
            c = sorted(extra)[0]
            raise CompileError(
                f"rule {index + 1} (convert): capture {{{c}}} is present in the inputs and absent from "
                f"target {pat.text}, and no op reduces it",
                span=span,
                code=UNUSED,
                hint=f"reduce it with stack(x, over={c}), or keep {{{c}}} in the target",
            )
        if pat.text in seen_out:
            raise CompileError(f"rule {index + 1} (convert): target {pat.text} is written twice", span=span)
        seen_out.add(pat.text)


def _check_all_used(
    index: int,
    inputs: list,
    nodes: list[Node],
    spans: list,
    uses: dict[str, int],
    binding_span: dict[str, Span | None],
    span: Span | None,
) -> None:
    """Every input and every value an op yields is used: a value no target takes would be lost."""
    for name, _ in inputs:
        if uses.get(name, 0) == 0:
            raise CompileError(
                f"rule {index + 1} (convert): input {name!r} is never used",
                span=binding_span.get(name) or span,
                code=UNUSED,
                hint="use it in an output, or remove it (a drop rule discards keys)",
            )
    for node, node_span in zip(nodes, spans, strict=True):
        for o in node.outputs:
            if uses.get(o, 0) == 0:
                raise CompileError(
                    f"rule {index + 1} (convert): a value of {node.op} is never used (it would be lost)",
                    span=node_span or span,
                    code=UNUSED,
                )


def _is_expr(v: Any) -> bool:
    return isinstance(v, ConfigExpr)


# ---- overlap between converts -----------------------------------------------------------------


def overlaps(rules: list[PlanRule], origins: list, spans: list | None = None):
    """Pairs of convert inputs of one spec (not across an include) that can claim the same key:
    (rule a, input a, rule b, input b, a key both match), in rule order. Only pairs whose fixed
    ends agree are asked (`candidate_pairs`): a spec of a few hundred converts is checked at once."""
    claims = [(r, name, pat) for r in rules if r.kind == "convert" for name, pat in r.inputs]
    pairs = candidate_pairs([p for _, _, p in claims], [origins[r.index] for r, _, _ in claims])
    if len(pairs) > MAX_OVERLAP_PAIRS:
        i, j = pairs[MAX_OVERLAP_PAIRS]
        raise CompileError(
            f"{len(pairs):,} pairs of convert inputs begin and end with the same text, so each pair must "
            f"be checked for a key both can claim; at most {MAX_OVERLAP_PAIRS:,} are checked",
            span=spans[claims[j][0].index] if spans else None,
            code=OVERLAP,
            hint="give the converts' templates distinct literal ends (`{p:path}.w1.weight`), or split the spec",
        )
    for i, j in pairs:
        (ra, na, pa), (rb, nb, pb) = claims[i], claims[j]
        if not meet(pa, pb):  # exact and fast; the automata then spell a key both match
            continue
        w = intersection_witness(pa, pb)
        if w is not None:
            yield ra, na, rb, nb, w


def candidate_pairs(patterns: list[Pattern], groups: list) -> list[tuple[int, int]]:
    """The pairs (i < j, sorted) of patterns of one group that could match one key: every key a
    pattern matches starts with its leading literal and ends with its trailing one, so two patterns
    meet only if one's leading literal starts the other's, and one's trailing literal ends the
    other's. Patterns sorted by their reversed trailing literal put every pattern that ends alike
    right after the one whose ending it extends: each pair is found without trying every pair."""
    ends = [literal_ends(p) for p in patterns]
    out: set[tuple[int, int]] = set()
    by_group: dict = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for members in by_group.values():
        order = sorted(members, key=lambda i: ends[i][1][::-1])
        rev = {i: ends[i][1][::-1] for i in members}
        for at, i in enumerate(order):
            for j in order[at + 1 :]:
                if not rev[j].startswith(rev[i]):
                    break
                a, b = ends[i][0], ends[j][0]
                if a.startswith(b) or b.startswith(a):
                    out.add((min(i, j), max(i, j)))
    return sorted(out)


def _check_overlaps(rules: list[PlanRule], flat: list, origins: list) -> None:
    """Two converts of one spec that can claim the same key are an error. Across an `include` the
    first claim wins, as in transformers (a sub-model's converter after the model's own)."""
    for ra, na, rb, nb, w in overlaps(rules, origins, [r.span for r in flat]):
        raise overlap_error(ra, na, rb, nb, w, flat[rb.index].span)


def overlap_error(ra: PlanRule, na: str, rb: PlanRule, nb: str, w: str, span: Span | None) -> CompileError:
    if ra.index == rb.index:
        return CompileError(
            f"rule {ra.index + 1} (convert): inputs {na} and {nb} can both match the key {w!r}",
            span=span,
            code=OVERLAP,
            hint="make the input templates disjoint",
        )
    pa, pb = dict(ra.inputs)[na], dict(rb.inputs)[nb]
    return CompileError(
        f"rules {ra.index + 1} and {rb.index + 1} can both claim the key {w!r} ({pa.text} and {pb.text})",
        span=span,
        code=OVERLAP,
        hint="at most one convert may claim a key: make the templates disjoint",
    )


# ---- includes -----------------------------------------------------------------------------


class _Budget:
    """Rules made while includes are expanded, all levels together (an included spec's rules, then
    their copies under each prefix, and the guards a later prefix adds): `take` refuses at the
    include that would pass MAX_EXPANDED_RULES, before anything past the limit is made."""

    def __init__(self) -> None:
        self.used = 0

    def take(self, n: int, rule: Include, what: str) -> None:
        if self.used + n > MAX_EXPANDED_RULES:
            raise CompileError(
                f"include {rule.spec}{what}: expanding the includes would make more than "
                f"{MAX_EXPANDED_RULES:,} rules ({self.used:,} so far, {n:,} more here)",
                span=rule.span,
                hint="include fewer specs or prefixes: each prefix repeats every included rule",
            )
        self.used += n


def _flatten(
    spec: Spec,
    resolve,
    _stack: tuple[str, ...] = (),
    _origin: str = "",
    _budget: _Budget | None = None,
    quantizations: list | None = None,
) -> tuple[list, list]:
    """Rules and, for each, which include it came from. Under several prefixes the first prefix a
    key has wins (transformers' `base_model_prefix.scope.` before `scope.`): a rename under a later
    prefix leaves keys under an earlier, longer one alone. The size is counted as it grows, and
    refused past MAX_EXPANDED_RULES (with the guards a later prefix adds) before it is made. The
    included specs' quantization sections are appended to `quantizations`, depth first."""
    out, origins = [], []
    budget = _budget or _Budget()
    stack = _stack or (spec.name,)  # the names included so far: a file need not hold the spec it is named for
    for n, rule in enumerate(spec.rules):
        if not isinstance(rule, Include):
            out.append(rule)
            origins.append(_origin)
            budget.used += 1
            continue
        if rule.spec in stack or rule.spec == spec.name:
            raise CompileError(
                f"include {rule.spec} is circular ({' -> '.join((*stack, rule.spec))})",
                span=rule.span,
            )
        if resolve is None:
            raise CompileError(f"include {rule.spec}: no spec library to resolve it from", span=rule.span)
        try:
            included = resolve(rule.spec)
        except SpecNotFoundError as exc:
            raise CompileError(f"include {rule.spec}: {exc.message}", span=rule.span, hint=exc.hint) from None
        if quantizations is not None and included.quantization is not None:
            quantizations.append(included.quantization)
        inner, inner_origins = _flatten(
            included, resolve, (*stack, rule.spec), f"{_origin}/{n}", budget, quantizations
        )
        if rule.only != "all":
            keep = [
                (r, o)
                for r, o in zip(inner, inner_origins, strict=True)
                if (r.kind == "convert") == (rule.only == "converts")
            ]
            inner, inner_origins = [r for r, _ in keep], [o for _, o in keep]
        under = rule.under or [""]
        where = f" under {len(under):,} prefixes" if len(under) > 1 else ""
        budget.take(len(under) * len(inner), rule, where)
        renames = sum(isinstance(r, Rename) for r in inner)
        for k, prefix in enumerate(under):
            earlier = [p for p in under[:k] if p.startswith(prefix)] if renames else []
            budget.take(renames * len(earlier), rule, f"{where} (the guards of its earlier prefixes)")
            for r, o in zip(inner, inner_origins, strict=True):
                out.append(_under(r, prefix, earlier))
                origins.append(f"{o}@{prefix}")
    return out, origins


def _under(rule, prefix: str, excluded: list[str] = ()):
    """A rule whose every template is moved under `prefix.` ("": every key). A rename also leaves
    keys under the `excluded` prefixes alone."""
    if excluded and isinstance(rule, Rename):
        guards = [_template(f"{e}.{{_scope:path}}") for e in excluded]
        rule = rule.model_copy(update={"unless": [*rule.unless, *guards]})
    if not prefix:
        return rule

    def t(tpl: Template) -> Template:
        parts = list(tpl.parts)
        if parts and isinstance(parts[0], Lit):
            parts[0] = Lit(text=f"{prefix}.{parts[0].text}", span=parts[0].span)
        else:
            parts.insert(0, Lit(text=f"{prefix}."))
        return Template(text=f"{prefix}.{tpl.text}", parts=parts, span=tpl.span)

    if isinstance(rule, Rename):
        return rule.model_copy(
            update={"source": t(rule.source), "target": t(rule.target), "unless": [t(u) for u in rule.unless]}
        )
    if isinstance(rule, Drop):
        return rule.model_copy(update={"source": t(rule.source)})
    return rule.model_copy(
        update={
            "inputs": [b.model_copy(update={"template": t(b.template)}) for b in rule.inputs],
            "outputs": [o.model_copy(update={"targets": [t(x) for x in o.targets]}) for o in rule.outputs],
        }
    )


def _template(text: str) -> Template:
    from ..spec.parse import parse_template
    from ..spec.source import Embedded, Source

    return parse_template(text, Embedded(Source(text, "<include>"), 1, 1))


# ---- the inverse ------------------------------------------------------------------------------


def invert(rules: list[PlanRule]) -> tuple[tuple[PlanRule, ...], list[str]]:
    """The rules that undo `rules`, in reverse order, and the reasons (if any) the result is lossy."""
    out, lossy = [], []
    for r in reversed(rules):
        if r.kind == "drop":
            lossy.append(f"{r.label} drops {r.inputs[0][1].text}")
            continue
        if r.kind == "rename" and r.one_way:
            continue  # an alias normalises on load; the inverse writes the canonical name
        if r.kind == "rename":
            (_, src), (_, dst) = r.inputs[0], r.outputs[0]
            shift = dst.offsets
            if shift:  # `{i}` -> `{i+1}` is undone by `{i}` -> `{i-1}`
                plain = lambda a: split_offset(a)[0]  # noqa: E731
                dst = Pattern(dst.text, tuple((k, plain(a) if k == "cap" else a, b) for k, a, b in dst.parts))
                src = Pattern(
                    src.text,
                    tuple(
                        (k, with_offset(a, -shift.get(a, 0)) if k == "cap" else a, b) for k, a, b in src.parts
                    ),
                )
            out.append(
                PlanRule(
                    len(out),
                    "rename",
                    r.where,
                    (("x", dst),),
                    (("x", src),),
                    keep=r.keep,
                    free=r.free,
                    types=r.types,
                    undoes=r.number,
                )
            )
            continue
        nodes = []
        for node in reversed(r.nodes):
            op = OPS[node.op]
            params = dict(node.params)
            reason = op.loses(params)
            if reason is not None:
                lossy.append(f"{r.label}: {reason} (at {node.where})")
            try:
                inv_name, inv_params = (op.inverse if reason is None else op.nearest_inverse)(
                    params, len(node.inputs)
                )
            except NotInvertible as exc:
                raise NotInvertible(f"{r.label}: {exc} (at {node.where})") from None
            exprs = tuple((k, e) for k, e in node.exprs if inv_params.get(k) == params.get(k))
            nodes.append(
                Node(inv_name, node.outputs, node.inputs, tuple(inv_params.items()), node.where, exprs)
            )
        types = dict(r.types)
        out.append(
            PlanRule(
                index=len(out),
                kind="convert",
                where=r.where,
                inputs=tuple((v, p.typed(types)) for v, p in r.outputs),
                outputs=tuple((n, p) for n, p in r.inputs),
                nodes=tuple(nodes),
                keep=r.keep,
                free=r.free,
                types=r.types,
                undoes=r.number,
            )
        )
    return tuple(out), lossy
