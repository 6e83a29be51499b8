"""Bind reports, ordering, JSON round trip, meta tensors and config expressions."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.tensors import assert_same_state, random_tensor

import convspec
from convspec.compile.expr import ListOf
from convspec.spec import parse_spec

P = "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"


def moe_layout(layers=1, experts=2, inter=8, hidden=4, dtype="bfloat16", skip=()):
    out = {}
    for i in range(layers):
        for e in range(experts):
            for w in ("w1", "w3", "w2"):
                key = P.format(i=i, e=e, w=w)
                if key not in skip:
                    out[key] = ((inter, hidden) if w != "w2" else (hidden, inter), dtype)
        out[f"model.layers.{i}.block_sparse_moe.gate.weight"] = ((experts, hidden), dtype)
    return out


def moe_state(layout, seed=0):
    return {k: random_tensor(s, d, seed + n) for n, (k, (s, d)) in enumerate(sorted(layout.items()))}


@pytest.fixture(scope="module")
def mixtral():
    return convspec.compile("mixtral")


def test_bind_outputs_and_coverage(mixtral):
    layout = moe_layout(layers=2, experts=3)
    layout["model.embed_tokens.weight"] = ((10, 4), "float32")
    bound = mixtral.bind(layout)
    assert bound.outputs["model.layers.1.mlp.experts.gate_up_proj"] == ((3, 16, 4), "bfloat16")
    assert bound.outputs["model.layers.0.mlp.experts.down_proj"] == ((3, 4, 8), "bfloat16")
    assert bound.outputs["model.layers.0.mlp.gate.weight"] == ((3, 4), "bfloat16")
    assert bound.outputs["model.embed_tokens.weight"] == ((10, 4), "float32")
    assert bound.unmatched == ["model.embed_tokens.weight"]
    cov = bound.coverage()
    assert cov["keys"] == len(layout) and cov["converted"] == 18 and cov["renamed"] == 2


def test_bind_missing_expert(mixtral):
    layout = moe_layout(experts=4, skip={P.format(i=0, e=2, w="w1"), P.format(i=0, e=2, w="w3")})
    with pytest.raises(convspec.BindError) as info:
        mixtral.bind(layout)
    (problem,) = info.value.problems
    assert "group p=model.layers.0: e=2 is missing: stack over {e} needs 0..3 and has 3 of them" in problem
    assert problem.startswith("rule 2 (convert, specs/mixtral.yaml:")
    assert "nothing was read" in str(info.value)


def test_bind_missing_input_of_a_group(mixtral):
    layout = moe_layout(experts=2, skip={P.format(i=0, e=0, w="w3"), P.format(i=0, e=1, w="w3")})
    with pytest.raises(convspec.BindError) as info:
        mixtral.bind(layout)
    (problem,) = info.value.problems
    assert "group p=model.layers.0 has no 'up' key" in problem


def test_bind_reports_every_problem_at_once(mixtral):
    layout = moe_layout(layers=3, experts=2)
    layout[P.format(i=0, e=1, w="w1")] = ((8, 5), "bfloat16")  # shape
    layout[P.format(i=1, e=1, w="w2")] = ((4, 8), "float16")  # dtype
    layout[P.format(i=2, e=0, w="w3")] = ((9, 4), "bfloat16")  # cat equal=true sizes
    layout[P.format(i=2, e=1, w="w3")] = ((9, 4), "bfloat16")
    with pytest.raises(convspec.BindError) as info:
        mixtral.bind(layout)
    problems = info.value.problems
    assert len(problems) == 3
    assert (
        "group p=model.layers.0: stack over e of tensors with different shapes: [8, 4], [8, 5]" in problems[0]
    )
    assert "group p=model.layers.1: stack over tensors of different dtypes: bfloat16, float16" in problems[2]
    assert "group p=model.layers.2: cat declares equal=true but the parts have sizes [8, 9]" in problems[1]
    assert str(info.value).startswith("error: 3 problems binding the plan:\n  - rule 2")


def test_unmatched_and_strict(mixtral):
    layout = moe_layout()
    layout["lm_head.weight"] = ((5, 4), "bfloat16")
    assert mixtral.bind(layout).unmatched == ["lm_head.weight"]
    with pytest.raises(convspec.BindError) as info:
        mixtral.bind(layout, strict=True)
    assert info.value.problems == ["no rule claims lm_head.weight"]
    assert (
        info.value.hint
        == "strict mode: every key must be claimed by a rule, or be in the target layout already"
    )
    with pytest.raises(convspec.BindError):
        mixtral.apply(moe_state(layout), strict=True)


def test_two_sources_for_one_key(mixtral):
    layout = moe_layout()
    layout["model.layers.0.mlp.gate.weight"] = ((2, 4), "bfloat16")
    with pytest.raises(convspec.BindError, match="two sources map to the key model.layers.0.mlp.gate.weight"):
        mixtral.bind(layout)


def test_experts_are_ordered_numerically(mixtral):
    n = 12
    layout = moe_layout(experts=n, inter=2, hidden=1, dtype="float32")
    state = {
        k: torch.full(s, float(k.split(".experts.")[1].split(".")[0]) if ".experts." in k else -1.0)
        for k, (s, _) in layout.items()
    }
    # insertion order scrambled on purpose: 10 and 11 before 2
    state = dict(sorted(state.items(), reverse=True))
    out = mixtral.apply(state)
    down = out["model.layers.0.mlp.experts.down_proj"]
    assert down[:, 0, 0].tolist() == [float(e) for e in range(n)]
    assert torch.equal(down[9], state[P.format(i=0, e=9, w="w2")])
    assert torch.equal(down[10], state[P.format(i=0, e=10, w="w2")])
    gate_up = out["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up[:, :2, 0].tolist() == [[float(e)] * 2 for e in range(n)]
    back = mixtral.inverse().apply(out)
    assert_same_state(back, state)


def test_json_round_trip(mixtral):
    text = mixtral.to_json()
    again = convspec.Plan.from_json(text)
    assert json.loads(again.to_json()) == json.loads(text)
    assert again.regex == mixtral.regex
    state = moe_state(moe_layout(layers=2, experts=3))
    a, b = mixtral.apply(state), again.apply(state)
    assert_same_state(a, b)
    assert_same_state(again.inverse().apply(b), state)
    inv = convspec.Plan.from_json(mixtral.inverse().to_json())
    assert inv.is_inverse
    assert_same_state(inv.apply(a), state)


def test_from_json_refuses_other_json():
    with pytest.raises(convspec.ConvspecError, match="not a convspec plan"):
        convspec.Plan.from_json('{"name": "x"}')


def test_apply_on_meta(mixtral):
    layout = moe_layout(layers=2, experts=3, inter=8192, hidden=4096)
    state = {k: torch.empty(s, dtype=getattr(torch, d), device="meta") for k, (s, d) in layout.items()}
    out = mixtral.apply(state)
    assert {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in out.items()} == (
        mixtral.bind(layout).outputs
    )
    assert all(v.device.type == "meta" for v in out.values())
    back = mixtral.inverse().apply(out)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: s for k, (s, _) in layout.items()}


# ---- config expressions -----------------------------------------------------------------------

CONFIG_SPEC = """spec cfg "config expressions"
convert qkv = {p:path}.qkv
     -> {p}.q, {p}.k, {p}.v = split(qkv, dim=0, sizes=[
            config.text_config.num_heads * config.text_config.head_dim,
            (config.text_config.kv_heads ?? config.text_config.num_heads) * config.text_config.head_dim,
            (config.text_config.kv_heads ?? config.text_config.num_heads) * config.text_config.head_dim])
