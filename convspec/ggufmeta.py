"""GGUF metadata <-> config.json, both ways, from the table specs/gguf_config.json (generated from
transformers' GGUF mappings by convspec/hf/gguf_config_import.py): what transformers makes of a file's
metadata, and the metadata llama.cpp writes for a config. No transformers, no gguf, no numpy here.

Metadata is an ordered `dict[str, tuple[str, object]]`: key -> (type, value), type one of u8 i8 u16 i16
u32 i32 u64 i64 f32 f64 bool str, or `arr:<type>` with a list value."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError

Metadata = dict[str, tuple[str, Any]]
_INT_RANGES = {
    "u8": (0, 2**8),
    "i8": (-(2**7), 2**7),
    "u16": (0, 2**16),
    "i16": (-(2**15), 2**15),
    "u32": (0, 2**32),
    "i32": (-(2**31), 2**31),
    "u64": (0, 2**64),
    "i64": (-(2**63), 2**63),
}


@cache
def table() -> dict[str, Any]:
    """specs/gguf_config.json: beside the package in a checkout, else the installed copy."""
    here = Path(__file__).resolve().parent.parent / "specs" / "gguf_config.json"
    entry = here if here.is_file() else resources.files("convspec.specs") / "gguf_config.json"
    return json.loads(entry.read_text(encoding="utf-8"))


def archs() -> list[str]:
    """Every GGUF architecture the table covers (llama.cpp's `general.architecture` values)."""
    return list(table()["archs"])


def _row(arch: str, where: str | None = None) -> dict[str, Any]:
    row = table()["archs"].get(arch)
    if row is None:
        raise ConfigError(
            f"GGUF architecture {arch!r}{_in(where)} is not one transformers can load",
            hint=f"known: {', '.join(archs())}",
        )
    return row


def _in(where: str | None) -> str:
    return f" in {where}" if where else ""


def gguf_arch(config_or_model_type: Any) -> str:
    """The GGUF architecture of an HF config (a dict, a transformers config) or model_type string."""
    if isinstance(config_or_model_type, str):
        mt = config_or_model_type
    elif isinstance(config_or_model_type, Mapping):
        mt = config_or_model_type.get("model_type")
    else:
        mt = getattr(config_or_model_type, "model_type", None)
    if not isinstance(mt, str):
        raise ConfigError("the config has no model_type", hint="add `model_type` to config.json")
    arch = table()["aliases"].get(mt, mt)
    if arch not in table()["archs"]:
        raise ConfigError(
            f"model_type {mt!r} has no GGUF architecture transformers can load",
            hint=f"GGUF architectures: {', '.join(archs())}",
        )
    return arch


def spec_name(arch: str) -> str:
    """The convspec spec for a GGUF architecture: `gguf_llama`, `gguf_gpt_oss` (for gpt-oss)."""
    return "gguf_" + arch.replace("-", "_")


def model_type(arch: str) -> str:
    """The model_type transformers gives a GGUF file of this architecture (gemma3 -> gemma3_text)."""
    return _row(arch)["model_type"]


def causal_lm(arch: str) -> str | None:
    """The transformers class a file of this architecture loads as (None where there is none)."""
    return _row(arch)["causal_lm"]


def loading_keys(arch: str) -> list[str]:
    """The config keys transformers sets from a file of this arch, dotted into nested dicts
    (`rope_parameters.rope_theta`): what a round trip must keep."""
    row = _row(arch)
    keys = [k for k in row["read"].values() if k is not None]
    keys = ["rope_parameters.rope_theta" if k == "rope_theta" else k for k in keys]
    return list(dict.fromkeys(keys + ["tie_word_embeddings"]))


# ------------------------------------------------------------------ metadata -> config


def _plain(value: Any) -> Any:
    """A metadata value without its type tag (accepts both `(type, value)` and a bare value)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return value[1]
    return value


def _parsed(value: Any) -> Any:
    """As transformers' _gguf_parse_value leaves it: a one-element array becomes its element."""
    value = _plain(value)
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return list(value) if isinstance(value, tuple) else value


def config_from_metadata(
    metadata: Mapping[str, Any], tensor_names: Iterable[str], source: str | None = None
) -> dict[str, Any]:
    """The config dict transformers 5.23 builds from a GGUF file with this metadata and these tensors
    (`AutoConfig.from_pretrained(dir, gguf_file=...)`): its new path for the archs it covers, its
    legacy load_gguf_checkpoint for the rest. `source` names the file in errors."""
    names = tuple(tensor_names)
    if "general.architecture" not in metadata:
        raise ConfigError(
            f"the GGUF metadata{_in(source)} has no general.architecture",
            hint="every GGUF file names its architecture in `general.architecture`",
        )
    arch = str(_plain(metadata["general.architecture"]))
    row = table()["archs"].get(arch)
    if row is not None and row["config_path"] == "gguf_config":
        return _new_path(arch, metadata, names, source)
    return _legacy(arch, metadata, names, source)


def _updated_arch(arch: str, name: Any, config: dict) -> str:
    """load_gguf_checkpoint's renames: mistral by general.name, t5/umt5, qwen2moe -> qwen2_moe, ..."""
    updated = arch
    if "llama" in arch and name == "mistral":  # transformers tests list membership: the exact name
        updated = "mistral"
    elif "t5" in arch:
        config["is_gated_act"] = True
        umt5 = isinstance(name, str) and "umt5" in name.lower()
        if "t5encoder" in arch:
            config["architectures"] = ["UMT5EncoderModel" if umt5 else "T5EncoderModel"]
        updated = "umt5" if umt5 else "t5"
    for part, to in (("qwen2moe", "qwen2_moe"), ("gpt-oss", "gpt_oss"), ("qwen3moe", "qwen3_moe")):
        if part in arch:
            return to
    return "minimax_m2" if "minimax-m2" in arch else updated


def _legacy(arch: str, metadata: Mapping[str, Any], names: tuple, source: str | None) -> dict[str, Any]:
    t = table()
    mapping = {
        row["transformers_arch"]: row["read"] for row in t["archs"].values() if row["transformers_arch"]
    }
    mapping |= {"mistral": mapping.get("llama", {}), "umt5": mapping.get("t5", {})}
    mapping |= {"general": t["general"], "tokenizer": t["tokenizer"]}
    config: dict[str, Any] = {}
    name = _plain(metadata.get("general.name"))
    updated = _updated_arch(arch, name, config)
    if "stablelm" in arch:
        config["use_qkv_bias"] = any(
            b in n for n in names for b in ("attn_q.bias", "attn_k.bias", "attn_v.bias")
        )
        config["use_parallel_residual"] = not any("ffn_norm" in n for n in names)
    if arch not in mapping and updated not in mapping:
        raise ConfigError(
            f"GGUF architecture {arch!r}{_in(source)} is not one transformers can load",
            hint=f"known: {', '.join(archs())}",
        )
    row = t["archs"].get(arch, {})
    config["tie_word_embeddings"] = "output.weight" not in names or bool(row.get("tie_exempt"))
    for key, value in row.get("defaults", {}).items():
        config.setdefault(key, value)
    for key, raw in metadata.items():
        key = key.replace(arch, updated)
        prefix, _, rest = key.partition(".")
        value = _parsed(raw)
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        renamed = mapping.get(prefix, {}).get(rest)
        if renamed is not None:
            config[renamed] = value
    _legacy_after(config, metadata, arch)
    return config


def _legacy_after(config: dict[str, Any], metadata: Mapping[str, Any], arch: str) -> None:
    """What load_gguf_checkpoint does once the keys are read."""
    mt = config.get("model_type")
    if mt in ("gemma3", "gemma4"):
        config["model_type"] = mt + "_text"
    if mt == "gemma4":
        config["eos_token_id"] = [1, 106, 50]  # transformers' fixed end-of-generation ids for gemma4
    if mt == "minimax_m2" and isinstance(config.get("scoring_func"), int):
        config["scoring_func"] = {0: "none", 1: "softmax", 2: "sigmoid"}.get(
            config["scoring_func"], "softmax"
        )
    if mt == "gpt_oss" and f"{arch}.rope.scaling.type" in metadata:
        config["rope_scaling"] = _gpt_oss_rope(metadata, arch)
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = _count(metadata["tokenizer.ggml.tokens"])


def _gpt_oss_rope(metadata: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """gpt-oss's rope_scaling from `rope.scaling.*`, as transformers means to read it (its code reads
    each field's first part, the key's length, instead of the value: see tests/test_ggufmeta.py)."""
    prefix = f"{arch}.rope.scaling."
    out: dict[str, Any] = {"rope_type": _plain(metadata[prefix + "type"])}
    for key, raw in metadata.items():
        suffix = key[len(prefix) :] if key.startswith(prefix) else None
        if suffix is None or suffix == "type":
            continue
        value = _plain(raw)
        if suffix in ("original_context_length", "original_max_position_embeddings"):
            suffix, value = "original_max_position_embeddings", int(value)
        elif suffix in ("factor", "attention_factor", "beta_fast", "beta_slow"):
            value = float(value)
        out[suffix] = value
    return out


def _count(tokens: Any) -> int:
    tokens = _plain(tokens)
    return tokens if isinstance(tokens, int) else len(tokens)


def _new_path(arch: str, metadata: Mapping[str, Any], names: tuple, source: str | None) -> dict[str, Any]:
    """transformers' integrations/gguf/gguf_config_mapping.py: qwen35, qwen35moe, lfm2."""

    def key(name: str, prefix: str = arch) -> Any:
        full = f"{prefix}.{name}" if prefix else name
        if full not in metadata:
            raise ConfigError(
                f"the GGUF metadata{_in(source)} has no {full}",
                hint=f"transformers reads {full} to build a {arch} config; the file must state it",
            )
        return _plain(metadata[full])

    def opt(full: str) -> Any:
        return _plain(metadata[full]) if full in metadata else None

    common = {
        "vocab_size": _count(key("tokenizer.ggml.tokens", "")),
        "tie_word_embeddings": "output.weight" not in names,
        "eos_token_id": opt("tokenizer.ggml.eos_token_id"),
        "bos_token_id": opt("tokenizer.ggml.bos_token_id"),
        "pad_token_id": opt("tokenizer.ggml.padding_token_id"),
    }
    if arch == "lfm2":
        kv = list(key("attention.head_count_kv"))
        return {
            "model_type": "lfm2",
            "architectures": ["Lfm2ForCausalLM"],
            "max_position_embeddings": key("context_length"),
            "hidden_size": key("embedding_length"),
            "intermediate_size": key("feed_forward_length"),
            "block_auto_adjust_ff_dim": False,
            "num_hidden_layers": key("block_count"),
            "num_attention_heads": key("attention.head_count"),
            "num_key_value_heads": max(kv),
            "layer_types": ["full_attention" if h else "conv" for h in kv],
            "norm_eps": key("attention.layer_norm_rms_epsilon"),
            "conv_L_cache": key("shortconv.l_cache"),
            "conv_bias": any(n.startswith("blk.") and n.endswith("shortconv.in_proj.bias") for n in names),
            "rope_parameters": {"rope_type": "default", "rope_theta": key("rope.freq_base")},
            **common,
        }
    return _qwen35(arch, key, opt, common)


def _qwen35(arch: str, key, opt, common: dict[str, Any]) -> dict[str, Any]:
    head_dim = key("attention.key_length")
    value_heads = key("ssm.time_step_rank")
    mtp = opt(f"{arch}.nextn_predict_layers") or 0
    moe = arch == "qwen35moe"
    config = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "architectures": ["Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"],
        "max_position_embeddings": key("context_length"),
        "hidden_size": key("embedding_length"),
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": key("attention.head_count_kv"),
        "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "full_attention_interval": key("full_attention_interval"),
        "linear_conv_kernel_dim": key("ssm.conv_kernel"),
        "linear_key_head_dim": key("ssm.state_size"),
        "linear_num_key_heads": key("ssm.group_count"),
        "linear_num_value_heads": value_heads,
        "num_hidden_layers": key("block_count") - mtp,
        "linear_value_head_dim": key("ssm.inner_size") // value_heads,
        "rope_parameters": {
            "rope_theta": key("rope.freq_base"),
            "mrope_section": [s for s in key("rope.dimension_sections") if s],
            "mrope_interleaved": True,
            "partial_rotary_factor": key("rope.dimension_count") / head_dim,
        },
        **common,
    }
    if (ff := opt(f"{arch}.feed_forward_length")) is not None:
        config["intermediate_size"] = ff
    if moe:
        config |= {
            "moe_intermediate_size": key("expert_feed_forward_length"),
            "shared_expert_intermediate_size": key("expert_shared_feed_forward_length"),
            "num_experts": key("expert_count"),
            "num_experts_per_tok": key("expert_used_count"),
        }
    return config


# ------------------------------------------------------------------ config -> metadata


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _first(config: Mapping[str, Any], candidates: Sequence[str]) -> Any:
    for c in candidates:
        if (v := _lookup(config, c)) is not None:
            return v
    return None


def _need(config: Mapping[str, Any], dotted: str, arch: str) -> Any:
    value = _lookup(config, dotted)
    if value is None:
        raise ConfigError(
            f"the {arch} config has no {dotted}",
            hint=f"llama.cpp's GGUF metadata for {arch} is computed from `{dotted}`: add it to config.json",
        )
    return value


def _full_attention_interval(config: Mapping[str, Any], arch: str) -> int | None:
    if (v := config.get("full_attention_interval")) is not None:
        return v
    types = config.get("layer_types") or []
    return types.index("full_attention") + 1 if "full_attention" in types else None


def _kv_heads_per_layer(config: Mapping[str, Any], arch: str) -> list[int]:
    kv = _need(config, "num_key_value_heads", arch)
    types = config.get("layer_types")
    if types is None:
        full = set(_need(config, "full_attn_idxs", arch))
        types = [
            "full_attention" if i in full else "conv" for i in range(_need(config, "num_hidden_layers", arch))
        ]
    return [kv if t == "full_attention" else 0 for t in types]


def _rope_factor(config: Mapping[str, Any]) -> float | None:
    return _first(config, ["rope_parameters.partial_rotary_factor", "partial_rotary_factor"])


def _lfm2_ff_dim(config: Mapping[str, Any], arch: str) -> int:
    """LFM2's feed-forward width as the model builds it (llama.cpp's LFM2 converter does the same)."""
    ff = _need(config, "intermediate_size", arch)
    if not config.get("block_auto_adjust_ff_dim"):
        return ff
    ff = int(2 * ff / 3)
    if (multiplier := config.get("block_ffn_dim_multiplier")) is not None:
        ff = int(multiplier * ff)
    multiple = config.get("block_multiple_of") or 1
    return multiple * ((ff + multiple - 1) // multiple)


_COMPUTED = {
    "lfm2_ff_dim": _lfm2_ff_dim,
    "head_dim_or_ratio": lambda c, a: (
        c.get("head_dim") or _need(c, "hidden_size", a) // _need(c, "num_attention_heads", a)
    ),
    "four_times_embedding": lambda c, a: (
        _first(c, ["n_inner", "ffn_hidden_size"]) or 4 * _first(c, ["hidden_size", "n_embd", "n_embed"])
    ),
    "gating_func_id": lambda c, a: {"softmax": 1, "sigmoid": 2}.get(c.get("scoring_func")),
    "kv_heads_per_layer": _kv_heads_per_layer,
    "full_attention_interval": _full_attention_interval,
    "mtp_layers": lambda c, a: c.get("mtp_num_hidden_layers") or None,
    "layers_plus_mtp": lambda c, a: _need(c, "num_hidden_layers", a) + (c.get("mtp_num_hidden_layers") or 0),
    "value_dim_total": lambda c, a: (
        _need(c, "linear_value_head_dim", a) * _need(c, "linear_num_value_heads", a)
    ),
    "partial_rotary_dims": lambda c, a: round((_rope_factor(c) or 1.0) * _need(c, "head_dim", a)),
    "mrope_sections": lambda c, a: (list(_need(c, "rope_parameters.mrope_section", a)) + [0, 0, 0, 0])[:4],
}


def _typed(type_: str, value: Any, key: str) -> tuple[str, Any]:
    """`(type, value)` with the value in the type's Python form, checked against the type's range."""
    if type_.startswith("arr:"):
        elem = type_[4:]
        return type_, [_typed(elem, v, key)[1] for v in value]
    if type_ in _INT_RANGES:
        lo, hi = _INT_RANGES[type_]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < hi:
            raise ConfigError(
                f"{key} = {value!r} does not fit GGUF type {type_}", hint="fix the config value"
            )
        return type_, value
    if type_ in ("f32", "f64"):
        value = float(value)
        # what a reader gets back: llama.cpp stores rope_theta and eps as 32-bit floats
        return type_, struct.unpack("<f", struct.pack("<f", value))[0] if type_ == "f32" else value
    if type_ == "bool":
        return type_, bool(value)
    return type_, str(value)


def _flat(config: Any) -> dict[str, Any]:
    """The config as a dict, a text_config's fields lifted to the top (as llama.cpp does)."""
    if not isinstance(config, Mapping):
        config = config.to_dict()
    config = dict(config)
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, Mapping) else config


def _general_name(config: Mapping[str, Any], name: str | None) -> str:
    """general.name: what transformers tells mistral (exactly `mistral`) and umt5 apart by."""
    if name is not None:
        return name
    mt = config.get("model_type")
    if mt in ("mistral", "umt5"):
        return mt
    path = str(config.get("_name_or_path") or "").rstrip("/")
    return path.rsplit("/", 1)[-1] or str(mt)


def metadata_from_config(
    config: Any, tensor_names: Iterable[str], name: str | None = None, *, vocab: Sequence[str] | None = None
) -> Metadata:
    """The GGUF metadata llama.cpp writes for this HF config (general.architecture, general.name, then
    the `{arch}.*` keys), such that transformers reads the original config values back. `vocab` is
    the token list to store; without one, archs whose vocab_size transformers reads only from the
    token list get `[PAD{i}]` placeholders (as llama.cpp pads a short vocabulary). general.file_type
    and the tensors are the writer's."""
    cfg = _flat(config)
    arch = gguf_arch(cfg)
    row = _row(arch)
    out: Metadata = {
        "general.architecture": ("str", arch),
        "general.name": ("str", _general_name(cfg, name)),
    }
    if row["causal_lm"] is None:
        raise ConfigError(f"transformers has no model class for GGUF architecture {arch!r}", hint=row["note"])
    for suffix, type_ in row["types"].items():
        if suffix in row["computed"]:
            value = _COMPUTED[row["computed"][suffix]](cfg, arch)
        else:
            value = _first(cfg, row["write"].get(suffix, ()))
        if value is not None:
            out[f"{arch}.{suffix}"] = _typed(type_, value, f"{arch}.{suffix}")
    if f"{arch}.block_count" not in out:
        layers = " or ".join(row["write"].get("block_count", ["num_hidden_layers"]))
        raise ConfigError(
            f"the {arch} config has no layer count ({layers})", hint=f"add {layers} to config.json"
        )
    _tokenizer(out, cfg, row, vocab)
    _check_tie(cfg, row, arch, tensor_names)
    return out


def _tokenizer(
    out: Metadata, cfg: Mapping[str, Any], row: Mapping[str, Any], vocab: Sequence[str] | None
) -> None:
    for gguf_key, hf_key in table()["tokenizer"].items():
        value = cfg.get(hf_key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            out["tokenizer." + gguf_key] = ("u32", value)
    if vocab is None and row["vocab_from_tokens"]:
        size = cfg.get("vocab_size")
        if size is None:
            raise ConfigError("the config has no vocab_size", hint="add `vocab_size` to config.json")
        vocab = [f"[PAD{i}]" for i in range(size)]
    if vocab is not None:
        out["tokenizer.ggml.tokens"] = ("arr:str", [str(t) for t in vocab])


def _check_tie(
    cfg: Mapping[str, Any], row: Mapping[str, Any], arch: str, tensor_names: Iterable[str]
) -> None:
    """transformers ties the output projection to the embedding exactly when there is no `output.weight`:
    an untied model without one would load with its embedding as the output. (A tied model with one,
    as llama.cpp writes gpt2, loads untied with equal values.)"""
    names = set(tensor_names)
    if (
        names
        and cfg.get("tie_word_embeddings") is False
        and not row["tie_exempt"]
        and "output.weight" not in names
    ):
        raise ConfigError(
            f"the {arch} config says tie_word_embeddings=False, but there is no output.weight tensor",
            hint="transformers ties the output projection to the embedding exactly when output.weight is absent",
        )
