"""The Plan: an immutable, JSON-serializable compiled spec (rules as patterns + op DAGs)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from ..derived import derived
from ..errors import NotInvertibleError, Span
from ..frozen import freeze
from .expr import ConfigExpr
from .patterns import Pattern

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..bind import BoundPlan
    from ..quantization import Quant


@dataclass(frozen=True)
class Node:
    """One op application in a rule's DAG: values in -> values out."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[tuple[str, Any], ...]  # plain values, or a ConfigExpr when they need a config
    where: Span = Span("", 0, 0)  # where the call was written: prints as `file:line:col`
    # The expressions (ConfigExpr) that params compiled with a config were evaluated from, by
    # parameter name: what the value means for other configs (the transformers exporter reads it).
    exprs: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:  # a list parameter is frozen with the node (and hashes)
        object.__setattr__(self, "params", tuple((k, freeze(v)) for k, v in self.params))
        object.__setattr__(self, "exprs", tuple((k, freeze(v)) for k, v in self.exprs))

    def __str__(self) -> str:
        args = list(self.inputs) + [f"{k}={_show(v)}" for k, v in self.params if v is not None]
        return f"{', '.join(self.outputs)} = {self.op}({', '.join(args)})"


def _show(v: Any) -> str:
    if isinstance(v, ConfigExpr):
        return f"<{v}>"
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
    where: Span  # where the rule was written: prints as `file:line:col`
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


MATCH_BLOCK = 32  # rules per block of the match regexes (see Plan.first_match)


