"""An op made up here, as one class, registered and used in specs: compile (DSL and YAML), bind,
apply, the byte-range path, the inverse, a plan file, lint and explain all take it from the class
alone. Nothing outside `convspec/ops` knows an op's name (issue 15)."""

from __future__ import annotations

import pytest
import torch
from helpers.tensors import assert_same_state, random_tensor
from safetensors.torch import load_file, save_file

import convspec
import convspec.blocks
from convspec.blocks import block_runs
from convspec.explain import explain, explanation_text
from convspec.lint import check_spec
from convspec.ops import OPS, NotInvertible, Op, OpError, Param, TensorInfo, blockmoves, register, unregister
from convspec.run import run_group
from convspec.streaming import convert_checkpoint


class SwapHalves(Op):
    """Swap the two halves of a tensor along `dim`: it moves whole blocks, and undoes itself."""

    name = "swap_halves"
    doc = "Swap the first and second half along `dim`."
    params = (Param("dim", "int", 0),)
    moves_blocks = True

    def infer(self, p, ins):
        (x,) = ins
        dim = self.norm_dim(p["dim"], len(x.shape))
        if x.shape[dim] % 2:
            raise OpError(f"swap_halves: dim {dim} of {list(x.shape)} is odd")
        return [x]

    def apply(self, p, ins):
        a, b = torch.chunk(ins[0], 2, dim=p["dim"])
        return [torch.cat([b, a], dim=p["dim"])]

    def inverse(self, p, n_inputs):
        return self.name, dict(p)

    def move_blocks(self, p, ins, rank):
        (x,) = ins
        dim = self.block_dim(p, rank)
        half = x.shape[dim] // 2
        a, b = blockmoves.split(x, dim, [half, half])
        return [blockmoves.cat([b, a], dim)]


class Computed(SwapHalves):
    """The same op computed with torch (not a block move)."""

    name = "swap_halves_computed"
    moves_blocks = False


class Lossy(SwapHalves):
    """The same op declared lossy: its plan's inverse is the nearest one, and lint says W204."""

    name = "swap_halves_lossy"

    def loses(self, p):
        return "swap_halves_lossy forgets which half came first (lossy, made up)"


class OneWay(SwapHalves):
    """The same op with no inverse: lint says W205, and the plan cannot save back."""

    name = "swap_halves_one_way"

    def inverse(self, p, n_inputs):
        raise NotInvertible("swap_halves_one_way has no inverse (made up)")


MADE_UP = (SwapHalves, Computed, Lossy, OneWay)


@pytest.fixture(autouse=True)
def made_up_ops():
    for op in MADE_UP:
        register(op)
    yield
    for op in MADE_UP:
        unregister(op.name)


DSL = """spec custom
convert x = {p:path}.w
  -> {p}.v = OP(x, dim=0)
convert e = {p:path}.experts.{i:int}.up
  -> {p}.up = OP(stack(e, over=i), dim=0)
"""

YAML = """spec: custom
rules:
  - convert:
      x: "{p:path}.w"
    to:
      "{p}.v": OP(x, dim=0)
  - convert:
      e: "{p:path}.experts.{i:int}.up"
    to:
      "{p}.up": OP(stack(e, over=i), dim=0)
"""


def _plan(tmp_path, op: str = "swap_halves", yaml: bool = False):
    path = tmp_path / ("s.yaml" if yaml else "s.cspec")
    path.write_text((YAML if yaml else DSL).replace("OP", op))
    return convspec.compile(str(path)), str(path)


def _state() -> dict[str, torch.Tensor]:
    state = {"m.w": random_tensor((8, 3), "bfloat16", 1)}
    state.update({f"m.experts.{i}.up": random_tensor((4, 5), "float32", 2 + i) for i in range(2)})
    return state


def _expected(state):
    w, ups = state["m.w"], [state[f"m.experts.{i}.up"] for i in range(2)]
    return {"m.v": torch.cat([w[4:], w[:4]]), "m.up": torch.stack(ups[::-1])}


def test_the_registry_refuses_a_name_twice():
    assert OPS["swap_halves"].name == "swap_halves"
    with pytest.raises(ValueError, match="registered already"):
        register(SwapHalves)


