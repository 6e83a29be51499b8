"""The Plan: an immutable, JSON-serializable compiled spec (rules as patterns + op DAGs)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
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
        """A checkpoint converted into a dict of tensors {target_key: tensor}."""
        return dict(self.stream(src, device=device, dtype=dtype, strict=strict))

    def load_into(self, model, src, strict: bool = True, device: str | None = None):
        """Fill `model` (on meta: assigned; allocated: copied in place); returns missing/unexpected/mismatched."""
        from ..load_into import load_into

        dev = device or next((str(p.device) for p in model.parameters() if not p.is_meta), "cpu")
        return load_into(model, self.stream(src, device=dev), strict=strict, base_prefix=self.base_prefix)

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
        """The plan as JSON text, in the current plan format, to ship a compiled plan.

        Args:
            indent: spaces per nesting level (None: one line).

        Returns:
            A JSON object whose `convspec_plan` field is the format version (docs/usage.md,
            "Plans as JSON"); `Plan.from_json` reads it back into an equal plan.

        Example:
            >>> import convspec
            >>> text = convspec.compile("mixtral").to_json()
            >>> convspec.Plan.from_json(text).to_json() == text
            True
        """
        from .plan_json import plan_dict

        return json.dumps(plan_dict(self), indent=indent)

    @staticmethod
    def from_json(text: str | bytes) -> Plan:
        """The plan a JSON text holds, checked as thoroughly as compiling checks a spec.

        A plan of an older format is upgraded one version at a time, by the steps the format's
        history lists; then every field is checked, and every rule with the compiler's own checks
        (known ops, their parameters and arity, templates, captures, the data flow, the recorded
        inverse). Nothing is filled in or guessed silently.

        Args:
            text: what `Plan.to_json` or `convspec compile SPEC --format json` wrote.

        Returns:
            The plan, ready to bind, apply, stream, save or invert.

        Raises:
            PlanError: the text is not JSON, not a plan, of a format newer than this convspec
                reads, or not a plan the compiler could make; the message names the field
                (`rules[2].nodes[0].op`) and what is wrong.

        Example:
            >>> import convspec
            >>> plan = convspec.Plan.from_json(convspec.compile("mixtral").to_json())
            >>> plan.name
            'mixtral'
            >>> convspec.Plan.from_json('{"convspec_plan": 99}')
            Traceback (most recent call last):
            ...
            convspec.errors.PlanError: error: convspec_plan: plan format 99 is newer than this convspec reads (formats 1 to 2)
              hint: upgrade convspec, or compile the spec again with this version
        """
        from .plan_json import loads

        return loads(text)
