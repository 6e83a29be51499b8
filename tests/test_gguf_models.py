"""GGUF written by convspec (issue 18's tests): for each architecture that builds here, a tiny model
saved as transformers saves it is converted to GGUF by `convspec convert ARCH hf/ model.gguf` in
F32, F16, BF16 and Q8_0, then

(a) read back by gguf-py: llama.cpp's names (the harness's, from gguf-py's TensorNameMap), shapes and
    the types llama.cpp's converter chooses;
(b) loaded by transformers' own GGUF path (`from_pretrained(dir, gguf_file=...)`): equal to the model
    for float types (bit for bit for F32; as the model rounded to F16/BF16 for those), and to
    transformers' loading of gguf-py's own Q8_0 file of the same model for Q8_0;
(c) converted back to a Hugging Face folder by convspec: bit-identical to the original for F32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="GGUF needs gguf-py: pip install 'convspec[gguf]'")
pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
pytest.importorskip("transformers", reason="the oracle is transformers' GGUF loader")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers.gguf_models import (  # noqa: E402
    LOADED,
    auto_class,
    gguf_tensors,
    tiny_model,
    write_gguf_with_gguf_py,
)
from safetensors.torch import load_file  # noqa: E402

from convspec import ggufmeta  # noqa: E402

ARCHS = LOADED
T = gguf.GGMLQuantizationType
# GGUF tensors computed with exp (`-exp(A_log)`): torch's float32 exp, which convspec runs, and numpy's,
# which the harness (as llama.cpp) runs, may differ in the last bit
TRANSCENDENTAL = ("ssm_a",)
# the architectures whose GGUF layout stores values a float rounds (w + 1 norms, -exp(A_log)): exact in
# float32 on the tiny models' values, rounded in bfloat16
ROUNDS = ("gemma2", "gemma3", "nemotron", "mamba", "qwen35", "qwen35moe")


def same_array(name: str, got: np.ndarray, want: np.ndarray) -> bool:
    if name.endswith(TRANSCENDENTAL) and got.dtype == np.float32:
        return bool(np.allclose(got, want, rtol=2**-23, atol=0))
    return bool(np.array_equal(got, want))


def expected_names(model, arch: str, want: dict) -> set[str]:
    """llama.cpp's names for the model, less the output a tied model leaves to the embedding (llama.cpp
    writes gpt2's and bloom's anyway, as a copy)."""
    names = set(want)
    if getattr(model.config, "tie_word_embeddings", False):
        names.discard("output.weight")
    return names


def hf_folder(model, d: Path) -> Path:
    """The model as transformers saves it (the layout of a checkpoint on the Hub)."""
    model.save_pretrained(d)
    return d


def read(path: Path) -> dict[str, tuple[tuple[int, ...], int, np.ndarray]]:
    """A GGUF file as gguf-py reads it: name -> (torch-order shape, type, data)."""
    r = gguf.GGUFReader(str(path))
    return {
        t.name: (tuple(int(n) for n in reversed(t.shape)), int(t.tensor_type), np.asarray(t.data))
        for t in r.tensors
    }


def loaded(path: Path, arch: str, dtype=torch.float32) -> dict[str, torch.Tensor]:
    model = auto_class(arch).from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.state_dict()


def convert(arch: str, src: Path, dst: Path, *extra: str) -> None:
    from convspec.cli import main

    assert main(["convert", arch, str(src), str(dst), "--quiet", *extra]) == 0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per arch: its tiny float32 model and the model's folder, made once."""
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(arch.replace("-", "_"))
        model = tiny_model(arch)
        out[arch] = (model, hf_folder(model, d / "hf"))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_gguf_by_convspec_loads_in_transformers_and_comes_back(arch, built, tmp_path):
    model, hf = built[arch]
    path = tmp_path / "model.gguf"
    convert(arch, hf, path, "--allow-lossy")
    # (a) gguf-py reads llama.cpp's names and shapes, every tensor F32
    ours = read(path)
    want = gguf_tensors(model, arch)
    assert set(ours) == expected_names(model, arch, want)
    for name in ours:
        shape, ggml_type, data = ours[name]
        assert shape == want[name].shape and ggml_type == T.F32, name
        assert same_array(name, data, want[name].astype(np.float32)), name
    # (b) transformers loads it as the model, bit for bit
    got, orig = loaded(path, arch), model.state_dict()
    assert set(got) == set(orig)
    bad = [k for k in orig if not torch.equal(got[k], orig[k])]
    assert not bad, bad[:5]
    # (c) and back to the Hugging Face folder, tensor for tensor
    back = tmp_path / "back"
    convert(arch, path, back)
    tensors = {}
    for f in sorted(back.glob("*.safetensors")):
        tensors |= load_file(f)
    saved = {}
    for f in sorted(hf.glob("*.safetensors")):
        saved |= load_file(f)
    assert set(tensors) == set(saved)
    bad = [k for k in saved if not torch.equal(tensors[k], saved[k])]
    assert not bad, bad[:5]
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == ggufmeta.model_type(arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_and_bf16(arch, built, tmp_path):
    """F16 (--gguf-type f16) and BF16 (a bfloat16 model's own dtype): 2-D tensors in that type,
    1-D ones F32, and transformers loads the model as rounded to that type."""
    model, hf = built[arch]
    convert(arch, hf, tmp_path / "h.gguf", "--gguf-type", "f16", "--allow-lossy")
    types = {n: t for n, (_, t, _) in read(tmp_path / "h.gguf").items()}
    assert T.F16 in set(types.values()) and all(t in (T.F16, T.F32) for t in types.values())
    got = loaded(tmp_path / "h.gguf", arch)
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v) or torch.equal(got[k], v.half().float()), k
    bf = tiny_model(arch, torch.bfloat16)
    hf16 = hf_folder(bf, tmp_path / "hf16")
    convert(arch, hf16, tmp_path / "b.gguf", "--allow-lossy")
    types = {n: t for n, (_, t, _) in read(tmp_path / "b.gguf").items()}
    assert T.BF16 in set(types.values())
    got = loaded(tmp_path / "b.gguf", arch, torch.bfloat16)
    if arch in ROUNDS:  # w + 1 or -exp(x) rounded to bfloat16 on the way, as llama.cpp's converter does
        bad = [k for k, v in bf.state_dict().items() if not torch.allclose(got[k], v, rtol=2**-7, atol=2**-7)]
    else:
        bad = [k for k, v in bf.state_dict().items() if not torch.equal(got[k], v)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_equals_gguf_py_quantizing_the_same_model(arch, built, tmp_path):
    """--gguf-type q8_0 writes the blocks gguf-py writes for the same model (llama.cpp's F32 list and
    F16 fallback included), so transformers loads the two files alike."""
    model, hf = built[arch]
    convert(arch, hf, tmp_path / "q.gguf", "--gguf-type", "q8_0", "--allow-lossy")
    tensors = gguf_tensors(model, arch)
    write_gguf_with_gguf_py(tmp_path / "ref.gguf", arch, tensors, {}, "Q8_0")
    ours, ref = read(tmp_path / "q.gguf"), read(tmp_path / "ref.gguf")
    assert set(ours) == expected_names(model, arch, ref)
    for name in ours:
        shape, ggml_type, data = ref[name]
        assert ours[name][:2] == (shape, ggml_type), name
        assert same_array(name, ours[name][2], data), name
    got, want = loaded(tmp_path / "q.gguf", arch), model.state_dict()
    assert set(got) == set(want)


def _llama_with_tokenizer(path: Path) -> None:
    """A one-layer llama GGUF file with a small SentencePiece-style vocabulary, as llama.cpp writes one."""
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += ["▁", "a", "b", "c", "▁a", "▁b", "ab", "▁ab", "abc"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(toks) - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(toks) - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tensor("token_embd.weight", np.zeros((len(toks), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_tokenizer_is_written_as_transformers_reads_it(tmp_path, capsys):
    """A GGUF file's tokenizer comes out as tokenizer.json (transformers' own GGUF tokenizer conversion),
    which encodes as transformers' tokenizer of the file; the way back keeps the file's metadata."""
    from transformers import AutoTokenizer

    _llama_with_tokenizer(tmp_path / "tok.gguf")
    convert("llama", tmp_path / "tok.gguf", tmp_path / "hf")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    text = "abc ab a cab"
    want = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf").encode(text)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == want
    convert("llama", tmp_path / "hf", tmp_path / "back.gguf")
    assert (tmp_path / "back.gguf").read_bytes() == (tmp_path / "tok.gguf").read_bytes()


def test_without_transformers_the_tokenizer_is_a_note(tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    _llama_with_tokenizer(tmp_path / "tok.gguf")
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    convert("llama", tmp_path / "tok.gguf", tmp_path / "hf")
    err = capsys.readouterr().err
    assert (
        "note: tok.gguf's tokenizer was not written as tokenizer.json (transformers is not installed" in err
    )
    assert (
        not (tmp_path / "hf" / "tokenizer.json").exists()
        and (tmp_path / "hf" / "gguf_metadata.json").exists()
    )


def test_an_edited_config_changes_the_metadata_written_back(tmp_path):
    """The kept metadata is written back as it was only while config.json says the same; an edit wins."""
    _llama_with_tokenizer(tmp_path / "tok.gguf")
    convert("llama", tmp_path / "tok.gguf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    convert("llama", tmp_path / "hf", tmp_path / "back.gguf")
    fields = gguf.GGUFReader(str(tmp_path / "back.gguf")).fields
    assert fields["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(1e-6)
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 268  # the kept tokenizer is still there


def test_a_k_quant_file_reads_as_transformers_loads_it(tmp_path):
    """A llama file of Q4_K and Q6_K blocks (as a Q4_K_M file mixes them) with F32 norms: convspec's
    Hugging Face folder is transformers' GGUF load, tensor for tensor, bit for bit (both dequantize
    with gguf-py; the q/k rows are permuted after)."""
    from test_ggml_ops import Q4_K, Q6_K, _k_blocks
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    tensors = gguf_tensors(model, "llama")
    metadata = ggufmeta.metadata_from_config(config.to_dict(), tensors)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for key, (type_, value) in metadata.items():
        if key != "general.architecture":
            {"u32": w.add_uint32, "f32": w.add_float32, "str": w.add_string}[type_](key, value)
    types = {}
    for i, (name, a) in enumerate(tensors.items()):
        if a.ndim == 2:
            t = Q6_K if name in ("output.weight", "blk.0.attn_v.weight") else Q4_K
            blocks = _k_blocks(t, a.shape[0] * a.shape[1] // 256, seed=i).reshape(a.shape[0], -1)
            w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType(t))
            types[name] = t
        else:
            w.add_tensor(name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert set(types.values()) == {Q4_K, Q6_K}
    convert("llama", tmp_path / "k.gguf", tmp_path / "hf")
    ours = load_file(tmp_path / "hf" / "model.safetensors")
    theirs = loaded(tmp_path / "k.gguf", "llama")
    assert set(ours) == set(theirs)
    bad = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not bad, bad[:5]
