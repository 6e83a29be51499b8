"""Reading transformers' conversion mapping: the raw lists, the model a key builds on the meta device,
the transforms that apply to it (with the sub-model scopes), and how each pattern matches its keys.

Everything here imports transformers lazily; it is the one place that knows its internals."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConvspecError, TransformersMissing  # noqa: F401 - importable from here as before
from ..extras import require_transformers
from .translate import Seen


def _tf():
    require_transformers("importing transformers' conversions")
    from transformers import conversion_mapping, core_model_loading

    return conversion_mapping, core_model_loading


def raw_mapping() -> dict[str, list]:
    """Every key (model type or class name) -> its list of transforms, as transformers builds it."""
    cm, _ = _tf()
    return {k: cm.get_checkpoint_conversion_mapping(k) for k in cm._build_checkpoint_conversion_mapping()}


def class_name(model_type: str) -> str | None:
    """The class a model type loads as (a causal LM, else a VLM, else the base model); no imports."""
    from transformers.models.auto import modeling_auto as ma

    tables = [
        ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        getattr(ma, "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", {}),
        ma.MODEL_MAPPING_NAMES,
    ]
    for table in tables:
        if model_type in table:
            name = table[model_type]
            return name[0] if isinstance(name, (list, tuple)) else name
    return None


def base_class_name(model_type: str) -> str | None:
    """The base-model class of a model type (transformers' AutoModel), when it is not the class the
    model type loads as; None for a class-name key or where the two are one class."""
    from transformers.models.auto import modeling_auto as ma
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    name = ma.MODEL_MAPPING_NAMES.get(model_type) if model_type in CONFIG_MAPPING else None
    name = name[0] if isinstance(name, (list, tuple)) else name
    return name if name and name != class_name(model_type) else None


def model_class(key: str):
    """The model class a mapping key stands for (a class name, or a model type's main class) and its
    config class; (None, None) when transformers has none."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if key in CONFIG_MAPPING:
        name = class_name(key)
        return (getattr(transformers, name, None) if name else None), CONFIG_MAPPING[key]
    cls = getattr(transformers, key, None)
    return cls, getattr(cls, "config_class", None)


def meta_model(key: str, base: bool = False, config: dict | None = None):
    """The model for `key` built from its default config (or the fields of `config`) on the meta
    device (no memory, no data); with `base`, the model type's base-model class (AutoModel) instead."""
    import torch

    cls, config_cls = model_class(key)
    if base:
        import transformers

        name = base_class_name(key)
        cls = getattr(transformers, name, None) if name else None
    if cls is None or config_cls is None:
        raise ConvspecError(f"transformers has no model class for {key!r}")
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        made = config_cls(**{k: v for k, v in (config or {}).items() if k != "model_type"})
        with torch.device("meta"):
            return cls(made)


@dataclass
class Applied:
    """The transforms that apply to one model: for each, where it comes from."""

    model: Any
    entries: list[tuple[str, int, str | None, Any]]  # (mapping key, index in its list, scope, transform)


def applied(model) -> Applied:
    """transformers' `get_model_conversion_mapping(model, add_legacy=False)`, remembering for every
    transform which mapping key and scope it came from (same walk, same de-duplication)."""
    cm, _ = _tf()
    from transformers.modeling_utils import PreTrainedModel

    entries = []
    seen_ids: defaultdict[str, list[str]] = defaultdict(list)
    for module_name, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        class_name, model_type = type(sub).__name__, sub.config.model_type
        if sub.is_custom_code() and class_name not in cm.USER_REGISTERED_MAPPINGS:
            continue
        if any(s == "" or module_name.startswith(s + ".") for s in seen_ids[class_name]):
            continue
        key = class_name
        conversions = cm.get_checkpoint_conversion_mapping(class_name)
        by_class = conversions is not None
        if not by_class:
            if model_type and any(s == "" or module_name.startswith(s + ".") for s in seen_ids[model_type]):
                continue
            key = model_type
            conversions = cm.get_checkpoint_conversion_mapping(model_type) if model_type else None
        if conversions is None:
            continue
        scope = None
        if module_name != "":
            scope = module_name.removeprefix(model.base_model_prefix).removeprefix(".")
            for t in conversions:
                t.scope_prefix, t.base_model_prefix = scope, model.base_model_prefix
        entries += [(key, i, scope, t) for i, t in enumerate(conversions)]
        seen_ids[class_name].append(module_name)
        if not by_class and model_type:
            seen_ids[model_type].append(module_name)
    return Applied(model, entries)


@dataclass
class Observed:
    """What loading a model's original-layout keys does, transform by transform."""

    original: dict[str, tuple[tuple[int, ...], str]]  # revert_weight_conversion(model, state_dict())
    converted: dict[str, tuple[tuple[int, ...], str]]  # state_dict()
    seen: dict[tuple[str, int, int], Seen] = field(default_factory=dict)  # (key, index, source) -> Seen
    fired: dict[tuple[str, int], int] = field(default_factory=dict)  # transform -> keys it renamed
    undone: dict[tuple[str, int], int] = field(default_factory=dict)  # ... whose rename load discards
    undone_keys: dict[tuple[str, int], list[str]] = field(default_factory=dict)  # what those saw
    kept_keys: dict[tuple[str, int], list[str]] = field(default_factory=dict)  # and where it stuck
    forward: dict[str, str] = field(default_factory=dict)  # original key -> where loading puts it
    prefix_fixed: int = 0  # keys transformers fixed by adding/stripping base_model_prefix


def state_layout(sd) -> dict:
    """A state dict's layout: {key: (shape, dtype name)}."""
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}


def observe(app: Applied) -> Observed:
    """Run transformers' own renaming over the model's original-layout keys (headers only), noting
    where each pattern matched, and which renames `from_pretrained` discards because the renamed key
    is not a parameter of the model while the original is."""
    _, cl = _tf()
    model = app.model
    sd = model.state_dict()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        original = cl.revert_weight_conversion(model, sd)
    obs = Observed(state_layout(original), state_layout(sd))
    renamings = [(k, i, t) for k, i, _, t in app.entries if isinstance(t, cl.WeightRenaming)]
    converters = [(k, i, t) for k, i, _, t in app.entries if isinstance(t, cl.WeightConverter)]
    base = model.base_model_prefix
    for key in sorted(original, key=cl.dot_natural_key):
        cur, hits, seen_as, added = key, [], {}, {}
        converter_hit = None
        for k, i, t in renamings:
            hit = t._scoped_match(cur)
            if hit is None:
                continue
            new, _ = t.rename_source_key(cur)
            if new == cur and type(t).__name__ == "GroupWeightRename":
                continue
            _, ktm, mo = hit
            src = int(mo.lastgroup[1:]) if mo.lastgroup else 0
            obs.seen.setdefault((k, i, src), Seen()).add(ktm[: mo.start()], ktm[mo.end() :], mo.group(0))
            hits.append((k, i))
            seen_as[(k, i)] = ktm
            added[(k, i)] = bool(base) and new.startswith(base + ".") and not cur.startswith(base + ".")
            cur = new
        for k, i, t in converters:
            hit = t._scoped_match(cur)
            if hit is None:
                continue
            _, ktm, mo = hit
            src = int(mo.lastgroup[1:]) if mo.lastgroup else 0
            obs.seen.setdefault((k, i, src), Seen()).add(ktm[: mo.start()], ktm[mo.end() :], mo.group(0))
            hits.append((k, i))
            converter_hit = (k, i)
            cur, _ = t.rename_source_key(cur)
            break
        final, stripped = cur, False
        if base:
            if final.startswith(base + ".") and final.removeprefix(base + ".") in sd:
                final, stripped = final.removeprefix(base + "."), True
            elif f"{base}.{final}" in sd:
                final = f"{base}.{final}"
            if final != cur:
                obs.prefix_fixed += 1
        for h in hits:
            obs.fired[h] = obs.fired.get(h, 0) + 1
        # the renamed key is no parameter and the original is: loading discards every transform
        # that fired, the converter's operations too (transformers loads the tensor as it is)
        fell_back = final not in sd and key in sd
        if fell_back:
            final = key
        for h in hits:
            # loading undid this transform: all of them when it fell back; a rename also when the
            # renames together gave the key its own name again, or when it added the base prefix
            # the base-prefix fix then stripped again. A converter whose target is its source's own
            # name is not undone: its operations still run (Transpose keeps the name, not the shape)
            is_converter = h == converter_hit
            undone = fell_back or not is_converter and (final == key or stripped and added.get(h))
            if undone:
                obs.undone[h] = obs.undone.get(h, 0) + 1
                obs.undone_keys.setdefault(h, []).append(seen_as.get(h, key))
            else:
                obs.kept_keys.setdefault(h, []).append(seen_as.get(h, key))
        obs.forward[key] = final
    return obs


def describe(t) -> str:
    """A transform as one line, for notes and comments."""
    name = type(t).__name__
    if name == "PrefixChange":
        what = f"add {t.prefix_to_add!r}" if t.prefix_to_add else f"remove {t.prefix_to_remove!r}"
        return f"PrefixChange({what}" + (f", under {t.model_prefix!r})" if t.model_prefix else ")")
    src = t._original_source_patterns
    tgt = t._original_target_patterns
    ops = ""
    if hasattr(t, "operations"):
        ops = ", [" + ", ".join(re.sub(r"\s+", " ", repr(o)) for o in t.operations) + "]"
    return f"{name}({src!r} -> {tgt!r}{ops})"