@dataclass(frozen=True)
class Plan:
    """A compiled spec: its rules as key patterns and op DAGs, the config it was compiled with, and
    its exact inverse. Immutable: the config is a frozen copy of the caller's, equal plans compare
    and hash equal, and what is derived from a plan is held beside it (`convspec.derived`), never in
    it. Made by `convspec.compile`, shipped with `to_json`/`from_json`, checked by `check`.
    `regex` is one alternation over every input pattern, one group per pattern.

    Example:
        >>> plan = convspec.compile("mixtral")
        >>> [r.kind for r in plan.rules]
        ['rename', 'convert', 'convert']
        >>> plan.inverse().is_inverse
        True
    """

    name: str
    doc: str
    model_types: tuple[str, ...]
    rules: tuple[PlanRule, ...]
    config: Any = None  # the config the plan was compiled with: a frozen copy (reads as a dict)
    inverse_rules: tuple[PlanRule, ...] | None = None
    inverse_error: str | None = None
    lossy: tuple[str, ...] = ()  # why an exact inverse is impossible, rule by rule
    is_inverse: bool = False
    base_prefix: str = ""  # load_into matches keys with or without it (a base-model checkpoint)
    quant: Quant | None = None  # quantized weights: their companions, kept or dequantized

    def __post_init__(self) -> None:  # the caller's config dict, copied: a later change never reaches it
        object.__setattr__(self, "config", freeze(self.config))

    def __hash__(self) -> int:
        """Equal plans hash equal; the hash is computed once (kept out of the compared fields, and out
        of a pickle: a string's hash differs from one process to the next)."""
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = hash(tuple(getattr(self, f.name) for f in fields(self)))
        return h

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    # ---- matching ----------------------------------------------------------------------------

    @property
    def regex(self) -> str:
        return self._alternation(0, ("rename", "convert", "drop"))[0].pattern

    def _alternation(self, start: int, kinds: tuple[str, ...], stop: int | None = None):
        """The combined regex over rules[start:stop] of the given kinds, and its group -> (rule, input)."""
        return derived(
            self, ("match", start, kinds, stop), lambda: _alternation(self.rules[start:stop], kinds)
        )

    def first_match(self, key: str, start: int = 0, renames_only: bool = False):
        """The first rule at or after `start` whose input pattern matches the whole key. From rule 0,
        one regex over every rule; from a later rule (after a rename), the rest of its block of
        MATCH_BLOCK rules one pattern at a time, then one regex per block: the regexes made stay
        linear in the rules (one per start would be quadratic, and a chain of renames asks for
        every start)."""
        kinds = ("rename",) if renames_only else ("rename", "convert", "drop")
        if not start:
            return self._match(key, self._alternation(0, kinds))
        edge = start - start % MATCH_BLOCK + MATCH_BLOCK
        for rule in self.rules[start:edge]:
            if rule.kind not in kinds or any(u.compiled.fullmatch(key) for u in rule.unless):
                continue
            for name, pat in rule.inputs:
                m = pat.compiled.fullmatch(key)
                if m is not None:  # an absent optional path is empty
                    return rule.index, name, {c: m.group(c) or "" for c in pat.captures}
        for lo in range(edge, len(self.rules), MATCH_BLOCK):
            hit = self._match(key, self._alternation(lo, kinds, lo + MATCH_BLOCK))
            if hit is not None:
                return hit
        return None

    @staticmethod
    def _match(key: str, alternation):
        regex, groups = alternation
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
        """The plan that undoes this one bit for bit: it loads what this one saves. Made once, and
        shared by bind's checks, every save and its compiled regexes.

        Args:
            allow_lossy: for a plan with a lossy rule (a drop, a narrowing cast), give the best-effort
                inverse instead of refusing.

        Returns:
            The inverse `Plan` (`is_inverse` flipped); its own inverse is this plan's rules again.

        Raises:
            NotInvertibleError: the plan cannot be undone exactly; names the rule and why.

        Example:
            >>> back = convspec.compile("mixtral").inverse()
            >>> back.rules[0].kind, back.rules[0].number
            ('convert', 3)
        """
        if self.inverse_rules is None or (self.lossy and not allow_lossy):
            raise NotInvertibleError(
                f"spec {self.name} cannot be inverted exactly: "
                + (self.inverse_error or "; ".join(self.lossy)),
                hint=None
                if self.inverse_error
                else "pass allow_lossy=True (convert --allow-lossy) for a best-effort inverse",
            )
        return derived(self, "inverse", self._make_inverse)

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
            quant=self.quant,
        )

    def bind(self, layout: dict, strict: bool = False):
        """Match a checkpoint's layout against the plan: every group, every output key with its shape
        and dtype, what is passed through, and every problem at once. Reads no tensor data.

        Args:
            layout: {key: (shape, dtype)} for every tensor (dtype as a name: "bfloat16"), as in a
                checkpoint's safetensors headers; `TensorInfo` values work too.
            strict: refuse keys no rule claims, instead of passing them through unchanged.

        Returns:
            A `BoundPlan`.

        Raises:
            BindError: the layout does not fit (an incomplete group, a shape an op cannot take, a
                key claimed twice, unclaimed keys with `strict`); lists every problem by key.
            ConfigError: a `config.*` expression needs a field the config lacks.

        Example:
            >>> shapes = {"w1": (48, 32), "w2": (32, 48), "w3": (48, 32)}
            >>> layout = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": (s, "bfloat16")
            ...           for e in range(4) for w, s in shapes.items()}
            >>> bound = convspec.compile("mixtral").bind(layout)
            >>> bound.outputs["model.layers.0.mlp.experts.gate_up_proj"]
            ((4, 96, 32), 'bfloat16')
        """
        return _runtime().bind(self, layout, strict)

    def apply(self, state_dict: dict, strict: bool = False) -> dict:
        """Convert a dict of tensors to the target layout, in memory.

        Args:
            state_dict: {key: tensor}, on any device (meta tensors too: shapes only).
            strict: refuse keys no rule claims, instead of passing them through unchanged.

        Returns:
            {target_key: tensor}.

        Raises:
            BindError, ConfigError: as `bind`, before any op runs.

        Example:
            >>> plan = convspec.compile("mixtral")
            >>> sd = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": torch.zeros(32, 32)
            ...       for e in range(2) for w in ("w1", "w2", "w3")}
            >>> out = plan.apply(sd)
            >>> out["model.layers.0.mlp.experts.gate_up_proj"].shape
            torch.Size([2, 64, 32])
            >>> back = plan.inverse().apply(out)
            >>> all(torch.equal(back[k], sd[k]) for k in sd)
            True
        """
        return _runtime().apply(self, state_dict, strict)

    def stream(self, src, device: str = "cpu", dtype: str | None = None, strict: bool = False):
        """Convert a checkpoint as it is read: (target_key, tensor) pairs, one group in memory at a
        time. The layout is bound (and every problem reported) before any tensor is read.

        Args:
            src: a checkpoint directory, a `model.safetensors.index.json`, or one `.safetensors` file.
            device: where the tensors are placed and the ops run.
            dtype: cast every tensor to this dtype ("bfloat16", ...); None keeps each one's.
            strict: refuse keys no rule claims, instead of passing them through unchanged.

        Returns:
            An iterator of (target_key, tensor).

        Raises:
            CheckpointError: `src` is missing, malformed or truncated (names the file).
            BindError, ConfigError: as `bind`.

        Example:
            >>> plan = convspec.compile("mixtral", config="tiny-mixtral/config.json")
            >>> key, tensor = next(plan.stream("tiny-mixtral"))
            >>> sum(1 for _ in plan.stream("tiny-mixtral"))
            21
        """
        yield from _runtime().stream(self.for_dtype(dtype), src, device, dtype, strict)

    def load(
        self,
        src,
        device: str = "cpu",
        dtype: str | None = None,
        strict: bool = False,
        shard: Any = None,
        mesh: Any = None,
        dequantize: bool | str = False,
    ) -> dict:
        """A checkpoint read and converted into a dict of tensors, or of DTensors, each rank reading
        only the source bytes of its own shards (docs/distributed.md).

        Args:
            src, device, dtype, strict: as `stream`.
            dequantize: quantized weights dequantized (`Plan.dequantize`) to `dtype` (default
                bfloat16), with transformers' numerics; else they are kept with their companions.
            shard: where each converted tensor lies on `mesh`, as `convspec.sharded.load_sharded`
                takes it: {target: placement} or a function of the target; a placement is a
                transformers tp_plan style ("colwise", "rowwise", "experts"), "replicate", or
                DTensor placements, one per mesh dim. A key it does not name is replicated, but
                a quantized weight's scale grid, which lies as its weight does.
            mesh: a `DeviceMesh`; default one dim over every rank of the job, on `device`'s type.
                With either, the local shards go to the mesh's device.

        Returns:
            {target_key: tensor}, a dict whose `.bound` is what bind found and `.already` how many
            source keys were in the target layout already (they pass through unchanged). Sharded,
            its `.stats` is what this rank read (bytes, read calls, regions read wider).

        Raises:
            CheckpointError, BindError, ConfigError: as `stream`.
            ConvspecError: a placement that does not fit the mesh or does not divide; sharded, a
                problem on any rank is raised on every rank, before any data is read.

        Example:
            >>> plan = convspec.compile("mixtral", config="tiny-mixtral/config.json")
            >>> sd = plan.load("tiny-mixtral")
            >>> sd["model.layers.1.mlp.experts.down_proj"].shape
            torch.Size([4, 32, 48])

            Sharded (here a job of one rank: its shard is all of it):

            >>> import torch.distributed as dist
            >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            >>> sd = plan.load("tiny-mixtral", shard={"model.layers.1.mlp.experts.down_proj": "experts"})
            >>> sd["model.layers.1.mlp.experts.down_proj"].placements, sd.stats.wider
            ((Shard(dim=0),), 0)
            >>> dist.destroy_process_group()
        """
        plan = self.for_dtype(dtype, dequantize)
        return _runtime().load(plan, src, device, dtype, strict, shard, mesh)

    def dequantize(self, dtype: str = "bfloat16") -> Plan:
        """This plan with its quantized weights dequantized to `dtype` by the scheme's op (transformers'
        numerics), their scales consumed and per-tensor companions dropped. Lossy: no inverse.

        Raises:
            CompileError: the plan has no quantization (compile it with the checkpoint's config).
        """
        return derived(self, ("dequantize", dtype), lambda: _runtime().dequantize(self, dtype))

    def adapter(self, kind: str = "lora", config: dict | None = None) -> Plan:
        """The plan that converts LoRA adapters of the models this plan converts: every rule on a
        weight rewritten on its factors A and B (docs/adapters.md); `config` is the adapter's
        adapter_config.json (None: PEFT's defaults, r=8). Its inverse converts them back exactly.

        Raises:
            ConvspecError: `kind` is not "lora".

        Example:
            >>> lora = convspec.compile("mixtral").adapter()
            >>> print(lora.rules[1].nodes[4])
            B%3 = block_diag(B%1, B%2, dim=-2, equal=true)
        """
        if kind != "lora":
            from ..errors import ConvspecError

            raise ConvspecError(
                f"adapter kind {kind!r}: convspec derives LoRA adapter plans", hint='kind="lora"'
            )
        return _runtime().adapter(self, config)

    def for_dtype(self, dtype: str | None, dequantize: bool | str = False) -> Plan:
        """The plan to run when outputs are cast to `dtype`: dequantizing when asked (to `dequantize`
        when it names a dtype, else `dtype`, else bfloat16). Casting quantized weights kept with their
        scales would change their values without them: refused."""
        if dequantize:
            return self.dequantize(dequantize if isinstance(dequantize, str) else dtype or "bfloat16")
        if dtype is not None and self.quant is not None and self.quant.dequantize is None:
            from ..errors import ConvspecError

            raise ConvspecError(
                f"casting to {dtype} would change quantized weights without their scales",
                hint="dequantize them: --dequantize (with --dtype) on the command line, dequantize=True in Python",
            )
        return self

    def load_into(self, model, src, strict: bool = True, device: str | None = None):
        """Fill a model's parameters and buffers from a checkpoint, converted as it is read. A model
        on the meta device gets the tensors assigned (no memory until they arrive); an allocated one
        has them copied in place. Keys are tried with and without the spec's `base_prefix`, so a
        base-model checkpoint fills a model with a head and the other way round. For a transformers
        model (`pip install 'convspec[transformers]'`), its non-persistent buffers are computed too.
        A model whose parameters are DTensors (`parallelize_module`, `distribute_tensor`) gets on
        each rank only its shards, read from their own source bytes (docs/distributed.md); every
        rank calls it.

        Args:
            model: a `torch.nn.Module`.
            src: the checkpoint, as `stream` takes it.
            strict: raise unless every parameter is filled, every key placed and every shape right.
            device: where tensors go; default the device of the model's first allocated parameter,
                else the CPU.

        Returns:
            A `LoadReport`: missing, unexpected and mismatched keys, buffers left on meta, and how
            many source keys were in the target layout already.

        Raises:
            LoadError: with `strict`, when the report is not ok (it carries the report).
            CheckpointError, BindError, ConfigError: as `stream`.

        Example:
            >>> config = transformers.MixtralConfig.from_pretrained("tiny-mixtral")
            >>> with torch.device("meta"):
            ...     model = transformers.MixtralForCausalLM(config)
            >>> report = convspec.compile("mixtral", config=config).load_into(model, "tiny-mixtral")
            >>> report.ok, str(report)
            (True, 'ok')
        """
        return _runtime().load_into(self, model, src, strict, device)

    def save(
        self, state_dict: dict, dst, max_shard_size: str | int = "5GB", overwrite: bool = False
    ) -> list[str]:
        """Convert a state dict and write it as sharded safetensors, atomically (the directory is
        complete, or absent). To save a loaded model in its checkpoint's layout, use the inverse.

        Args:
            state_dict: {key: tensor}, in this plan's source layout.
            dst: the output directory; it must not exist unless `overwrite`.
            max_shard_size: the largest shard, "5GB" (decimal), "512MiB" (binary) or a byte count.
            overwrite: replace an existing `dst` (swapped in atomically).

        Returns:
            The shard file names written (with an index beside them when there are several).

        Raises:
            CheckpointError: `dst` exists without `overwrite`, or the size cannot be read.
            BindError, ConfigError: as `bind`, before anything is written.

        Example:
            >>> plan = convspec.compile("mixtral", config="tiny-mixtral/config.json")
            >>> plan.inverse().save(plan.load("tiny-mixtral"), "tiny-mixtral-saved")
            ['model.safetensors']
        """
        return _runtime().save(self, state_dict, dst, max_shard_size, overwrite)

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
        return _runtime().to_json(self, indent)

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
        return _runtime().from_json(text)

    def check(self) -> None:
        """Verify the plan's invariants, as `Plan.from_json` does (torch.fx's `Graph.lint()` is the
        model): every op known, with valid parameters and arity; each value defined once, before it
        is used; every rule output produced; captures consistent with the templates; the recorded
        inverse the one the rules give.

        Returns:
            None: the plan is one the compiler could have made.

        Raises:
            PlanError: names the field (`rules[2].nodes[0].op`) and what is wrong.

        Example:
            >>> convspec.compile("mixtral").check()
        """
        _runtime().check(self)


