"""The GGUF specs (specs/gguf_<arch>.yaml): what the importer writes now, compiled; the names their
inverse writes are gguf-py TensorNameMap's; their forward plan, on a GGUF-named state dict made the way
llama.cpp's convert_hf_to_gguf.py makes it, gives the keys save_pretrained writes (the Hub's layout) and,
fused as transformers fuses that layout on load, what transformers' own GGUF loading gives on the same
arrays (its TensorProcessor, or its GGUF_ARCHS ops), bit for bit."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import convspec  # noqa: E402
from convspec.hf.gguf_import import (  # noqa: E402
    ARCHS,
    CONVERT_CHECKED,
    EXACT,
    FILE_CHECKED,
    NO_SPEC,
    ROUND_TRIP,
    SAVED_CHECKED,
    VALUE_CHECKED,
    import_arch,
    spec_name,
    spec_text,
    tiny_model,
)
from convspec.hf.gguf_saved import saved_inverse, saved_key  # noqa: E402

SPECS = Path(__file__).resolve().parent.parent / "specs"
ARCH_NAMES = list(ARCHS)


@pytest.fixture(scope="module")
def models():
    """The tiny meta model of every architecture, built once."""
    return {a: tiny_model(ARCHS[a].model_type, ARCHS[a].tiny, ARCHS[a].kind) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_the_spec_is_what_the_importer_writes(arch):
    """specs/gguf_*.yaml are generated: `convspec import-transformers --gguf ARCH -o specs/...`."""
    path = SPECS / f"{spec_name(arch)}.yaml"
    assert path.read_text() == spec_text(import_arch(arch)), f"regenerate {path.name}"


def test_every_gguf_spec_file_has_an_architecture():
    """No stale GGUF spec, and the architectures without one are the ones the importer says why of."""
    files = {p.stem for p in SPECS.glob("gguf_*.yaml")}
    assert files == {spec_name(a) for a in ARCHS}
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf import GGUF_ARCHS

    wanted = (set(GGUF_CONFIG_MAPPING) | set(GGUF_ARCHS)) - {"general", "tokenizer"}
    covered = {a.replace("-", "_") for a in ARCHS} | {ARCHS[a].model_type for a in ARCHS}
    assert wanted - covered == set(NO_SPEC)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_compiles_with_the_models_config_both_ways(arch, models):
    plan = convspec.compile(spec_name(arch), models[arch].config)
    assert plan.inverse(allow_lossy=True).rules


# ---- names: the inverse writes gguf-py's names -------------------------------------------------------


def _arch_key(arch: str):
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


# HF keys gguf-py's TensorNameMap names otherwise than llama.cpp writes them (its converters rename or
# split these before the map is asked): HF leaf -> GGUF names with `{base}` the map's name for the key
_SPLIT = {"experts.gate_up_proj": ["{g}.weight", "{u}.weight"], "experts.down_proj": ["{base}.weight"]}
_RENAMED = {
    "linear_attn.dt_bias": "blk.{bid}.ssm_dt.bias",
    "mlp.e_score_correction_bias": "blk.{bid}.exp_probs_b.bias",
}


def gguf_names(arch: str, model) -> dict[str, list[str]]:
    """HF key -> the GGUF tensor name(s) llama.cpp gives it, by gguf-py's TensorNameMap."""
    nm = gguf.get_tensor_name_map(_arch_key(arch), model.config.num_hidden_layers)
    out: dict[str, list[str]] = {}
    taken: set[str] = set()
    keys = list(model.state_dict())
    # transformers asks for each key, then for it under each of the model's children (bloom's
    # BloomModel), never giving a name twice (t5's encoder.embed_tokens is `shared`'s token_embd)
    for depth in range(max(k.count(".") for k in keys) + 1):
        for k in keys:
            if k in out or depth > k.count("."):
                continue
            names = _names(nm, k, depth)
            if names and not set(names) & taken:
                out[k] = names
                taken |= set(names)
    return out


