"""Generate specs/gguf_config.json, the GGUF metadata <-> config.json mapping, from transformers' own
tables (GGUF_CONFIG_MAPPING, GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_ARCHS, its auto class names) and
gguf-py's GGUFWriter (which value type llama.cpp stores each key as), plus the small hand table below
for what transformers and llama.cpp do in code. `convspec.ggufmeta` reads the file at run time, without
transformers or gguf."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from ..errors import TransformersMissing

OUT = Path(__file__).resolve().parent.parent.parent / "specs" / "gguf_config.json"

# HF model_type -> llama.cpp's `general.architecture`, where they differ (transformers'
# get_gguf_hf_weights_map and load_gguf_checkpoint spell these renames in code).
ALIASES = {
    "mistral": "llama",  # llama.cpp writes mistral as llama; transformers tells them apart by general.name
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "gpt_oss": "gpt-oss",
    "minimax_m2": "minimax-m2",
    "gemma3_text": "gemma3",
    "gemma4_text": "gemma4",
    "umt5": "t5",
    "qwen3_5_text": "qwen35",
    "qwen3_5": "qwen35",
    "qwen3_5_moe_text": "qwen35moe",
    "qwen3_5_moe": "qwen35moe",
}

# The GGUF_CONFIG_MAPPING key transformers reads an arch under (load_gguf_checkpoint's renames).
TRANSFORMERS_ARCH = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}

# The model_type transformers gives a file of this GGUF arch, where it is not the GGUF_CONFIG_MAPPING
# key the arch is read under (load_gguf_checkpoint's gemma3 -> gemma3_text; gguf_config_mapping.py).
MODEL_TYPES = {
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "qwen35": "qwen3_5_text",
    "qwen35moe": "qwen3_5_moe_text",
}

# What transformers' new config path (integrations/gguf/gguf_config_mapping.py) reads, by hand: the
# functions are code, not tables. suffix -> config key; `ggufmeta` rebuilds the rest in code.
NEW_PATH_READ = {
    "qwen35": {
        "context_length": "max_position_embeddings",
        "embedding_length": "hidden_size",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "attention.key_length": "head_dim",
        "attention.layer_norm_rms_epsilon": "rms_norm_eps",
        "full_attention_interval": "full_attention_interval",
        "ssm.conv_kernel": "linear_conv_kernel_dim",
        "ssm.state_size": "linear_key_head_dim",
        "ssm.group_count": "linear_num_key_heads",
        "ssm.time_step_rank": "linear_num_value_heads",
        "block_count": "num_hidden_layers",
        "ssm.inner_size": "linear_value_head_dim",
        "feed_forward_length": "intermediate_size",
        "rope.freq_base": "rope_parameters.rope_theta",
        "rope.dimension_sections": "rope_parameters.mrope_section",
        "rope.dimension_count": "rope_parameters.partial_rotary_factor",
        "nextn_predict_layers": None,
    },
    "lfm2": {
        "context_length": "max_position_embeddings",
        "embedding_length": "hidden_size",
        "feed_forward_length": "intermediate_size",
        "block_count": "num_hidden_layers",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "attention.layer_norm_rms_epsilon": "norm_eps",
        "shortconv.l_cache": "conv_L_cache",
        "rope.freq_base": "rope_parameters.rope_theta",
    },
}
NEW_PATH_READ["qwen35moe"] = NEW_PATH_READ["qwen35"] | {
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
}

# Keys llama.cpp's convert_hf_to_gguf.py writes that transformers does not read back (or reads into
# nothing): suffix -> the config keys llama.cpp takes it from, first present wins. TextModel's
# key_length/value_length from head_dim applies to every arch (BASE_EXTRA).
BASE_EXTRA = {"attention.key_length": ["head_dim"], "attention.value_length": ["head_dim"]}
LLAMA_CPP_EXTRA: dict[str, dict[str, list[str]]] = {
    "llama": {"vocab_size": ["vocab_size"]},
    "qwen2": {"vocab_size": ["vocab_size"]},
    "qwen2moe": {
        "expert_feed_forward_length": ["moe_intermediate_size"],
        "expert_shared_feed_forward_length": ["shared_expert_intermediate_size"],
    },
    "qwen3moe": {"expert_feed_forward_length": ["moe_intermediate_size"]},
    "gemma2": {
        "attn_logit_softcapping": ["attn_logit_softcapping"],
        "final_logit_softcapping": ["final_logit_softcapping"],
    },
    "gemma3": {
        "rope.freq_base_swa": ["rope_local_base_freq", "rope_parameters.sliding_attention.rope_theta"]
    },
    "gpt-oss": {"attention.sliding_window": ["sliding_window"]},
    "minimax-m2": {"expert_feed_forward_length": ["intermediate_size"]},
    "bloom": {"feed_forward_length": ["n_inner"], "attention.head_count_kv": ["n_head"]},
    "falcon": {"attention.layer_norm_epsilon": ["layer_norm_epsilon"]},
    "stablelm": {"rope.freq_base": ["rope_theta", "rope_parameters.rope_theta"]},
    "gpt2": {"attention.layer_norm_epsilon": ["layer_norm_epsilon"]},
    "phi3": {"rope.dimension_count": ["head_dim"]},
}

# Where llama.cpp reads a config key under another name than transformers writes back: extra
# candidates for a suffix (HF GPT-2 configs say n_positions where convert_hf_to_gguf.py reads n_ctx).
CANDIDATES: dict[str, dict[str, list[str]]] = {
    "gpt2": {"context_length": ["n_ctx", "n_positions"]},
    "bloom": {"context_length": ["seq_length", "n_positions"]},
}

# Keys whose value is computed, not copied (ggufmeta implements each name).
COMPUTED: dict[str, dict[str, str]] = {
    "llama": {"rope.dimension_count": "head_dim_or_ratio"},
    "gpt2": {"feed_forward_length": "four_times_embedding"},
    "bloom": {"feed_forward_length": "four_times_embedding"},
    "falcon": {"feed_forward_length": "four_times_embedding"},
    "minimax-m2": {"expert_gating_func": "gating_func_id"},
    "lfm2": {"attention.head_count_kv": "kv_heads_per_layer", "feed_forward_length": "lfm2_ff_dim"},
    "qwen35": {
        "block_count": "layers_plus_mtp",
        "full_attention_interval": "full_attention_interval",
        "nextn_predict_layers": "mtp_layers",
        "ssm.inner_size": "value_dim_total",
        "rope.dimension_count": "partial_rotary_dims",
        "rope.dimension_sections": "mrope_sections",
    },
}
COMPUTED["qwen35moe"] = COMPUTED["qwen35"]

# Where transformers 5 keeps rope_theta: in rope_parameters (per attention type for gemma3 and later).
ROPE_THETA = ["rope_theta", "rope_parameters.rope_theta", "rope_parameters.full_attention.rope_theta"]

TIE_EXEMPT = ("falcon", "bloom")  # load_gguf_checkpoint's `exceptions`: always tied, whatever the file holds
NOTES = {
    "llama": "general.name == 'mistral' (exactly) reads as model_type mistral (load_gguf_checkpoint), whose "
    "weights transformers 5.23 then cannot load (gguf-py has no architecture 'mistral').",
    "t5": "transformers sets is_gated_act=True; a general.name containing 'umt5' loads as umt5.",
    "stablelm": "use_qkv_bias and use_parallel_residual come from the tensor names, not metadata.",
    "gpt-oss": "transformers 5.23 reads rope.scaling.* from field.parts[0] (the key's length, not the value) "
    "and fails on a file with rope.scaling.factor, so metadata_from_config leaves yarn scaling out; "
    "nor does it load llama.cpp's experts and sinks (its processor is keyed gpt_oss, not gpt-oss); "
    "metadata_from_config writes both `attention.sliding_window` (llama.cpp's) and `sliding_window` (transformers').",
    "deci": "transformers 5.23 has no `deci` config class: AutoConfig cannot build this model type.",
    "gpt2": "vocab_size comes from the token list's length; context_length is read into n_ctx, not "
    "n_positions, so n_positions keeps its default.",
    "qwen2moe": "moe_intermediate_size and shared_expert_intermediate_size are not read by transformers.",
    "qwen3": "transformers reads no attention.key_length for qwen3: head_dim keeps its default (128).",
    "qwen3moe": "moe_intermediate_size is not read by transformers (default 768).",
    "falcon": "transformers reads head_count_kv into num_key_value_heads (FalconConfig says num_kv_heads) and "
    "has no falcon tensor processor: only multi-query files (one kv head, where llama.cpp's qkv regrouping "
    "is the identity) load with their values; layer_norm_epsilon is not read.",
    "gemma4": "transformers reads neither head_dim nor the per-layer-input sizes (vocab_size_per_layer_input, "
    "hidden_size_per_layer_input): a file loads only into a model with those defaults.",
    "mamba": "llama.cpp stores A as -exp(A_log) and the conv1d kernel squeezed to 2-D; transformers undoes both.",
    "lfm2": "read by transformers' new config path: layer_types from per-layer head_count_kv (0 = conv).",
}

TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens",)


def _sample(annotation: str):
    """A value of the annotated type, to call a GGUFWriter add_* method with."""
    import gguf

    scalar = {"int": 7, "float": 0.5, "bool": True, "str": "x", "bytes": b"x"}
    first = annotation.split("|")[0].strip()
    if first in scalar:
        return scalar[first]
    if first.startswith("Sequence[") and first[9:-1] in scalar:
        return [scalar[first[9:-1]]] * 2
    enum = getattr(gguf, first, None)
    if enum is not None and hasattr(enum, "__members__"):
        return next(iter(enum))
    return None


_VTYPES = {
    "UINT8": "u8",
    "INT8": "i8",
    "UINT16": "u16",
    "INT16": "i16",
    "UINT32": "u32",
    "INT32": "i32",
    "UINT64": "u64",
    "INT64": "i64",
    "FLOAT32": "f32",
    "FLOAT64": "f64",
    "BOOL": "bool",
    "STRING": "str",
}


def _type_name(value) -> str:
    """A GGUFValue's type in ggufmeta's spelling: `u32`, `arr:i32`, ..."""
    import gguf

    if value.type != gguf.GGUFValueType.ARRAY:
        return _VTYPES[value.type.name]
    if isinstance(value.value, bytes):
        return "arr:u8"
    sub = value.sub_type or gguf.GGUFValueType.get_type(value.value[0])
    return "arr:" + _VTYPES[sub.name]


def writer_key_types() -> dict[str, str]:
    """Every metadata key a GGUFWriter add_* method writes, with `{arch}` for the arch, and its type:
    each one-argument method is called on a writer with a value of its annotated type."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path=None, arch="{arch}")
    types: dict[str, str] = {}
    for name, fn in sorted(inspect.getmembers(GGUFWriter, inspect.isfunction)):
        params = list(inspect.signature(fn).parameters.values())[1:]
        if not name.startswith("add_") or len(params) != 1 or name in ("add_array", "add_string"):
            continue
        sample = _sample(str(params[0].annotation))
        if sample is None:
            continue
        writer.kv_data[0].clear()
        try:
            getattr(writer, name)(sample)
        except Exception:  # a method that wants more than its annotation says: not a config key
            continue
        for key, value in writer.kv_data[0].items():
            types[key] = _type_name(value)
        # an `int | Sequence[int]` key (head_count_kv per layer) also has its array form
        if str(params[0].annotation) == "int | Sequence[int]":
            writer.kv_data[0].clear()
            getattr(writer, name)([7, 7])
            for key, value in writer.kv_data[0].items():
                types[key + "[]"] = _type_name(value)
    return dict(sorted(types.items()))


