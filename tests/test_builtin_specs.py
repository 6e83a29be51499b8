"""Every built-in spec: both syntaxes give the same IR, and forward-then-inverse is the identity bit for
bit over synthetic checkpoints. Hand-written specs have a generator in GENERATORS; every other spec
gets keys drawn from its own rename templates (its converts are checked on transformers' real
layouts by tests/test_conformance.py, and op by op in tests/test_ops_property.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.tensors import DTYPE_NAMES, assert_same_state, random_tensor
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import convspec
from convspec.routing import route_one
from convspec.spec import parse_spec
from convspec.spec.emit import to_dsl, to_yaml

SPECS = Path(__file__).resolve().parent.parent / "specs"
NAMES = convspec.spec_names()

# A generator draws (layout, config, keys the forward plan must produce) for its spec.
Layout = dict[str, tuple[tuple[int, ...], str]]
Generator = Callable[[st.DrawFn], tuple[Layout, dict | None, set[str]]]

dims = st.integers(1, 4)
dtypes = st.sampled_from(DTYPE_NAMES)


def _prefixes(draw) -> list[str]:
    n = draw(st.integers(1, 3))
    root = draw(st.sampled_from(["model.layers", "model.language_model.layers", "transformer.h"]))
    return [f"{root}.{i}" for i in range(n)]


def _moe(expert_key: str, gate_key: str | None, fused_prefix: str) -> Generator:
    def gen(draw):
        layout: Layout = {}
        produced: set[str] = set()
        for p in _prefixes(draw):
            n = draw(st.integers(1, 11))
            inter, hidden, dtype = draw(dims), draw(dims), draw(dtypes)
            for e in range(n):
                layout[expert_key.format(p=p, e=e, w="gate")] = ((inter, hidden), dtype)
                layout[expert_key.format(p=p, e=e, w="up")] = ((inter, hidden), dtype)
                layout[expert_key.format(p=p, e=e, w="down")] = ((hidden, inter), dtype)
            if gate_key:
                layout[gate_key.format(p=p)] = ((n, hidden), draw(dtypes))
            produced |= {f"{p}.{fused_prefix}.gate_up_proj", f"{p}.{fused_prefix}.down_proj"}
        layout["model.embed_tokens.weight"] = ((draw(dims), draw(dims)), draw(dtypes))
        return layout, None, produced

    return gen


class _MixtralKey(str):
    """w1/w3/w2 names for gate/up/down."""

    def format(self, **kw):  # noqa: A003
        kw["w"] = {"gate": "w1", "up": "w3", "down": "w2"}.get(kw.get("w"), kw.get("w"))
        return str.format(self, **kw)


def gen_legacy(draw):
    layout: Layout = {}
    produced: set[str] = set()
    names = {
        "LayerNorm.gamma": "LayerNorm.weight",
        "LayerNorm.beta": "LayerNorm.bias",
        "weight_g": "parametrizations.weight.original0",
        "weight_v": "parametrizations.weight.original1",
    }
    for i in range(draw(st.integers(1, 3))):
        p = f"bert.encoder.layer.{i}.output"
        for old, new in names.items():
            if draw(st.booleans()):
                layout[f"{p}.{old}"] = ((draw(dims),), draw(dtypes))
                produced.add(f"{p}.{new}")
    layout["bert.embeddings.word_embeddings.weight"] = ((draw(dims), draw(dims)), draw(dtypes))
    return layout, None, produced


def gen_split_qkv(draw):
    heads = draw(st.integers(1, 4))
    kv = draw(st.integers(1, heads))
    head_dim = draw(st.integers(1, 3))
    config = {"num_attention_heads": heads, "hidden_size": heads * head_dim * draw(st.integers(1, 2))}
    if draw(st.booleans()) or config["hidden_size"] != heads * head_dim:
        config["head_dim"] = head_dim
    if draw(st.booleans()) or kv != heads:
        config["num_key_value_heads"] = kv
    rows = (heads + 2 * kv) * head_dim
    layout: Layout = {}
    produced: set[str] = set()
    for p in _prefixes(draw):
        kinds = ["weight"] + (["bias"] if draw(st.booleans()) else [])
        for kind in kinds:
            shape = (rows, draw(dims)) if kind == "weight" else (rows,)
            layout[f"{p}.self_attn.qkv_proj.{kind}"] = (shape, draw(dtypes))
            produced |= {f"{p}.self_attn.{n}_proj.{kind}" for n in "qkv"}
        layout[f"{p}.self_attn.o_proj.weight"] = ((draw(dims), draw(dims)), draw(dtypes))
    return layout, config, produced


GENERATORS: dict[str, Generator] = {
    "mixtral": _moe(
        _MixtralKey("{p}.block_sparse_moe.experts.{e}.{w}.weight"),
        "{p}.block_sparse_moe.gate.weight",
        "mlp.experts",
    ),
    "qwen2_moe": _moe("{p}.mlp.experts.{e}.{w}_proj.weight", "{p}.mlp.gate.weight", "mlp.experts"),
    "legacy": gen_legacy,
    "split_qkv": gen_split_qkv,
}


def test_builtin_names_found():
    assert "mixtral" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_both_syntaxes_give_the_same_ir(name):
    """A hand-written .cspec twin parses to the YAML's IR; every spec written out in either syntax
    parses back to the same IR."""
    yaml_file, cspec_file = SPECS / f"{name}.yaml", SPECS / f"{name}.cspec"
    a = parse_spec(yaml_file.read_text(), str(yaml_file))
    assert a.name == name
    assert convspec.load_spec(name).model_dump() == a.model_dump()
    if cspec_file.exists():
        assert parse_spec(cspec_file.read_text(), str(cspec_file)).model_dump() == a.model_dump()
    assert parse_spec(to_dsl(a), "x.cspec").model_dump() == a.model_dump()
    assert parse_spec(to_yaml(a), "x.yaml").model_dump() == a.model_dump()


_SEGS = ["layers", "model", "weight", "bias", "q_proj", "blocks", "x1", "norm", "encoder"]


def _from_templates(plan: convspec.Plan) -> Generator:
    """Keys drawn from the plan's rename templates, plus unrelated keys. Keys the forward plan would
    claim with a convert are left out (their layouts come from transformers, see test_conformance)."""
    renames = [r for r in plan.rules if r.kind == "rename"]

    def value(draw, typ: str) -> str:
        if typ == "int":
            return str(draw(st.integers(0, 12)))
        if typ in ("path", "path?"):
            n = draw(st.integers(0 if typ == "path?" else 1, 3))
            return ".".join(draw(st.sampled_from(_SEGS)) for _ in range(n))
        return draw(st.sampled_from(_SEGS))

    def gen(draw):
        layout: Layout = {"lm_head.weight": ((2, 3), "float32")}
        for _ in range(draw(st.integers(1, 8))):
            if not renames:
                break
            rule = draw(st.sampled_from(renames))
            pat = rule.inputs[0][1]
            key = pat.format({c: value(draw, t) for c, t in rule.types})
            if route_one(plan, key)[0] == "member":  # a convert claims it, maybe after renames
                continue
            layout[key] = ((draw(dims),), draw(dtypes))
        return layout, None, set()

    return gen


@pytest.mark.parametrize("name", NAMES)
def test_forward_then_inverse_is_identity(name):
    """Either the inverse gives every tensor back bit for bit, or bind warned about the key (or an
    alias renamed it: aliases normalise old names, and the inverse writes the canonical one)."""
    spec = convspec.load_spec(name)
    generator = GENERATORS.get(name) or _from_templates(convspec.compile(spec))

    examples = 15 if name in GENERATORS else 4

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
    @given(case=st.composite(generator)(), seed=st.integers(0, 2**31))
    def check(case, seed):
        layout, config, produced = case
        plan = convspec.compile(spec, config)
        try:
            bound = plan.bind(layout)
        except convspec.BindError:
            assume(False)  # drawn keys that collide (two map to one name): bind refuses them
        assert produced <= set(bound.outputs), sorted(produced - set(bound.outputs))
        # an aliased key is saved under its canonical name by design, and so is a key in the target
        # layout already (saving back writes the original layout); a warned one was reported
        # (leaving a key out can change how the rest bind: a base-model lead is found from all keys,
        # so the keys are bound again until none is set aside)
        while True:
            warned = {w.split(" ", 1)[0] for w in bound.warnings} | set(bound.aliased) | set(bound.already)
            if not warned & set(layout):
                break
            layout = {k: v for k, v in layout.items() if k not in warned}
            bound = plan.bind(layout)
        state = {k: random_tensor(s, d, seed + i) for i, (k, (s, d)) in enumerate(layout.items())}
        out = plan.apply(state)
        assert {
            k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in out.items()
        } == bound.outputs
        # the drawn keys never reach a convert, so a spec whose converts are lossy (the GGUF specs'
        # add, log_neg) still gives them back bit for bit through its best-effort inverse
        lossy = bool(plan.lossy)
        back = plan.inverse(allow_lossy=lossy).apply(out)
        assert_same_state(back, state)
        # the JSON form of the plan does the same
        again = convspec.Plan.from_json(plan.to_json())
        assert_same_state(again.inverse(allow_lossy=lossy).apply(again.apply(state)), state)

    check()


# ---- every convert of every spec, with data ----------------------------------------------------

_SUB = {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 2, "hidden_size": 4}
SMALL_CONFIG = {**_SUB, "text_config": dict(_SUB), "vision_config": dict(_SUB)}
_VALUES = {"int": "1", "seg": "weight", "path": "layers.0", "path?": "layers.0"}


def _group_layout(plan, rule, shape: tuple[int, ...], n_experts: int = 4, path: str = "layers.0") -> Layout:
    """One group of a convert in the spec's source layout: its input templates filled in and taken
    back through the renames before it, every tensor of `shape` (divisible by the chunk, split and
    rope sizes SMALL_CONFIG gives), the stacked capture 0..n-1."""
    from convspec.routing import follow_renames

    inverse = plan.inverse()
    # the inverse lists the rules from this one on first (aliases and drops have no inverse rule)
    start = sum(1 for r in plan.rules[rule.index :] if not r.one_way and r.kind != "drop")
    layout: Layout = {}
    stacked = {c for free in rule.free_of.values() for c in free}
    for _, pat in rule.inputs:
        types = dict(rule.types)
        base = {c: {**_VALUES, "path": path}.get(types.get(c, "seg"), "x") for c in pat.captures}
        if "f" in base:
            base["f"] = "self_"
        over = [c for c in pat.captures if c in stacked]
        for e in range(n_experts if over else 1):
            values = {**base, **{c: str(e) for c in over}}
            layout[follow_renames(inverse, pat.format(values), start, renames_only=True)[0]] = (
                shape,
                "float32",
            )
    return layout


# The GGUF specs' converts read GGUF config fields (bloom's n_head) and some round: they are checked
# with data against transformers' GGUF loading in tests/test_gguf_specs.py
CONVERT_SPECS = [
    n
    for n in NAMES
    if any(r.kind == "convert" for r in convspec.compile(n).rules) and not n.startswith("gguf_")
]


@pytest.mark.parametrize("name", CONVERT_SPECS)
def test_every_convert_round_trips_bit_exact(name):
    """Each convert rule on a synthetic group: forward, then inverse, gives back the same bits. A
    group whose keys have no base prefix reads as a base-model checkpoint (see bind's base_lead);
    it is tried as a head-class checkpoint too, its path under the prefix."""
    plan = convspec.compile(name, SMALL_CONFIG)
    paths = ["layers.0"] + ([f"{plan.base_prefix}.layers.0"] if plan.base_prefix else [])
    tried = 0
    for rule in plan.rules:
        if rule.kind != "convert":
            continue
        found = []
        for path in paths:
            for shape in ((12, 6), (2, 12, 6)):  # 3-d for ops on already-stacked experts
                layout = _group_layout(plan, rule, shape, path=path)
                try:
                    found.append((layout, plan.bind(layout)))
                    break
                except convspec.BindError as exc:
                    problems = exc.problems
        if not found:
            pytest.fail(f"{rule.label}: the synthetic group does not bind: {problems[:2]}")
        for layout, bound in found:
            if len(bound.groups) != 1 or bound.groups[0].rule.index != rule.index:
                continue  # an earlier rule (e.g. a convert of the including spec) claims these keys
            if bound.warnings:
                continue  # bind reports that saving back would not undo it (overlapping includes)
            state = {k: random_tensor(s, d, i) for i, (k, (s, d)) in enumerate(layout.items())}
            out = plan.apply(state)
            back = plan.inverse().apply(out)
            assert_same_state(back, state)
            tried += 1
            break
    assert tried, "no convert of this spec claimed its own synthetic group"