def _alternation(rules: tuple[PlanRule, ...], kinds: tuple[str, ...]):
    """One regex over the input patterns of `rules` of the given kinds, one group per pattern, and
    its group number -> (rule index, input name, capture names, capture group numbers)."""
    alts, groups, n = [], {}, 0
    for rule in rules:
        if rule.kind not in kinds:
            continue
        guard = ""
        if rule.unless:
            guard = "(?!(?:" + "|".join(u.regex(named=False) for u in rule.unless) + r")\Z)"
        for k, (name, pat) in enumerate(rule.inputs):
            n += 1
            outer = n
            caps = []
            for cap in pat.captures:
                n += 1
                caps.append((cap, n))
            alts.append(f"({guard}{pat.regex(prefix=f'r{rule.index}_{k}__')})")
            groups[outer] = (rule.index, name, tuple(c for c, _ in caps), tuple(i for _, i in caps))
    return re.compile("|".join(alts) if alts else r"(?!)"), groups


# ---- the runtime the conveniences are routed through ------------------------------------------


class Runtime(Protocol):
    """What `convspec.runtime` provides: the conveniences' work, in the layers above this one."""

    def bind(self, plan: Plan, layout: dict, strict: bool) -> BoundPlan: ...
    def apply(self, plan: Plan, state_dict: dict, strict: bool) -> dict: ...
    def stream(self, plan: Plan, src, device: str, dtype: str | None, strict: bool) -> Iterator: ...
    def load(
        self, plan: Plan, src, device: str, dtype: str | None, strict: bool, shard: Any, mesh: Any
    ) -> dict: ...
    def load_into(self, plan: Plan, model, src, strict: bool, device: str | None): ...
    def save(
        self, plan: Plan, state_dict: dict, dst, max_shard_size: str | int, overwrite: bool
    ) -> list[str]: ...
    def to_json(self, plan: Plan, indent: int | None) -> str: ...
    def from_json(self, text: str | bytes) -> Plan: ...
    def check(self, plan: Plan) -> None: ...
    def dequantize(self, plan: Plan, dtype: str) -> Plan: ...
    def adapter(self, plan: Plan, config: dict | None) -> Plan: ...


_installed: list[Runtime] = []


def install_runtime(runtime: Runtime) -> None:
    """Called once by `convspec.runtime` as `import convspec` runs: the plan's conveniences go there."""
    _installed[:] = [runtime]


def _runtime() -> Runtime:
    if not _installed:  # pragma: no cover - importing any convspec module imports the package first
        raise RuntimeError("convspec.runtime is not installed: import convspec")
    return _installed[0]