def _names(nm, k: str, depth: int) -> list[str] | None:
    base, suffix = (
        (k.rsplit(".", 1)[0], "." + k.rsplit(".", 1)[1]) if k.endswith((".weight", ".bias")) else (k, "")
    )
    bid = next((s for s in k.split(".") if s.isdigit()), None)
    leaf = next((x for x in _RENAMED if k.endswith(x)), None)
    if leaf:
        return [_RENAMED[leaf].format(bid=bid)]
    name = nm.get_name(".".join(base.split(".")[depth:]))
    split = next((x for x in _SPLIT if k.endswith(x)), None)
    if split and (name or split == "experts.gate_up_proj"):
        g, u = f"blk.{bid}.ffn_gate_exps", f"blk.{bid}.ffn_up_exps"
        return [t.format(base=name, g=g, u=u) for t in _SPLIT[split]]
    return [name + suffix] if name else None


def _meta_state(model) -> dict:
    return {
        k: torch.empty(v.shape, dtype=torch.float32, device="meta") for k, v in model.state_dict().items()
    }


def _inverse_of_builtin(arch: str):
    """transformers' conversion mapping as convspec's built-in spec, inverted: state_dict -> saved."""
    return saved_inverse(ARCHS[arch].model_type)


def to_saved_layout(arch: str, state: dict) -> dict:
    """A state_dict-keyed state in the layout save_pretrained writes (per-expert keys for the MoE archs)."""
    inv = _inverse_of_builtin(arch)
    return state if inv is None else inv.apply(state)


def to_state_dict_layout(arch: str, state: dict) -> dict:
    """A saved-layout state fused as transformers fuses it on load (its conversion mapping, which
    convspec's built-in spec for the model type encodes: tests/test_conformance.py checks those)."""
    inv = _inverse_of_builtin(arch)
    return state if inv is None else inv.inverse().apply(state)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_the_inverse_writes_gguf_py_names(arch, models):
    """Every HF key the spec maps (in the saved layout) is written under the name gguf-py's
    TensorNameMap gives it; every other key passes through (the spec's header lists them)."""
    model = models[arch]
    plan = convspec.compile(spec_name(arch), model.config)
    saved = to_saved_layout(arch, _meta_state(model))
    out = plan.inverse(allow_lossy=True).apply(saved)
    names = gguf_names(arch, model)
    text = (SPECS / f"{spec_name(arch)}.yaml").read_text()
    passed = {k for k in out if k in saved}
    header = " ".join(line.lstrip("# ") for line in text.split("\nspec:")[0].splitlines())
    for k in passed:  # a key left as it is: the header names it and says why
        assert re.sub(r"\.(\d+)\.", ".{i}.", k, count=1) in header, k
    inv = _inverse_of_builtin(arch)
    expected = {n for k, ns in names.items() if saved_key(k, inv) not in passed for n in ns}
    assert set(out) - passed == expected
    if arch == "gpt-oss":
        assert {k for k in passed if ".experts." in k}  # transformers loads none of them (see the note)


# ---- values: forward on llama.cpp's layout == transformers' GGUF loading -------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (HF -> GGUF) for q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tile(w: np.ndarray, nk: int, per: int, hd: int, offset: int = 0, dim: int = 0) -> np.ndarray:
    """llama.cpp's qwen3.5 value heads: grouped by key head -> tiled, from `offset` on along `dim`."""
    w = np.moveaxis(w, dim, 0)
    head, tail = w[:offset], w[offset:]
    tail = tail.reshape(nk, per, hd, *tail.shape[1:]).swapaxes(0, 1).reshape(tail.shape)
    return np.moveaxis(np.concatenate([head, tail]), 0, dim)