@pytest.mark.parametrize("yaml", [False, True], ids=["dsl", "yaml"])
@pytest.mark.parametrize("op", ["swap_halves", "swap_halves_computed"])
def test_compile_bind_apply_and_inverse(tmp_path, op, yaml):
    plan, _ = _plan(tmp_path, op, yaml)
    state = _state()
    bound = plan.bind({k: TensorInfo.of(t) for k, t in state.items()})
    assert bound.outputs == {"m.v": ((8, 3), "bfloat16"), "m.up": ((2, 4, 5), "float32")}
    out = plan.apply(state)
    assert_same_state(out, _expected(state))
    assert plan.lossy == ()
    assert_same_state(plan.inverse().apply(out), state)


def test_a_bad_shape_is_a_bind_error(tmp_path):
    plan, _ = _plan(tmp_path)
    with pytest.raises(convspec.BindError, match="swap_halves: dim 0 of \\[7, 3\\] is odd"):
        plan.bind({"m.w": ((7, 3), "float32")})


def test_an_unknown_parameter_is_a_compile_error(tmp_path):
    path = tmp_path / "s.cspec"
    path.write_text("spec s\nconvert x = {p:path}.w\n  -> {p}.v = swap_halves(x, dims=1)\n")
    with pytest.raises(convspec.CompileError, match="swap_halves has no parameter 'dims'"):
        convspec.compile(str(path))


def test_a_block_move_runs_as_byte_ranges(tmp_path, monkeypatch):
    """The op's own move_blocks gives byte runs: the same bits as its torch apply, and convert copies
    them file to file; the computed variant is not a block move."""
    monkeypatch.setattr(convspec.blocks, "MIN_AVERAGE_RUN", 0)
    state = _state()
    layout = {k: TensorInfo.of(t) for k, t in state.items()}
    for op, moves in (("swap_halves", True), ("swap_halves_computed", False)):
        plan, _ = _plan(tmp_path, op)
        bound = plan.bind(layout)
        for g in bound.groups:
            runs = block_runs(bound, g)
            assert (runs is not None) == moves
            if runs is None:
                continue
            ref = run_group(bound, g, state)
            for key, info in g.outputs.items():
                out = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
                view = out.reshape(-1).view(torch.uint8)
                for src, a, b, n in runs[key]:
                    view[b : b + n] = state[src].reshape(-1).view(torch.uint8)[a : a + n]
                assert torch.equal(out.view(torch.uint8), ref[key].view(torch.uint8))
    plan, _ = _plan(tmp_path)
    (tmp_path / "src").mkdir()
    save_file(state, str(tmp_path / "src" / "model.safetensors"))
    convert_checkpoint(plan, tmp_path / "src", tmp_path / "out")
    assert_same_state(load_file(str(tmp_path / "out" / "model.safetensors")), _expected(state))


def test_a_plan_file_keeps_the_op(tmp_path):
    plan, _ = _plan(tmp_path)
    again = convspec.Plan.from_json(plan.to_json())
    assert_same_state(again.apply(_state()), _expected(_state()))


def test_lossy_and_one_way_come_from_the_class(tmp_path):
    plan, _ = _plan(tmp_path, "swap_halves_lossy")
    assert len(plan.lossy) == 2 and "forgets which half came first" in plan.lossy[0]
    with pytest.raises(convspec.NotInvertibleError):
        plan.inverse()
    out = plan.apply(_state())
    assert_same_state(plan.inverse(allow_lossy=True).apply(out), _state())  # its nearest inverse
    plan, _ = _plan(tmp_path, "swap_halves_one_way")
    assert plan.inverse_error is not None and "no inverse (made up)" in plan.inverse_error


@pytest.mark.parametrize(
    ("op", "codes"),
    [("swap_halves", set()), ("swap_halves_lossy", {"W204"}), ("swap_halves_one_way", {"W205"})],
)
def test_lint(tmp_path, op, codes):
    _, path = _plan(tmp_path, op)
    found = {f.code for f in check_spec(path).findings}
    assert found & {"W204", "W205"} == codes
    assert not {c for c in found if c.startswith("E")}


def test_explain(tmp_path):
    plan, _ = _plan(tmp_path)
    layout = {k: TensorInfo.of(t) for k, t in _state().items()}
    e = explain(plan, "m.experts.1.up", layout)
    text = explanation_text(e)
    assert "swap_halves" in text and "m.up" in text
    assert "[2, 4, 5]" in text or "(2, 4, 5)" in text
