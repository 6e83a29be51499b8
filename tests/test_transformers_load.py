"""Differential with data: a tiny MixtralForCausalLM saved by transformers (original per-expert layout),
loaded by convspec, equals transformers' from_pretrained; the inverse save reproduces the saved file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import convspec

transformers = pytest.importorskip("transformers")


def tiny_config(experts: int):
    return transformers.MixtralConfig(
        num_local_experts=experts,
        intermediate_size=24,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config(11)
    model = transformers.MixtralForCausalLM(cfg)
    d = tmp_path_factory.mktemp("hf") / "tiny-mixtral"
    model.save_pretrained(d)
    return cfg, d


def test_saved_file_is_in_the_original_layout(saved):
    _, d = saved
    keys = set(load_file(str(d / "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.experts.10.w1.weight" in keys


def test_load_into_meta_model_equals_from_pretrained(saved):
    cfg, d = saved
    ref = transformers.MixtralForCausalLM.from_pretrained(d).state_dict()
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(cfg)
    plan = convspec.compile("mixtral", config=d / "config.json")
    report = plan.load_into(model, d, strict=False)
    assert report.unexpected == [] and report.mismatched == []
    sd = model.state_dict()
    # lm_head is tied to nothing here; every key transformers loaded must match bit for bit
    assert set(sd) == set(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref if k not in report.missing)
    assert report.missing == []


def test_inverse_save_reproduces_the_saved_tensors(saved, tmp_path):
    _, d = saved
    model = transformers.MixtralForCausalLM.from_pretrained(d)
    plan = convspec.compile("mixtral", config=d / "config.json")
    plan.inverse().save(model.state_dict(), tmp_path / "out")
    original = load_file(str(d / "model.safetensors"))
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_strict_load_into_refuses_a_model_that_would_keep_random_weights(saved):
    cfg, d = saved
    bigger = transformers.MixtralConfig(**{**cfg.to_dict(), "num_hidden_layers": 3})
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(bigger)
    with pytest.raises(convspec.ConvspecError) as exc:
        convspec.compile("mixtral").load_into(model, d, strict=True)
    assert "model.layers.2." in str(exc.value) and "missing" in str(exc.value)


def test_base_model_checkpoint_fills_a_model_with_a_head(tmp_path):
    """The spec's `base_prefix: model` lets a MixtralModel checkpoint (keys without `model.`) fill a
    MixtralForCausalLM, and a causal-LM checkpoint fill a bare MixtralModel; only the head is left."""
    cfg = tiny_config(4)
    torch.manual_seed(1)
    base = transformers.MixtralModel(cfg)
    base.save_pretrained(tmp_path / "base")
    saved = load_file(tmp_path / "base" / "model.safetensors")
    assert not any(k.startswith("model.") for k in saved)
    plan = convspec.compile("mixtral", config=tmp_path / "base" / "config.json")
    assert plan.base_prefix == "model"
    with torch.device("meta"):
        lm = transformers.MixtralForCausalLM(cfg)
    report = plan.load_into(lm, tmp_path / "base", strict=False)
    assert report.missing == ["lm_head.weight"] and not report.unexpected and not report.mismatched
    for k, v in base.state_dict().items():
        assert torch.equal(lm.state_dict()[f"model.{k}"], v), k

    lm_full = transformers.MixtralForCausalLM(cfg)
    lm_full.save_pretrained(tmp_path / "lm")
    with torch.device("meta"):
        bare = transformers.MixtralModel(cfg)
    report = plan.load_into(bare, tmp_path / "lm", strict=False)
    assert report.unexpected == ["lm_head.weight"] and not report.missing
    for k, v in bare.state_dict().items():
        assert torch.equal(v, lm_full.state_dict()[f"model.{k}"]), k


def test_a_meta_model_runs_after_load_into_its_non_persistent_buffers_computed(saved):
    cfg, d = saved
    ref = transformers.MixtralForCausalLM.from_pretrained(d)
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(cfg)
    report = convspec.compile("mixtral", config=d / "config.json").load_into(model, d, strict=True)
    assert report.ok and report.on_meta == []
    assert not [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    buffers = dict(ref.named_buffers())
    assert all(torch.equal(t, buffers[k]) for k, t in model.named_buffers())  # rotary inv_freq
    x = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(model(x).logits, ref(x).logits)


def test_a_plain_module_is_told_which_buffers_no_checkpoint_fills():
    from convspec.load_into import LoadError, load_into

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("freq", torch.ones(2), persistent=False)

    with torch.device("meta"):
        net = Net()
    items = [("lin.weight", torch.zeros(2, 2)), ("lin.bias", torch.zeros(2))]
    report = load_into(net, items, strict=False)
    assert report.on_meta == ["freq"] and not report.ok
    assert "left on meta (the model cannot run): freq" in str(report)
    with torch.device("meta"):
        net = Net()
    with pytest.raises(LoadError):
        load_into(net, items, strict=True)


def test_an_already_converted_checkpoint_loads_as_transformers_loads_it(saved, tmp_path):
    """A fused checkpoint (what convert writes) loads into the model; transformers loads it too."""
    cfg, d = saved
    convspec.convert("mixtral", d, tmp_path / "fused")
    ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "fused").state_dict()
    plan = convspec.compile("mixtral", config=d / "config.json")
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(cfg)
    report = plan.load_into(model, tmp_path / "fused", strict=True)
    fused = load_file(str(tmp_path / "fused" / "model.safetensors"))
    original = load_file(str(d / "model.safetensors"))
    assert report.ok and report.already == len(set(fused) - set(original)) > 0
    assert "were in the target layout already" in str(report)
    sd = model.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
