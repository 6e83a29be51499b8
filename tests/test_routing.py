"""Routing by key shape: the bulk path (one match per shape) must agree with matching every key."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convspec
from convspec.routing import Routes, _route_each, fold_info, route_all
from convspec.spec import parse_spec

WORDS = ["model", "layers", "mlp", "experts", "w1", "w3", "a", "weight", "bias", "0", "7", "12", "007"]


def _slow(plan, keys) -> Routes:
    out = Routes()
    _route_each(plan, keys, _inverse(plan), out)
    return out


def _inverse(plan):
    return plan.inverse(allow_lossy=True) if plan.inverse_rules is not None else None


def assert_same_routes(plan, keys: list[str]) -> Routes:
    fast, slow = route_all(plan, keys, _inverse(plan)), _slow(plan, keys)
    assert fast.passthrough == slow.passthrough
    assert sorted(fast.unmatched) == sorted(slow.unmatched)
    assert sorted(fast.dropped) == sorted(slow.dropped)
    assert sorted(fast.aliased) == sorted(slow.aliased)
    assert fast.members == slow.members
    assert sorted(fast.problems) == sorted(slow.problems)
    assert sorted(fast.collisions, key=str) == sorted(slow.collisions, key=str)
    return fast


def _keys_from_templates(plan, rng: random.Random, n: int) -> list[str]:
    """Keys drawn from every input template of the plan (numbers of 1 to 3 digits), plus noise."""
    pats = [(r, p) for r in plan.rules for _, p in r.inputs]
    keys = {"lm_head.weight", "model.norm.weight", "layers.5.w1.weight", "x.01.y"}
    keys |= {f"model.layers.{i}.{w}.weight" for i in range(12) for w in ("q", "k", "w1")}
    for _ in range(n if pats else 0):
        rule, pat = rng.choice(pats)
        types = dict(rule.types)
        vals = {}
        for c in pat.captures:
            t = types.get(c, "seg")
            if t == "int":
                vals[c] = str(rng.choice([0, 1, 2, 9, 10, 11, 99, 100, 255]))
            elif t in ("path", "path?"):
                k = rng.randint(0 if t == "path?" else 1, 3)
                vals[c] = ".".join(rng.choice(WORDS) for _ in range(k))
            else:
                vals[c] = rng.choice(WORDS)
        keys.add(pat.format(vals))
    return sorted(keys)


@pytest.mark.parametrize("name", convspec.spec_names())
def test_every_builtin_spec_routes_the_same_in_bulk(name):
    plan = convspec.compile(name)
    keys = _keys_from_templates(plan, random.Random(name), 120)
    routes = assert_same_routes(plan, keys)
    pinned = fold_info(plan)
    if pinned is not None and not {str(i) for i in range(12)} <= pinned:
        assert routes.shapes < len(keys)  # the bulk path ran: some keys shared a route


def _moe_keys(layers: int, experts: int) -> list[str]:
    return [
        f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
        for i in range(layers)
        for e in range(experts)
        for w in ("w1", "w2", "w3")
    ] + [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(layers)]


def test_bulk_routing_matches_one_stand_in_per_shape():
    """Mixtral, 12 layers x 16 experts: keys of 1 and 2 digit numbers, `w1`/`w3` told apart."""
    plan = convspec.compile("mixtral")
    routes = assert_same_routes(plan, _moe_keys(12, 16))
    assert len(routes.members) == 2 * 12  # gate_up and down per layer
    assert routes.shapes < 30  # matched per shape, not per key (12 * 16 * 3 + 12 keys)


def _plan(text: str):
    return convspec.compile(parse_spec("spec t\n" + text + "\n", "t.cspec"))


def test_a_number_the_spec_spells_out_is_not_folded():
    """`layers.0.` in a template: layer 0 routes differently from the layers that share its shape."""
    plan = _plan("rename layers.0.{r:path} -> first.{r}\nrename layers.{i:int}.{r:path} -> blocks.{i}.{r}")
    assert fold_info(plan) == frozenset({"0"})
    keys = [f"layers.{i}.{w}.weight" for i in range(40) for w in ("a", "b")]
    routes = assert_same_routes(plan, keys)
    assert routes.passthrough["layers.0.a.weight"] == "first.a.weight"
    assert routes.passthrough["layers.7.a.weight"] == "blocks.7.a.weight"


def test_a_digit_beside_a_capture_turns_folding_off():
    plan = _plan("rename {x}0.{r:path} -> y.{x}.{r}")
    assert fold_info(plan) is None
    assert_same_routes(plan, [f"a{i}0.w.{j}" for i in range(10) for j in range(5)])


def test_offsets_turn_folding_off():
    plan = _plan("rename {p:path}.q.{i:int} -> {p}.layers.{i+1}.q")
    assert fold_info(plan) is None
    assert_same_routes(plan, [f"m.q.{i}" for i in range(40)])


@pytest.mark.parametrize(
    "odd",
    ["model.layers.01.block_sparse_moe.experts.0.w1.weight", "a\x1fb", "ünïcode.3.weight", "x.3\ny"],
)
def test_keys_the_bulk_path_cannot_fold_are_matched_alone(odd):
    """Leading zeros (not an `{e:int}`), the placeholder byte, non-ASCII text and newlines."""
    plan = convspec.compile("mixtral")
    keys = _moe_keys(2, 12) + [odd]
    routes = assert_same_routes(plan, keys)
    if "\x1f" not in odd and "\n" not in odd:
        assert routes.shapes < 20  # the other keys still share routes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.lists(
            st.sampled_from(WORDS + ["3", "45", "100", "block_sparse_moe", "gate"]), min_size=1, max_size=7
        ),
        min_size=1,
        max_size=80,
    )
)
def test_any_key_set_routes_the_same_in_bulk(segments):
    plan = _plan(
        "rename layers.0.{r:path} -> first.{r}\n"
        "drop {p:path}.bias\n"
        "rename {p:path}.mlp.{r:path} -> {p}.ffn.{r}\n"
        "convert gate = {p:path}.experts.{e:int}.w1.weight, up = {p:path}.experts.{e:int}.w3.weight\n"
        "     -> {p}.gate_up = cat(stack(gate, over=e), stack(up, over=e), dim=1)"
    )
    keys = sorted({".".join(s) for s in segments} | set(_moe_keys(1, 12)))
    assert_same_routes(plan, keys)


BASE_SPEC = """spec t
base_prefix model
rename {p:path}.transformer.{rest:path} -> {p}.language_model.{rest}
rename model.llm.{rest:path} -> model.text.{rest}
convert w = {p:path}.experts.{e:int}.w -> {p}.experts.stacked = stack(w, over=e)
"""


def test_a_base_model_checkpoint_is_matched_as_if_a_leading_capture_could_be_empty():
    """No key under `base_prefix`: `{p:path}.transformer.x` applies to `transformer.x` too (as
    transformers' unanchored pattern does); a literal `model.llm.` rule does not apply to `llm.x`."""
    plan = convspec.compile(parse_spec(BASE_SPEC, "t.cspec"))
    f32 = ((2, 2), "float32")
    base = {"transformer.h.0.w": f32, "llm.h.0.w": f32, "experts.0.w": f32, "experts.1.w": f32}
    bound = plan.bind(base)
    assert bound.passthrough == {
        "transformer.h.0.w": "language_model.h.0.w",
        "llm.h.0.w": "llm.h.0.w",
    }
    assert bound.outputs["experts.stacked"] == ((2, 2, 2), "float32")
    back = plan.inverse().bind({k: (tuple(s), d) for k, (s, d) in bound.outputs.items()})
    assert set(back.outputs) == set(base)
    head = plan.bind({f"model.{k}": v for k, v in base.items()})  # under the prefix: as before
    assert head.passthrough == {
        "model.transformer.h.0.w": "model.language_model.h.0.w",
        "model.llm.h.0.w": "model.text.h.0.w",
    }
    assert "model.experts.stacked" in head.outputs
    no_base = convspec.compile(parse_spec(BASE_SPEC.replace("base_prefix model\n", ""), "t.cspec"))
    assert no_base.bind(base).passthrough["transformer.h.0.w"] == "transformer.h.0.w"


def test_a_base_model_checkpoint_routes_the_same_in_bulk():
    plan = convspec.compile(parse_spec(BASE_SPEC, "t.cspec"))
    keys = [f"transformer.h.{i}.w" for i in range(40)] + [f"experts.{e}.w" for e in range(40)]
    fast = route_all(plan, keys, _inverse(plan), "<model>.")
    slow = Routes(lead="<model>.")
    _route_each(plan, keys, _inverse(plan), slow)
    assert fast.passthrough == slow.passthrough and fast.members == slow.members
    assert fast.passthrough["transformer.h.3.w"] == "language_model.h.3.w"


def test_language_md_base_model_example_is_what_bind_does():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "language.md").read_text(encoding="utf-8")
    section = text.split("Rules imported from transformers are often written under the prefix", 1)[1]
    spec = re.search(r"```cspec\n(.*?)```", section, re.S).group(1)
    plan = convspec.compile(parse_spec(spec, "t.cspec"))
    rows = re.findall(r"^\| (`.*`) +\| (`.*`) +\|$", section.split("\n(tests/", 1)[0], re.M)
    assert len(rows) == 2
    for keys, become in rows:
        src, dst = re.findall(r"`([^`]+)`", keys), re.findall(r"`([^`]+)`", become)
        bound = plan.bind({k: ((1,), "float32") for k in src})
        assert [bound.passthrough[k] for k in src] == dst
