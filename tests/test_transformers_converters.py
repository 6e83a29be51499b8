"""Converters that keep a key's name but change its tensor, with data: transformers' `from_pretrained`
against convspec's built-in spec, tensor for tensor.

The importer once called such a converter inert (its target is its source's own name, so nothing
seemed to happen) and left it out. The only ones in transformers' mapping are qwen3_vl_moe's two
`Transpose(1, 2, check_dims=True)`: Qwen3-VL-MoE checkpoints store the routed experts as
`[experts, hidden, 2 * moe_intermediate]` (gate_up) and `[experts, moe_intermediate, hidden]` (down),
the model holds them transposed. transformers transposes only when the shapes differ; the spec
always does, so a square tensor is transposed too (transformers loads that one as it is).

`save_pretrained` cannot make the original checkpoint here: its revert compares each tensor with
the model's own parameter, which always has the same shape, and writes the model's layout. The
original checkpoint is the model's tensors with the expert dims swapped, as those checkpoints are.

Every other converter of the mapping is translated into a rule and checked by the conformance run,
except one the importer cannot express (qwen4_exp_text's concatenation of a collection of shards):
the last test loads it with data too, and convspec refuses it rather than loading it wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convspec

transformers = pytest.importorskip("transformers")

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _config(hidden: int, moe_intermediate: int):
    text = dict(
        hidden_size=hidden,
        intermediate_size=24,
        moe_intermediate_size=moe_intermediate,
        num_experts=2,
        num_experts_per_tok=1,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        vocab_size=64,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 0]},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=16,
        num_heads=2,
        patch_size=4,
        temporal_patch_size=1,
        spatial_merge_size=1,
        out_hidden_size=hidden,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=60)


def _is_expert(key: str) -> bool:
    return key.endswith(EXPERTS)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def _differing(got: dict, want: dict) -> list[str]:
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))[:8]
    return sorted(
        k
        for k in want
        if tuple(got[k].shape) != tuple(want[k].shape)
        or got[k].dtype != want[k].dtype
        or not torch.equal(_bits(got[k]), _bits(want[k]))
    )


def _checkpoint(tmp_path, hidden: int, moe_intermediate: int):
    """(config, the model's own state dict, a checkpoint dir in the original layout)."""
    config = _config(hidden, moe_intermediate)
    torch.manual_seed(0)
    model = transformers.Qwen3VLMoeForConditionalGeneration(config).float()
    assert sum(p.numel() for p in model.parameters()) * 4 < 1_000_000
    d = tmp_path / "orig"
    model.save_pretrained(d)
    saved = load_file(str(d / "model.safetensors"))
    experts = [k for k in saved if _is_expert(k)]
    assert len(experts) == 4  # two layers, two tensors each
    # what save_pretrained wrote is the model's layout (see the module docstring): swap the dims
    sd = model.state_dict()
    assert all(torch.equal(saved[k], sd[k]) for k in experts)
    original = {k: (v.transpose(1, 2).contiguous() if _is_expert(k) else v) for k, v in saved.items()}
    save_file(original, str(d / "model.safetensors"), metadata={"format": "pt"})
    return config, {k: v for k, v in sd.items() if k in saved}, d


def _plan(d) -> convspec.Plan:
    return convspec.compile(convspec.load_spec("qwen3_vl_moe"), config=d / "config.json")


def test_the_spec_states_the_transpose():
    plan = convspec.compile("qwen3_vl_moe")
    ops = [(n.op, dict(n.params)) for r in plan.rules for n in r.nodes]
    assert ops == [("transpose", {"dim0": 1, "dim1": 2})] * 2, ops


@pytest.mark.parametrize("hidden", [16], ids=["gate_up [2, 8, 16] from [2, 16, 8]"])
def test_load_equals_from_pretrained(tmp_path, hidden):
    config, model_sd, d = _checkpoint(tmp_path, hidden, moe_intermediate=4)
    original = load_file(str(d / "model.safetensors"))
    gate_up = next(k for k in original if k.endswith(EXPERTS[0]))
    assert tuple(original[gate_up].shape) == (2, 16, 8) and tuple(model_sd[gate_up].shape) == (2, 8, 16)

    ref, info = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(
        d, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref_sd = {k: v for k, v in ref.state_dict().items() if k in model_sd}
    assert _differing(ref_sd, model_sd) == []  # transformers transposed them back

    got = _plan(d).load(d)
    assert _differing(got, ref_sd) == []

    with torch.device("meta"):
        meta = transformers.Qwen3VLMoeForConditionalGeneration(config)
    report = _plan(d).load_into(meta, d, strict=False)
    assert report.unexpected == [] and report.mismatched == [] and report.missing == []
    into = {k: v for k, v in meta.state_dict().items() if k in model_sd}
    assert _differing(into, ref_sd) == []


def test_inverse_save_writes_the_original_layout_back(tmp_path):
    _, _, d = _checkpoint(tmp_path, 16, moe_intermediate=4)
    plan = _plan(d)
    plan.inverse().save(plan.load(d), tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert _differing(back, load_file(str(d / "model.safetensors"))) == []


def test_a_square_expert_tensor_is_transposed_where_transformers_guesses_it_is_not(tmp_path):
    """hidden 8 = 2 * moe_intermediate 4: gate_up is [2, 8, 8] in both layouts, down_proj is not
    square. transformers' check_dims sees gate_up's shape match the model's and loads it as it is
    (transposed relative to the model it was saved from); convspec's spec transposes it."""
    _, model_sd, d = _checkpoint(tmp_path, 8, moe_intermediate=4)
    original = load_file(str(d / "model.safetensors"))
    square = sorted(k for k in original if k.endswith(EXPERTS[0]))
    assert all(original[k].shape[1] == original[k].shape[2] for k in square)

    got = _plan(d).load(d)
    assert _differing(got, model_sd) == []  # every tensor as the model held it

    ref = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    ref_sd = {k: v for k, v in ref.state_dict().items() if k in model_sd}
    # transformers differs exactly on the square tensors: it kept the checkpoint's layout there
    assert _differing(ref_sd, model_sd) == square
    assert all(torch.equal(ref_sd[k], original[k]) for k in square)


# ---- the importer ------------------------------------------------------------------------------


def test_the_importer_translates_a_converter_that_keeps_the_name():
    """`convspec import-transformers qwen3_vl_moe`: both converters become explicit transposes, with
    a comment saying where the spec differs from transformers; nothing is called inert."""
    from convspec.hf.library import import_key

    imp = import_key("qwen3_vl_moe")
    text = imp.specs[imp.name]
    assert "# inert" not in text and imp.notes == []
    assert text.count("# differs from transformers: WeightConverter") == 2
    for name in ("gate_up_proj", "down_proj"):
        assert f'"{{p}}.mlp.experts.{name}": transpose({name}, dim0=1, dim1=2)' in text


def test_a_converter_with_operations_is_never_inert():
    """Even where every key it fired on was counted as undone, a converter that changes the tensor is
    translated, while a pure rename loading discards everywhere is still left out as inert."""
    from transformers.core_model_loading import Transpose, WeightConverter, WeightRenaming

    from convspec.hf.library import translate

    transforms = [
        WeightRenaming("block_sparse_moe", "mlp"),
        WeightConverter("mlp.experts.down_proj", "mlp.experts.down_proj", [Transpose(1, 2, check_dims=True)]),
    ]
    everywhere = {("k", 0): 3, ("k", 1): 3}
    t = translate("k", transforms, {}, fired=everywhere, undone=everywhere)
    assert [n.split("(")[0] for n in t.inert] == ["WeightRenaming"]
    assert len(t.lines) == 1 and "transpose(down_proj, dim0=1, dim1=2)" in t.lines[0]
    assert len(t.differs) == 1 and "square" in t.differs[0]


def test_observing_the_model_counts_the_converters_as_applied_not_undone():
    """transformers runs a converter whose target is its source's own name (the key is a parameter);
    only a rename whose result is no parameter, while the original is, is undone by loading."""
    from convspec.hf.mapping import applied, meta_model, observe

    obs = observe(applied(meta_model("qwen3_vl_moe")))
    converters = [(k, i) for k, i in obs.fired if k == "qwen3_vl_moe"]
    assert sorted(i for _, i in converters) == [0, 1]
    assert all(obs.fired[h] > 0 and h not in obs.undone for h in converters)
    assert all(obs.forward[k] == k for k in obs.original if k.endswith(EXPERTS))


def test_every_converter_that_keeps_its_name_is_one_tested_here():
    """The audit, re-run on the installed transformers: every WeightConverter of its mapping has
    operations (so none can be inert), and the ones whose target is their source's own name are
    qwen3_vl_moe's, loaded with data above. A new one needs its own test with data here."""
    from transformers.core_model_loading import WeightConverter

    from convspec.hf.mapping import raw_mapping

    converters = [(k, t) for k, ts in raw_mapping().items() for t in ts if isinstance(t, WeightConverter)]
    assert converters and all(t.operations for _, t in converters)
    same = {
        (k, tuple(t._original_source_patterns))
        for k, t in converters
        if list(t._original_source_patterns) == list(t._original_target_patterns)
    }
    assert same == {("qwen3_vl_moe", (e,)) for e in EXPERTS}


# ---- the one converter the importer leaves out: not expressible, and convspec says so ----------


def test_the_converter_the_importer_cannot_express_is_refused_not_misloaded(tmp_path):
    """qwen4_exp_text's `Concatenate(dim=0, num_shards_attribute="split_ngram_parts")` joins a
    collection of `ngram_embedding.shard_{i}.weight` into one tensor; a spec has no cat over a
    collection, so the importer leaves it out with a `# not expressible` comment. With data:
    transformers loads the shards into one parameter; convspec's strict load_into refuses, naming
    the parameter it would leave at random init and the shards it cannot place."""
    text = dict(
        hidden_size=16,
        intermediate_size=24,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=8,
        num_experts=2,
        num_experts_per_tok=1,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        hc_count=2,
        hc_lowrank=4,
        layer_types=["linear_attention", "indexed_attention"],
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=4,
        linear_value_head_dim=4,
        indexer_n_heads=1,
        indexer_kv_heads=1,
        indexer_head_dim=8,
        indexer_budget=8,
        indexer_compress_ratio=4,
        ple_layer_ids=[1],  # the n-gram embedding lives in layer 0's PLE
        ngram_size=3,
        heads_per_ngram=2,
        ngram_vocab_size_base=64,
        make_ngram_vocab_size_divisible_by=8,
        split_ngram_parts=4,
    )
    header = Path(convspec.load_spec("qwen4_exp_text").file).read_text().split("\nspec:")[0]
    assert "# not expressible: WeightConverter(['ngram_embedding.shard_*.weight']" in header
    config = transformers.AutoConfig.for_model("qwen4_exp_text", **text)
    torch.manual_seed(0)
    model = transformers.Qwen4ExpForCausalLM(config).float()
    d = tmp_path / "orig"
    model.save_pretrained(d)
    saved = load_file(str(d / "model.safetensors"))
    shards = sorted(k for k in saved if ".ngram_embedding.shard_" in k)
    joined = shards[0].split(".shard_")[0] + ".weight"
    assert len(shards) == 4 and joined not in saved

    ref, info = transformers.Qwen4ExpForCausalLM.from_pretrained(
        d, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(ref.state_dict()[joined], torch.cat([saved[k] for k in shards]))

    plan = convspec.compile(convspec.load_spec("qwen4_exp_text"), config=d / "config.json")
    with torch.device("meta"):
        meta = transformers.Qwen4ExpForCausalLM(config)
    with pytest.raises(convspec.ConvspecError) as exc:
        plan.load_into(meta, d, strict=True)
    msg = str(exc.value)
    assert "1 missing" in msg and joined in msg and all(k in msg for k in shards)