def llama_cpp(arch: str, key: str, w: np.ndarray, cfg) -> list[np.ndarray]:
    """convert_hf_to_gguf.py's modify_tensors for one HF tensor: its GGUF array(s)."""
    if arch == "llama" and key.endswith("q_proj.weight"):
        return [_permute(w, cfg.num_attention_heads)]
    if arch == "llama" and key.endswith("k_proj.weight"):
        return [_permute(w, cfg.num_key_value_heads)]
    if arch in ("gemma2", "gemma3", "nemotron") and key.endswith("norm.weight"):
        return [w + 1]
    if arch == "bloom" and "query_key_value" in key:
        n, e = cfg.n_head, cfg.hidden_size
        q = w.reshape(n, 3, e // n, *w.shape[1:])
        return [np.concatenate([q[:, j].reshape(-1, *w.shape[1:]) for j in range(3)])]
    if arch == "gpt2" and key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return [w.T.copy()]
    if arch == "mamba" and key.endswith("A_log"):
        return [-np.exp(w)]
    if key.endswith(("conv1d.weight", "conv.conv.weight")) and arch in ("mamba", "lfm2"):
        return [w.squeeze(1)]
    if key.endswith("experts.gate_up_proj"):
        return list(np.split(w, 2, axis=1))
    if key.endswith("shared_expert_gate.weight"):
        return [w.squeeze(0)]
    if arch.startswith("qwen35"):
        return [_qwen35(key, w, cfg)]
    return [w]


def _qwen35(key: str, w: np.ndarray, c) -> np.ndarray:
    nk, per = c.linear_num_key_heads, c.linear_num_value_heads // c.linear_num_key_heads
    hd, qk = c.linear_value_head_dim, 2 * c.linear_key_head_dim * c.linear_num_key_heads
    if key.endswith("norm.weight") and "linear_attn.norm" not in key:
        return w + 1
    if key.endswith("A_log"):
        return _tile(-np.exp(w), nk, per, 1)
    if key.endswith(("dt_bias", "in_proj_a.weight", "in_proj_b.weight")):
        return _tile(w, nk, per, 1)
    if key.endswith("in_proj_z.weight"):
        return _tile(w, nk, per, hd)
    if key.endswith("in_proj_qkv.weight"):
        return _tile(w, nk, per, hd, qk)
    if key.endswith("conv1d.weight"):
        return _tile(w.squeeze(1), nk, per, hd, qk)
    if key.endswith("out_proj.weight"):
        return _tile(w, nk, per, hd, dim=1)
    return w


def gguf_state(arch: str, model, seed: int = 0) -> tuple[dict, dict]:
    """Random HF tensors of the model's shapes, and the GGUF-named arrays llama.cpp writes for them."""
    g = torch.Generator().manual_seed(seed)
    hf = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    if arch == "mamba":
        hf = {k: v.abs() + 0.5 if k.endswith("A_log") else v for k, v in hf.items()}
    names = gguf_names(arch, model)
    out = {}
    for k, v in hf.items():
        if k not in names or (arch == "gpt-oss" and ".experts." in k):
            continue
        for n, a in zip(names[k], llama_cpp(arch, k, v.numpy(), model.config), strict=True):
            out[n] = np.ascontiguousarray(a, dtype=np.float32)
    return hf, out


def transformers_load(arch: str, model, arrays: dict) -> dict:
    """What transformers' GGUF loading makes of these arrays (its load_gguf_checkpoint loop, or its
    GGUF_ARCHS converters), without a file."""
    from transformers.integrations.gguf import GGUF_ARCHS

    if arch in GGUF_ARCHS:
        return _new_path(arch, model, arrays)
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    proc = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    mapping = get_gguf_hf_weights_map(model, proc)
    parsed = {"tensors": {}}
    for name, w in arrays.items():
        r = proc.process(weights=w, name=name, tensor_key_mapping=mapping, parsed_parameters=parsed)
        if r.name in mapping:
            parsed["tensors"][mapping[r.name]] = torch.from_numpy(np.copy(r.weights))
    return parsed["tensors"]


def _new_path(arch: str, model, arrays: dict) -> dict:
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    from transformers.integrations.gguf import GGUF_ARCHS

    mapping = GGUF_ARCHS[arch](model.config)
    ren = [t for t in mapping if isinstance(t, WeightRenaming) and not isinstance(t, WeightConverter)]
    conv = [t for t in mapping if isinstance(t, WeightConverter)]
    groups: dict[str, dict] = {}
    for name, w in arrays.items():
        hf, pattern = rename_source_key(name, copy.deepcopy(ren), copy.deepcopy(conv))
        groups.setdefault(hf, {})[pattern] = torch.from_numpy(np.copy(w))
    out = {}
    for hf, srcs in groups.items():
        if None in srcs:
            out[hf] = srcs[None]
            continue
        c = next(c for c in conv if next(iter(srcs)) in c.source_patterns)
        d = {p: [t] for p, t in srcs.items()}
        for op in c.operations:
            d = op.convert(d, c.source_patterns, c.target_patterns)
        (out[hf],) = d.values()
    return out


@pytest.mark.parametrize("arch", VALUE_CHECKED)
def test_forward_equals_transformers_gguf_loading(arch, models):
    """The forward plan on llama.cpp's arrays gives transformers' tensors, bit for bit; where no op
    rounds, it gives back the HF tensors themselves, and the inverse gives back llama.cpp's arrays."""
    model = models[arch]
    hf, arrays = gguf_state(arch, model)
    expected = transformers_load(arch, model, arrays)
    plan = convspec.compile(spec_name(arch), model.config)
    saved = plan.apply({k: torch.from_numpy(v) for k, v in arrays.items()})
    got = to_state_dict_layout(arch, saved)
    assert set(got) == set(expected)
    for k, v in expected.items():
        if arch == "mamba" and k.endswith("A_log"):
            # MambaTensorProcessor takes np.log in float32, 1 ulp off torch.log on some elements;
            # log_neg is torch.log(-x), as transformers' own LogNegate (qwen3.5) computes it
            (name,) = gguf_names(arch, model)[k]
            assert torch.equal(got[k], torch.log(-torch.from_numpy(arrays[name]))), k
            assert (got[k].view(torch.int32) - v.view(torch.int32)).abs().max() <= 1, k
            continue
        assert got[k].shape == v.shape and torch.equal(got[k], v), k
        assert torch.allclose(got[k], hf[k], atol=1e-5), k  # and it is the model's own tensor
    if arch in EXACT:
        assert all(torch.equal(got[k], hf[k]) for k in got)
        back = plan.inverse().apply(saved)
        assert set(back) == set(arrays)
        assert all(np.array_equal(back[k].numpy(), arrays[k]) for k in arrays)


def test_llama_is_gqa_here(models):
    """The llama check above covers grouped-query attention: k's rows permute per kv head."""
    c = models["llama"].config
    assert c.num_key_value_heads < c.num_attention_heads


def test_conformance_md_has_the_gguf_section():
    """docs/conformance.md ends with the GGUF section as the importer renders it now (tools/conformance.py
    appends it when it writes the page); its claims are the checks above."""
    from convspec.hf.gguf_import import conformance_section

    text = (SPECS.parent / "docs" / "conformance.md").read_text()
    assert text.endswith("\n\n" + conformance_section()), "regenerate: python tools/conformance.py"


def test_the_cli_writes_a_gguf_spec(tmp_path, capsys):
    """`convspec import-transformers --gguf ARCH -o FILE` writes what specs/ has; an architecture with
    no spec is one clear error, exit 2."""
    from convspec.cli import main

    out = tmp_path / "gguf_qwen2moe.yaml"
    assert main(["import-transformers", "--gguf", "qwen2moe", "-o", str(out)]) == 0
    assert out.read_text() == (SPECS / "gguf_qwen2moe.yaml").read_text()
    capsys.readouterr()
    assert main(["import-transformers", "--gguf", "deci"]) == 2
    err = capsys.readouterr().err
    assert "no GGUF spec for architecture 'deci'" in err and "remote code" in err and "Traceback" not in err


def _write_gguf(arch: str, model, arrays: dict, path: Path) -> None:
    """A GGUF file written by gguf-py: the tiny config as the metadata transformers reads, F32 tensors."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    w = gguf.GGUFWriter(str(path), arch)
    for key, attr in GGUF_CONFIG_MAPPING[ARCHS[arch].model_type.removesuffix("_text")].items():
        v = getattr(model.config, attr, None) if attr else None
        if isinstance(v, int) and not isinstance(v, bool):
            w.add_uint32(f"{arch}.{key}", v)
        elif isinstance(v, float):
            w.add_float32(f"{arch}.{key}", v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(model.config.vocab_size)])
    for k, a in arrays.items():
        w.add_tensor(k, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", FILE_CHECKED)
def test_the_oracle_is_transformers_loading_a_file_gguf_py_wrote(arch, models, tmp_path):
    """What transformers_load gives is what `from_pretrained(gguf_file=...)` gives on a file gguf-py
    wrote with the same arrays, tensor for tensor: so the forward plan equals transformers' GGUF load."""
    import contextlib
    import io

    import transformers

    model = models[arch]
    _, arrays = gguf_state(arch, model)
    _write_gguf(arch, model, arrays, tmp_path / "m.gguf")
    cls = (
        transformers.AutoModelForSeq2SeqLM
        if ARCHS[arch].kind == "seq2seq"
        else transformers.AutoModelForCausalLM
    )
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = cls.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).state_dict()
    expected = transformers_load(arch, model, arrays)
    assert [k for k in expected if not torch.equal(loaded[k], expected[k])] == []
    got = convspec.compile(spec_name(arch), model.config).apply(
        {k: torch.from_numpy(v) for k, v in arrays.items()}
    )
    got = to_state_dict_layout(arch, got)
    differ = [k for k in got if not torch.equal(got[k], loaded[k])]
    assert differ == ([k for k in got if k.endswith("A_log")] if arch == "mamba" else [])  # 1 ulp, above


