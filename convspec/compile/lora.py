"""The adapter plan of a plan: each rule that converts a weight W, rewritten as rules on its LoRA
factors (W + s * B @ A), by what each op means for factors (`Op.low_rank`). Nothing is written by
hand: the adapter plan binds, streams and inverts like any other."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import CompileError, Span
from ..io.adapter import EMBEDDING, LINEAR, MAGNITUDE, PREFIX, WRAPPED, LoraConfig, lora_config
from ..ops import OPS, Factors, NoLowRank
from .patterns import Pattern
from .plan import Node, Plan, PlanRule

VARIANTS = ("linear", "embedding", "full")  # a DoRA adapter's Linear weights: "dora" for "linear"
SKIPPED = ("bias",)  # weights no LoRA adapts: their rules get no adapter rule


@dataclass(frozen=True)
class Produced:
    """What one adapter rule writes for one base output: the weight's name as PEFT targets it, and the
    rank and alpha its factors have (rank_pattern and alpha_pattern follow them)."""

    kind: str  # module | embedding | param
    module: str  # the module's name in the converted model (a template: captures as written)
    name: str  # the leaf name target_modules / target_parameters list
    rank: int
    alpha: float | int


@dataclass(frozen=True)
class Adapter:
    """An adapter plan and what it knows beyond the plan: where each rule came from, the rules whose
    adapters it refuses (and why), and what each rule produces for the adapter config."""

    plan: Plan
    base: Plan
    config: LoraConfig
    refused: tuple[tuple[int, str, str], ...] = ()  # (its rule index, base rule label, why)
    produced: dict[int, tuple[Produced, ...]] = field(default_factory=dict)  # adapter rule index ->
    consumed: dict[int, tuple[Produced, ...]] = field(default_factory=dict)  # ... and what it reads
    params: tuple[tuple[str, Pattern, Pattern], ...] = ()  # (side in|out, adapter A pattern, weight)

    def converting(self, reverse: bool = False) -> Plan:
        """The plan that converts this adapter: forward, or (`reverse`) from the converted layout back."""
        return self.plan.inverse() if reverse else self.plan

    def param_weight(self, key: str, side: str) -> str | None:
        """The weight a parameter adapter's A key (`side`: the base plan's in or out) adapts, None
        for a module's adapter (its weight is the module's `.weight`)."""
        for s, a, weight in self.params:
            if s == side:
                m = a.match(key)
                if m is not None:
                    return weight.format(m)
        return None


def _text(parts) -> str:
    return "".join(a if k == "lit" else (f"{{{a}:{b}}}" if b else f"{{{a}}}") for k, a, b in parts)


def _pattern(parts) -> Pattern:
    merged: list[tuple[str, str, str | None]] = []
    for part in parts:
        if part[0] == "lit" and merged and merged[-1][0] == "lit":
            merged[-1] = ("lit", merged[-1][1] + part[1], None)
        elif part[0] != "lit" or part[1]:
            merged.append(part)
    return Pattern(_text(merged), tuple(merged))


def _adapted(parts, tail: str = "") -> Pattern:
    """The key PEFT saves for `parts` (a base template, or a module's) and `tail`: `base_model.model.`
    before it, `tail` (`.lora_A.weight`, ...) after it."""
    return _pattern((("lit", PREFIX, None), *parts, ("lit", tail, None)))


def _split(p: Pattern) -> tuple[tuple, str] | None:
    """A weight template as (the module's parts, the parameter's name), None when it ends in a capture."""
    kind, last, _ = p.parts[-1]
    if kind != "lit" or "." not in last:
        return None
    head, _, leaf = last.rpartition(".")
    return (*p.parts[:-1], ("lit", head, None)), leaf


def _specialized(rule: PlanRule) -> PlanRule:
    """A rule whose every template ends in one segment capture (`{p}.qkv_proj.{kind}`: weight or
    bias) as the same rule on weights: the capture written as `weight`, as adapters adapt them."""
    pats = [p for _, p in (*rule.inputs, *rule.outputs)]
    ends = {p.parts[-1][1] if p.parts[-1][0] == "cap" else None for p in pats}
    types = dict(rule.types)
    if len(ends) != 1 or None in ends or types.get(next(iter(ends)), "seg") != "seg":
        return rule
    (cap,) = ends

    def lit(p: Pattern) -> Pattern:
        return _pattern((*p.parts[:-1], ("lit", "weight", None)))

    return replace(
        rule,
        inputs=tuple((n, lit(p)) for n, p in rule.inputs),
        outputs=tuple((n, lit(p)) for n, p in rule.outputs),
        keep=tuple(k for k in rule.keep if k != cap),
        types=tuple((k, v) for k, v in rule.types if k != cap),
    )


def kind_of(leaf: str) -> str:
    return "module" if leaf == "weight" else "param"


def _example(parts) -> str:
    """A module name for a template, for PEFT's patterns: captures as a plausible value."""
    return "".join(a if k == "lit" else ("0" if b == "int" else "x") for k, a, b in parts)


def _leaf(parts) -> str:
    return _text(parts).rpartition(".")[2]


class _Rule:
    """One adapter rule being made from one base convert rule, in one variant."""

    def __init__(self, d: Derivation, rule: PlanRule, variant: str):
        self.d, self.rule, self.variant = d, rule, variant
        self.params: list[tuple[str, Pattern, Pattern]] = []
        self.mags: dict[str, str] = {}  # DoRA: base value -> its magnitude value
        self.scalings: dict[str, float] = {}  # base value -> its factors' scaling (alpha / r)
        self.nodes: list[Node] = []
        self.free: dict[str, tuple[str, ...]] = {}

    def fresh(self, like: str, factor: str) -> str:
        """A value of `factor` (A or B) of the base value `like`: `B%3` (`B%3'`, ... as it is rewritten)."""
        name = f"{factor}{like}" if like.startswith("%") else f"{like}_{factor}"
        while name in self.free:
            name += "'"
        self.free[name] = self.rule.free_of.get(like, ())
        return name

    def node(self, op: str, ins: list[str], params: dict, likes, factor: str, where: Span | None = None):
        likes = [likes] if isinstance(likes, str) else likes
        outs = [self.fresh(like, factor) for like in likes]
        self.nodes.append(Node(op, tuple(ins), tuple(outs), tuple(params.items()), where or self.rule.where))
        return outs

    def inputs(self):
        """The adapter's inputs for each base input, and the factors (L, R) they make."""
        ins, vals = [], {}
        for name, pat in self.rule.inputs:
            split = _split(pat)
            if split is None:
                raise NoLowRank(f"its input {pat.text} ends in a capture, so its weight has no module name")
            module, leaf = split
            where = self.rule.where
            if self.variant == "embedding":
                a, b = (_adapted(module, "." + s) for s in EMBEDDING)
                ins += [(f"{name}_A", a), (f"{name}_B", b)]
                self.free[f"{name}_A"] = self.free[f"{name}_B"] = self.rule.free_of.get(name, ())
                vals[name] = (f"{name}_B", f"{name}_A", Factors(2, True), self.d.rank(module, leaf))
                continue
            depth = 0 if leaf == "weight" else self.d.depth(module, leaf, "in")
            wrap = "." + WRAPPED * depth
            a, b = (_adapted(module, wrap + s) for s in LINEAR)
            ins += [(f"{name}_A", a), (f"{name}_B", b)]
            self.free[f"{name}_A"] = self.free[f"{name}_B"] = self.rule.free_of.get(name, ())
            r = self.d.rank(module, leaf)
            if leaf == "weight":
                vals[name] = (f"{name}_B", f"{name}_A", Factors(2), r)
                if self.variant == "dora":  # DoRA: the magnitude of each of the weight's rows
                    ins.append((f"{name}_M", _adapted(module, "." + MAGNITUDE)))
                    self.free[f"{name}_M"] = self.rule.free_of.get(name, ())
                    self.mags[name] = f"{name}_M"
                continue
            if self.variant == "dora":
                raise NoLowRank(f"PEFT has no DoRA for a parameter's adapter ({pat.text})")
            self.params.append(("in", a, pat))
            # a parameter adapter (PEFT's ParamWrapper): an expert stack's factors, experts flattened
            (right,) = self.node("unflatten", [f"{name}_A"], {"dim": 0, "sizes": [-1, r]}, name, "A", where)
            (u,) = self.node("unflatten", [f"{name}_B"], {"dim": 1, "sizes": [r, -1]}, name, "B", where)
            (left,) = self.node("permute", [u], {"dims": [2, 0, 1]}, name, "B", where)
            vals[name] = (left, right, Factors(3), r)
        return ins, vals

    def build(self) -> tuple[PlanRule, tuple[Produced, ...], tuple[Produced, ...]]:
        """The adapter rule, what it writes for each base output, and what it reads."""
        ins, vals = self.inputs()
        consumed = []
        for name, pat in self.rule.inputs:
            module, leaf = _split(pat)
            kind = kind_of(leaf) if self.variant != "embedding" else "embedding"
            label = leaf if kind == "param" else _leaf(module)
            alpha = self.d.alpha(module, leaf)
            consumed.append(Produced(kind, _text(module), label, vals[name][3], alpha))
            self.scalings[name] = self.d.config.scaling(vals[name][3], alpha)
        for node in self.rule.nodes:
            self.walk(node, vals)
        outputs, produced = [], []
        for value, pat in self.rule.outputs:
            made = self.output(value, pat, vals[value])
            outputs += made[0]
            produced.append(made[1])
        rule = PlanRule(
            index=0,
            kind="convert",
            where=self.rule.where,
            inputs=tuple(ins),
            outputs=tuple(outputs),
            nodes=tuple(self.nodes),
            keep=self.rule.keep,
            free=tuple(self.free.items()),
            types=self.rule.types,
        )
        self.d.params += self.params
        return rule, tuple(produced), tuple(consumed)

    def walk(self, node: Node, vals: dict) -> None:
        """One base op, as ops on the factors of its inputs (and DoRA's magnitudes)."""
        facs = [vals[v][2] for v in node.inputs]
        on = OPS[node.op].low_rank(dict(node.params), facs)
        outs = on.outs * len(node.outputs) if len(on.outs) == 1 else on.outs
        ranks = [vals[v][3] for v in node.inputs]
        if on.joins_ranks and len(set(ranks)) > 1:
            raise NoLowRank(
                f"{node.op} joins weights whose adapters have ranks {ranks} (adapter config): the "
                "block-diagonal form needs one rank, so that its inverse can split it"
            )
        if on.joins_ranks and len({self.scalings.get(v) for v in node.inputs}) > 1:
            raise NoLowRank(f"{node.op} joins weights whose adapters scale differently (alpha / r)")
        if self.variant == "dora":
            self.magnitude(node, on, facs)
        lefts = self.side(on.left, [vals[v][0] for v in node.inputs], node, "B")
        rights = self.side(on.right, [vals[v][1] for v in node.inputs], node, "A")
        rank = sum(ranks) if on.joins_ranks else ranks[0]
        for k, v in enumerate(node.outputs):
            vals[v] = (lefts[k], rights[k], outs[k], rank)
            self.scalings[v] = self.scalings.get(node.inputs[0])

    def output(self, value: str, pat: Pattern, val) -> tuple[list, Produced]:
        """The adapter outputs of one base output: its factors as PEFT names and lays them out."""
        left, right, f, rank = val
        split = _split(pat)
        if split is None:
            raise NoLowRank(f"its output {pat.text} ends in a capture, so its weight has no module name")
        module, leaf = split
        outputs = []
        if value in self.mags:
            if kind_of(leaf) != "module" or f.swapped or f.ndim != 2:
                raise NoLowRank(f"its output {pat.text} is no Linear weight, which DoRA's magnitude needs")
            outputs.append((self.mags[value], _adapted(module, "." + MAGNITUDE)))
        if f.swapped != (self.variant == "embedding"):  # (L @ R)^T = R^T @ L^T: the factors trade places
            dims = {"dim0": f.ndim - 2, "dim1": f.ndim - 1}
            (left,), (right,) = (
                self.node("transpose", [right], dims, value, "B"),
                self.node("transpose", [left], dims, value, "A"),
            )
        if self.variant == "embedding":
            kind, tail = "embedding", ["." + s for s in EMBEDDING]
        elif leaf == "weight":
            if f.ndim != 2:
                raise NoLowRank(f"its output {pat.text} is a module's weight of {f.ndim} dims")
            kind, tail = "module", ["." + s for s in LINEAR]
        else:
            kind = "param"
            wrap = "." + WRAPPED * self.d.depth(module, leaf, "out")
            tail = [wrap + s for s in LINEAR]
            if f.ndim == 3:  # PEFT's layout: the experts flattened into the rank
                (right,) = self.node("flatten", [right], {"dim": 0, "sizes": [-1, rank]}, value, "A")
                (u,) = self.node("permute", [left], {"dims": [1, 2, 0]}, value, "B")
                (left,) = self.node("flatten", [u], {"dim": 1, "sizes": [rank, -1]}, value, "B")
            elif f.ndim != 2:
                raise NoLowRank(f"its output {pat.text} has {f.ndim} dims; PEFT adapts 2 or 3")
        a, b = (_adapted(module, t) for t in tail)
        outputs += [(right, a), (left, b)]
        if kind == "param":
            self.params.append(("out", a, pat))
        name = leaf if kind == "param" else _leaf(module)
        alpha = self.d.config.alpha_for(rank, self.scalings[value])
        return outputs, Produced(kind, _text(module), name, rank, alpha)

    def magnitude(self, node: Node, on, facs: list[Factors]) -> None:
        """DoRA's magnitude vectors through `node`: they follow the weight's rows as B does."""
        if any(f.swapped for f in facs) or on.rows is False:
            raise NoLowRank(f"DoRA's magnitude (one per row of the weight) cannot follow {node.op} here")
        rows = on.left if on.rows is True else on.rows
        got = self.side(rows, [self.mags[v] for v in node.inputs], node, "M")
        self.mags.update(zip(node.outputs, got, strict=True))

    def side(self, on, values: list[str], node: Node, factor: str) -> list[str]:
        """One factor's values through `on` (an op, or None: kept, shared or checked equal)."""
        if on is not None:
            name, params = on
            return self.node(name, values, params, list(node.outputs), factor, node.where)
        n = len(node.outputs)
        if len(values) == n:
            return values
        if len(values) == 1:
            return self.node("share", values, {"n": n}, list(node.outputs), factor, node.where)
        return self.node("same", values, {}, node.outputs[0], factor, node.where)


class Derivation:
    """Makes the adapter plan of `base` for adapters of `config`; `targeted` names the parameters
    (not modules' weights) an adapter targets, which set how PEFT nests their adapters."""

    def __init__(self, base: Plan, config: LoraConfig, targeted: frozenset[str] | None = None):
        self.base, self.config, self.targeted = base, config, targeted
        self.params: list[tuple[str, Pattern, Pattern]] = []
        self.siblings: dict[tuple[str, str], list[str]] = {}  # (side, module text) -> params in order
        for rule in base.rules:
            for side, pats in (("in", rule.inputs), ("out", rule.outputs)):
                for _, pat in pats:
                    split = _split(pat)
                    if split is not None and split[1] not in ("weight", *SKIPPED):
                        names = self.siblings.setdefault((side, _text(split[0])), [])
                        if split[1] not in names:
                            names.append(split[1])

    def depth(self, module, leaf: str, side: str) -> int:
        """How many `base_layer.` PEFT puts before a parameter's adapter: one for each parameter of the
        same module adapted after it (PEFT wraps a module's parameters in their order)."""
        names = self.siblings.get((side, _text(module)), [leaf])
        later = names[names.index(leaf) + 1 :] if leaf in names else []
        return sum(1 for n in later if self.targeted is None or n in self.targeted)

    def rank(self, module, leaf: str) -> int:
        return self.config.rank(self._name(module, leaf))

    def alpha(self, module, leaf: str) -> float:
        return self.config.alpha_of(self._name(module, leaf))

    @staticmethod
    def _name(module, leaf: str) -> str:
        return _example(module) if leaf == "weight" else f"{_example(module)}.{leaf}"

    def run(self) -> Adapter:
        from .compiler import inverse_of

        rules: list[PlanRule] = []
        refused, produced, consumed = [], {}, {}
        readers: dict[str, PlanRule] = {}  # adapter key template -> the convert that reads it

        def add(new: PlanRule, made: tuple = (), used: tuple = ()) -> None:
            """The next rule, unless a convert reads keys an earlier one reads: PEFT's names cannot
            tell those weights' adapters apart (a module's `weight` and its parameter `weight_1`),
            so the first keeps them and this one is said among the refused."""
            new = _with_index(new, len(rules))
            texts = [p.text for _, p in new.inputs] if new.kind == "convert" else []
            first = next((readers[t] for t in texts if t in readers), None)
            if first is not None:
                refused.append((-1, new.label, f"its adapters' names are those of {first.label}'s"))
                return
            readers.update(dict.fromkeys(texts, new))
            if new.kind == "convert":
                produced[new.index], consumed[new.index] = made, used
            rules.append(new)

        for rule in map(_specialized, self.base.rules):
            if rule.kind in ("rename", "drop"):
                for r in self.renamed(rule):
                    add(r)
                continue
            weights = [_split(p) for _, p in (*rule.inputs, *rule.outputs)]
            if all(w is not None and w[1] in SKIPPED for w in weights[: len(rule.inputs)]):
                continue
            if self.targeted is not None and any(
                w is not None and w[1] not in ("weight", *SKIPPED) and w[1] not in self.targeted
                for w in weights
            ):
                continue  # a parameter this adapter does not adapt: its name would be another's
            for variant in VARIANTS:
                variant = "dora" if variant == "linear" and self.config.dora else variant
                if variant == "embedding" and not all(
                    (s := _split(p)) is not None and s[1] == "weight"
                    for _, p in (*rule.inputs, *rule.outputs)
                ):
                    continue
                if variant == "full":
                    add(_prefixed(rule))
                    continue
                try:
                    add(*_Rule(self, rule, variant).build())
                except NoLowRank as exc:
                    why = str(exc) if variant != "embedding" else f"as an embedding's adapter: {exc}"
                    n = len(rules)
                    add(_refusal(rule, variant, str(exc)))
                    refused.append((n if len(rules) > n else -1, rule.label, why))
        inverse_rules, inverse_error, lossy = inverse_of(rules)
        plan = Plan(
            name=f"{self.base.name}.lora",
            doc=f"LoRA adapters of {self.base.name}: {self.base.doc}".strip(": "),
            model_types=self.base.model_types,
            rules=tuple(rules),
            config=self.base.config,
            inverse_rules=inverse_rules,
            inverse_error=inverse_error,
            lossy=lossy,
            is_inverse=self.base.is_inverse,
        )
        return Adapter(plan, self.base, self.config, tuple(refused), produced, consumed, tuple(self.params))

    def renamed(self, rule: PlanRule) -> list[PlanRule]:
        """A rename or a drop, for every name PEFT saves under the weights it matches."""
        (_, src), (_, dst) = rule.inputs[0], (rule.outputs[0] if rule.outputs else (None, None))
        forms: list[tuple[Pattern, Pattern | None]] = []
        s_split, d_split = _split(src), _split(dst) if dst is not None else None
        if s_split is None or (dst is not None and d_split is None):  # ends in a capture: the rest follows
            forms.append((_adapted(src.parts), None if dst is None else _adapted(dst.parts)))
        else:
            (sm, sl), dd = s_split, d_split
            if sl in SKIPPED:
                return []
            if sl == "weight":
                tails = [("." + s, "." + s) for s in (*LINEAR, *EMBEDDING, MAGNITUDE)]
            else:
                ws = "." + WRAPPED * self.depth(sm, sl, "in")
                wd = "." + WRAPPED * (self.depth(dd[0], dd[1], "out") if dd is not None else 0)
                tails = [(ws + s, wd + s) for s in LINEAR]
            tails.append(
                ("." + sl, "." + (dd[1] if dd is not None else sl))
            )  # the weight itself (modules_to_save)
            forms += [(_adapted(sm, ts), None if dd is None else _adapted(dd[0], td)) for ts, td in tails]
        out = []
        for s, d in forms:
            inputs = (("x", s),)
            outputs = () if d is None else (("x", d),)
            out.append(
                PlanRule(
                    0,
                    rule.kind,
                    rule.where,
                    inputs,
                    outputs,
                    keep=rule.keep,
                    free=rule.free,
                    types=rule.types,
                    unless=tuple(_adapted(u.parts) for u in rule.unless),
                    one_way=rule.one_way,
                )
            )
        return out


def _with_index(rule: PlanRule, index: int) -> PlanRule:
    return replace(rule, index=index)


def _prefixed(rule: PlanRule) -> PlanRule:
    """The base rule on the weights themselves, as an adapter saves the ones it trains whole."""

    def pre(pats):
        return tuple((n, _adapted(p.parts)) for n, p in pats)

    return replace(rule, inputs=pre(rule.inputs), outputs=pre(rule.outputs))


def _refusal(rule: PlanRule, variant: str, why: str) -> PlanRule:
    """A rule that claims the adapter keys of `rule`'s weights and refuses them at bind."""
    op = next((n.op for n in rule.nodes), "convert")
    names = EMBEDDING if variant == "embedding" else LINEAR
    ins, outs, free = [], [], {}
    for name, pat in rule.inputs:
        split = _split(pat)
        module = split[0] if split is not None else pat.parts
        for i, s in enumerate(names):
            ins.append((f"{name}_{i}", _adapted(module, "." + s)))
            free[f"{name}_{i}"] = rule.free_of.get(name, ())
    node = Node("no_low_rank", tuple(n for n, _ in ins), ("out",), (("op", op),), rule.where)
    out_pat = _adapted(rule.outputs[0][1].parts, ".refused")
    outs.append(("out", out_pat))
    return PlanRule(
        0,
        "convert",
        rule.where,
        tuple(ins),
        tuple(outs),
        nodes=(node,),
        keep=rule.keep,
        free=tuple(free.items()),
        types=rule.types,
    )


def derive(base: Plan, config: LoraConfig | dict | None = None, targeted=None) -> Adapter:
    """The adapter plan of `base` for LoRA adapters with `config` (an adapter_config.json's dict;
    None: PEFT's defaults). See docs/adapters.md."""
    if not isinstance(config, LoraConfig):
        config = lora_config(config or {})
    if base.quant is not None and base.quant.dequantize is not None:
        raise CompileError(f"spec {base.name} dequantizes weights; an adapter has none to dequantize")
    return Derivation(base, config, None if targeted is None else frozenset(targeted)).run()
