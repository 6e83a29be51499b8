"""Differential with data, tiny configs: for each model type, a tiny model saved by transformers
(`save_pretrained` reverts transformers' conversion, so the file is in the ORIGINAL checkpoint layout)
is loaded by convspec with the model type's built-in spec and must equal transformers' own
`from_pretrained` tensor for tensor (keys, shapes, dtypes, bits); `load_into` a meta model must give
the same parameters; and the inverse plan must write the saved tensors back bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import convspec

transformers = pytest.importorskip("transformers")

# Every model is well under 1 MB of float32 parameters (the largest, llava, is ~70 KB).
_ATTN = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
    # token ids inside the tiny vocabulary (some defaults, e.g. olmoe's eos 50279, are not)
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# model type -> (transformers model class, or None for AutoModelForCausalLM; config kwargs)
CASES: dict[str, tuple[str | None, dict]] = {
    "mixtral": (None, dict(_ATTN, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        None,
        dict(
            _ATTN,
            intermediate_size=20,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=12,
            num_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3_moe": (
        None,
        dict(
            _ATTN,
            intermediate_size=20,
            moe_intermediate_size=8,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=4,
        ),
    ),
    "deepseek_v3": (
        None,
        dict(
            _ATTN,
            intermediate_size=24,
            moe_intermediate_size=8,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,  # layer 0 dense MLP, layer 1 MoE: both layouts are exercised
            kv_lora_rank=8,
            q_lora_rank=12,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=4,
        ),
    ),
    "olmoe": (None, dict(_ATTN, intermediate_size=8, num_experts=4, num_experts_per_tok=2)),
    "phimoe": (None, dict(_ATTN, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "jamba": (
        None,
        dict(
            _ATTN,
            intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            # layer 0: mamba + dense MLP; layer 1: attention + MoE
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_d_conv=4,
            mamba_expand=2,
        ),
    ),
    "granitemoe": (None, dict(_ATTN, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "lfm2_moe": (
        None,
        dict(
            _ATTN,
            intermediate_size=24,
            moe_intermediate_size=8,
            num_experts=4,
            num_experts_per_tok=2,
            num_dense_layers=1,  # layer 0 dense, layer 1 MoE
            # the default (None) does not build; one short-conv layer and one attention layer
            layer_types=["conv", "full_attention"],
            # tie_word_embeddings defaults to True here: the one tied case of the list
        ),
    ),
    "llava": (
        "LlavaForConditionalGeneration",
        dict(
            text_config=dict(
                model_type="llama",
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=128,
                max_position_embeddings=64,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=16,
                patch_size=8,
                projection_dim=16,
            ),
            image_token_id=100,
        ),
    ),
}

# A model type that cannot work gets `pytest.mark.xfail(strict=True, reason=<the error>)` here.
XFAIL: dict[str, str] = {}


def _params():
    return [
        pytest.param(mt, marks=pytest.mark.xfail(strict=True, reason=XFAIL[mt])) if mt in XFAIL else mt
        for mt in CASES
    ]


def _model_class(model_type: str):
    cls, _ = CASES[model_type]
    return getattr(transformers, cls) if cls else transformers.AutoModelForCausalLM


def _build(model_type: str, config):
    cls, _ = CASES[model_type]
    if cls:
        return getattr(transformers, cls)(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def _read_safetensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, single file or sharded with an index."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        part = load_file(str(d / name))
        assert not set(part) & set(out), f"{name} repeats keys"
        out.update(part)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def _assert_bit_equal(got: dict, want: dict, what: str):
    assert sorted(got) == sorted(want), (
        f"{what}: only in got {sorted(set(got) - set(want))[:8]}, only in want {sorted(set(want) - set(got))[:8]}"
    )
    bad = [
        k
        for k in want
        if tuple(got[k].shape) != tuple(want[k].shape)
        or got[k].dtype != want[k].dtype
        or not torch.equal(_bits(got[k]), _bits(want[k]))
    ]
    assert not bad, f"{what}: {len(bad)} tensors differ: {bad[:8]}"


@pytest.fixture(scope="module", params=_params())
def case(request, tmp_path_factory):
    """(model type, config, checkpoint dir, reference state dict, keys the checkpoint cannot hold)."""
    model_type = request.param
    _, kwargs = CASES[model_type]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = _build(model_type, config).float()
    assert sum(p.numel() for p in model.parameters()) * 4 < 1_000_000
    orig = tmp_path_factory.mktemp(model_type) / "orig"
    model.save_pretrained(orig)
    ref, info = _model_class(model_type).from_pretrained(orig, dtype=torch.float32, output_loading_info=True)
    # the reference itself loaded cleanly: nothing left at random init, nothing dropped
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref_sd = ref.state_dict()
    # Keys of ref.state_dict() the checkpoint cannot contain. state_dict() already leaves out
    # non-persistent buffers (rotary inv_freq, ...); what remains are tied weights: save_pretrained
    # writes one tensor per storage, so with tie_word_embeddings the tied target (lm_head.weight)
    # is not in the file and from_pretrained re-ties it to its source. transformers lists exactly
    # these as `all_tied_weights_keys` (target -> source); check each really shares the source's
    # storage in the reference, so the exclusion is a fact about the data, not a guess.
    tied = dict(ref.all_tied_weights_keys)
    for target, source in tied.items():
        assert ref_sd[target].data_ptr() == ref_sd[source].data_ptr(), (target, source)
    return model_type, config, orig, ref_sd, set(tied)


def _plan(model_type: str, orig: Path) -> convspec.Plan:
    return convspec.compile(convspec.load_spec(model_type), config=orig / "config.json")


def test_load_equals_from_pretrained(case):
    model_type, _, orig, ref_sd, tied = case
    sd = _plan(model_type, orig).load(orig)
    # the saved layout differs from the loaded one, so the spec has real work to do here
    assert set(sd) != set(_read_safetensors(orig))
    want = {k: v for k, v in ref_sd.items() if k not in tied}
    _assert_bit_equal(sd, want, f"{model_type}: convspec load vs from_pretrained")


def test_load_into_meta_model_equals_from_pretrained(case):
    model_type, config, orig, ref_sd, tied = case
    with torch.device("meta"):
        model = _build(model_type, config)
    report = _plan(model_type, orig).load_into(model, orig, strict=False)
    assert report.unexpected == [] and report.mismatched == []
    # the checkpoint fills every persistent parameter/buffer except the tied targets
    assert set(report.missing) == tied
    # load_into assigns new Parameters on a meta model, which unties; tie again as transformers does
    model.tie_weights()
    got = model.state_dict()
    assert not [k for k, v in got.items() if v.is_meta]
    _assert_bit_equal(got, ref_sd, f"{model_type}: load_into vs from_pretrained")


def test_inverse_save_reproduces_the_saved_checkpoint(case, tmp_path):
    model_type, _, orig, _, _ = case
    plan = _plan(model_type, orig)
    sd = plan.load(orig)
    plan.inverse().save(sd, tmp_path / "back")
    _assert_bit_equal(
        _read_safetensors(tmp_path / "back"),
        _read_safetensors(orig),
        f"{model_type}: inverse save vs original",
    )