@pytest.mark.parametrize("arch", CONVERT_CHECKED)
def test_convert_of_a_gguf_py_file_equals_transformers_load(arch, tmp_path):
    """`convspec convert gguf FILE out/` on the oracle harness's file (tests/helpers/gguf_models.py,
    written by gguf-py as llama.cpp lays tensors out) writes the layout save_pretrained writes, which
    fused as transformers fuses it is what transformers' from_pretrained(gguf_file=) loads, bit for bit,
    and from_pretrained(out/) loads that too; only weights the loaded model ties to another are not
    written."""
    import contextlib
    import io

    from helpers.gguf_models import auto_class, write_tiny_gguf
    from safetensors.torch import load_file

    from convspec.cli import main

    _, path = write_tiny_gguf(tmp_path, arch)
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = (
            auto_class(arch).from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
        )
        assert main(["convert", "gguf", str(path), str(tmp_path / "out")]) == 0
    files = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(f).items()}
    got = to_state_dict_layout(arch, files)
    assert [k for k in got if k not in loaded or not torch.equal(got[k], loaded[k])] == []
    ptrs = [v.data_ptr() for k, v in loaded.items() if k in got]
    assert [k for k, v in loaded.items() if k not in got and v.data_ptr() not in ptrs] == []
    with contextlib.redirect_stderr(io.StringIO()):
        ours = auto_class(arch).from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    assert [k for k in loaded if not torch.equal(ours[k], loaded[k])] == []


