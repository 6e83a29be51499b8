"""The transformers exporter: a plan as WeightRenaming / WeightConverter objects.

Differential throughout: what transformers does with the exported objects (loading, and saving, which
reverses them) must equal what the plan and its inverse do, key for key and tensor for tensor.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import types
from contextlib import contextmanager

import pytest
import torch

import convspec
from convspec.compile.plan import PlanRule
from convspec.integrations.transformers import ExportError, to_weight_conversions
from convspec.spec import parse_spec

transformers = pytest.importorskip("transformers")
from transformers import conversion_mapping as cm  # noqa: E402
from transformers.core_model_loading import (  # noqa: E402
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)

HAS_ALIASES = {f.name for f in dataclasses.fields(PlanRule)} >= {"unless", "one_way"}


def compile_rules(rules: str, config: dict | None = None) -> convspec.Plan:
    return convspec.compile(parse_spec("spec demo\n" + rules, "demo.cspec"), config)


@contextmanager
def registered(model_type: str, conversions: list):
    """Register `conversions` for `model_type`, and put transformers' own mapping back afterwards."""
    original = cm.get_checkpoint_conversion_mapping(model_type)
    was_user = model_type in cm.USER_REGISTERED_MAPPINGS
    cm.register_checkpoint_conversion_mapping(model_type, conversions, overwrite=True)
    try:
        yield
    finally:
        if original is None:
            cm._checkpoint_conversion_mapping_cache.pop(model_type, None)
        else:
            cm.register_checkpoint_conversion_mapping(model_type, original, overwrite=True)
        if not was_user:
            cm.USER_REGISTERED_MAPPINGS.discard(model_type)


# ---- transformers' loading and saving, without a model -------------------------------------------


class _Model:
    """What transformers' ops ask of a model: its config and (for Split) its parameters."""

    def __init__(self, conversions, params=None, **config):
        self._weight_conversions = conversions
        self.config = types.SimpleNamespace(**config)
        self.params = params or {}

    def get_parameter(self, name):
        return self.params[name]


def hf_load(conversions: list, state: dict, model: _Model | None = None) -> dict:
    """transformers' `convert_and_load_state_dict_in_model`, minus the model: checkpoint -> model keys."""
    import copy

    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    groups: dict = {}
    for key, tensor in sorted(state.items(), key=lambda kv: dot_natural_key(kv[0])):
        new, pattern = rename_source_key(key, renamings, converters)
        if pattern is not None:
            mapping = groups.setdefault(new, copy.deepcopy(by_pattern[pattern]))
        else:
            mapping, pattern = groups.setdefault(new, WeightRenaming(key, new)), key
        mapping.add_tensor(new, key, pattern, tensor)
    out = {}
    for first, mapping in groups.items():
        config = model.config if model is not None else None
        for key, value in mapping.convert(first, model=model, config=config).items():
            out[key] = value[0] if isinstance(value, list) else value
    return out


def hf_save(conversions: list, state: dict, **config) -> dict:
    """transformers' `revert_weight_conversion`: model keys -> checkpoint."""
    return revert_weight_conversion(_Model(conversions, **config), state)


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


# ---- the built-in specs against transformers' own mappings, on the meta device -----------------------

MODELS = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_local_experts=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=2,
            num_experts=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        ),
    ),
}


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_builtin_spec_reverts_like_transformers_own_mapping(model_type):
    cfg_cls, model_cls, kwargs = MODELS[model_type]
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs))
    state = model.state_dict()
    reference = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, state).items()}
    assert any(".experts.3." in k for k in reference)  # transformers' mapping did unfuse the experts

    plan = convspec.compile(convspec.load_spec(model_type))
    with registered(model_type, to_weight_conversions(plan)):
        ours = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, state).items()}
    assert ours == reference
    # and the plan's own inverse agrees
    assert {k: tuple(v.shape) for k, v in plan.inverse().apply(state).items()} == reference
    # transformers' mapping is back in place
    assert revert_weight_conversion(model, state).keys() == reference.keys()
    assert model_type not in cm.USER_REGISTERED_MAPPINGS


def test_mixtral_exports_the_expected_objects():
    renaming, gate_up, down = to_weight_conversions(convspec.compile("mixtral"))
    assert type(renaming) is WeightRenaming
    assert type(gate_up) is WeightConverter and type(down) is WeightConverter
    assert [type(op).__name__ for op in gate_up.operations] == ["MergeModulelist", "Concatenate"]
    assert (gate_up.operations[0].dim, gate_up.operations[1].dim) == (0, 1)
    assert gate_up.target_patterns == [".mlp.experts.gate_up_proj"]
    key = "model.layers.1.block_sparse_moe.experts.12.w3.weight"
    renamed, _ = renaming.rename_source_key(key)
    assert renamed == "model.layers.1.mlp.experts.12.w3.weight"
    assert gate_up.rename_source_key(renamed) == (
        "model.layers.1.mlp.experts.gate_up_proj",
        gate_up.source_patterns[1],
    )
    # the source order is the order in which cat joins them: w1 (gate), then w3 (up)
    assert ".w1" in gate_up.source_patterns[0] and ".w3" in gate_up.source_patterns[1]
    # whole keys only: no leading zero, no suffix, no missing prefix
    for other in (
        "model.layers.1.mlp.experts.01.w3.weight",
        "model.layers.1.mlp.experts.1.w3.weight_scale_inv",
        "mlp.experts.1.w3.weight",
        "model.layers.1.mlp.experts.a.1.w3.weight",
    ):
        assert gate_up.rename_source_key(other) == (other, None)


