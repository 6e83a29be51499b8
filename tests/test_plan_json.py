"""Plans read from JSON: upgraded by format version, then checked as thoroughly as compiling checks a
spec; whatever is wrong is a PlanError that names the field."""

from __future__ import annotations

import json

import pytest

import convspec
from convspec.compile.plan_json import FORMAT, UPGRADES
from convspec.errors import PlanError


@pytest.fixture(scope="module")
def mixtral() -> convspec.Plan:
    return convspec.compile("mixtral")


@pytest.fixture(scope="module")
def split_qkv() -> convspec.Plan:
    """A plan whose split sizes wait for the config (a config expression in the JSON)."""
    return convspec.compile("split_qkv")


def _load(d: dict) -> convspec.Plan:
    return convspec.Plan.from_json(json.dumps(d))


def _refused(d: dict | str, *needles: str) -> PlanError:
    with pytest.raises(PlanError) as exc:
        convspec.Plan.from_json(d if isinstance(d, str) else json.dumps(d))
    for needle in needles:
        assert needle in exc.value.message, exc.value.message
    return exc.value


def _convert(d: dict, side: str = "rules") -> dict:
    """The first convert rule of a plan object (C in messages: its place in the list)."""
    return next(r for r in d[side] if r["kind"] == "convert")


C = next(i for i, r in enumerate(convspec.compile("mixtral").rules) if r.kind == "convert")


# ---- versions -------------------------------------------------------------------------------------


def test_to_json_writes_the_current_format(mixtral):
    assert json.loads(mixtral.to_json())["convspec_plan"] == FORMAT == 2


def test_every_older_format_has_one_upgrade_step():
    """Version N is upgraded by UPGRADES[N] to N+1, from 1 up to the current format."""
    assert sorted(UPGRADES) == list(range(1, FORMAT))


def test_a_format_1_plan_as_last_written_is_upgraded(mixtral):
    """What convspec wrote before formats were counted: the same fields, `convspec_plan: 1`."""
    d = json.loads(mixtral.to_json())
    d["convspec_plan"] = 1
    assert _load(d) == mixtral


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_a_format_1_plan_without_the_later_fields_gets_what_they_meant(mixtral, inverse):
    """Format 1 plans from before undoes, unless, one_way, base_prefix, is_inverse, lossy,
    inverse_error and config were written: the upgrade gives each its meaning, explicitly."""
    plan = mixtral.inverse() if inverse else mixtral
    d = json.loads(plan.to_json())
    d["convspec_plan"] = 1
    for key in ("config", "inverse_error", "lossy", "regex"):
        del d[key]
    if not inverse:
        del d["is_inverse"]
    for side in ("rules", "inverse_rules"):
        for r in d[side]:
            for key in ("undoes", "unless", "one_way"):
                del r[key]
    back = _load(d)
    assert back == plan
    undoing = back.rules if inverse else back.inverse_rules
    assert [r.undoes for r in undoing] == [3, 2, 1]
    del d["base_prefix"]  # a plan from before base_prefix was from a spec without one
    assert _load(d).base_prefix == ""


def test_a_format_2_plan_must_have_every_field(mixtral):
    """Only an older format is upgraded: a current plan that lacks a field is refused, not patched."""
    d = json.loads(mixtral.to_json())
    del d["inverse_rules"][0]["undoes"]
    _refused(d, "inverse_rules[0].undoes: missing field")


def test_a_newer_format_is_refused(mixtral):
    d = json.loads(mixtral.to_json())
    d["convspec_plan"] = FORMAT + 1
    err = _refused(d, f"plan format {FORMAT + 1} is newer than this convspec reads")
    assert "upgrade convspec" in err.hint


@pytest.mark.parametrize("version", [0, -1, "2", 1.5, True, None])
def test_a_version_that_is_not_one_is_refused(mixtral, version):
    d = json.loads(mixtral.to_json())
    d["convspec_plan"] = version
    _refused(d, "is not a plan format version")


@pytest.mark.parametrize(
    "text", ['{"name": "x"}', "[]", "3", '"plan"', "null", '{"convspec_plan_": 2}'], ids=repr
)
def test_json_without_a_version_is_not_a_plan(text):
    """No `convspec_plan` field: not a plan at all (every plan ever written has one)."""
    _refused(text, "not a convspec plan: no 'convspec_plan' field")


@pytest.mark.parametrize("text", ["", "{", "{'a': 1}", "[" * 100_000, "1" * 5000], ids=lambda t: t[:8])
def test_text_that_is_not_json_is_refused(text):
    _refused(text, "not a convspec plan")


# ---- the shape of a plan --------------------------------------------------------------------------


def test_a_field_of_the_wrong_type_is_named(mixtral):
    d = json.loads(mixtral.to_json())
    d["rules"][1]["keep"] = "p"
    _refused(d, "rules[1].keep: expected a list, got a string")
    d = json.loads(mixtral.to_json())
    d["rules"] = {"0": 1}
    _refused(d, "rules: expected a list, got an object")