# ---- the Hugging Face side is the layout save_pretrained writes ----------------------------------------


def _saved_keys(model, path: Path) -> set[str]:
    from safetensors import safe_open

    model.save_pretrained(path)
    keys = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys |= set(fh.keys())
    return keys


def test_saved_and_round_trip_cover_what_they_should(models):
    """`saved` is checked for every architecture of the oracle harness; `round trip` for every one whose
    saved layout is not its state_dict (the importer composed its experts)."""
    from helpers.gguf_models import TINY

    assert set(SAVED_CHECKED) == set(TINY) & set(ARCHS)
    changed = {
        a for a in ARCHS if set(to_saved_layout(a, _meta_state(models[a]))) != set(models[a].state_dict())
    }
    assert changed == set(ROUND_TRIP)


@pytest.mark.parametrize("arch", SAVED_CHECKED)
def test_forward_gives_the_keys_save_pretrained_writes(arch, tmp_path):
    """The forward plan on the tiny model's GGUF tensors gives exactly the keys `save_pretrained`
    writes for it (weights it ties to another are written by neither). gpt-oss's experts have no rule
    (its spec's header says why), and its sinks are `blk.N.attn_sinks` in transformers' name map where
    llama.cpp writes `blk.N.attn_sinks.weight`: they are left out on both sides."""
    from helpers.gguf_models import gguf_tensors
    from helpers.gguf_models import tiny_model as harness_model

    model = harness_model(arch)
    saved = _saved_keys(model, tmp_path)
    arrays = gguf_tensors(model, arch)
    meta = {k: torch.empty(v.shape, device="meta") for k, v in arrays.items()}
    out = set(convspec.compile(spec_name(arch), model.config).apply(meta))
    if arch == "gpt-oss":  # no expert rule; transformers' name map wants `attn_sinks`, the harness writes
        out = {k for k in out if "_exps" not in k and "attn_sinks" not in k}  # llama.cpp's `.weight` suffix
        saved = {k for k in saved if ".experts." not in k and not k.endswith(".sinks")}
    sd = model.state_dict()
    tied = {k for k in out - saved if any(sd[k].data_ptr() == sd[s].data_ptr() for s in saved if s in sd)}
    assert out - tied == saved
    assert tied <= {"lm_head.weight"}


