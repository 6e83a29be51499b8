"""PEFT LoRA adapters on disk: `adapter_config.json` read and checked, the ranks and alphas it gives
each module (PEFT's own pattern matching), and the names PEFT saves factors under."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .sidefile import MAX_CONFIG_BYTES, load_json, regular_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT saves every key under the wrapped model's name
WRAPPED = "base_layer."  # a parameter adapter nested inside another one on the same module

# the factors PEFT saves for one weight, by the module type that holds it
LINEAR = ("lora_A.weight", "lora_B.weight")
EMBEDDING = ("lora_embedding_A", "lora_embedding_B")
MAGNITUDE = "lora_magnitude_vector"  # DoRA: one per output row of a Linear


def is_adapter(src: str | Path) -> bool:
    """A PEFT adapter directory: it has an adapter_config.json."""
    return Path(src).is_dir() and (Path(src) / ADAPTER_CONFIG).exists()


def pattern_key(patterns, name: str) -> str | None:
    """The first of `patterns` that PEFT's `get_pattern_key` matches against the module `name`."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except re.error:
            continue  # PEFT would raise; a pattern that is no regex matches nothing here
    return None


@dataclass(frozen=True)
class LoraConfig:
    """What a LoRA adapter's config says about the factors: the default rank and alpha, the patterns
    that change them per module, and rsLoRA's scaling. `raw` is the whole file, kept for rewriting."""

    r: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    rslora: bool
    dora: bool
    raw: dict[str, Any]
    where: str = ADAPTER_CONFIG

    def rank(self, name: str) -> int:
        key = pattern_key(self.rank_pattern, name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_of(self, name: str) -> float:
        key = pattern_key(self.alpha_pattern, name)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def alpha_for(self, rank: int, scaling: float) -> float | int:
        """The alpha that gives `scaling` at `rank` (an int where it is one, as PEFT writes them)."""
        alpha = scaling * math.sqrt(rank) if self.rslora else scaling * rank
        return int(alpha) if float(alpha).is_integer() else alpha


def _number(raw: dict, key: str, where: str, kind: type, default: Any) -> Any:
    v = raw.get(key, default)
    ok = isinstance(v, kind) and not isinstance(v, bool) and (kind is int or math.isfinite(v))
    if not ok or v <= 0:
        what = "a positive integer" if kind is int else "a positive number"
        raise ConfigError(
            f"{where}: {key} must be {what}, not {json.dumps(v)[:60]}", hint="fix the adapter config"
        )
    return v


def _patterns(raw: dict, key: str, where: str, kind: type) -> dict:
    v = raw.get(key) or {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: {key} must be an object of module pattern -> value")
    for k in v:
        _number(v, k, f"{where}: {key}", kind, None)
        if _nested_repeat(k):
            raise ConfigError(
                f"{where}: {key}: the pattern {json.dumps(k)[:60]} repeats a part that repeats itself "
                "(like (a+)+), which can take exponential time to match a module name",
                hint="write it without a repetition inside a repetition",
            )
    return dict(v)


def _nested_repeat(pattern: str) -> bool:
    """Whether a regex repeats (more than once) a part that itself repeats: the shape of patterns whose
    matching backtracks exponentially. A pattern that is no regex matches nothing (`pattern_key`)."""
    import re._parser as parser  # the parser `re` compiles with: the tree, not a guess at the text

    try:
        tree = parser.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return False

    def repeats(items, inside: bool) -> bool:
        for op, av in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, sub = av
                many = hi > 1
                if inside and many or repeats(sub, inside or many):
                    return True
            elif name == "SUBPATTERN" and repeats(av[-1], inside):
                return True
            elif name == "BRANCH" and any(repeats(b, inside) for b in av[1]):
                return True
            elif name in ("ASSERT", "ASSERT_NOT") and repeats(av[1], inside):
                return True
        return False

    return repeats(tree, False)


def lora_config(raw: Any, where: str = ADAPTER_CONFIG) -> LoraConfig:
    """Check an adapter config (a dict, as read) and say what it says of the factors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: an adapter config must be a JSON object, not {type(raw).__name__}")
    kind = raw.get("peft_type", "LORA")
    if kind != "LORA":
        raise ConfigError(
            f"{where}: peft_type is {json.dumps(kind)[:60]}; convspec converts LoRA adapters (peft_type LORA)",
            hint="other adapter kinds have no low-rank factors to convert",
        )
    for key in ("target_modules", "target_parameters"):
        v = raw.get(key)
        if (
            v is not None
            and not isinstance(v, str)
            and not (isinstance(v, list) and all(isinstance(x, str) for x in v))
        ):
            raise ConfigError(f"{where}: {key} must be a list of names or one regex string")
    if raw.get("fan_in_fan_out"):
        raise ConfigError(
            f"{where}: fan_in_fan_out adapters (GPT-2's Conv1D) store A and B transposed; not supported",
            hint="merge the adapter into the base model and convert the merged weights",
        )
    if raw.get("lora_bias"):
        raise ConfigError(
            f"{where}: lora_bias adapters train a bias beside B; converting them is not supported",
            hint="merge the adapter into the base model and convert the merged weights",
        )
    return LoraConfig(
        r=_number(raw, "r", where, int, 8),
        alpha=_number(raw, "lora_alpha", where, (int, float), 8),
        rank_pattern=_patterns(raw, "rank_pattern", where, int),
        alpha_pattern=_patterns(raw, "alpha_pattern", where, (int, float)),
        rslora=bool(raw.get("use_rslora")),
        dora=bool(raw.get("use_dora")),
        raw=raw,
        where=where,
    )


def read_adapter_config(src: str | Path) -> LoraConfig:
    """The adapter config of the adapter directory `src`, checked."""
    path = Path(src) / ADAPTER_CONFIG
    regular_file(path, ConfigError, "adapter config")
    return lora_config(load_json(path, MAX_CONFIG_BYTES, ConfigError, "adapter config"), str(path))


def config_text(raw: dict) -> str:
    """An adapter config as PEFT writes one (sorted keys, two-space indent, no final newline)."""
    return json.dumps(raw, indent=2, sort_keys=True)