def test_an_unknown_field_is_refused(mixtral):
    d = json.loads(mixtral.to_json())
    _convert(d)["nodes"][0]["opp"] = "stack"
    err = _refused(d, f"rules[{C}].nodes[0].opp: unknown field")
    assert "did you mean 'op'" in err.hint


def test_a_missing_field_is_named(mixtral):
    d = json.loads(mixtral.to_json())
    del _convert(d)["nodes"][0]["params"]
    _refused(d, f"rules[{C}].nodes[0].params: missing field")


# ---- ops, parameters, templates, captures -----------------------------------------------------------


def test_an_unknown_op_is_a_plan_error_not_a_key_error_later(mixtral):
    """The issue's case: it loaded, then failed with a bare KeyError when the plan was used."""
    d = json.loads(mixtral.to_json())
    _convert(d)["nodes"][0]["op"] = "stak"
    err = _refused(d, f"rules[{C}].nodes[0].op: unknown op 'stak'")
    assert "did you mean 'stack'" in err.hint


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("dim", "0", "parameter dim of stack must be an integer, got '0'"),
        ("dim", True, "parameter dim of stack must be an integer, got True"),
        ("over", "e.x", "parameter over of stack must be a capture name"),
        ("parts", 2, "outputs: 1 values, but stack with these parameters yields 2"),
        ("over", "f", "stack(over=f) but its input is not a collection over {f}"),
    ],
)
def test_a_bad_parameter_is_named(mixtral, name, value, needle):
    d = json.loads(mixtral.to_json())
    node = _convert(d)["nodes"][0]
    node["params"] = [[k, value if k == name else v] for k, v in node["params"]]
    _refused(d, f"rules[{C}]", needle)


def test_unknown_missing_and_repeated_parameters_are_refused(mixtral):
    d = json.loads(mixtral.to_json())
    _convert(d)["nodes"][0]["params"].append(["size", 2])
    _refused(d, f"rules[{C}].nodes[0].params: stack has no parameter 'size'")
    d = json.loads(mixtral.to_json())
    _convert(d)["nodes"][0]["params"].pop(0)
    _refused(d, f"rules[{C}].nodes[0].params: missing parameter over of stack")
    d = json.loads(mixtral.to_json())
    _convert(d)["nodes"][0]["params"].append(["dim", 0])
    _refused(d, f"rules[{C}].nodes[0].params: a parameter is given twice")


def test_an_op_check_is_run(mixtral):
    """chunk n=0 is refused by the op's own check, as compiling refuses it."""
    d = json.loads(mixtral.inverse().to_json())
    rule = next(r for r in d["rules"] if any(n["op"] == "chunk" for n in r["nodes"]))
    node = next(n for n in rule["nodes"] if n["op"] == "chunk")
    node["params"] = [[k, 0 if k == "n" else v] for k, v in node["params"]]
    _refused(d, "chunk needs n >= 1, got 0")


def test_a_bad_template_is_named(mixtral):
    d = json.loads(mixtral.to_json())
    d["rules"][0]["inputs"][0][1]["parts"][0] = ["cap", "1p", "path"]
    _refused(d, "rules[0].inputs[0][1]: template '{1p:path}", "in key template")
    d = json.loads(mixtral.to_json())
    d["rules"][0]["inputs"][0][1]["parts"][0] = ["cap", "p", "long"]
    _refused(d, "unknown capture type 'long'")
    d = json.loads(mixtral.to_json())
    d["rules"][0]["inputs"][0][1]["parts"].insert(1, ["lit", "", None])
    _refused(d, "rules[0].inputs[0][1].parts:", "do not spell one template")


def test_a_capture_the_target_does_not_bind_is_refused(mixtral):
    """The compiler's own data-flow check, on the plan: the target names a capture no input has."""
    d = json.loads(mixtral.to_json())
    rule = _convert(d)
    parts = rule["outputs"][0][1]["parts"]
    parts[-1][1] += "."
    parts.append(["cap", "q", "seg"])
    _refused(d, f"rules[{C}]: rule {C + 1} (convert): capture {{q}} in target")


def test_a_rename_that_drops_a_capture_is_refused(mixtral):
    d = json.loads(mixtral.to_json())
    rename = next(r for r in d["rules"] if r["kind"] == "rename")
    i = d["rules"].index(rename)
    rename["outputs"][0][1]["parts"] = [["lit", "x", None]]
    _refused(d, f"rules[{i}]: rename drops capture")


def test_a_value_used_before_it_is_made_is_refused(mixtral):
    d = json.loads(mixtral.to_json())
    nodes = _convert(d)["nodes"]
    nodes[0], nodes[-1] = nodes[-1], nodes[0]
    _refused(d, f"rules[{C}].nodes[0].inputs: '%1' is not an input of the rule or a value of an op before")