def _arch_entry(arch: str, mapping: dict, defaults: dict, archs_new: set, key_types: dict) -> dict:
    """One GGUF arch's row: what transformers makes of it and what llama.cpp writes for it."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    hf_arch = TRANSFORMERS_ARCH.get(arch, arch)
    new_path = arch in archs_new
    read = dict(NEW_PATH_READ[arch]) if new_path else dict(mapping[hf_arch])
    model_type = MODEL_TYPES.get(arch, hf_arch)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(
        model_type
    ) or MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    write: dict[str, list[str]] = {}
    for suffix, key in read.items():
        if key is not None and "." not in key:
            write[suffix] = [key]
    if "rope.freq_base" in read:
        write["rope.freq_base"] = ROPE_THETA
    for suffix, keys in (BASE_EXTRA | LLAMA_CPP_EXTRA.get(arch, {}) | CANDIDATES.get(arch, {})).items():
        write[suffix] = keys + [k for k in write.get(suffix, []) if k not in keys]
    write = {s: _with_aliases(keys, model_type) for s, keys in write.items()}
    computed = COMPUTED.get(arch, {})
    suffixes = sorted(set(read) | set(write) | set(computed), key=_order)
    types = {s: _key_type(s, key_types, arch) for s in suffixes}
    return {
        "model_type": model_type,
        "causal_lm": causal,
        "config_path": "gguf_config" if new_path else "legacy",
        "transformers_arch": None if new_path else hf_arch,
        "read": read,
        "defaults": dict(defaults.get(hf_arch, {})),
        "write": {s: write[s] for s in suffixes if s in write and s not in computed},
        "computed": computed,
        "types": types,
        "tie_exempt": arch in TIE_EXEMPT,
        "vocab_from_tokens": new_path or "vocab_size" not in read,
        "note": NOTES.get(arch),
    }


def _with_aliases(keys: list[str], model_type: str) -> list[str]:
    """Candidates plus the names the config class's attribute_map gives them (a Qwen3MoeConfig
    stores num_experts as num_local_experts; a GPT2Config max_position_embeddings as n_positions)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    amap = getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) if model_type in CONFIG_MAPPING else {}
    out = list(keys)
    for key in keys:
        out += [amap[key]] if key in amap else []
        out += [alias for alias, target in amap.items() if target == key]
    return list(dict.fromkeys(out))