# ---- the real thing: from_pretrained and save_pretrained with the exported mapping -------------------


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    torch.manual_seed(0)
    _, _, kwargs = MODELS["mixtral"]
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**kwargs)).float()
    path = tmp_path_factory.mktemp("hf") / "tiny-mixtral"
    model.save_pretrained(path)
    return model, path


def test_from_pretrained_with_exported_mapping(tiny_mixtral, tmp_path):
    from safetensors.torch import load_file

    original, path = tiny_mixtral
    saved = load_file(str(path / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in saved  # the original layout

    plan = convspec.compile(convspec.load_spec("mixtral"), config=path / "config.json")
    with registered("mixtral", to_weight_conversions(plan)):
        model, info = transformers.MixtralForCausalLM.from_pretrained(path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert not info["error_msgs"]
        assert_same(model.state_dict(), original.state_dict())

        model.save_pretrained(tmp_path / "again")
    assert_same(load_file(str(tmp_path / "again" / "model.safetensors")), saved)


# ---- renames: exact whole-key semantics, both ways --------------------------------------------------

SEGMENTS = ["a", "b", "0", "3", "12", "07", "x_1"]

RENAMES = {
    "mixtral": (
        "rename {p:path}.block_sparse_moe.{rest:path} -> {p}.mlp.{rest}",
        ["block_sparse_moe", "mlp"],
    ),
    "legacy": (
        "rename {p:path}.LayerNorm.gamma -> {p}.LayerNorm.weight\n"
        "rename {p:path}.weight_g -> {p}.parametrizations.weight.original0",
        ["LayerNorm", "gamma", "weight", "weight_g", "parametrizations", "original0"],
    ),
    "numbered": (
        "rename {p:path}.layer_{i:int}.{k} -> {p}.layers.{i}.{k}",
        ["layer_3", "layer_07", "layers"],
    ),
    "two_captures": (
        "rename {p:path}.layers.{i:int}.attention.wq.weight -> {p}.layers.{i}.self_attn.q_proj.weight",
        ["layers", "attention", "wq", "weight", "self_attn", "q_proj"],
    ),
    "strip": ("rename model.{p:path} -> {p}", ["model"]),
    "add": ("rename {p:path} -> model.{p}", ["model"]),
    "literal": ("rename lm_head.weight -> output.weight", ["lm_head", "weight", "output"]),
    "seg_int": ("rename {a}.x.{b:int} -> {a}.y.{b}", ["x", "y"]),
    "chain": (
        "rename {p:path}.attn.{w} -> {p}.self_attn.{w}\nrename {p:path}.self_attn.{w} -> {p}.attention.{w}",
        ["attn", "self_attn", "attention"],
    ),
}
# a group spanning several captures takes leading zeros when saving (transformers strips the lookahead)
LOOSE_INTS_ON_SAVE = {"wide", "wide_optional"}
RENAMES["wide"] = (
    "rename {p:path}.layers.{i:int}.fc1.{rest:path} -> {p}.layers.{i}.mlp.fc1.{rest}",
    ["layers", "fc1", "mlp", "1", "01"],
)
if HAS_ALIASES:
    RENAMES |= {
        "wide_optional": (
            "rename {p:path?}.layers.{i:int}.fc1.{rest:path?} -> {p}.layers.{i}.mlp.fc1.{rest}",
            ["layers", "fc1", "mlp", "1", "01"],
        ),
        "unless": ("rename model.{p:path} -> {p} unless model.embed.{x}, model.{y:int}", ["model", "embed"]),
        "alias": ("alias {p:path?}.ln_f.{w} -> {p}.norm.{w}", ["ln_f", "norm"]),
        "optional_prefix": ("rename {p:path?}.block.{r:path} -> {p}.layer.{r}", ["block", "layer"]),
        "optional_tail": ("rename {p:path}.qkv.{r:path?} -> {p}.attn_qkv.{r}", ["qkv", "attn_qkv"]),
    }


# keys that exercise the longer templates (random keys rarely spell them out)
EXTRA_KEYS = [
    "m.layers.3.attention.wq.weight",
    "m.layers.07.attention.wq.weight",
    "layers.0.attention.wq.weight",
    "a.layers.1.attention.wq.weight.x",
    "a.layers.1.attention.wq.layers.2.attention.wq.weight",
    "m.layers.3.self_attn.q_proj.weight",
    "m.b.layers.12.self_attn.q_proj.weight",
    "a.layers.0.fc1.layers.2.fc1.x",
    "a.layers.1.fc1.layers.02.fc1.x",
    "layers.3.fc1.w",
    "layers.3.fc1",
    "m.layers.3.mlp.fc1.w",
    "m.layers.3.mlp.fc1.layers.4.mlp.fc1.w",
    "a.x.3",
    "a.x.03",
    "a.b.x.3",
    "lm_head.weight",
    "a.lm_head.weight",
]


def keys_from(words: list[str], max_segments: int = 4) -> list[str]:
    """Every key of up to `max_segments` segments over a small vocabulary, and longer random ones."""
    vocab = SEGMENTS[:4] + words
    keys = [".".join(c) for n in range(1, max_segments + 1) for c in itertools.product(vocab, repeat=n)]
    rng = random.Random(0)
    vocab = SEGMENTS + words * 3
    keys += [".".join(rng.choice(vocab) for _ in range(rng.randint(5, 10))) for _ in range(1500)]
    return keys + EXTRA_KEYS + ["a." + ".".join(words) + ".b"]


def plan_key(plan: convspec.Plan, key: str) -> str:
    (out,) = plan.apply({key: torch.zeros(1)})
    return out


@pytest.mark.parametrize("name", sorted(RENAMES))
def test_renames_match_the_plan_both_ways(name):
    rules, words = RENAMES[name]
    plan = compile_rules(rules)
    conversions = to_weight_conversions(plan)
    inverse = plan.inverse()
    for key in keys_from(words, 4 if len(words) < 4 else 3):
        expected = plan_key(plan, key)
        assert list(hf_load(conversions, {key: torch.zeros(1)})) == [expected], key
        if name in LOOSE_INTS_ON_SAVE and any(re.fullmatch("0[0-9]+", seg) for seg in key.split(".")):
            continue
        back = plan_key(inverse, expected)
        assert list(hf_save(conversions, {expected: torch.zeros(1)})) == [back], expected
        # and from keys in the target layout
        assert list(hf_save(conversions, {key: torch.zeros(1)})) == [plan_key(inverse, key)], key


def test_the_identity_rename_exports_nothing():
    assert to_weight_conversions(compile_rules("rename {p:path}.w -> {p}.w")) == []


@pytest.mark.skipif(not HAS_ALIASES, reason="needs alias/unless")
def test_an_alias_renames_on_load_only():
    plan = compile_rules("alias {p:path}.gamma -> {p}.weight")
    conversions = to_weight_conversions(plan)
    assert list(hf_load(conversions, {"m.ln.gamma": torch.zeros(1)})) == ["m.ln.weight"]
    assert list(hf_save(conversions, {"m.ln.weight": torch.zeros(1)})) == ["m.ln.weight"]


# ---- converts: tensors, both ways -------------------------------------------------------------------


def rand(*shape):
    return torch.randn(*shape)


CONVERTS = {
    "stack_cat": (
        "convert gate = {p:path}.experts.{e:int}.w1.weight, up = {p:path}.experts.{e:int}.w3.weight\n"
        " -> {p}.experts.gate_up_proj = cat(stack(gate, over=e), stack(up, over=e), dim=1, equal=true)",
        None,
        {f"m.l.{i}.experts.{e}.w{w}.weight": rand(4, 3) for i in range(2) for e in range(11) for w in (1, 3)},
    ),
    "stack_transpose": (
        "convert w = {p:path}.experts.{e:int}.w -> {p}.experts.w = transpose(stack(w, over=e), dim0=1, dim1=2)",
        None,
        {f"m.experts.{e}.w": rand(4, 3) for e in range(3)},
    ),
    "chunk": (
        "convert w = {p:path}.gate_up.weight -> {p}.gate.weight, {p}.up.weight = chunk(w, dim=0)",
        None,
        {"m.0.gate_up.weight": rand(6, 2), "m.1.gate_up.weight": rand(6, 2), "m.0.other": rand(1)},
    ),
    "split": (
        "convert qkv = {p:path}.self_attn.qkv_proj.{kind}\n"
        " -> {p}.self_attn.q_proj.{kind}, {p}.self_attn.k_proj.{kind}, {p}.self_attn.v_proj.{kind}\n"
        " = split(qkv, dim=0, sizes=[config.q, config.kv, config.kv])",
        {"q": 4, "kv": 2},
        {"l.0.self_attn.qkv_proj.weight": rand(8, 3), "l.0.self_attn.qkv_proj.bias": rand(8)},
    ),
    "transpose": (
        "convert w = {p:path}.w_in -> {p}.w_out = transpose(w)",
        None,
        {"a.w_in": rand(2, 3), "a.b.w_in": rand(4, 3), "w_in": rand(1)},
    ),
    "rope": (
        "convert q = {p:path}.q.weight -> {p}.q_proj.weight = permute_rope(q, heads=config.num_attention_heads)",
        None,
        {"l.0.q.weight": rand(16, 3), "l.1.q.weight": rand(16, 3)},
    ),
    "rope_compiled": (
        "convert q = {p:path}.q.weight -> {p}.q_proj.weight = unpermute_rope(q, heads=config.num_attention_heads)",
        {"num_attention_heads": 4},
        {"l.0.q.weight": rand(16, 3)},
    ),
    "rope_then_cat": (
        "convert q = {p:path}.q, k = {p:path}.k\n"
        " -> {p}.qk = cat(permute_rope(q, heads=config.num_attention_heads),"
        " permute_rope(k, heads=config.num_attention_heads), dim=0, equal=true)",
        None,
        {"l.q": rand(8, 2), "l.k": rand(8, 2)},
    ),
    "chunk_then_rope": (
        "convert qk = {p:path}.qk -> {p}.q, {p}.k ops [chunk(n=2, dim=0), permute_rope(heads=config.num_attention_heads)]",
        None,
        {"l.qk": rand(16, 2)},
    ),
    "chunk_rope_some": (
        "convert in_proj = {p:path}.self_attn.in_proj.weight\n"
        " let v1, v2, v3 = chunk(in_proj, 3, dim=0)\n"
        " -> {p}.self_attn.q_proj.weight = permute_rope(v1, heads=config.num_attention_heads ?? 1)\n"
        " -> {p}.self_attn.k_proj.weight = permute_rope(v2, heads=config.num_attention_heads ?? 1)\n"
        " -> {p}.self_attn.v_proj.weight = v3",
        None,
        {"l.0.self_attn.in_proj.weight": rand(24, 2), "l.1.self_attn.in_proj.weight": rand(24, 2)},
    ),
    "chunk_rope_mixed": (
        "convert w = {p:path}.qkv\n"
        " let a, b, c = chunk(w, 3, dim=0)\n"
        " -> {p}.q = permute_rope(a, heads=config.num_attention_heads)\n"
        " -> {p}.k = unpermute_rope(b, heads=config.num_attention_heads)\n"
        " -> {p}.v = c",
        None,
        {"l.qkv": rand(24)},
    ),
    # the reverse of chunk_rope_some: rope on q and k, not v, then one cat (a vision tower's fused qkv)
    "rope_some_then_cat": (
        "convert q = {p:path}.self_attn.q_proj.weight, k = {p:path}.self_attn.k_proj.weight,"
        " v = {p:path}.self_attn.v_proj.weight\n"
        " -> {p}.self_attn.qkv.weight = cat(unpermute_rope(q, heads=config.num_attention_heads ?? 1),"
        " unpermute_rope(k, heads=config.num_attention_heads ?? 1), v, dim=0, equal=true)",
        None,
        {f"l.{i}.self_attn.{w}_proj.weight": rand(8, 2) for i in range(2) for w in "qkv"},
    ),
    "rope_mixed_then_cat": (
        "convert a = {p:path}.a, b = {p:path}.b, c = {p:path}.c\n"
        " -> {p}.abc = cat(c, permute_rope(a, heads=config.num_attention_heads),"
        " unpermute_rope(b, heads=config.num_attention_heads), dim=0, equal=true)",
        None,
        {"l.a": rand(8), "l.b": rand(8), "l.c": rand(8)},
    ),
    "deinterleave_chunk": (
        "convert w = {p:path}.gu -> {p}.g, {p}.u ops [deinterleave(dim=0), chunk(dim=0)]",
        None,
        {"l.gu": rand(6, 2)},
    ),
    "cat_interleave": (
        "convert g = {p:path}.g, u = {p:path}.u -> {p}.gu = interleave(cat(g, u, dim=1, equal=true), dim=1)",
        None,
        {"l.g": rand(2, 3), "l.u": rand(2, 3)},
    ),
    "conv3d": (
        "convert w = {p:path}.patch.weight -> {p}.patch.linear.weight\n"
        " = reshape(w, shape=[-1, 24], from_shape=[-1, 3, 2, 2, 2])",
        None,
        {"v.patch.weight": rand(4, 3, 2, 2, 2)},
    ),
    "two_parts": (
        "convert q = {p:path}.wq, k = {p:path}.wk\n"
        " -> {p}.q_proj = permute_rope(q, heads=config.num_attention_heads)\n"
        " -> {p}.k_proj = transpose(k)",
        None,
        {"l.wq": rand(8, 2), "l.wk": rand(8, 2)},
    ),
    "anchored": (
        "convert w = heads.{e:int}.weight -> heads.weight = stack(w, over=e)",
        None,
        {f"heads.{e}.weight": rand(2) for e in range(3)} | {"x.heads.0.weight": rand(1)},
    ),
    "after_rename": (
        "rename {p:path}.block_sparse_moe.{r:path} -> {p}.mlp.{r}\n"
        "convert w = {p:path}.mlp.experts.{e:int}.w2.weight -> {p}.mlp.experts.down_proj ops [stack(e)]\n"
        "rename lm_head.{w} -> output.{w}",
        None,
        {f"m.block_sparse_moe.experts.{e}.w2.weight": rand(2, 3) for e in range(2)}
        | {"m.block_sparse_moe.gate.weight": rand(2), "lm_head.weight": rand(2)},
    ),
}
if HAS_ALIASES:
    CONVERTS["optional_prefix"] = (
        "convert w = {p:path?}.experts.{e:int}.w -> {p}.experts.w = stack(w, over=e)",
        None,
        {f"experts.{e}.w": rand(2) for e in range(2)} | {f"a.b.experts.{e}.w": rand(2) for e in range(3)},
    )


@pytest.mark.parametrize("name", sorted(CONVERTS))
def test_converts_match_the_plan_both_ways(name):
    rules, config, state = CONVERTS[name]
    heads = {"num_attention_heads": 4}
    # exported as written (config expressions unevaluated when there is no config), run with a config
    conversions = to_weight_conversions(compile_rules(rules, config))
    plan = compile_rules(rules, {**heads, **(config or {})})
    expected = plan.apply(state)
    model = _Model(conversions, params=expected, **heads)
    assert_same(hf_load(conversions, state, model), expected)
    assert_same(hf_save(conversions, expected, **heads), plan.inverse().apply(expected))
    assert_same(hf_save(conversions, expected, **heads), state)


def test_rope_heads_from_a_sub_config():
    plan = compile_rules(
        "convert q = {p:path}.q -> {p}.q_proj = permute_rope(q, heads=config.text_config.num_attention_heads)"
    )
    (conv,) = to_weight_conversions(plan)
    assert conv.operations[0].subconfig_key == "text_config"


# ---- with a config or without, a plan exports alike --------------------------------------------------

ROPE_RULE = "convert q = {p:path}.q -> {p}.q_proj = permute_rope(q, heads=HEADS)"
# heads expression -> the subconfig_key transformers' PermuteForRope gets
ROPE_HEADS = {
    "config.num_attention_heads": None,
    "config.num_attention_heads ?? 1": None,
    "config.vision_config.num_attention_heads": "vision_config",
    "config.vision_config.num_attention_heads ?? config.num_attention_heads": "vision_config",
    # what the importer writes for transformers' PermuteForRope(subconfig_key="vision_config")
    "config.vision_config.num_attention_heads ?? config.num_attention_heads ?? 1": "vision_config",
}
# heads expressions no PermuteForRope reads -> what the error says
ROPE_HEADS_REFUSED = {
    "config.num_key_value_heads": "always uses config.num_attention_heads",
    # where vision_config is missing, transformers falls back to config.num_attention_heads, not to 1
    "config.vision_config.num_attention_heads ?? 1": "always uses config.num_attention_heads",
    "config.a.vision_config.num_attention_heads": "always uses config.num_attention_heads",
    "4": "a number in the spec is not a config field",
}
# every field above present, and equal where a value-based guess would pick the wrong one
ROPE_CONFIG = {
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vision_config": {"num_attention_heads": 2},
    "a": {"vision_config": {"num_attention_heads": 2}},
}


def described(conversions: list) -> list:
    """What an exported list does, as plain data: types, patterns, and each op's settings."""
    return [
        (
            type(c).__name__,
            c.source_patterns,
            c.target_patterns,
            [(type(op).__name__, vars(op)) for op in getattr(c, "operations", [])],
        )
        for c in conversions
    ]


@pytest.mark.parametrize("heads", sorted(ROPE_HEADS))
def test_rope_heads_export_alike_with_and_without_a_config(heads):
    rules = ROPE_RULE.replace("HEADS", heads)
    without = to_weight_conversions(compile_rules(rules))
    plan = compile_rules(rules, ROPE_CONFIG)
    conversions = to_weight_conversions(plan)
    assert described(conversions) == described(without)
    assert conversions[0].operations[0].subconfig_key == ROPE_HEADS[heads]
    # and transformers, reading the head count from its config, permutes as the plan does
    config = dict(ROPE_CONFIG, vision_config=types.SimpleNamespace(**ROPE_CONFIG["vision_config"]))
    state = {"l.0.q": rand(8, 3), "l.1.q": rand(8)}
    expected = plan.apply(state)
    assert_same(hf_load(conversions, state, _Model(conversions, **config)), expected)
    assert_same(hf_save(conversions, expected, **config), state)


@pytest.mark.parametrize("heads", sorted(ROPE_HEADS_REFUSED))
def test_rope_heads_refused_alike_with_and_without_a_config(heads):
    rules = ROPE_RULE.replace("HEADS", heads)
    errors = []
    for config in (None, ROPE_CONFIG):
        with pytest.raises(ExportError) as info:
            to_weight_conversions(compile_rules(rules, config))
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert ROPE_HEADS_REFUSED[heads] in errors[0] and "demo.cspec:2:1" in errors[0]
    assert f"heads={heads}" in errors[0]


def test_config_expressions_survive_a_plan_json_round_trip():
    plan = compile_rules(ROPE_RULE.replace("HEADS", "config.vision_config.num_attention_heads"), ROPE_CONFIG)
    again = convspec.Plan.from_json(plan.to_json())
    assert described(to_weight_conversions(again)) == described(to_weight_conversions(plan))
    assert again.rules[0].nodes[0].exprs == plan.rules[0].nodes[0].exprs != ()


# ---- what cannot be exported ------------------------------------------------------------------------

UNSUPPORTED = {
    "permute": (
        "convert w = {p:path}.w -> {p}.v = permute(w, dims=[1, 0])",
        None,
        "rule 1 (convert, demo.cspec:2:1)",
        "op permute has no transformers equivalent",
    ),
    "cast": (
        "convert w = {p:path}.w -> {p}.v = cast(w, dtype=float32, from=bfloat16)",
        None,
        "rule 1 (convert, demo.cspec:2:1)",
        "op cast",
    ),
    "two_places": (
        "rename {a}.x.{b}.y -> {a}.z.{b}.w",
        None,
        "rule 1 (rename, demo.cspec:2:1)",
        "changes in more than one place",
    ),
    "swapped": (
        "rename {a}.{b:int}.w -> {b}.{a}.w",
        None,
        "rule 1 (rename, demo.cspec:2:1)",
        "one capturing group",
    ),
    "drop": ("drop {p:path}.inv_freq", None, "rule 1 (drop, demo.cspec:2:1)", "no transformers equivalent"),
    "rename_after_convert": (
        "convert w = {p:path}.experts.{e:int}.w -> {p}.experts.w = stack(w, over=e)\n"
        "rename {p:path}.experts.{r:path} -> {p}.mlp.experts.{r}",
        None,
        "rule 2 (rename, demo.cspec:3:1)",
        "comes after rule 1 (convert, demo.cspec:2:1)",
    ),
    "cat_unequal": (
        "convert a = {p:path}.a, b = {p:path}.b -> {p}.ab = cat(a, b, dim=0)",
        None,
        "rule 1 (convert, demo.cspec:2:1)",
        "cat without sizes=[...] or equal=true",
    ),
    "cat_sizes": (
        "convert a = {p:path}.a, b = {p:path}.b -> {p}.ab = cat(a, b, dim=0, sizes=[1, 2])",
        None,
        "rule 1 (convert, demo.cspec:2:1)",
        "unequal sizes=[1, 2]",
    ),
    "rope_kv_heads": (
        "convert k = {p:path}.k -> {p}.k_proj = permute_rope(k, heads=config.num_key_value_heads)",
        None,
        "rule 1 (convert, demo.cspec:2:1)",
        "config.num_attention_heads",
    ),
    "rope_literal_heads": (
        "convert k = {p:path}.k -> {p}.k_proj = permute_rope(k, heads=8)",
        {"num_attention_heads": 4},
        "rule 1 (convert, demo.cspec:2:1)",
        "heads=8",
    ),
    "interleave_parts": (
        "convert w = {p:path}.w -> {p}.v = interleave(w, parts=3)",
        None,
        "rule 1 (convert, demo.cspec:2:1)",
        "parts=3",
    ),
    "stack_then_chunk": (
        "convert w = {p:path}.e.{e:int}.w -> {p}.a, {p}.b ops [stack(e), chunk(dim=1)]",
        None,
        "rule 1 (convert, demo.cspec:2:1)",
        "stack a collection and then cut it",
    ),
    "capture_inside": (
        "convert w = {p:path}.layers.{i:int}.qkv -> {p}.layers.{i}.q, {p}.layers.{i}.kv = chunk(w)",
        None,
        "rule 1 (convert, demo.cspec:2:1)",
        "one {p:path} capture",
    ),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_rules_raise_export_error(name):
    rules, config, label, message = UNSUPPORTED[name]
    plan = compile_rules(rules, config)
    with pytest.raises(ExportError) as info:
        to_weight_conversions(plan)
    assert isinstance(info.value, convspec.ConvspecError)
    assert label in str(info.value)
    assert message in str(info.value)


def test_unsupported_rule_from_a_spec_file(tmp_path):
    path = tmp_path / "bad.cspec"
    path.write_text(
        "spec bad\nrename {p:path}.w1 -> {p}.w\nconvert w = {p:path}.x -> {p}.y = permute(w, dims=[1, 0])\n"
    )
    with pytest.raises(ExportError, match=r"rule 2 \(convert, .*bad\.cspec:3:1\).*permute"):
        to_weight_conversions(convspec.compile(convspec.load_spec(path)))


def test_missing_transformers_is_a_typed_error_naming_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(convspec.TransformersMissing, match="convspec\\[transformers\\]"):
        to_weight_conversions(convspec.compile("mixtral"))


def test_the_documented_example_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "integrations.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    with registered("mixtral", []):  # the example registers for the whole process: put it back after
        exec(compile(code, "docs/integrations.md", "exec"), {})


# ---- transformers' own conversion tests (tests/utils/test_core_model_loading.py), ported ------------
# Each scenario transformers tests with its hand-written mapping is written as a spec here; the exported
# mapping must load (convert_and_load_state_dict_in_model) and save (revert_weight_conversion) as the
# plan does, and as the scenario expects, whether the plan was compiled with a config or without.


def _param(*shape) -> torch.nn.Module:
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(*shape))
    return module


def _pretrained(build, config=None):
    """A PreTrainedModel whose modules `build(root)` adds (what transformers' loading needs)."""

    class Tiny(transformers.PreTrainedModel):
        config_class = transformers.PreTrainedConfig
        base_model_prefix = "model"

        def __init__(self, config):
            super().__init__(config)
            build(self)
            self.post_init()

    return Tiny(config or transformers.PreTrainedConfig())


def hf_convert_and_load(model, state: dict, conversions: list) -> dict:
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    info, _ = convert_and_load_state_dict_in_model(
        model, {k: v.clone() for k, v in state.items()}, LoadStateDictConfig(weight_mapping=conversions)
    )
    assert not info.missing_keys and not info.unexpected_keys and not info.mismatched_keys
    assert not info.conversion_errors
    return model.state_dict()


ERNIE_EXPERTS = """
rename mlp.w2.weight -> mlp.down_proj.weight
convert gate = {p:path}.experts.{e:int}.w1.weight, up = {p:path}.experts.{e:int}.w3.weight
 let g1, g2 = stack(gate, over=e, dim=0, parts=2)
 let u1, u2 = stack(up, over=e, dim=0, parts=2)
 -> {p}.experts.gate_up_proj.weight = cat(g1, u1, dim=1, equal=true)
 -> {p}.extra_experts.gate_up_proj.weight = cat(g2, u2, dim=1, equal=true)
convert down = {p:path}.experts.{e:int}.w2.weight
 -> {p}.experts.down_proj.weight, {p}.extra_experts.down_proj.weight = stack(down, over=e, parts=2)
convert qkv = {p:path}.self_attn.qkv_proj.weight
 -> {p}.self_attn.q_proj.weight, {p}.self_attn.k_proj.weight, {p}.self_attn.v_proj.weight = chunk(qkv, dim=0)
"""


def _ernie_model():
    def build(root):
        root.model = torch.nn.Module()
        root.model.layers = torch.nn.ModuleList()
        for _ in range(2):
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.Module()
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(layer.self_attn, name, _param(1, 2))
            for name in ("experts", "extra_experts"):
                experts = torch.nn.Module()
                experts.gate_up_proj, experts.down_proj = _param(2, 4, 2), _param(2, 2, 2)
                setattr(layer, name, experts)
            root.model.layers.append(layer)
        root.mlp = torch.nn.Module()
        root.mlp.down_proj = _param(2, 2)

    return _pretrained(build)


@pytest.mark.parametrize("config", [None, {"num_attention_heads": 1}], ids=["no config", "config"])
def test_ported_ernie4_5_vl_moe_conversion_both_ways(config):
    """transformers' test_ernie4_5_vl_moe_conversion and _reversed, with the mapping exported from a spec:
    stack(parts=2) + cat is its ErnieFuseAndSplitTextVisionExperts."""
    plan = compile_rules(ERNIE_EXPERTS, config)
    conversions = to_weight_conversions(plan)
    ops = [type(op).__name__ for c in conversions for op in getattr(c, "operations", [])]
    assert ops == ["ErnieFuseAndSplitTextVisionExperts"] * 2 + ["Chunk"]
    assert described(conversions) == described(to_weight_conversions(compile_rules(ERNIE_EXPERTS)))

    torch.manual_seed(1)
    state = {
        f"model.layers.{i}.experts.{e}.w{w}.weight": rand(2, 2)
        for i in range(2)
        for e in range(4)
        for w in (1, 2, 3)
    }
    state |= {f"model.layers.{i}.self_attn.qkv_proj.weight": rand(3, 2) for i in range(2)}
    state["mlp.w2.weight"] = rand(2, 2)
    model = _ernie_model()
    loaded = hf_convert_and_load(model, state, conversions)
    assert_same(loaded, plan.apply(state))
    # what transformers' test expects: experts 0-1 in experts, 2-3 in extra_experts, gate then up on dim 1
    w = lambda i, e, n: state[f"model.layers.{i}.experts.{e}.w{n}.weight"]  # noqa: E731
    for i in range(2):
        for name, members in (("experts", (0, 1)), ("extra_experts", (2, 3))):
            gate = torch.stack([w(i, e, 1) for e in members])
            up = torch.stack([w(i, e, 3) for e in members])
            assert torch.equal(
                loaded[f"model.layers.{i}.{name}.gate_up_proj.weight"], torch.cat([gate, up], 1)
            )
            down = torch.stack([w(i, e, 2) for e in members])
            assert torch.equal(loaded[f"model.layers.{i}.{name}.down_proj.weight"], down)
    assert_same(revert_weight_conversion(model, loaded), state)


VISION_HEADS = "config.vision_config.num_attention_heads ?? config.num_attention_heads ?? 1"
UNFUSE_QKV = f"""
convert qkv = {{p:path}}.self_attn.qkv_proj.weight
 let q, k, v = chunk(qkv, 3, dim=0)
 -> {{p}}.self_attn.q_proj.weight = permute_rope(q, heads={VISION_HEADS})
 -> {{p}}.self_attn.k_proj.weight = permute_rope(k, heads={VISION_HEADS})
 -> {{p}}.self_attn.v_proj.weight = v
"""
FUSE_QKV = f"""
convert q = {{p:path}}.self_attn.q_proj.weight, k = {{p:path}}.self_attn.k_proj.weight,
 v = {{p:path}}.self_attn.v_proj.weight
 -> {{p}}.self_attn.qkv_proj.weight = cat(unpermute_rope(q, heads={VISION_HEADS}),
 unpermute_rope(k, heads={VISION_HEADS}), v, dim=0, equal=true)
"""


@pytest.mark.parametrize("config", [None, "config"])
def test_ported_qkv_chunk_rope_permute_vision_config(config):
    """transformers' test_qkv_chunk_rope_permute_vision_config: a vision tower's fused qkv is cut and q, k
    permuted with the vision config's head count (2, not the top-level 4), and fused back the other way
    (the cat whose inputs go through different ops first)."""
    heads, head_dim = 2, 8
    hidden = heads * head_dim
    as_dict = {"num_attention_heads": 4, "vision_config": {"num_attention_heads": heads}}
    hf_config = transformers.PreTrainedConfig(
        num_attention_heads=4, vision_config=transformers.PreTrainedConfig(num_attention_heads=heads)
    )

    def model(fused: bool):
        def build(root):
            root.layers = torch.nn.ModuleList([torch.nn.Module()])
            attn = root.layers[0].self_attn = torch.nn.Module()
            for name in ("qkv_proj",) if fused else ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, _param(hidden * (3 if fused else 1), hidden))

        return _pretrained(build, hf_config)

    qkv = rand(3 * hidden, hidden)
    q, k, v = torch.chunk(qkv, 3, dim=0)
    permuted = lambda t: t.view(heads, head_dim // 2, 2, hidden).transpose(1, 2).reshape(hidden, hidden)  # noqa: E731
    unfused = {
        "layers.0.self_attn.q_proj.weight": permuted(q),
        "layers.0.self_attn.k_proj.weight": permuted(k),
    }
    unfused["layers.0.self_attn.v_proj.weight"] = v

    for rules, src, dst, fused, ops in (
        (
            UNFUSE_QKV,
            {"layers.0.self_attn.qkv_proj.weight": qkv},
            unfused,
            False,
            ["Chunk", "PermuteForRope"],
        ),
        (
            FUSE_QKV,
            unfused,
            {"layers.0.self_attn.qkv_proj.weight": qkv},
            True,
            ["PermuteForRope", "Concatenate"],
        ),
    ):
        plan = compile_rules(rules, as_dict if config else None)
        conversions = to_weight_conversions(plan)
        assert described(conversions) == described(to_weight_conversions(compile_rules(rules)))
        (converter,) = conversions
        assert [type(op).__name__ for op in converter.operations] == ops
        rope = converter.operations[ops.index("PermuteForRope")]
        assert (rope.subconfig_key, rope.permute_layer_names, rope.inverse) == (
            "vision_config",
            ["q_proj", "k_proj"],
            fused,
        )
        target = model(fused)
        loaded = hf_convert_and_load(target, src, conversions)
        assert_same(loaded, dst)
        assert_same(plan.apply(src, strict=True) if config else dst, dst)
        assert_same(revert_weight_conversion(target, loaded), src)


# ---- the acid test for Ernie 4.5 VL: from_pretrained and save_pretrained with the exported mapping ------


def _tiny_ernie4_5_vl_moe():
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        moe_intermediate_size=[8, 4],
        moe_k=2,
        moe_num_experts=4,
        moe_num_shared_experts=1,
        mlp_layer_types=["dense", "sparse"],
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
    )
    vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=24, patch_size=2)
    tokens = dict(
        image_start_token_id=60,
        image_end_token_id=61,
        image_token_id=62,
        video_start_token_id=63,
        video_end_token_id=59,
        video_token_id=58,
    )
    config = transformers.Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, **tokens)
    return transformers.Ernie4_5_VLMoeForConditionalGeneration(config).float()


