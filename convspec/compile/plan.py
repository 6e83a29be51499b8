"""The Plan: an immutable, JSON-serializable compiled spec (rules as patterns + op DAGs)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

from .patterns import Pattern


@dataclass(frozen=True)
class Node:
    """One op application in a rule's DAG: values in -> values out."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[tuple[str, Any], ...]  # plain values, or {"$expr": IR} when they need a config
    where: str = ""

    def __str__(self) -> str:
        args = list(self.inputs) + [f"{k}={_show(v)}" for k, v in self.params if v is not None]
        return f"{', '.join(self.outputs)} = {self.op}({', '.join(args)})"


def _show(v: Any) -> str:
    if isinstance(v, dict) and "$expr" in v:
        return "<" + v.get("text", "expr") + ">"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return str(v)


@dataclass(frozen=True)
class PlanRule:
    """A compiled rule: input patterns, the op DAG, and the patterns its output values take."""

    index: int
    kind: str  # rename | convert | drop
    where: str
    inputs: tuple[tuple[str, Pattern], ...]
    outputs: tuple[tuple[str, Pattern], ...] = ()
    nodes: tuple[Node, ...] = ()
    keep: tuple[str, ...] = ()  # captures that name a group (kept in the outputs)
    free: tuple[tuple[str, tuple[str, ...]], ...] = ()  # value -> captures it is a collection over
    types: tuple[tuple[str, str], ...] = ()  # capture -> path | path? | int | seg
    unless: tuple[Pattern, ...] = ()  # a rename leaves keys matching these alone
    one_way: bool = False  # an alias: applied on load, not undone by the inverse
    undoes: int = 0  # in an inverse plan: the number of the spec's rule this one undoes

    @property
    def number(self) -> int:
        """The rule's number as the spec file counts them (an inverse rule: the rule it undoes)."""
        return self.undoes or self.index + 1

    @property
    def label(self) -> str:
        return f"rule {self.number} ({self.kind}, {self.where})"

    @cached_property
    def free_of(self) -> dict[str, tuple[str, ...]]:
        return dict(self.free)


