"""LoRA adapters converted by their base model's spec: the adapter plan for one adapter, the checks of
its factors from headers (pairs, ranks, the base's shapes), the adapter config that follows the
converted names, and the merge that checks a conversion (convert then merge == merge then convert)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .compile.lora import Adapter, derive
from .errors import BindError
from .io.adapter import EMBEDDING, LINEAR, MAGNITUDE, PREFIX, LoraConfig, lora_config, pattern_key
from .ops import TensorInfo

FACTORS = {
    LINEAR[0]: ("A", "linear"),
    LINEAR[1]: ("B", "linear"),
    EMBEDDING[0]: ("A", "embedding"),
    EMBEDDING[1]: ("B", "embedding"),
}


def factor_of(key: str) -> tuple[str, str, str] | None:
    """(module, factor A|B, kind linear|embedding) of a PEFT adapter key; None for any other key."""
    if not key.startswith(PREFIX):
        return None
    for suffix, (factor, kind) in FACTORS.items():
        if key.endswith("." + suffix):
            return key[len(PREFIX) : -len(suffix) - 1], factor, kind
    return None


def partner(module: str, kind: str, factor: str) -> str:
    """The key of a module's factor `factor` (A or B)."""
    names = LINEAR if kind == "linear" else EMBEDDING
    return f"{PREFIX}{module}.{names[0 if factor == 'A' else 1]}"


def adapter_plan(first: Adapter, layout: dict[str, TensorInfo], reverse: bool = False) -> Adapter:
    """The adapter plan for the adapter of `layout`, from `first` (derived as if every parameter
    were adapted; `reverse`: an adapter of the converted layout, converted back). PEFT names a
    parameter's adapter by which other parameters of its module are adapted too, so the plan is
    made again for the parameters the adapter holds, where they are fewer."""
    base, config = first.base, first.config
    if reverse:
        names = config.raw.get("target_parameters") or []
        names = [names] if isinstance(names, str) else names
        return derive(base, config, targeted={n.rpartition(".")[2] for n in names})
    every = {p.name for ps in first.produced.values() for p in ps if p.kind == "param"}
    if not every:
        return first
    made = set()
    for g in first.plan.bind(layout).groups:
        made |= {p.name for p in first.produced.get(g.rule.index, ()) if p.kind == "param"}
    return first if made == every else derive(base, config, targeted=made)


def check_refused(adapter: Adapter, plan, layout: dict[str, TensorInfo], src) -> None:
    """Headers only: no key of the adapter reaches a rule whose weights its factors cannot follow
    (the reason is the one derivation found: the op, or the config's ranks and alphas)."""
    from .errors import ConvspecError
    from .routing import route_one

    why = {i: (label, reason) for i, label, reason in adapter.refused}
    if plan.is_inverse:  # an inverse rule says which forward rule it undoes
        why = {r.index: why[r.number - 1] for r in plan.rules if r.number - 1 in why and r.kind == "convert"}
    if not why:
        return
    for key in layout:
        hit = route_one(plan, key)
        if hit[0] == "member" and hit[1] in why:
            label, reason = why[hit[1]]
            raise ConvspecError(
                f"{src}: {key}: {label}: the adapter cannot be converted: {reason}",
                hint="merge the adapter into the base model (PEFT merge_and_unload) and convert the merged weights",
            )


def check_factors(
    layout: dict[str, TensorInfo], config: LoraConfig, adapter: Adapter, side: str, src
) -> None:
    """Headers only: every A has its B and every B its A, both of two dims and one rank, the rank the
    adapter config gives the module (a parameter's adapter: that rank times its experts, which the
    plan checks). Every problem at once, by key."""
    pairs: dict[tuple[str, str], dict[str, TensorInfo]] = {}
    for key, info in layout.items():
        f = factor_of(key)
        if f is not None:
            pairs.setdefault((f[0], f[2]), {})[f[1]] = info
    problems = []
    for (module, kind), got in sorted(pairs.items()):
        if len(got) < 2:
            have, lacks = ("A", "B") if "A" in got else ("B", "A")
            problems.append(
                f"{partner(module, kind, have)}: lora {have} without its {lacks} ({partner(module, kind, lacks)})"
            )
            continue
        a, b = got["A"], got["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            problems.append(
                f"{partner(module, kind, 'A')}: A {list(a.shape)} and B {list(b.shape)} must have two dims"
            )
            continue
        if a.shape[0] != b.shape[1]:
            problems.append(
                f"{partner(module, kind, 'A')}: A has rank {a.shape[0]} {list(a.shape)}, B rank {b.shape[1]} {list(b.shape)}"
            )
            continue
        if adapter.param_weight(partner(module, kind, "A"), side) is not None:
            continue
        want = config.rank(module)
        if want != a.shape[0]:
            problems.append(
                f"{partner(module, kind, 'A')}: rank {a.shape[0]}, but {Path(config.where).name} gives "
                f"{module} rank {want} (r, or its rank_pattern)"
            )
    if problems:
        raise BindError(
            problems, hint=f"the factors of the adapter {src} must pair up, of the ranks its config gives"
        )


