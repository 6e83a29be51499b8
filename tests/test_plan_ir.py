"""The plan is a pure, immutable IR: equal plans compare and hash equal (with a config too), the
config is a frozen copy of the caller's, nothing is written into a plan, and `Plan.check` holds
its invariants."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

import convspec
from convspec.frozen import FrozenDict, FrozenList


def _config() -> dict:
    return {"num_local_experts": 4, "rope_scaling": {"type": "linear", "factors": [1, 2]}}


def test_equal_plans_with_a_config_compare_and_hash_equal():
    a, b = convspec.compile("mixtral", config=_config()), convspec.compile("mixtral", config=_config())
    assert a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert hash(a) == hash(a)  # computed once, then read back
    other = convspec.compile("mixtral", config={**_config(), "num_local_experts": 8})
    assert other != a


def test_a_plan_with_config_expressions_left_for_bind_hashes():
    spec = convspec.spec.parse_spec(
        'spec: t\nrules:\n  - convert:\n      x: "{p:path}.qkv"\n    to:\n'
        '      "{p}.a, {p}.b": split(x, dim=0, sizes=[config.a, config.b])\n',
        "t.yaml",
    )
    assert hash(convspec.compile(spec)) == hash(convspec.compile(spec))


def test_the_callers_config_is_copied_and_frozen():
    config = _config()
    plan = convspec.compile("mixtral", config=config)
    before = plan.to_json()
    config["num_local_experts"] = 99
    config["rope_scaling"]["factors"].append(3)
    assert plan.config == _config() and plan.to_json() == before
    assert isinstance(plan.config, dict) and isinstance(plan.config["rope_scaling"]["factors"], list)
    with pytest.raises(TypeError):
        plan.config["num_local_experts"] = 1
    with pytest.raises(TypeError):
        plan.config["rope_scaling"]["factors"].append(5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.config = {}  # type: ignore[misc]
    assert not hasattr(plan, "_cache")


def test_a_plan_pickles_and_copies_into_an_equal_plan():
    plan = convspec.compile("mixtral", config=_config())
    hash(plan)
    again = pickle.loads(pickle.dumps(plan))
    assert (
        again == plan
        and hash(again) == hash(plan)
        and "_hash" not in pickle.loads(pickle.dumps(plan)).__dict__
    )
    assert copy.deepcopy(plan) == plan
    assert type(again.config) is FrozenDict and type(again.config["rope_scaling"]["factors"]) is FrozenList


def test_the_inverse_is_made_once_and_held_outside_the_plan():
    plan = convspec.compile("mixtral")
    assert plan.inverse() is plan.inverse()
    assert plan.inverse().inverse() == plan
    assert "inverse" not in vars(plan)


def test_check_passes_on_compiled_plans_and_refuses_a_broken_one():
    plan = convspec.compile("mixtral", config=_config())
    plan.check()
    plan.inverse().check()
    rule = next(r for r in plan.rules if r.nodes)
    bad = dataclasses.replace(rule.nodes[0], op="concatt")
    broken = dataclasses.replace(
        plan,
        rules=tuple(
            dataclasses.replace(r, nodes=(bad, *r.nodes[1:])) if r is rule else r for r in plan.rules
        ),
    )
    with pytest.raises(convspec.PlanError, match=r"rules\[\d\]\.nodes\[0\]\.op: unknown op 'concatt'"):
        broken.check()


def _first_node(d: dict) -> dict:
    return next(r for r in d["rules"] if r["nodes"])["nodes"][0]


def test_from_json_runs_check_an_unknown_op_or_a_bad_parameter_is_refused_by_name():
    import json

    d = json.loads(convspec.compile("mixtral").to_json())
    _first_node(d)["op"] = "stakk"
    with pytest.raises(convspec.PlanError, match=r"nodes\[0\]\.op: unknown op 'stakk'"):
        convspec.Plan.from_json(json.dumps(d))
    d = json.loads(convspec.compile("mixtral").to_json())
    node = _first_node(d)
    node["params"] = [[k, "0" if k == "dim" else v] for k, v in node["params"]]
    with pytest.raises(
        convspec.PlanError, match=r"nodes\[0\]\.params\.dim: parameter dim of \w+ must be an integer"
    ):
        convspec.Plan.from_json(json.dumps(d))


def test_config_expressions_are_typed_nodes_with_one_printer():
    from convspec.compile.expr import BinOp, ConfigExpr, ListOf, Ref, config_expr_json, show

    spec = convspec.spec.parse_spec(
        'spec: t\nrules:\n  - convert:\n      x: "{p:path}.qkv"\n    to:\n'
        '      "{p}.a, {p}.b": split(x, dim=0, sizes=[config.a * 2, config.b ?? 1])\n',
        "t.yaml",
    )
    plan = convspec.compile(spec)
    sizes = dict(plan.rules[0].nodes[0].params)["sizes"]
    assert isinstance(sizes, ConfigExpr) and isinstance(sizes.ir, ListOf) and sizes.length == 2
    assert isinstance(sizes.ir.items[0], BinOp) and sizes.ir.items[0].left == Ref(("config", "a"))
    assert sizes.text == show(sizes.ir) == "[(config.a * 2), (config.b ?? 1)]"
    assert str(plan.rules[0].nodes[0]).endswith("sizes=<[(config.a * 2), (config.b ?? 1)]>)")
    assert config_expr_json(sizes)["$len"] == config_expr_json(sizes)["$expr"]["items"]
    assert convspec.Plan.from_json(plan.to_json()) == plan


def test_where_a_rule_or_op_was_written_is_a_typed_span_that_prints_as_before():
    from convspec.errors import Span

    plan = convspec.compile("mixtral")
    rule = plan.rules[1]
    assert isinstance(rule.where, Span) and rule.where.file == "specs/mixtral.yaml" and rule.where.line > 0
    assert str(rule.where) == f"specs/mixtral.yaml:{rule.where.line}:{rule.where.col}"
    assert isinstance(rule.nodes[0].where, Span) and rule.where.text is None  # no source line kept
    assert f"({rule.kind}, {rule.where})" in rule.label
    for text in (
        "specs/x.yaml:6:5",
        "<spec>:1:2",
        "<spec>",
        "",
        "C:\\specs\\x.yaml:3:4",
        "x:01:2",
        "a:b",
        "x:0:1",
    ):
        assert str(Span.from_location(text)) == text
    assert Span.from_location("<spec>:1:2") == Span(None, 1, 2)


def test_binding_and_inverting_write_nothing_into_the_plan():
    from convspec import derived

    plan = convspec.compile("mixtral", config={"num_local_experts": 2})
    shapes = {"w1": (48, 32), "w2": (32, 48), "w3": (48, 32)}
    layout = {
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": (s, "bfloat16")
        for e in range(2)
        for w, s in shapes.items()
    }
    before = dict(vars(plan))
    bound = plan.bind(layout)
    plan.inverse().bind({k: v for k, v in bound.outputs.items()})
    assert vars(plan) == before
    assert derived.held(plan) > 0  # what binding derived is held beside the plan


def test_a_frozen_list_shows_in_a_message_as_the_list_it_is():
    """reprlib picks its format by type name: a FrozenList parameter is shown thawed, as a list."""
    import json

    spec = convspec.spec.parse_spec(
        'spec: t\nrules:\n  - convert:\n      x: "{p:path}.qkv"\n    to:\n'
        '      "{p}.a, {p}.b": split(x, dim=0, sizes=[1, 2])\n',
        "t.yaml",
    )
    d = json.loads(convspec.compile(spec).to_json())
    node = d["rules"][0]["nodes"][0]
    node["params"] = [[k, [1, 2, 3, 4, 5, 6, 7, "x"] if k == "sizes" else v] for k, v in node["params"]]
    with pytest.raises(convspec.PlanError) as err:
        convspec.Plan.from_json(json.dumps(d))
    assert err.value.message.endswith("must be a list of integers, got [1, 2, 3, 4, 5, 6, ...]")


def test_derived_tables_are_bounded_and_go_with_their_plan(monkeypatch):
    """Block runs of many distinct shapes (the table that grew without bound) stay within MAX_TABLES,
    the oldest going first, and a plan's tables are let go when the plan is."""
    import gc

    from test_fuzz import within

    from convspec import derived
    from convspec.blocks import block_runs

    monkeypatch.setattr(derived, "MAX_TABLES", 8)
    plan = convspec.compile("mixtral", config={"num_local_experts": 2})
    with within(60, 1 << 30, "evicting derived tables"):  # evicting an inverse plan once deadlocked
        _bind_many_shapes(plan, block_runs, derived)
    key = id(plan)
    del plan
    gc.collect()
    assert key not in derived._tables


def _bind_many_shapes(plan, block_runs, derived) -> None:
    for rows in range(1, 21):  # 20 layers of distinct shapes: 20 distinct block-run signatures
        layout = {
            f"model.layers.{rows}.block_sparse_moe.experts.{e}.{w}.weight": ((rows, 4), "float32")
            for e in range(2)
            for w in ("w1", "w2", "w3")
        }
        bound = plan.bind(layout)
        for group in bound.groups:
            block_runs(bound, group, 0)
        assert derived.held(plan) <= 8
