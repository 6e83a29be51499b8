"""Differential: on the meta device, convspec's plans agree with transformers' own conversion mapping.

transformers' model state_dict is the converted layout; `revert_weight_conversion` gives the original
(on-disk) layout. Our forward plan must map original -> converted exactly, and the inverse back.
"""

from __future__ import annotations

import pytest
import torch

import convspec

transformers = pytest.importorskip("transformers")
from transformers.core_model_loading import revert_weight_conversion  # noqa: E402

CASES = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            num_local_experts=10,
            intermediate_size=24,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=11,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=12,
            intermediate_size=20,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=4,
            moe_intermediate_size=8,
            intermediate_size=20,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            num_experts=4,
            intermediate_size=8,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        ),
    ),
}


def _layouts(model_type: str):
    cfg_cls, model_cls, kwargs = CASES[model_type]
    config = getattr(transformers, cfg_cls)(**kwargs)
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(config)
    converted = model.state_dict()
    original = revert_weight_conversion(model, dict(converted))
    return config, converted, original


def _sig(sd: dict) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_forward_matches_transformers(model_type):
    config, converted, original = _layouts(model_type)
    assert set(original) != set(converted), "the mapping must change something for this test to mean anything"
    plan = convspec.compile(convspec.load_spec(model_type), config=config)
    out = plan.apply(original)
    assert _sig(out) == _sig(converted)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_inverse_matches_transformers(model_type):
    config, converted, original = _layouts(model_type)
    plan = convspec.compile(convspec.load_spec(model_type), config=config)
    assert _sig(plan.inverse().apply(converted)) == _sig(original)


def test_bind_agrees_with_apply_on_meta():
    _, converted, original = _layouts("mixtral")
    plan = convspec.compile("mixtral")
    bound = plan.bind({k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in original.items()})
    assert {k: (tuple(s), d) for k, (s, d) in bound.outputs.items()} == {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in converted.items()
    }