def test_a_derived_field_that_disagrees_is_refused(mixtral):
    d = json.loads(mixtral.to_json())
    d["rules"][0]["keep"] = []
    _refused(d, "rules[0].keep: [], but the rule's templates and ops give ['p', 'rest']")
    d = json.loads(mixtral.to_json())
    d["rules"][1]["index"] = 0
    _refused(d, "rules[1].index: 0, but the rule is number 1 of its list")


def test_a_recorded_inverse_that_does_not_undo_the_rules_is_refused(mixtral):
    d = json.loads(mixtral.to_json())
    d["inverse_rules"][0]["undoes"] = 1
    _refused(d, "inverse_rules[0]: is not what inverting the other side's rules gives")
    d = json.loads(mixtral.to_json())
    d["lossy"] = ["rule 1 drops everything"]
    _refused(d, "lossy: ['rule 1 drops everything'], but inverting the rules gives []")


# ---- config expressions ------------------------------------------------------------------------------


def test_a_config_expression_round_trips_and_is_checked(split_qkv):
    text = split_qkv.to_json()
    assert convspec.Plan.from_json(text) == split_qkv
    d = json.loads(text)
    node = _convert(d)["nodes"][0]
    sizes = dict(node["params"])["sizes"]
    assert "$expr" in sizes
    sizes["$expr"]["kind"] = "lambda"
    _refused(d, "rules[0].nodes[0].params.sizes: not an expression")


def test_a_config_expression_in_a_plan_compiled_with_a_config_is_refused(split_qkv):
    d = json.loads(split_qkv.to_json())
    d["config"] = {"num_attention_heads": 2}
    _refused(
        d, "rules[0].nodes[0].params.sizes: a config expression, but the plan was compiled with a config"
    )


def test_a_config_expression_where_compiling_allows_none_is_refused(mixtral, split_qkv):
    expr = dict(_convert(json.loads(split_qkv.to_json()))["nodes"][0]["params"])["sizes"]
    d = json.loads(mixtral.to_json())
    node = _convert(d)["nodes"][0]
    node["params"] = [[k, expr if k == "over" else v] for k, v in node["params"]]
    _refused(d, "params.over: a capture parameter is written out in the spec, never a config expression")


def test_the_expressions_a_config_was_read_through_round_trip_and_are_checked():
    """A plan compiled with a config keeps, beside each value, the expression it came from (what the
    transformers exporter reads); read back, each must name a parameter evaluated from the config."""
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32, "head_dim": 8}
    plan = convspec.compile("split_qkv", config)
    text = plan.to_json()
    again = convspec.Plan.from_json(text)
    node = next(n for r in again.rules if r.kind == "convert" for n in r.nodes if n.exprs)
    assert dict(node.exprs)["sizes"].text.startswith("[")
    assert again.to_json() == text
    d = json.loads(text)
    exprs = next(n for r in d["rules"] if r["kind"] == "convert" for n in r["nodes"] if "exprs" in n)["exprs"]
    exprs[0][0] = "dim"  # a value written out in the spec, not what the expression gives
    _refused(d, ".exprs[0][1]: ", "with the plan's config, but dim is 0")
    exprs[0][0] = "nope"
    _refused(d, ".exprs[0][0]: 'nope' is not a parameter of split evaluated from the config")
    exprs[0][0] = "sizes"
    exprs[0][1]["$expr"] = {"kind": "num", "value": 3}
    _refused(d, ".exprs[0][1]: not an expression as the compiler writes it")
    d["config"] = None
    _refused(d, "the plan has no config")


# ---- the command line ------------------------------------------------------------------------------


def test_the_error_renders_as_one_message(mixtral):
    """What the CLI prints for any ConvspecError: `error: FIELD: what is wrong`, and a hint."""
    d = json.loads(mixtral.to_json())
    _convert(d)["nodes"][0]["op"] = "stak"
    err = _refused(d)
    assert str(err).splitlines()[0] == f"error: rules[{C}].nodes[0].op: unknown op 'stak'"
    assert isinstance(err, convspec.ConvspecError)


def test_the_usage_docs_example_prints_what_it_says(capsys):
    """docs/usage.md, "Plans as JSON": its Python block runs and prints its trailing `# ` lines."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "usage.md").read_text(encoding="utf-8")
    section = doc.split("## Plans as JSON", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    lines = code.rstrip("\n").splitlines()
    said = []
    while lines and lines[-1].startswith("# "):
        said.insert(0, lines.pop()[2:])
    exec(compile("\n".join(lines), "docs/usage.md", "exec"), {})
    assert said and capsys.readouterr().out.splitlines() == said


def test_a_config_expression_with_a_nameless_name_is_refused():
    """The fuzzer's find: `{"kind": "ref", "path": []}` in a plan's expression was an IndexError."""

    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 2, "hidden_size": 8}
    d = json.loads(convspec.compile("split_qkv", config=config).to_json())
    d["rules"][0]["nodes"][0]["exprs"][0][1]["$expr"]["items"][0]["left"]["path"] = []
    with pytest.raises(PlanError, match=r"exprs\[0\]\[1\]: not an expression: a name with no parts"):
        convspec.Plan.from_json(json.dumps(d))