def check_base(
    layout: dict[str, TensorInfo], base: dict[str, TensorInfo], adapter: Adapter, side: str, src, base_src
) -> None:
    """Headers only: every weight the adapter adapts is in the base checkpoint, with the shape its
    factors make. An adapter of modules the base does not have is refused, never passed through."""
    problems = []
    for key, a in layout.items():
        f = factor_of(key)
        if f is None or f[1] != "A":
            continue
        module, _, kind = f
        b = layout.get(partner(module, kind, "B"))
        if b is None or len(a.shape) != 2 or len(b.shape) != 2:
            continue  # check_factors says what is wrong
        weight = adapter.param_weight(key, side) or f"{module}.weight"
        w = base.get(weight)
        if w is None:
            problems.append(f"{key}: the base checkpoint has no {weight}, which this adapts")
            continue
        if len(w.shape) == 3:
            n = w.shape[0]
            want = ((n * (a.shape[0] // n), w.shape[2]), (w.shape[1], n * (a.shape[0] // n)))
            got = (tuple(a.shape), tuple(b.shape))
        else:
            want = (b.shape[0], a.shape[1]) if kind == "linear" else (a.shape[1], b.shape[0])
            got = tuple(w.shape)
        if got != want:
            problems.append(
                f"{key}: the factors {list(a.shape)} and {list(b.shape)} do not fit {weight} {list(w.shape)}"
            )
    if problems:
        raise BindError(
            problems, hint=f"the adapter {src} must adapt weights of the base checkpoint {base_src}"
        )


def converted_config(adapter: Adapter, bound, reverse: bool = False) -> dict:
    """The converted adapter's config: target_modules and target_parameters name the converted
    weights, and rank_pattern / alpha_pattern follow them (a weight fused from parts has their ranks
    together, and the alpha that keeps the parts' scaling)."""
    config = adapter.config
    raw = dict(config.raw)
    used: dict[str, set[str]] = {"module": set(), "param": set()}  # names read, by kind
    made: dict[str, set[str]] = {"module": set(), "param": set()}  # names written, by kind
    special: dict[str, tuple[int, float]] = {}
    for g in bound.groups:
        index = g.rule.number - 1  # an inverse rule: the number of the rule it undoes
        wrote, read = adapter.produced.get(index, ()), adapter.consumed.get(index, ())
        if reverse:
            wrote, read = read, wrote
        for p in read:
            used["param" if p.kind == "param" else "module"].add(p.name)
        for p in wrote:
            made["param" if p.kind == "param" else "module"].add(p.name)
            special[p.name] = (p.rank, p.alpha)
    for src, dst in bound.passthrough.items():  # a module renamed: its adapter follows it
        a, b = factor_of(src), factor_of(dst)
        if a is not None and b is not None:
            old, new = a[0].rpartition(".")[2], b[0].rpartition(".")[2]
            if old != new:
                used["module"].add(old)
                made["module"].add(new)
    # a module and a parameter may share a leaf name (qwen2_moe's experts.{e}.down_proj and
    # experts.down_proj): each list loses only the names of its own kind that no output has
    gone = {kind: used[kind] - made[kind] for kind in used}

    def names(key: str, kind: str):
        v = raw.get(key)
        had = {v} if isinstance(v, str) else set(v or ())
        if isinstance(v, str) and not (had & gone[kind]) and not made[kind] - had:
            return v  # a regex (or "all-linear") that no conversion touched stays as written
        kept = [n for n in ([v] if isinstance(v, str) else v or ()) if n not in gone[kind]]
        out = kept + sorted(made[kind] - set(kept))  # the config's own order, then the new names
        return out or None

    if used["module"] or made["module"]:
        raw["target_modules"] = names("target_modules", "module")
    if used["param"] or made["param"]:
        raw["target_parameters"] = names("target_parameters", "param")
    every_gone = gone["module"] | gone["param"]
    for key, pos, default in (("rank_pattern", 0, config.r), ("alpha_pattern", 1, config.alpha)):
        old = raw.get(key) or {}
        patterns = {k: v for k, v in old.items() if not any(pattern_key([k], f"x.{n}") for n in every_gone)}
        for name, values in sorted(special.items()):
            k = rf".*\.{re.escape(name)}"
            if values[pos] != default:
                patterns[k] = values[pos]
            else:
                patterns.pop(k, None)
        if key in raw or patterns:
            raw[key] = patterns
    return raw


def merge(
    weights: dict, factors: dict, config: dict, adapter: Adapter | None = None, side: str = "in"
) -> dict:
    """`weights` with the adapter `factors` merged in, W + s * B @ A, in float64, as PEFT merges them
    (an embedding's update transposed; a parameter's experts flattened into the rank)."""
    import torch

    cfg = lora_config(config)
    out = {k: v.to(torch.float64) for k, v in weights.items()}
    for key in factors:
        f = factor_of(key)
        if f is None or f[1] != "A":
            continue
        module, _, kind = f
        a = factors[key].to(torch.float64)
        b = factors[partner(module, kind, "B")].to(torch.float64)
        param = adapter.param_weight(key, side) if adapter is not None else None
        target = param or f"{module}.weight"
        name = param or module
        w = out[target]
        if param is not None and w.dim() == 3:
            n = w.shape[0]
            r = a.shape[0] // n
            s = cfg.scaling(r, cfg.alpha_of(name))
            out[target] = w + s * torch.bmm(b.reshape(b.shape[0], r, n).permute(2, 0, 1), a.reshape(n, r, -1))
            continue
        delta = cfg.scaling(a.shape[0], cfg.alpha_of(name)) * (b @ a)
        merged = w + (delta.T if kind == "embedding" else delta)
        magnitude = factors.get(f"{PREFIX}{module}.{MAGNITUDE}")
        if magnitude is not None:  # DoRA: each row rescaled to its magnitude, as PEFT merges it
            merged = merged * (magnitude.to(torch.float64) / merged.norm(dim=1)).unsqueeze(1)
        out[target] = merged
    return out


@dataclass(frozen=True)
class MergeMismatch:
    """A converted weight where merging then converting differs from converting then merging."""

    key: str
    why: str
    max_abs_diff: float | None = None


@dataclass
class MergeCheck:
    """What `merge_check` compared: every weight of the converted base, and where the two ways differ."""

    checked: int
    mismatches: list[MergeMismatch] = field(default_factory=list)
    tolerance: float = 0.0


def merge_check(
    base_plan, adapter: Adapter, weights: dict, factors: dict, reverse: bool = False
) -> MergeCheck:
    """Merge the adapter into the base then convert, and convert both then merge with the converted
    adapter config: the same weights, in float64, up to the rounding of sums taken in another order
    (a relative 1e-12 of each weight's largest value)."""
    import torch

    src_side, dst_side = ("out", "in") if reverse else ("in", "out")
    plan_w = base_plan.inverse() if reverse else base_plan
    plan_a = adapter.converting(reverse)
    weights = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in weights.items()}
    one = plan_w.apply(merge(weights, factors, adapter.config.raw, adapter, src_side))
    converted = plan_a.apply(factors)
    bound = plan_a.bind({k: TensorInfo.of(v) for k, v in factors.items()})
    config = converted_config(adapter, bound, reverse)
    two = merge(plan_w.apply(weights), converted, config, adapter, dst_side)
    out = MergeCheck(checked=len(one), tolerance=1e-12)
    for key in sorted(set(one) | set(two)):
        if key not in one or key not in two:
            where = "merging then converting" if key in one else "converting then merging"
            out.mismatches.append(MergeMismatch(key, f"only {where} makes it"))
            continue
        a, b = one[key], two[key]
        if a.shape != b.shape:
            out.mismatches.append(MergeMismatch(key, f"shapes {list(a.shape)} and {list(b.shape)}"))
            continue
        if not a.is_floating_point():
            if not torch.equal(a, b):
                out.mismatches.append(MergeMismatch(key, "values differ"))
            continue
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        scale = max(a.abs().max().item() if a.numel() else 0.0, 1.0)
        if diff > out.tolerance * scale:
            out.mismatches.append(MergeMismatch(key, "the merged weights differ", diff))
    return out
