"""The GGUF oracle harness (tests/helpers/gguf_models.py) holds: for each arch, transformers' own GGUF
loader (`from_pretrained(dir, gguf_file=...)`) loads the file gguf-py writes from the tiny model's
tensors, transformed as llama.cpp's converter does, back into the tiny model, bit for bit."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf", reason="the GGUF oracle needs gguf-py (pip install gguf)")
pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
pytest.importorskip("transformers", reason="the GGUF oracle is transformers' GGUF loader")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers.gguf_models import LOADED, auto_class, gguf_tensors, tiny_model, write_tiny_gguf  # noqa: E402

from convspec import ggufmeta  # noqa: E402

ARCHS = LOADED


def _load(tmp_path, path, dtype=torch.float32, arch="llama"):
    return auto_class(arch).from_pretrained(tmp_path, gguf_file=path.name, dtype=dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_the_harness_file_bit_for_bit(arch, tmp_path):
    model, path = write_tiny_gguf(tmp_path, arch)
    loaded = _load(tmp_path, path, arch=arch)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name
    assert type(loaded).__name__ == ggufmeta.causal_lm(arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_files_load_bit_for_bit(arch, tmp_path):
    """A float16 model written F16 (1-D tensors F32, as llama.cpp keeps them) loads back exactly."""
    model, path = write_tiny_gguf(tmp_path, arch, dtype=torch.float16)
    got = _load(tmp_path, path, dtype=torch.float16, arch=arch).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(got[name].to(torch.float16), tensor), name


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_files_load_close_with_norms_exact(arch, tmp_path):
    """Q8_0 (2-D and 3-D tensors in blocks of 32 along rows, as llama.cpp quantizes them): transformers
    loads every tensor in its shape, within Q8_0's rounding, and the F32 ones (norms, biases) exactly."""
    model, path = write_tiny_gguf(tmp_path, arch, qtype="Q8_0")
    got = _load(tmp_path, path, arch=arch).state_dict()
    for name, tensor in model.state_dict().items():
        assert got[name].shape == tensor.shape, name
        if tensor.ndim == 1:
            assert torch.equal(got[name], tensor), name
        else:
            assert torch.allclose(got[name], tensor, atol=2e-3, rtol=0), name


def test_gpt_oss_transformers_loads_all_but_the_experts_and_sinks(tmp_path):
    """transformers 5.23 cannot load llama.cpp's gpt-oss experts or attention sinks: its gpt-oss tensor
    processor is registered under `gpt_oss` while files say `gpt-oss`, and its name map looks for
    `blk.N.ffn_down_exps` / `blk.N.attn_sinks` without the `.weight` llama.cpp writes. Those come back
    newly initialized (reported missing); every other tensor loads bit for bit."""
    from transformers import AutoModelForCausalLM

    model, path = write_tiny_gguf(tmp_path, "gpt-oss")
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32, output_loading_info=True
    )
    lost = {k for k in model.state_dict() if ".mlp.experts." in k or k.endswith("self_attn.sinks")}
    assert set(info["missing_keys"]) == lost and len(lost) == 10
    got = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        if name not in lost:
            assert torch.equal(got[name], tensor), name
    t = gguf_tensors(model, "gpt-oss")  # llama.cpp's layout, for convspec's own gpt-oss spec
    assert t["blk.0.ffn_gate_exps.weight"].shape == (4, 32, 64) and t["blk.0.ffn_up_exps.bias"].shape == (
        4,
        32,
    )
    assert t["blk.0.ffn_down_exps.weight"].shape == (4, 64, 32) and "blk.0.attn_sinks.weight" in t
    gate_up = model.state_dict()["model.layers.0.mlp.experts.gate_up_proj"].numpy()  # [E, H, 2I], interleaved
    assert np.array_equal(t["blk.0.ffn_up_exps.weight"], gate_up[:, :, 1::2].swapaxes(1, 2))


def test_mistral_is_a_llama_file_named_mistral_which_transformers_cannot_load(tmp_path):
    """llama.cpp writes mistral as `llama` (q/k rows permuted); transformers reads such a file's config
    as mistral only when general.name is exactly `mistral`, which metadata_from_config writes for a
    mistral config. transformers 5.23 then fails to load the weights: its GGUF name map asks gguf-py
    for an architecture `mistral`, which gguf-py does not have (NotImplementedError)."""
    from helpers.gguf_models import TINY, write_gguf_with_gguf_py
    from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**TINY["llama"]), dtype=torch.float32).eval()
    tensors = gguf_tensors(model, "llama")
    md = ggufmeta.metadata_from_config(model.config.to_dict(), tensors)
    assert md["general.architecture"] == ("str", "llama") and md["general.name"] == ("str", "mistral")
    path = write_gguf_with_gguf_py(tmp_path / "m.gguf", "llama", tensors, md)
    config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    assert type(config).__name__ == "MistralConfig" and config.num_key_value_heads == 2
    with pytest.raises(NotImplementedError, match="mistral"):
        AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)