@pytest.mark.parametrize("arch", ROUND_TRIP)
def test_a_saved_moe_checkpoint_round_trips_through_gguf(arch, tmp_path):
    """`convspec convert ARCH <save_pretrained dir> out.gguf`, then `convspec convert ARCH out.gguf back/`,
    gives the saved tensors back bit for bit (per-expert keys stacked, then unstacked: byte moves), and
    transformers loads back/ as it loads the gguf-py file of the same model (or, where it cannot load that
    file, see tests/helpers/gguf_models.py TINY, as the model itself)."""
    import contextlib
    import io

    from helpers.gguf_models import auto_class, write_tiny_gguf
    from safetensors.torch import load_file

    from convspec.cli import main

    model, path = write_tiny_gguf(tmp_path, arch)
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        lossy = ["--allow-lossy"] if arch not in EXACT else []  # w + 1 norms, -exp(A_log): this file is exact
        assert main(["convert", arch, str(hf), str(tmp_path / "out.gguf"), *lossy]) == 0
        assert main(["convert", arch, str(tmp_path / "out.gguf"), str(tmp_path / "back")]) == 0
    saved = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}
    back = {k: v for f in sorted((tmp_path / "back").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(back) == set(saved) and any(".experts.0." in k for k in saved)
    assert [k for k in saved if not torch.equal(back[k], saved[k])] == []
    with contextlib.redirect_stderr(io.StringIO()):
        ours = auto_class(arch).from_pretrained(tmp_path / "back", dtype=torch.float32).state_dict()
        if arch in ("qwen2moe", "qwen3moe"):  # transformers does not read their expert widths from GGUF
            expected = model.state_dict()
        else:
            expected = (
                auto_class(arch)
                .from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
                .state_dict()
            )
    assert set(ours) == set(expected)
    assert [k for k in expected if not torch.equal(ours[k], expected[k])] == []


def test_the_importer_refuses_what_it_cannot_compose():
    """A rule whose expression the built-in spec's inverse does not start by undoing is an importer error
    that names the key and the rule, not a guessed rule."""
    from convspec.errors import ConvspecError
    from convspec.hf.gguf_import import Entry
    from convspec.hf.gguf_saved import to_saved

    inv = saved_inverse("qwen2_moe")
    fine = Entry([("x", "blk.0.ffn_down_exps.weight")], "model.layers.0.mlp.experts.down_proj")
    (got,) = to_saved([fine], inv)
    assert (got.target, got.expr) == ("model.layers.0.mlp.experts.{e}.down_proj.weight", "unstack(x, over=e)")
    odd = Entry(fine.sources, fine.target, "transpose(x, dim0=1, dim1=2)")
    with pytest.raises(ConvspecError, match=r"cannot compose model\.layers\.0\.mlp\.experts\.down_proj"):
        to_saved([odd], inv)