# vocab_size, then llama.cpp's TextModel.set_gguf_parameters order, then the rest by name
ORDER = [
    "vocab_size",
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "rope.freq_base",
    "attention.layer_norm_rms_epsilon",
    "attention.layer_norm_epsilon",
    "expert_count",
    "expert_used_count",
    "attention.key_length",
    "attention.value_length",
    "rope.dimension_count",
]


def _order(suffix: str) -> tuple[int, str]:
    return (ORDER.index(suffix) if suffix in ORDER else len(ORDER), suffix)


# keys transformers reads that no GGUFWriter method writes (so no type to read off the writer)
EXTRA_TYPES = {"sliding_window": "u32", "rope.scaling.type": "str"}


def _key_type(suffix: str, key_types: dict, arch: str) -> str:
    if suffix in EXTRA_TYPES:
        return EXTRA_TYPES[suffix]
    if arch == "lfm2" and suffix == "attention.head_count_kv":
        return key_types["{arch}." + suffix + "[]"]
    found = key_types.get("{arch}." + suffix)
    if found is None:
        raise ValueError(f"no GGUFWriter method writes {{arch}}.{suffix}: add it to EXTRA_TYPES")
    return found


def generate() -> dict[str, Any]:
    """The whole of specs/gguf_config.json, from the installed transformers and gguf."""
    try:
        import gguf
        import transformers
        from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError as e:
        raise TransformersMissing(
            f"generating gguf_config.json needs transformers and gguf: {e}",
            hint="pip install transformers gguf",
        ) from e
    from importlib.metadata import version

    key_types = writer_key_types()
    mapping = {k: v for k, v in GGUF_CONFIG_MAPPING.items() if k not in ("general", "tokenizer")}
    known = set(gguf.MODEL_ARCH_NAMES.values())
    archs = sorted({ALIASES.get(k, k) for k in mapping} | set(GGUF_CONFIG_ARCHS))
    missing = [a for a in archs if a not in known]
    if missing:
        raise ValueError(f"gguf-py knows no architecture {missing}")
    rows = {
        a: _arch_entry(a, mapping, GGUF_CONFIG_DEFAULTS_MAPPING, set(GGUF_CONFIG_ARCHS), key_types)
        for a in archs
    }
    return {
        "_generated": "by convspec.hf.gguf_config_import.generate(); do not edit (tests/test_ggufmeta.py checks)",
        "transformers": transformers.__version__,
        "gguf": version("gguf"),
        "general": dict(GGUF_CONFIG_MAPPING["general"]),
        "tokenizer": dict(GGUF_CONFIG_MAPPING["tokenizer"]),
        "aliases": dict(sorted(ALIASES.items())),
        "archs": rows,
        "key_types": {
            k: v for k, v in key_types.items() if k.startswith(("general.", "tokenizer.", "{arch}."))
        },
    }


def render(data: dict[str, Any]) -> str:
    """The file's text: stable key order, one trailing newline."""
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def write(path: Path = OUT) -> Path:
    """Regenerate the file (run after upgrading transformers or gguf)."""
    path.write_text(render(generate()), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write())