@pytest.mark.parametrize("arch", ["lfm2", "qwen35", "gpt2"])
def test_gguf_py_reads_back_the_declared_types(arch, tmp_path):
    """The file holds each metadata key in the type ggufmeta declares (arrays with their element type)."""
    import gguf

    model = tiny_model(arch)
    tensors = gguf_tensors(model, arch)
    md = ggufmeta.metadata_from_config(model.config.to_dict(), tensors)
    path = write_tiny_gguf(tmp_path, arch)[1]
    short = {
        "UINT32": "u32",
        "INT32": "i32",
        "FLOAT32": "f32",
        "STRING": "str",
        "BOOL": "bool",
        "ARRAY": "arr",
    }
    fields = gguf.GGUFReader(path).fields
    for key, (type_, value) in md.items():
        assert ":".join(short[t.name] for t in fields[key].types) == type_, key
        got = fields[key].contents()
        assert got == value or (type_ == "f32" and np.float32(got) == np.float32(value)), key


def test_umt5_is_a_t5_file_named_umt5(tmp_path):
    """llama.cpp writes umt5 as `t5`; transformers loads it as umt5 when general.name contains `umt5`,
    which metadata_from_config writes for a umt5 config. Every layer's relative attention bias loads."""
    from helpers.gguf_models import TINY, write_gguf_with_gguf_py
    from transformers import AutoModelForSeq2SeqLM, UMT5Config

    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(UMT5Config(**TINY["t5"]), dtype=torch.float32).eval()
    tensors = gguf_tensors(model, "t5")
    md = ggufmeta.metadata_from_config(model.config.to_dict(), tensors)
    assert md["general.architecture"] == ("str", "t5") and md["general.name"] == ("str", "umt5")
    path = write_gguf_with_gguf_py(tmp_path / "m.gguf", "t5", tensors, md)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert type(loaded).__name__ == "UMT5ForConditionalGeneration"
    got = loaded.state_dict()
    assert set(got) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(got[name], tensor), name


def test_names_are_gguf_pys():
    """The harness names every tensor as gguf-py's TensorNameMap does; the arch-specific layouts."""
    t = gguf_tensors(tiny_model("llama"), "llama")
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight"} <= set(t)
    t = gguf_tensors(tiny_model("qwen2moe"), "qwen2moe")
    assert t["blk.0.ffn_gate_exps.weight"].shape == (4, 1408, 64)  # [experts, rows, cols] in torch order
    assert t["blk.0.ffn_down_exps.weight"].shape == (4, 64, 1408)
    assert t["blk.0.ffn_gate_inp_shexp.weight"].shape == (64,)
    t = gguf_tensors(tiny_model("mamba"), "mamba")
    assert t["blk.0.ssm_conv1d.weight"].shape == (128, 4) and (t["blk.0.ssm_a"] < 0).all()
    t = gguf_tensors(tiny_model("gemma2"), "gemma2")
    assert "output.weight" not in t  # tied: llama.cpp writes no output for gemma


def test_llama_q_k_rows_are_permuted_gqa_aware():
    model = tiny_model("llama")
    t = gguf_tensors(model, "llama")
    k = model.state_dict()["model.layers.0.self_attn.k_proj.weight"].numpy()  # 2 kv heads of 16 rows
    g = t["blk.0.attn_k.weight"]
    # head 0: HF rows [0..7 | 8..15] (the two rope halves) -> GGML pairs (0, 8), (1, 9), ...
    assert np.array_equal(g[0], k[0]) and np.array_equal(g[1], k[8]) and np.array_equal(g[16], k[16])


def test_q8_0_file_loads_as_transformers_dequantizes_it(tmp_path):
    """Q8_0: 2-D tensors quantized by gguf.quants as llama.cpp does, 1-D ones F32 (exact)."""
    import gguf

    model, path = write_tiny_gguf(tmp_path, "qwen2", qtype="Q8_0")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    loaded = _load(tmp_path, path).state_dict()
    want = model.state_dict()
    assert torch.equal(
        loaded["model.layers.0.input_layernorm.weight"], want["model.layers.0.input_layernorm.weight"]
    )
    q = want["model.layers.0.self_attn.q_proj.weight"].numpy()
    expected = gguf.quants.dequantize(
        gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    assert np.array_equal(loaded["model.layers.0.self_attn.q_proj.weight"].numpy(), expected)
    assert not np.array_equal(expected, q)  # lossy, as declared


def test_bf16_file_loads_bit_for_bit(tmp_path):
    model, path = write_tiny_gguf(tmp_path, "llama", dtype=torch.bfloat16)
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["output_norm.weight"] == "F32"
    loaded = _load(tmp_path, path, dtype=torch.bfloat16).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name].to(torch.bfloat16), tensor), name
