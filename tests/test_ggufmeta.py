"""convspec.ggufmeta: the GGUF metadata <-> config.json mapping (specs/gguf_config.json), checked
against transformers' own GGUF config reading on files gguf-py writes."""

from __future__ import annotations

import math
import struct

import pytest
from helpers.gguf_models import LOADED

from convspec import ggufmeta
from convspec.errors import ConfigError, ConvspecError

# the archs whose tiny models transformers builds here (tests/helpers/gguf_models.py TINY)
ARCHS = [*LOADED, "gpt-oss"]


def test_names():
    assert ggufmeta.spec_name("gpt-oss") == "gguf_gpt_oss"
    assert ggufmeta.spec_name("llama") == "gguf_llama"
    assert ggufmeta.model_type("gemma3") == "gemma3_text"
    assert ggufmeta.model_type("qwen2moe") == "qwen2_moe"
    assert ggufmeta.model_type("qwen35") == "qwen3_5_text"
    assert ggufmeta.gguf_arch("qwen2_moe") == "qwen2moe"
    assert ggufmeta.gguf_arch({"model_type": "mistral"}) == "llama"
    assert ggufmeta.gguf_arch({"model_type": "gemma3_text"}) == "gemma3"
    assert ggufmeta.causal_lm("gpt2") == "GPT2LMHeadModel"
    assert {"llama", "qwen2moe", "gpt-oss", "minimax-m2", "mamba", "t5", "lfm2", "qwen35"} <= set(
        ggufmeta.archs()
    )


def _llama_config(**over):
    cfg = {
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return cfg | over


def test_metadata_keys_types_and_order_are_llama_cpps():
    md = ggufmeta.metadata_from_config(_llama_config(), ["token_embd.weight"], name="tiny")
    assert list(md)[:2] == ["general.architecture", "general.name"]
    assert md["general.architecture"] == ("str", "llama")
    assert md["general.name"] == ("str", "tiny")
    assert md["llama.block_count"] == ("u32", 2)  # gguf-py's add_block_count stores uint32
    assert md["llama.attention.head_count_kv"] == ("u32", 2)
    assert md["llama.rope.dimension_count"] == ("u32", 16)  # hidden / heads, as LlamaModel computes it
    assert md["llama.rope.freq_base"] == ("f32", 10000.0)
    # f32 as a reader gets it back: 1e-5 is not a float32
    assert md["llama.attention.layer_norm_rms_epsilon"] == (
        "f32",
        struct.unpack("<f", struct.pack("<f", 1e-5))[0],
    )
    assert md["tokenizer.ggml.bos_token_id"] == ("u32", 1)
    assert "tokenizer.ggml.tokens" not in md  # llama's vocab_size is a key of its own
    keys = [k for k in md if k.startswith("llama.")]
    assert keys[:4] == [
        "llama.vocab_size",
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
    ]


def test_round_trip_without_transformers():
    cfg = _llama_config(tie_word_embeddings=False)
    names = ["token_embd.weight", "output.weight"]
    back = ggufmeta.config_from_metadata(ggufmeta.metadata_from_config(cfg, names), names)
    assert back["model_type"] == "llama" and back["tie_word_embeddings"] is False
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "max_position_embeddings",
    ):
        assert back[key] == cfg[key], key
    assert back["rope_theta"] == 10000.0
    assert math.isclose(back["rms_norm_eps"], 1e-5, rel_tol=1e-6)


def test_mistral_is_llama_named_mistral():
    md = ggufmeta.metadata_from_config(_llama_config(model_type="mistral"), [])
    assert md["general.architecture"] == ("str", "llama") and md["general.name"] == ("str", "mistral")
    assert ggufmeta.config_from_metadata(md, [])["model_type"] == "mistral"
    md["general.name"] = ("str", "Mistral 7B")  # transformers tests the exact name
    assert ggufmeta.config_from_metadata(md, [])["model_type"] == "llama"


def test_lfm2_layer_types_ride_on_per_layer_kv_heads():
    cfg = {
        "model_type": "lfm2",
        "vocab_size": 8,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "norm_eps": 1e-5,
        "conv_L_cache": 3,
        "layer_types": ["conv", "full_attention", "conv"],
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    }
    md = ggufmeta.metadata_from_config(cfg, [])
    assert md["lfm2.attention.head_count_kv"] == ("arr:i32", [0, 2, 0])
    assert md["tokenizer.ggml.tokens"][0] == "arr:str" and len(md["tokenizer.ggml.tokens"][1]) == 8
    back = ggufmeta.config_from_metadata(md, ["blk.0.shortconv.in_proj.weight"])
    assert back["layer_types"] == cfg["layer_types"] and back["num_key_value_heads"] == 2
    assert back["vocab_size"] == 8 and back["conv_L_cache"] == 3 and back["conv_bias"] is False