@dataclass(frozen=True)
class Plan:
    """A compiled spec. `regex` is one alternation over every input pattern, one group per pattern."""

    name: str
    doc: str
    model_types: tuple[str, ...]
    rules: tuple[PlanRule, ...]
    config: Any = None  # the config dict the plan was compiled with (frozen by convention)
    inverse_rules: tuple[PlanRule, ...] | None = None
    inverse_error: str | None = None
    lossy: tuple[str, ...] = ()  # why an exact inverse is impossible, rule by rule
    is_inverse: bool = False
    base_prefix: str = ""  # load_into matches keys with or without it (a base-model checkpoint)
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    # ---- matching ----------------------------------------------------------------------------

    @property
    def regex(self) -> str:
        return self._alternation(0, ("rename", "convert", "drop"))[0].pattern

    def _alternation(self, start: int, kinds: tuple[str, ...]):
        """The combined regex over rules[start:] of the given kinds, and its group -> (rule, input)."""
        key = (start, kinds)
        if key not in self._cache:
            alts, groups, n = [], {}, 0
            for rule in self.rules[start:]:
                if rule.kind not in kinds:
                    continue
                for k, (name, pat) in enumerate(rule.inputs):
                    n += 1
                    outer = n
                    caps = []
                    for cap in pat.captures:
                        n += 1
                        caps.append((cap, n))
                    guard = ""
                    if rule.unless:
                        guard = "(?!(?:" + "|".join(u.regex(named=False) for u in rule.unless) + r")\Z)"
                    alts.append(f"({guard}{pat.regex(prefix=f'r{rule.index}_{k}__')})")
                    groups[outer] = (rule.index, name, tuple(c for c, _ in caps), tuple(i for _, i in caps))
            self._cache[key] = (re.compile("|".join(alts) if alts else r"(?!)"), groups)
        return self._cache[key]

    def first_match(self, key: str, start: int = 0, renames_only: bool = False):
        """The first rule at or after `start` whose input pattern matches the whole key."""
        kinds = ("rename",) if renames_only else ("rename", "convert", "drop")
        regex, groups = self._alternation(start, kinds)
        m = regex.fullmatch(key)
        if m is None:
            return None
        rule, name, names, idx = groups[m.lastindex]
        if not idx:
            return rule, name, {}
        values = m.group(*idx) if len(idx) > 1 else (m.group(idx[0]),)
        if None in values:  # an absent optional path is empty
            values = tuple(v or "" for v in values)
        return rule, name, dict(zip(names, values, strict=True))

    # ---- the public API ----------------------------------------------------------------------

    def inverse(self, allow_lossy: bool = False) -> Plan:
        """The plan that undoes this one bit for bit (with allow_lossy, the best effort). Made once:
        bind's checks and every save share it, and its compiled regexes."""
        from ..errors import NotInvertibleError

        if self.inverse_rules is None or (self.lossy and not allow_lossy):
            raise NotInvertibleError(
                f"spec {self.name} cannot be inverted exactly: "
                + (self.inverse_error or "; ".join(self.lossy)),
                hint=None if self.inverse_error else "pass allow_lossy=True for a best-effort inverse",
            )
        if "inverse" not in self._cache:
            self._cache["inverse"] = self._make_inverse()
        return self._cache["inverse"]

    def _make_inverse(self) -> Plan:
        return Plan(
            name=self.name,
            doc=self.doc,
            model_types=self.model_types,
            rules=self.inverse_rules,
            config=self.config,
            inverse_rules=self.rules if not self.lossy else None,
            inverse_error="the forward plan is lossy" if self.lossy else None,
            lossy=(),
            is_inverse=not self.is_inverse,
            base_prefix=self.base_prefix,
        )

    def bind(self, layout: dict, strict: bool = False):
        """Plan x checkpoint layout ({key: (shape, dtype)}) -> BoundPlan; reads no tensor data."""
        from ..bind import bind

        return bind(self, layout, strict=strict)

    def apply(self, state_dict: dict, strict: bool = False) -> dict:
        """Convert a dict of tensors (any device, meta included) to the target layout."""
        from ..run import apply_plan

        return apply_plan(self, state_dict, strict=strict)

    def stream(self, src, device: str = "cpu", dtype: str | None = None, strict: bool = False):
        """Yield (target_key, tensor) from a checkpoint, one group in memory at a time."""
        from ..io.checkpoint import Checkpoint
        from ..streaming import bind_checkpoint, stream_bound

        ckpt = Checkpoint(src)
        yield from stream_bound(bind_checkpoint(self, ckpt, strict), ckpt, device, dtype)

    def load(self, src, device: str = "cpu", dtype: str | None = None, strict: bool = False) -> dict:
        """A checkpoint converted into a dict of tensors {target_key: tensor}; its `.bound` is what
        bind found (`.already`: how many keys were in the target layout already)."""
        from ..io.checkpoint import Checkpoint
        from ..streaming import Loaded, bind_checkpoint, stream_bound

        ckpt = Checkpoint(src)
        bound = bind_checkpoint(self, ckpt, strict)
        return Loaded(stream_bound(bound, ckpt, device, dtype), bound=bound)

    def load_into(self, model, src, strict: bool = True, device: str | None = None):
        """Fill `model` (on meta: assigned; allocated: copied in place); returns missing/unexpected/mismatched,
        and how many keys were in the target layout already."""
        from ..io.checkpoint import Checkpoint
        from ..load_into import load_into
        from ..streaming import bind_checkpoint, stream_bound

        dev = device or next((str(p.device) for p in model.parameters() if not p.is_meta), "cpu")
        ckpt = Checkpoint(src)
        bound = bind_checkpoint(self, ckpt)
        items = stream_bound(bound, ckpt, dev)
        return load_into(
            model, items, strict=strict, base_prefix=self.base_prefix, already=len(bound.already)
        )

    def save(
        self, state_dict: dict, dst, max_shard_size: str | int = "5GB", overwrite: bool = False
    ) -> list[str]:
        """Apply the plan to a state dict and write it as sharded safetensors, atomically."""
        from ..io.writer import AtomicDir, parse_size, write_sharded
        from ..ops import TensorInfo
        from ..streaming import output_order

        bound = self.bind({k: TensorInfo.of(t) for k, t in state_dict.items()})
        out = self.apply(state_dict)
        entries = output_order(bound)
        with AtomicDir(dst, overwrite=overwrite) as tmp:
            return write_sharded(
                tmp, entries, ((k, out[k]) for k, _, _ in entries), parse_size(max_shard_size)
            )

    # ---- JSON --------------------------------------------------------------------------------

    def to_json(self, indent: int | None = None) -> str:
        d = {
            "convspec_plan": 1,
            "name": self.name,
            "doc": self.doc,
            "model_types": list(self.model_types),
            "config": self.config,
            "rules": [_rule_json(r) for r in self.rules],
            "inverse_rules": None
            if self.inverse_rules is None
            else [_rule_json(r) for r in self.inverse_rules],
            "inverse_error": self.inverse_error,
            "lossy": list(self.lossy),
            "is_inverse": self.is_inverse,
            "base_prefix": self.base_prefix,
            "regex": self.regex,
        }
        return json.dumps(d, indent=indent)

    @staticmethod
    def from_json(text: str) -> Plan:
        d = json.loads(text)
        if d.get("convspec_plan") != 1:
            from ..errors import ConvspecError

            raise ConvspecError("not a convspec plan (missing 'convspec_plan': 1)")
        inv = d.get("inverse_rules")
        rules = tuple(_rule_from(r) for r in d["rules"])
        inverse = None if inv is None else tuple(_rule_from(r) for r in inv)
        if inverse is not None:  # a plan written before inverse rules named the rule they undo
            if d.get("is_inverse", False):
                rules = _undoing(rules, inverse)
            else:
                inverse = _undoing(inverse, rules)
        return Plan(
            name=d["name"],
            doc=d["doc"],
            model_types=tuple(d["model_types"]),
            rules=rules,
            config=d.get("config"),
            inverse_rules=inverse,
            inverse_error=d.get("inverse_error"),
            lossy=tuple(d.get("lossy", ())),
            is_inverse=d.get("is_inverse", False),
            base_prefix=d.get("base_prefix", ""),
        )