def test_from_pretrained_ernie4_5_vl_moe_with_exported_mapping(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    original = _tiny_ernie4_5_vl_moe()
    original.save_pretrained(tmp_path / "ernie")
    saved = load_file(str(tmp_path / "ernie" / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in saved  # text and vision experts, one list

    with_config = convspec.compile("ernie4_5_vl_moe", config=tmp_path / "ernie" / "config.json")
    conversions = to_weight_conversions(with_config)
    assert described(conversions) == described(to_weight_conversions(convspec.compile("ernie4_5_vl_moe")))
    cls = transformers.Ernie4_5_VLMoeForConditionalGeneration
    with registered("ernie4_5_vl_moe", conversions):
        model, info = cls.from_pretrained(tmp_path / "ernie", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert not info["error_msgs"]
        assert_same(model.state_dict(), original.state_dict())
        model.save_pretrained(tmp_path / "again")
    assert_same(load_file(str(tmp_path / "again" / "model.safetensors")), saved)


# ---- docs/integrations.md: every example of what cannot be exported --------------------------------

DOCS = __import__("pathlib").Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
DOC_CONFIG = {
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 1,
    "vision_config": {"num_attention_heads": 2},
}


def _refused_examples() -> list[tuple[str, str]]:
    text = DOCS.read_text().split("### What cannot be exported", 1)[1]
    return re.findall(r"```cspec\n# ExportError: (.*?)\n(.*?)```", text, re.S)


def test_the_docs_list_what_cannot_be_exported():
    examples = _refused_examples()
    assert len(examples) >= 15
    for says, rules in examples:
        messages = []
        for config in (None, DOC_CONFIG):
            with pytest.raises(ExportError) as info:
                to_weight_conversions(compile_rules(rules, config))
            messages.append(str(info.value))
        assert messages[0] == messages[1], rules
        assert says in messages[0], (rules, messages[0])
        assert re.search(r"rule \d+ \((rename|convert|drop), demo\.cspec:\d+:\d+\)", messages[0]), messages[0]


def test_the_documented_sub_config_caveat():
    """docs/integrations.md: for a config whose vision_config lacks num_attention_heads, transformers'
    PermuteForRope(subconfig_key="vision_config") uses 1 head, the spec's fallback the top-level field."""
    plan = compile_rules(
        ROPE_RULE.replace("HEADS", "config.vision_config.num_attention_heads ?? config.num_attention_heads"),
        {"num_attention_heads": 4, "vision_config": {}},
    )
    assert dict(plan.rules[0].nodes[0].params)["heads"] == 4
    (converter,) = to_weight_conversions(plan)
    (rope,) = converter.operations
    x = rand(8, 2)
    config = types.SimpleNamespace(num_attention_heads=4, vision_config=types.SimpleNamespace())
    one_head = transformers.core_model_loading.PermuteForRope()._permute_for_rope(
        x, types.SimpleNamespace(num_attention_heads=1)
    )
    assert torch.equal(rope._permute_for_rope(x, config), one_head)
    assert not torch.equal(one_head, plan.apply({"l.q": x})["l.q_proj"])


def test_every_builtin_spec_exports_alike_with_and_without_a_config():
    """kimi_k25(_base) and mistral_large4(_base) exported differently (or were refused for different
    reasons) with a config than without: their vision rope reads config.vision_config."""
    from convspec.api import _builtin_index
    from convspec.compile.expr import ConfigExpr

    sub = {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 2, "hidden_size": 4}
    config = {**sub, "text_config": dict(sub), "vision_config": dict(sub)}

    def export(name: str, config: dict | None):
        try:
            return described(to_weight_conversions(convspec.compile(name, config=config)))
        except ExportError as exc:
            return str(exc)

    def needs_config(name: str) -> bool:
        rules = convspec.compile(name).rules
        return any(isinstance(v, ConfigExpr) for rule in rules for node in rule.nodes for _, v in node.params)

    # the GGUF specs (issue 18) read GGUF files, which transformers' conversion mapping never sees: not exported
    builtins = {f.rsplit(".", 1)[0] for f in _builtin_index().values()}
    names = [n for n in sorted(builtins) if not n.startswith("gguf_") and needs_config(n)]
    assert {"kimi_k25", "kimi_k25_base", "mistral_large4", "mistral_large4_base"} <= set(names)
    differ = [name for name in names if export(name, config) != export(name, None)]
    assert differ == []