def test_errors_name_the_key_and_the_file():
    with pytest.raises(ConfigError) as e:
        ggufmeta.config_from_metadata({}, [], source="m.gguf")
    assert "general.architecture" in str(e.value) and "m.gguf" in str(e.value)
    with pytest.raises(ConfigError) as e:
        ggufmeta.config_from_metadata({"general.architecture": ("str", "lfm2")}, [], source="m.gguf")
    assert "tokenizer.ggml.tokens" in e.value.message and "m.gguf" in e.value.message
    assert e.value.hint and "tokenizer.ggml.tokens" in e.value.hint
    with pytest.raises(ConfigError, match="'bert'"):
        ggufmeta.config_from_metadata({"general.architecture": ("str", "bert")}, [], source="m.gguf")
    with pytest.raises(ConfigError, match="'bert'"):
        ggufmeta.metadata_from_config({"model_type": "bert"}, [])
    with pytest.raises(ConfigError, match="model_type"):
        ggufmeta.metadata_from_config({}, [])
    with pytest.raises(ConfigError, match="output.weight"):
        ggufmeta.metadata_from_config(_llama_config(tie_word_embeddings=False), ["token_embd.weight"])
    with pytest.raises(ConfigError, match="u32"):
        ggufmeta.metadata_from_config(_llama_config(num_hidden_layers=-1), [])
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ggufmeta.metadata_from_config(_llama_config(num_hidden_layers=None), [])
    with pytest.raises(ConfigError, match="no model class"):  # transformers 5.23 has no deci config
        ggufmeta.metadata_from_config({"model_type": "deci", "num_hidden_layers": 2}, [])
    with pytest.raises(ConvspecError, match="mrope_section"):
        ggufmeta.metadata_from_config(
            {"model_type": "qwen3_5_text", "num_hidden_layers": 2, "head_dim": 8}, []
        )


# ------------------------------------------------------------------ against transformers


def test_the_file_is_what_the_generator_makes():
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from convspec.hf.gguf_config_import import OUT, generate, render

    assert OUT.read_text(encoding="utf-8") == render(generate()), (
        "specs/gguf_config.json is stale: run `python -m convspec.hf.gguf_config_import`"
    )


def _as_f32(v):
    return struct.unpack("<f", struct.pack("<f", v))[0] if isinstance(v, float) else v


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


@pytest.mark.parametrize("arch", ARCHS)
def test_config_equals_transformers_and_round_trips(arch, tmp_path):
    """On a file gguf-py writes with metadata_from_config's keys: config_from_metadata is the dict
    transformers builds, AutoConfig reads the original values back, and the arch is the model's."""
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    pytest.importorskip("transformers")
    from helpers.gguf_models import tiny_config, write_gguf_with_gguf_py
    from transformers import AutoConfig
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS, get_gguf_config, read_gguf_metadata
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    original = tiny_config(arch)
    names = ["token_embd.weight"] + ([] if original.tie_word_embeddings else ["output.weight"])
    md = ggufmeta.metadata_from_config(original.to_dict(), names)
    path = write_gguf_with_gguf_py(
        tmp_path / "m.gguf", arch, {n: np.zeros((4, 4), np.float32) for n in names}, md
    )
    reader = gguf.GGUFReader(path)
    read = {k: f.contents() for k, f in reader.fields.items()}
    ours = ggufmeta.config_from_metadata(read, [t.name for t in reader.tensors], str(path))
    if arch in GGUF_CONFIG_ARCHS:  # transformers' new config path, as AutoConfig chooses it
        assert ours == get_gguf_config(*read_gguf_metadata(str(path)))
    else:
        assert ours == load_gguf_checkpoint(str(path))["config"]
    # the typed metadata itself gives the same config as the file's
    assert ggufmeta.config_from_metadata(md, names) == ours
    back = AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back.model_type == original.model_type
    for key in ggufmeta.loading_keys(arch):
        try:
            want = _get(original, key)
        except (AttributeError, KeyError):
            continue  # a key this config class does not have (gpt2's n_ctx): nothing to keep
        assert _as_f32(_get(back, key)) == _as_f32(want), key


def test_gpt_oss_metadata_and_transformers_rope_scaling_failure(tmp_path):
    """gpt-oss: the config keys round trip; llama.cpp's yarn keys (rope.scaling.*) make transformers
    5.23's load_gguf_checkpoint fail (it reads each field's first part, the key's length, and calls
    float() on that array), so metadata_from_config does not write them (yarn scaling is not carried)."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    from helpers.gguf_models import write_gguf_with_gguf_py
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.AutoConfig.for_model(
        "gpt_oss",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=64,
        tie_word_embeddings=False,
    )
    names = ["token_embd.weight", "output.weight"]
    md = ggufmeta.metadata_from_config(cfg.to_dict(), names)
    assert not any(".rope.scaling." in k for k in md)
    assert md["gpt-oss.attention.sliding_window"] == md["gpt-oss.sliding_window"] == ("u32", 64)
    zeros = {n: np.zeros((4, 4), np.float32) for n in names}
    path = write_gguf_with_gguf_py(tmp_path / "m.gguf", "gpt-oss", zeros, md)
    theirs = load_gguf_checkpoint(str(path))["config"]
    assert ggufmeta.config_from_metadata(md, names) == theirs
    assert (
        theirs["model_type"] == "gpt_oss"
        and theirs["num_local_experts"] == 4
        and theirs["sliding_window"] == 64
    )
    md["gpt-oss.rope.scaling.type"] = ("str", "yarn")
    md["gpt-oss.rope.scaling.factor"] = ("f32", 32.0)
    path = write_gguf_with_gguf_py(tmp_path / "y.gguf", "gpt-oss", zeros, md)
    with pytest.raises(TypeError):
        load_gguf_checkpoint(str(path))
    assert ggufmeta.config_from_metadata(md, names)["rope_scaling"] == {"rope_type": "yarn", "factor": 32.0}