convert w = {p:path}.wq
     -> {p}.wq_rope = permute_rope(w, heads=config.text_config.hidden // (config.text_config.head_dim * 2 + 0) % 100 - -0)
"""


@pytest.fixture
def cfg_spec(tmp_path):
    path = tmp_path / "cfg.cspec"
    path.write_text(CONFIG_SPEC)
    return convspec.load_spec(str(path))


def _cfg(kv=None):
    text = {"num_heads": 4, "head_dim": 2, "hidden": 8}
    if kv is not None:
        text["kv_heads"] = kv
    return {"text_config": text, "num_heads": 999}


@pytest.mark.parametrize(("kv", "sizes"), [(1, [8, 2, 2]), (None, [8, 8, 8])])
def test_config_expressions_dict_and_json_path(cfg_spec, tmp_path, kv, sizes):
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(_cfg(kv)))
    for config in (_cfg(kv), str(cfg_path), tmp_path):
        plan = convspec.compile(cfg_spec, config)
        rows = sum(sizes)
        layout = {"a.qkv": ((rows, 3), "float16"), "a.wq": ((8, 3), "bfloat16")}
        bound = plan.bind(layout)
        assert [bound.outputs[f"a.{n}"][0][0] for n in "qkv"] == sizes
        state = {k: random_tensor(s, d, 1) for k, (s, d) in layout.items()}
        out = plan.apply(state)
        q, k, v = (out[f"a.{n}"] for n in "qkv")
        assert torch.equal(torch.cat([q, k, v]).view(torch.int16), state["a.qkv"].view(torch.int16))
        # heads = 8 // (2 * 2 + 0) % 100 - -0 = 2: per head, rows [x0 y0 x1 y1] -> [x0 x1 y0 y1]
        assert torch.equal(out["a.wq_rope"][1].view(torch.int16), state["a.wq"][2].view(torch.int16))
        assert_same_state(plan.inverse().apply(out), state)


def test_config_expressions_deferred_to_bind(cfg_spec):
    plan = convspec.compile(cfg_spec)
    node = plan.rules[0].nodes[0]
    assert isinstance(dict(node.params)["sizes"].ir, ListOf)
    with pytest.raises(convspec.ConfigError, match="no config was given"):
        plan.bind({"a.qkv": ((24, 3), "float16")})


def test_compile_with_config_missing_field(cfg_spec):
    config = _cfg(1)
    del config["text_config"]["head_dim"]
    with pytest.raises(convspec.CompileError) as info:
        convspec.compile(cfg_spec, config)
    assert "the config has no field config.text_config.head_dim" in info.value.message
    assert info.value.hint == (
        "add it to the config, or give a default: config.text_config.head_dim ?? VALUE"
    )
    assert (info.value.span.line, info.value.span.col) == (3, 55)  # the sizes parameter


def test_config_default_used_when_field_is_null(cfg_spec):
    config = _cfg()
    config["text_config"]["kv_heads"] = None
    plan = convspec.compile(cfg_spec, config)
    assert dict(plan.rules[0].nodes[0].params)["sizes"] == [8, 8, 8]


def test_bad_config_file(cfg_spec, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{nope")
    with pytest.raises(convspec.ConfigError, match="invalid JSON"):
        convspec.compile(cfg_spec, str(bad))
    with pytest.raises(convspec.ConfigError, match="does not exist"):
        convspec.compile(cfg_spec, str(tmp_path / "missing.json"))


# ---- keys that the inverse would not give back, and defaults without a config -------------------


def test_bind_counts_a_key_already_in_the_target_layout_and_strict_accepts_it():
    import convspec as cs

    plan = cs.compile("mixtral")
    layout = {
        "m.block_sparse_moe.experts.0.w1.weight": ((2, 2), "float32"),
        "m.block_sparse_moe.experts.0.w3.weight": ((2, 2), "float32"),
        "m.mlp.foo.weight": ((1,), "float32"),  # already in the target layout: the inverse renames it
    }
    for strict in (False, True):
        bound = plan.bind(layout, strict=strict)
        assert bound.already == ["m.mlp.foo.weight"] and bound.warnings == []
        assert bound.passthrough["m.mlp.foo.weight"] == "m.mlp.foo.weight"
        assert bound.coverage()["already"] == 1
    with pytest.raises(cs.BindError, match="no rule claims m.other.weight"):
        plan.bind({**layout, "m.other.weight": ((1,), "float32")}, strict=True)


def test_strict_refuses_a_key_both_plans_would_claim():
    import convspec as cs
    from convspec.spec import parse_spec

    plan = cs.compile(parse_spec("spec t\nrename {p:path}.old.{r:path} -> {p}.new.{r}\n", "t.cspec"))
    layout = {"x.old.new.y": ((1,), "float32"), "x.old.z": ((1,), "float32")}
    bound = plan.bind(layout)  # the forward plan wins, and lists it
    assert bound.passthrough == {"x.old.new.y": "x.new.new.y", "x.old.z": "x.new.z"}
    assert bound.ambiguous == ["x.old.new.y"] and bound.warnings == []
    with pytest.raises(cs.BindError, match="x.old.new.y reads as a key of either layout"):
        plan.bind(layout, strict=True)
    assert plan.bind({"x.old.z": ((1,), "float32")}, strict=True).ambiguous == []


def test_bind_has_no_warnings_for_a_clean_source_layout():
    import convspec as cs

    plan = cs.compile("mixtral")
    layout = {
        "m.block_sparse_moe.experts.0.w1.weight": ((2, 2), "float32"),
        "m.block_sparse_moe.experts.0.w3.weight": ((2, 2), "float32"),
        "m.block_sparse_moe.gate.weight": ((1, 2), "float32"),
        "m.embed.weight": ((3, 2), "float32"),
    }
    assert plan.bind(layout).warnings == []


def test_default_is_not_taken_when_no_config_was_given_at_all():
    import convspec as cs
    from convspec.spec import parse_spec

    spec = parse_spec(
        "spec s\nconvert x = {p:path}.w -> {p}.a, {p}.b = chunk(x, n=config.parts ?? 2)\n", "s.cspec"
    )
    plan = cs.compile(spec)
    with pytest.raises(cs.ConfigError, match="needs config.parts, but no config was given"):
        plan.apply({"m.w": torch.zeros(4)})
    out = cs.compile(spec, config={}).apply({"m.w": torch.arange(4)})
    assert out["m.a"].tolist() == [0, 1] and out["m.b"].tolist() == [2, 3]


def test_bind_warns_when_saving_back_would_not_undo_a_convert():
    """A rename after a convert can, in the inverse order, rename the convert's output away from
    its inverse (what happens when an including spec and an included one overlap)."""
    plan = convspec.compile(
        parse_spec(
            "spec overlap\n"
            "convert w = {p:path}.attention.wq.weight -> {p}.attention.q_proj.weight = transpose(w)\n"
            "rename {p:path}.attention.{r:path} -> {p}.self_attn.{r}\n"
            "rename {p:path}.wq.{r:path} -> {p}.q_proj.{r}\n",
            "overlap.cspec",
        )
    )
    layout = {"x.attention.wq.weight": ((2, 3), "float32")}
    bound = plan.bind(layout)
    assert list(bound.outputs) == ["x.self_attn.q_proj.weight"]
    assert len(bound.warnings) == 1
    assert "x.self_attn.q_proj.weight comes from rule 1" in bound.warnings[0]
    assert "saving back would not undo this convert" in bound.warnings[0]
    with pytest.raises(convspec.BindError):
        plan.bind(layout, strict=True)
    # and it is right: the inverse indeed skips the transpose
    back = plan.inverse().bind(bound.outputs).outputs
    assert back == {"x.attention.wq.weight": ((3, 2), "float32")}


def test_an_index_offset_round_trips_and_refuses_negative_indices():
    plan = convspec.compile(
        parse_spec("spec off\nrename {p:path}.attn_queries.{i:int} -> {p}.layers.{i+1}.query\n", "off.cspec")
    )
    state = {f"m.attn_queries.{i}": random_tensor((2,), "float32", i) for i in (0, 9)}
    out = plan.apply(state)
    assert sorted(out) == ["m.layers.1.query", "m.layers.10.query"]
    assert_same_state(plan.inverse().apply(out), state)
    with pytest.raises(convspec.BindError, match=r"\{i-1\} is -1 for i=0"):
        plan.inverse().bind({"m.layers.0.query": ((1,), "float32")})


@pytest.mark.parametrize(
    "text, message",
    [
        ("rename {p:path}.a.{i:int+1} -> {p}.b.{i}", "only in a rename target"),
        ("rename {p:path}.a.{i} -> {p}.b.{i+1}", "is seg, so no constant can be added"),
        ("convert w = {p:path}.w.{i:int} -> {p}.x.{i+1} = transpose(w)", "only in a rename target"),
    ],
)
def test_index_offsets_are_checked(text, message):
    with pytest.raises(convspec.CompileError, match=message):
        convspec.compile(parse_spec(f"spec off\n{text}\n", "off.cspec"))


def test_stack_in_parts_keeps_halves_of_different_shapes_apart():
    """Ernie 4.5 VL: text experts and vision experts, stacked separately (they differ in shape)."""
    plan = convspec.compile(
        parse_spec(
            "spec ernie\n"
            "convert gate = {p:path}.experts.{e:int}.gate.weight, up = {p:path}.experts.{e:int}.up.weight\n"
            "  let g1, g2 = stack(gate, over=e, parts=2)\n"
            "  let u1, u2 = stack(up, over=e, parts=2)\n"
            "  -> {p}.text.gate_up = cat(g1, u1, dim=1, equal=true)\n"
            "  -> {p}.vision.gate_up = cat(g2, u2, dim=1, equal=true)\n",
            "ernie.cspec",
        )
    )
    state = {}
    for e in range(5):  # 3 + 2, as torch.chunk splits 5
        for w in ("gate", "up"):
            state[f"m.experts.{e}.{w}.weight"] = random_tensor((3, 4) if e < 3 else (2, 4), "bfloat16", e)
    assert plan.bind({k: (tuple(v.shape), "bfloat16") for k, v in state.items()}).outputs == {
        "m.text.gate_up": ((3, 6, 4), "bfloat16"),
        "m.vision.gate_up": ((2, 4, 4), "bfloat16"),
    }
    out = plan.apply(state)
    assert_same_state(plan.inverse().apply(out), state)
    with pytest.raises(convspec.BindError, match="leaves a part empty"):
        plan.bind(
            {"m.experts.0.gate.weight": ((3, 4), "float32"), "m.experts.0.up.weight": ((3, 4), "float32")}
        )


def test_an_unknown_include_names_the_including_line(tmp_path):
    f = tmp_path / "a.cspec"
    f.write_text("spec a\ninclude nosuch under model\n")
    with pytest.raises(convspec.CompileError) as exc:
        convspec.compile(convspec.load_spec(f))
    text = exc.value.render()
    assert text.startswith(f"{f}:2:1: error: include nosuch: no built-in spec or model type named 'nosuch'")
    assert "include nosuch under model" in text


def test_bind_warns_when_saving_back_would_rename_a_converts_input_wrongly():
    import convspec as cs
    from convspec.spec import parse_spec

    spec = parse_spec(
        'spec: t\nrules:\n  - rename: "t.h.{i:int}.{rest:path}"\n    to: "m.layers.{i}.{rest}"\n'
        '  - rename: "t.{rest:path}"\n    to: "m.{rest}"\n'
        '  - convert:\n      x: "{p:path}.qkv"\n    to:\n      "{p}.q, {p}.k": chunk(x, dim=0, n=2)\n',
        "t.yaml",
    )
    bound = cs.compile(spec).bind({"t.h.0.qkv": ((4, 2), "float32")})
    assert "t.h.0.qkv is an input of rule 3 (convert, t.yaml:7:5), but saving back would write it as " in (
        "\n".join(bound.warnings)
    )


@pytest.mark.parametrize(
    "n, problem",
    [
        (100_000_000, "chunk yields 100000000 values with this config, the rule names 2"),
        ("2", "chunk: parameter n from the config is '2', not a valid int"),
        (0, "chunk needs n >= 1, got 0"),
    ],
)
def test_parameters_evaluated_at_bind_are_checked_like_literals(n, problem):
    """A plan compiled without a config (or shipped as JSON) meets its config at bind: the values
    the config gives are checked there, before any op runs on them."""
    import dataclasses

    import convspec as cs
    from convspec.spec import parse_spec

    spec = parse_spec(
        'spec: t\nrules:\n  - convert:\n      x: "{p:path}.qkv"\n    to:\n'
        '      "{p}.q, {p}.k": chunk(x, dim=0, n=config.n)\n',
        "t.yaml",
    )
    plan = dataclasses.replace(cs.compile(spec), config={"n": n})
    with pytest.raises(cs.BindError) as exc:
        plan.bind({"a.qkv": ((4, 2), "float32")})
    assert problem in exc.value.problems[0]


def test_a_plan_json_without_undoes_gets_it_back_from_the_rule_order():
    """Plans written before inverse rules named the rule they undo still number them as the spec."""
    import json

    import convspec as cs

    plan = cs.compile("mixtral")
    for d, side in (
        (json.loads(plan.to_json()), "inverse_rules"),
        (json.loads(plan.inverse().to_json()), "rules"),
    ):
        d["convspec_plan"] = 1  # the format before plans wrote undoes
        for r in d[side]:
            del r["undoes"]
        back = cs.Plan.from_json(json.dumps(d))
        rules = back.inverse_rules if side == "inverse_rules" else back.rules
        assert [r.undoes for r in rules] == [r.undoes for r in plan.inverse_rules] == [3, 2, 1]