def _undoing(inverse: tuple[PlanRule, ...], forward: tuple[PlanRule, ...]) -> tuple[PlanRule, ...]:
    """Inverse rules with `undoes` filled in where it is missing: they undo the forward rules that
    have an inverse (not drops, not aliases), last first."""
    undone = [r.number for r in reversed(forward) if r.kind != "drop" and not r.one_way]
    return tuple(r if r.undoes else replace(r, undoes=n) for r, n in zip(inverse, undone, strict=True))


def _rule_json(r: PlanRule) -> dict:
    d = asdict(r)
    d["inputs"] = [[n, _pat_json(p)] for n, p in r.inputs]
    d["unless"] = [_pat_json(p) for p in r.unless]
    d["outputs"] = [[n, _pat_json(p)] for n, p in r.outputs]
    d["nodes"] = [
        {
            "op": n.op,
            "inputs": list(n.inputs),
            "outputs": list(n.outputs),
            "params": [list(x) for x in n.params],
            "where": n.where,
        }
        for n in r.nodes
    ]
    return d


def _pat_json(p: Pattern) -> dict:
    return {"text": p.text, "parts": [list(x) for x in p.parts]}


def _pat_from(d: dict) -> Pattern:
    return Pattern(d["text"], tuple(tuple(x) for x in d["parts"]))


def _rule_from(d: dict) -> PlanRule:
    return PlanRule(
        index=d["index"],
        kind=d["kind"],
        where=d["where"],
        inputs=tuple((n, _pat_from(p)) for n, p in d["inputs"]),
        outputs=tuple((n, _pat_from(p)) for n, p in d["outputs"]),
        nodes=tuple(
            Node(
                n["op"],
                tuple(n["inputs"]),
                tuple(n["outputs"]),
                tuple((k, v) for k, v in n["params"]),
                n["where"],
            )
            for n in d["nodes"]
        ),
        keep=tuple(d["keep"]),
        free=tuple((v, tuple(c)) for v, c in d["free"]),
        types=tuple((c, t) for c, t in d["types"]),
        unless=tuple(_pat_from(p) for p in d.get("unless", ())),
        one_way=d.get("one_way", False),
        undoes=d.get("undoes", 0),
    )
