"""LoRA adapters of tiny real models, made by PEFT on the original layout and converted by the base
model's spec (issue 19): per-expert Mixtral and Qwen2-MoE to fused experts, Phi-3's fused q/k/v and
gate/up to Llama's and back, Meta's rope order to transformers'. The oracles are PEFT's and
transformers': PEFT's own transformers-v5 conversion of MoE adapters, transformers + PEFT outputs of
the original model with the original adapter, and PEFT's merge of the original adapter, converted as
the base is (the base conversions are checked against transformers and hand conversions). Each
adapter also comes back byte for byte, and `convspec verify --base` passes both ways."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from helpers import lora_models as lm
from safetensors.torch import load_file

import convspec
from convspec.cli import main

pytest.importorskip("transformers")
pytest.importorskip("peft")

SPECS = Path(__file__).resolve().parent / "specs"
PHI3_LLAMA, LLAMA_PHI3 = str(SPECS / "phi3_llama.yaml"), str(SPECS / "llama_phi3.yaml")
LLAMA_META = str(SPECS / "llama_meta.yaml")
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
FP32 = dict(rtol=1e-5, atol=1e-5)


class Case:
    """One tiny model and its adapter, both converted by `spec`: the transformers classes of the
    original and converted layouts (None: a layout transformers has no class for) and configs."""

    def __init__(self, root: Path, spec: str, tiny: lm.Tiny, classes, config, model=None):
        self.spec, self.tiny, self.model = spec, tiny, model
        self.classes, self.config = classes, config  # (original class, converted class), converted config
        self.adapter = root / "converted"
        self.base = root / "converted_base"
        convspec.convert(spec, tiny.adapter, self.adapter, base=tiny.base)
        convspec.convert(spec, tiny.base, self.base)

    def converted_base(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.base / "model.safetensors"))

    def converted_factors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.adapter / WEIGHTS))


def _make(name: str, root: Path) -> Case:
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    if name in ("mixtral", "qwen2_moe"):
        tiny, model = getattr(lm, name)(root)
        return Case(root, name, tiny, (None, type(model)), tiny.config, model=model)
    if name == "phi3_to_llama":
        return Case(root, PHI3_LLAMA, lm.phi3(root), (Phi3ForCausalLM, LlamaForCausalLM), lm.llama_config())
    if name == "llama_to_phi3":
        return Case(root, LLAMA_PHI3, lm.llama(root), (LlamaForCausalLM, Phi3ForCausalLM), lm.phi3_config())
    assert name == "meta_llama"
    tiny = lm.meta_llama(root)
    return Case(root, LLAMA_META, tiny, (None, LlamaForCausalLM), tiny.config)


NAMES = ["mixtral", "qwen2_moe", "phi3_to_llama", "llama_to_phi3", "meta_llama"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """`made(name)`: the model made and converted once for the module (the tests only read its files)."""
    cases: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cases:
            cases[name] = _make(name, tmp_path_factory.mktemp(name))
        return cases[name]

    return get


@pytest.fixture(scope="module", params=NAMES)
def case(request, made) -> Case:
    return made(request.param)


def _peft(model, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).eval()


def _targets(raw: dict) -> dict:
    """An adapter config with its target lists as sets (their order is PEFT's set order)."""
    out = dict(raw)
    for key in ("target_modules", "target_parameters"):
        if isinstance(out.get(key), list):
            out[key] = set(out[key])
    return out


# round trip and verify: every model


def test_round_trip_is_byte_identical(case, tmp_path):
    """Original adapter -> converted -> back: the same adapter_model.safetensors byte for byte, and
    the same adapter config (target lists compared as sets)."""
    back = tmp_path / "back"
    convspec.convert(case.spec, case.adapter, back, base=case.base, reverse=True)
    assert filecmp.cmp(case.tiny.adapter / WEIGHTS, back / WEIGHTS, shallow=False)
    original = json.loads((case.tiny.adapter / CONFIG).read_text())
    assert _targets(json.loads((back / CONFIG).read_text())) == _targets(original)


def test_verify_passes_both_ways(case, capsys):
    """`convspec verify SPEC ADAPTER --base BASE` on the original pair, and its reverse on the
    converted pair: the round trip bit for bit and the float64 merge check."""
    assert main(["verify", case.spec, str(case.tiny.adapter), "--base", str(case.tiny.base)]) == 0
    assert main(["verify", case.spec, str(case.adapter), "--base", str(case.base), "--reverse"]) == 0
    out = capsys.readouterr().out
    assert out.count("comes back bit for bit") == 2 and out.count("merging then converting") == 2, out


def test_merging_commutes_with_converting_exactly_in_float64(case):
    """The issue's merge property with PEFT's merge, not convspec's: the original adapter merged by
    PEFT into the original base (float64), converted by the spec's plan, equals the converted base
    with the converted adapter merged by PEFT, bit for bit (renames, stacks, permutations, splits
    and block-diagonal joins add only exact zeros)."""
    plan = convspec.compile(case.spec, config=case.tiny.config)
    original, converted = case.classes
    one = plan.apply(lm.merged64(case.tiny.state, case.tiny.adapter, original, case.tiny.config))
    two = lm.merged64(plan.apply(case.tiny.state), case.adapter, converted, case.config)
    assert one.keys() == two.keys()
    assert [k for k in one if not torch.equal(one[k], two[k])] == []
    base = plan.apply({k: v.to(torch.float64) for k, v in case.tiny.state.items()})
    assert [k for k in base if not torch.equal(base[k], two[k])]  # the adapter changed weights


def test_the_converted_adapter_changes_the_model(case):
    """The adapters are not zero: every converted factor has non-zero entries (a zero B would make
    every logits comparison below pass whatever the conversion did)."""
    factors = case.converted_factors()
    assert factors and all(t.abs().max() > 0 for t in factors.values())


# a. and b. per-expert MoE: PEFT's own v5 conversion is the oracle


@pytest.fixture
def peft_converts_qwen2_moe(monkeypatch):
    """PEFT 0.21.2 has Qwen2-MoE's tables (_MOE_TARGET_MODULE_MAPPING, _MOE_FUSED_TARGETS) but maps
    only mixtral to them, so PeftModel.from_pretrained converts the tensors of a per-expert Qwen2-MoE
    adapter and not its config: the experts' factors are silently left out. Turned on here, PEFT's
    own conversion is the oracle for Qwen2-MoE as for Mixtral."""
    from peft.utils import transformers_weight_conversion as twc

    monkeypatch.setitem(twc._MODEL_TO_CONVERSION_PATTERN, "qwen2_moe", "qwen2_moe")


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_adapter_equals_peft_conversion(made, name, peft_converts_qwen2_moe):
    """convspec's converted tensors are exactly those of PEFT's
    `convert_peft_adapter_state_dict_for_transformers`."""
    from peft import LoraConfig
    from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers

    c = made(name)
    original = load_file(str(c.tiny.adapter / WEIGHTS))
    model = type(c.model)(c.tiny.config)
    ref = convert_peft_adapter_state_dict_for_transformers(
        model, LoraConfig.from_pretrained(str(c.tiny.adapter)), dict(original)
    )
    got = c.converted_factors()
    assert set(got) == set(ref)
    assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_adapter_config_equals_peft_conversion(made, name, peft_converts_qwen2_moe):
    """The converted adapter config says what PEFT's own conversion of the config says, which PEFT
    makes as it loads the original adapter onto the v5 model."""
    c = made(name)
    loaded = _peft(lm.model_with(type(c.model), c.tiny.config, c.model.state_dict()), c.tiny.adapter)
    peft_config = loaded.peft_config["default"]
    ours = json.loads((c.adapter / CONFIG).read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        assert ours[key] == getattr(peft_config, key), key
    for key in ("target_modules", "target_parameters"):
        assert set(ours[key]) == set(getattr(peft_config, key)), key


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_logits_match_peft_loading_the_original(made, name, peft_converts_qwen2_moe):
    """The v5 model (fused experts) with convspec's converted base and adapter gives the logits of the
    v5 model transformers made, with PEFT loading the ORIGINAL adapter through its own conversion."""
    c = made(name)
    cls, base = type(c.model), c.converted_base()
    assert base.keys() == c.model.state_dict().keys()
    assert all(torch.equal(base[k], v) for k, v in c.model.state_dict().items())
    ref = lm.logits(_peft(lm.model_with(cls, c.tiny.config, c.model.state_dict()), c.tiny.adapter))
    got = lm.logits(_peft(lm.model_with(cls, c.tiny.config, base), c.adapter))
    plain = lm.logits(lm.model_with(cls, c.tiny.config, base))
    assert not torch.allclose(ref, plain, **FP32)  # the adapter matters
    torch.testing.assert_close(got, ref, **FP32)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_logits_match_transformers_loading_the_merged_original(made, name, tmp_path):
    """Another oracle, without PEFT's conversion: the original adapter merged by PEFT into the
    per-expert base, loaded by transformers' own `from_pretrained` (which fuses the experts), gives
    the logits of the converted base with the converted adapter."""
    c = made(name)
    cls = type(c.model)
    lm.save_base(lm.merged(c.tiny.state, c.tiny.adapter), c.tiny.config, tmp_path / "merged")
    ref = lm.logits(cls.from_pretrained(str(tmp_path / "merged")).eval())
    got = lm.logits(_peft(lm.model_with(cls, c.tiny.config, c.converted_base()), c.adapter))
    torch.testing.assert_close(got, ref, **FP32)


# c. fused q/k/v and gate/up (Phi-3) <-> separate projections (Llama), both ways


def test_phi3_and_llama_compute_one_function(tmp_path):
    """The fixture's premise: Phi-3 and Llama configured alike, with Phi-3's weights split by hand,
    give the same logits; and the fixture spec splits the base as the hand split does."""
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    tiny = lm.phi3(tmp_path)
    split = lm.split_phi3(tiny.state, tiny.config)
    phi3 = lm.logits(lm.model_with(Phi3ForCausalLM, tiny.config, tiny.state))
    llama = lm.logits(lm.model_with(LlamaForCausalLM, lm.llama_config(), split))
    torch.testing.assert_close(llama, phi3, **FP32)
    convspec.convert(PHI3_LLAMA, tiny.base, tmp_path / "llama")
    got = load_file(str(tmp_path / "llama" / "model.safetensors"))
    assert got.keys() == split.keys() and all(torch.equal(got[k], split[k]) for k in split)


def test_phi3_adapter_on_llama(made):
    """An adapter on Phi-3's qkv_proj / gate_up_proj moved to Llama: each part's B is a slice of the
    fused B and every part shares the fused A; Llama with it gives Phi-3 + adapter's logits."""
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    c = made("phi3_to_llama")
    original, factors = load_file(str(c.tiny.adapter / WEIGHTS)), c.converted_factors()
    pre = "base_model.model.model.layers.0"
    a = original[f"{pre}.self_attn.qkv_proj.lora_A.weight"]
    b = original[f"{pre}.self_attn.qkv_proj.lora_B.weight"]
    parts = [factors[f"{pre}.self_attn.{n}_proj.lora_B.weight"] for n in "qkv"]
    assert all(torch.equal(factors[f"{pre}.self_attn.{n}_proj.lora_A.weight"], a) for n in "qkv")
    assert torch.equal(torch.cat(parts), b)
    assert json.loads((c.adapter / CONFIG).read_text())["r"] == lm.R
    ref = lm.logits(_peft(lm.model_with(Phi3ForCausalLM, c.tiny.config, c.tiny.state), c.tiny.adapter))
    got = lm.logits(_peft(lm.model_with(LlamaForCausalLM, lm.llama_config(), c.converted_base()), c.adapter))
    torch.testing.assert_close(got, ref, **FP32)


def test_llama_adapter_on_phi3(made):
    """An adapter on Llama's q/k/v and gate/up (an A each) moved to Phi-3: A concatenated along the
    rank, B block-diagonal, the fused rank (and the alpha keeping the scaling) in rank_pattern /
    alpha_pattern; Phi-3 with it gives Llama + adapter's logits."""
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    c = made("llama_to_phi3")
    original, factors = load_file(str(c.tiny.adapter / WEIGHTS)), c.converted_factors()
    pre = "base_model.model.model.layers.1"
    a = factors[f"{pre}.self_attn.qkv_proj.lora_A.weight"]
    b = factors[f"{pre}.self_attn.qkv_proj.lora_B.weight"]
    parts = [f"{pre}.self_attn.{n}_proj" for n in "qkv"]
    assert torch.equal(a, torch.cat([original[f"{p}.lora_A.weight"] for p in parts]))
    assert torch.equal(b, torch.block_diag(*[original[f"{p}.lora_B.weight"] for p in parts]))
    config = json.loads((c.adapter / CONFIG).read_text())
    assert config["rank_pattern"] == {r".*\.qkv_proj": 3 * lm.R, r".*\.gate_up_proj": 2 * lm.R}
    assert config["alpha_pattern"] == {r".*\.qkv_proj": 3 * lm.ALPHA, r".*\.gate_up_proj": 2 * lm.ALPHA}
    ref = lm.logits(_peft(lm.model_with(LlamaForCausalLM, c.tiny.config, c.tiny.state), c.tiny.adapter))
    got = lm.logits(_peft(lm.model_with(Phi3ForCausalLM, lm.phi3_config(), c.converted_base()), c.adapter))
    torch.testing.assert_close(got, ref, **FP32)


def test_llama_adapter_on_phi3_by_the_reverse_of_the_split(made, tmp_path):
    """`convert phi3_llama LLAMA_ADAPTER --reverse`: the Llama adapter fused onto Phi-3 as
    `llama_phi3` fuses it (A along the rank, B block-diagonal)."""
    c = made("llama_to_phi3")
    out = tmp_path / "phi3"
    r = convspec.convert(PHI3_LLAMA, c.tiny.adapter, out, base=c.tiny.base, reverse=True)
    assert "the parts' A's differ" in r.notes[0]  # not the output of a forward conversion: said
    got, want = load_file(str(out / WEIGHTS)), c.converted_factors()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# d. Meta's rope order -> transformers'


def test_meta_base_matches_transformers_permute(made):
    """The fixture spec's `permute_rope` has the direction of transformers' convert_llama_weights_to_hf
    `permute`: the converted Meta base is the hand conversion, bit for bit."""
    c = made("meta_llama")
    want, got = lm.meta_to_hf(c.tiny.state, c.tiny.config), c.converted_base()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_meta_adapter_on_transformers_llama(made):
    """The Meta adapter moved to transformers' Llama (rows of wq/wk's B permuted, the embedding and
    the output renamed) gives the logits of the original adapter merged by PEFT into the Meta base,
    converted by hand."""
    from transformers import LlamaForCausalLM

    c = made("meta_llama")
    oracle = lm.meta_to_hf(lm.merged(c.tiny.state, c.tiny.adapter), c.tiny.config)
    ref = lm.logits(lm.model_with(LlamaForCausalLM, c.tiny.config, oracle))
    got = lm.logits(_peft(lm.model_with(LlamaForCausalLM, c.tiny.config, c.converted_base()), c.adapter))
    plain = lm.logits(lm.model_with(LlamaForCausalLM, c.tiny.config, c.converted_base()))
    assert not torch.allclose(ref, plain, **FP32)
    torch.testing.assert_close(got, ref, **FP32)
    config = json.loads((c.adapter / CONFIG).read_text())
    assert set(config["target_modules"]) == {
        *lm.ATTENTION,
        "gate_proj",
        "up_proj",
        "down_proj",
        "embed_tokens",
        "lm_head",
    }
