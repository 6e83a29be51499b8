"""Differential conformance against transformers: for a mapping key, build its model on the meta device
from the default config; its `state_dict()` is the converted layout and transformers'
`revert_weight_conversion` the original. convspec's plan must map original -> converted exactly
(keys, shapes, dtypes), and its inverse converted -> original. Headers only: no tensor data."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import ConvspecError
from .mapping import applied, base_class_name, meta_model, observe

# Where convspec and transformers differ, and why (tests/test_conformance.py requires these to
# still differ: a fix must remove the entry).
KNOWN = {
    "RfDetrForInstanceSegmentation": "transformers' `^` rename (add `model.`) is undone by its loader for "
    "`class_embed`/`bbox_embed` when it loads RfDetrForObjectDetection (they sit at its root) but kept "
    "when the same transform loads them inside RfDetrForInstanceSegmentation: the loader decides per "
    "model, and the one shared spec (rf_detr_for_object_detection_base) follows the first",
    "qwen3_vl_moe": "transformers' `Transpose(1, 2, check_dims=True)` transposes only a tensor whose shape "
    "differs from the model's, so `revert_weight_conversion` never transposes back and its 'original' "
    "layout is the model's own; Qwen3-VL-MoE checkpoints store the experts transposed, and the spec "
    "states the transpose both ways (tests/test_transformers_converters.py loads one with data and "
    "compares with transformers' from_pretrained)",
}


@dataclass
class Result:
    key: str
    spec: str | None
    status: str  # pass | fail | error | no model | transformers inconsistent
    forward: str = ""  # "" when exact, else what differs
    inverse: str = ""
    keys: int = 0  # keys in the converted layout
    changed: int = 0  # keys whose name or shape the conversion changes
    seconds: float = 0.0
    base: str | None = None  # the base-model class checked (AutoModel), for a base-model row


def as_placed(got: dict, want: dict, prefix: str) -> dict:
    """Keys as `load_into` places them in a model whose keys are `want`: one the model lacks, with
    the spec's base_prefix added or removed where that gives one it has (what transformers does)."""
    if not prefix:
        return got
    out = {}
    for k, v in got.items():
        if k not in want:
            if f"{prefix}.{k}" in want:
                k = f"{prefix}.{k}"
            elif k.startswith(prefix + ".") and k[len(prefix) + 1 :] in want:
                k = k[len(prefix) + 1 :]
        out[k] = v
    return out


def _diff(got: dict, want: dict, limit: int = 3) -> str:
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shape = [k for k in want if k in got and tuple(got[k][0]) != tuple(want[k][0])]
    dtype = [k for k in want if k in got and got[k][1] != want[k][1]]
    out = []
    if missing:
        out.append(f"{len(missing)} missing (e.g. {', '.join(missing[:limit])})")
    if extra:
        out.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:limit])})")
    if shape:
        k = shape[0]
        out.append(f"{len(shape)} with other shapes (e.g. {k}: {list(got[k][0])} vs {list(want[k][0])})")
    if dtype:
        out.append(f"{len(dtype)} with other dtypes (e.g. {dtype[0]})")
    return "; ".join(out)


def check(key: str, spec_name: str | None = None, base: bool = False) -> Result:
    """Run both directions for one mapping key against its spec (default: `load_spec(key)`); with
    `base`, for the model type's base-model class (keys without the base prefix), whose keys are
    compared as `load_into` places them (the base prefix added or removed where the model needs)."""
    from .. import api

    t0 = time.perf_counter()
    base_name = base_class_name(key) if base else None
    if base and base_name is None:
        raise ConvspecError(f"{key} has no base-model class of its own")
    try:
        model = meta_model(key, base=base)
        obs = observe(applied(model))
    except Exception as exc:  # noqa: BLE001 - transformers could not build this model here
        msg = str(exc).strip().splitlines()[0][:140] if str(exc).strip() else ""
        return Result(
            key, None, "no model", forward=f"{type(exc).__name__}: {msg}".rstrip(": "), base=base_name
        )
    original, converted = obs.original, obs.converted
    res = Result(key, None, "pass", keys=len(converted), base=base_name)
    res.changed = len(set(original.items()) ^ set(converted.items())) // 2 or len(
        set(original) ^ set(converted)
    )
    # transformers' own load of the keys it reverted: where does each land?
    astray = {k: v for k, v in obs.forward.items() if v not in converted}
    try:
        # a base-model class that is a key of the mapping itself (MllamaModel) has its own spec
        own = base_name if base_name in api._builtin_index() else None
        spec = api.load_spec(spec_name or own or key)
        res.spec = spec.name
        plan = api.compile(spec, config=model.config.to_dict())
        placed = plan.base_prefix if base else ""
        bound = plan.bind(original)
        res.forward = _diff(as_placed(bound.outputs, converted, placed), converted)
        inv = plan.inverse(allow_lossy=True).bind(converted).outputs
        res.inverse = _diff(as_placed(inv, original, placed), original)
    except ConvspecError as exc:
        res.status, res.forward = "error", " ".join(exc.render().splitlines()[:2])[:300]
    else:
        if astray:
            k, v = next(iter(astray.items()))
            ours = bound.passthrough.get(k)
            follows = all(bound.passthrough.get(a) == b for a, b in astray.items())
            res.status = "transformers inconsistent"
            res.forward = (
                f"transformers' own load of its reverted layout puts {len(astray)} key(s) where the model has "
                f"none, e.g. {k} -> {v}; convspec {'follows that load' if follows else f'gives {ours}'}"
            )
        elif res.forward or res.inverse:
            res.status = "fail"
    res.seconds = time.perf_counter() - t0
    return res
