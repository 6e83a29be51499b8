"""Hostile input, round two, for groups and shapes (issue 14, classes 1, 4 and 8).

1. Outputs per group are bounded by the bytes they describe: a header's shape or a key's number
   must not make millions of tensors (or count up to a number) out of a few bytes. Bind refuses at
   a stated limit before anything is made per output, naming the file and the key.
2. Zero-size tensors are tensors: they convert and come back; only an unstack of a dim of size 0
   (which would make no tensor, so the key would vanish) is refused.
3. A cast declared exact gives back every bit pattern, NaN payloads included.

HOSTILE_CASES run as real processes under tests/hostile.py's memory cap and time limit; the
generators of variants run in-process under an alarm and a tracemalloc ceiling (as test_fuzz does).
"""

from __future__ import annotations

import contextlib
import io
import re
import signal
import tracemalloc
from pathlib import Path

import pytest
import torch
from helpers.tensors import bit_equal, random_tensor
from hostile import check_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_bad_inputs import Case, entry
from test_bad_inputs import st as safetensors_file

import convspec
from convspec import bind as binding
from convspec import interpret
from convspec.bind import MAX_UNSTACKED, UNSTACKED_BYTES, LimitError
from convspec.cli import main
from convspec.io.safetensors import MAX_KEY_CHARS, read_layout
from convspec.ops import OPS, stacking
from convspec.ops.base import MAX_EXTENT
from convspec.ops.cast import EXACT, MANTISSA, cast_tensor
from convspec.ops.stacking import MAX_MEMBERS
from convspec.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
CONVERSIONS = settings(VARIANTS, max_examples=6)  # each example converts there and back: files, fsyncs
TIME_LIMIT_S = 60  # a hang guard, not a speed check: each example takes well under a second
PEAK_BYTES = 64 << 20  # what bind may allocate for a few-hundred-byte header: far below a blow-up
PER_KEY_BYTES = 1 << 10  # and for each key it writes (a header of 21,330 fused experts makes 64k keys)


def header(tensors: dict[str, list[int]], dtype: str = "BF16") -> bytes:
    """A safetensors file of empty tensors: a header only, every shape with a 0 somewhere."""
    return safetensors_file({k: entry(dtype, shape, (0, 0)) for k, shape in tensors.items()})


# ---- the specs that stack experts: where their keys are, one layer at a time -----------------------

# spec -> (a source key per weight, by expert), the fused target keys: gate_up is cat of two stacks
MOE = {
    "mixtral": (
        "model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight",
        ("w1", "w3", "w2"),
        "model.layers.{l}.mlp.experts.{f}",
    ),
    "deepseek_v3": (  # qwen2_moe's spec, found by model type
        "model.layers.{l}.mlp.experts.{e}.{w}.weight",
        ("gate_proj", "up_proj", "down_proj"),
        "model.layers.{l}.mlp.experts.{f}",
    ),
    "jamba": (
        "model.layers.{l}.feed_forward.experts.{e}.{w}.weight",
        ("gate_proj", "up_proj", "down_proj"),
        "model.layers.{l}.feed_forward.experts.{f}",
    ),
    "ernie4_5_moe": (
        "model.layers.{l}.mlp.experts.{e}.{w}.weight",
        ("gate_proj", "up_proj", "down_proj"),
        "model.layers.{l}.mlp.experts.{f}",
    ),
}


def members(spec: str, layers: int, experts: int, inter: int, hidden: int) -> dict[str, list[int]]:
    """Per-expert source shapes: gate and up [inter, hidden], down [hidden, inter]."""
    key, (gate, up, down), _ = MOE[spec]
    out = {}
    for layer in range(layers):
        for e in range(experts):
            out[key.format(l=layer, e=e, w=gate)] = [inter, hidden]
            out[key.format(l=layer, e=e, w=up)] = [inter, hidden]
            out[key.format(l=layer, e=e, w=down)] = [hidden, inter]
    return out


def fused(spec: str, layers: int, experts: int, inter: int, hidden: int) -> dict[str, list[int]]:
    """The fused target shapes: gate_up_proj [experts, 2 inter, hidden], down_proj [experts, hidden, inter]."""
    key = MOE[spec][2]
    out = {}
    for layer in range(layers):
        out[key.format(l=layer, f="gate_up_proj")] = [experts, 2 * inter, hidden]
        out[key.format(l=layer, f="down_proj")] = [experts, hidden, inter]
    return out


def unreadable(shapes: dict) -> bool:
    """The header reader refuses the file: a shape's bits (0 counted as 1) reach 2**64, which the
    safetensors library cannot count in every order of the dims (docs/safety.md)."""
    return any(extent(s) * 8 >= 2**64 for s in shapes.values())


READER_REFUSES = "has more bits than 64-bit sizes count"


def extent(shape: list[int], itemsize: int = 2) -> int:
    n = itemsize
    for s in shape:
        n *= s or 1
    return n


# ---- the catalogue: real processes under a memory cap and a time limit ------------------------------

REVERSE = ("convert", "mixtral", "{d}/src", "{d}/out", "--reverse")
DOWN = "model.layers.{}.mlp.experts.down_proj"
NESTED = "spec nest\nconvert w = {p:path}.w\n     -> {p}.x.{a}.{b}.w = unstack(unstack(w, over=a), over=b)\n"
ONE_BYTE = {DOWN.format(i): entry("U8", (40_000, 1, 1), (40_000 * i, 40_000 * (i + 1))) for i in range(4)}

HOSTILE_CASES = [
    Case(  # the issue's example: a few hundred bytes of header, 50 million outputs
        "unstack_50_million_experts",
        "checkpoint",
        {"src/model.safetensors": header({DOWN.format(0): [50_000_000, 0, 32]})},
        REVERSE,
        "unstack over e of [50000000, 0, 32] along dim 0 makes 50000000 tensors, more than the limit of "
        f"{MAX_MEMBERS} per collection (keys: model.layers.0.mlp.experts.down_proj)",
    ),
    Case(
        "unstack_2_to_the_40_experts_qwen2_moe",
        "checkpoint",
        {
            "src/model.safetensors": header(
                {"model.layers.0.mlp.experts.gate_up_proj": [2**40, 0, 16], DOWN.format(0): [2**40, 16, 0]}
            )
        },
        ("convert", "qwen2_moe", "{d}/src", "{d}/out", "--reverse"),
        f"along dim 0 makes {2**40} tensors, more than the limit of {MAX_MEMBERS} per collection",
    ),
    Case(  # each layer under the limit per collection, together over the limit of a conversion
        "empty_experts_over_many_layers",
        "checkpoint",
        {"src/model.safetensors": header({DOWN.format(i): [40_000, 0, 8] for i in range(50)})},
        REVERSE,
        f"unstacking makes 80000 tensors of 0 bytes by here, more than the limit of {MAX_UNSTACKED} plus "
        f"one per {UNSTACKED_BYTES} bytes",
    ),
    Case(  # 160 kB of data made into 160,000 tensors of one byte
        "one_byte_experts",
        "checkpoint",
        {"src/model.safetensors": safetensors_file(ONE_BYTE, bytes(160_000))},
        REVERSE,
        "unstacking makes 80000 tensors of 80000 bytes by here, more than the limit",
    ),
    Case(  # 90,000 members out of two unstacks of 300
        "unstack_of_unstack",
        "checkpoint",
        {"spec.cspec": NESTED, "src/model.safetensors": header({"m.w": [300, 300, 0]})},
        ("convert", "{d}/spec.cspec", "{d}/src", "{d}/out"),
        f"unstack over b makes 65700 tensors, more than the limit of {MAX_MEMBERS} per collection (keys: m.w)",
    ),
    Case(  # one key's number is 10**11: nothing may count up to it
        "expert_number_10_to_the_11",
        "checkpoint",
        {
            "src/model.safetensors": header(
                {f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight": [0, 4] for e in (0, 10**11)}
            )
        },
        REVERSE[:-1],
        "e=1 is missing: stack over {e} needs 0..100000000000 and has 2 of them (missing 1, 2, 3, 4, 5, "
        "6, 7, 8)",
    ),
    Case(  # a stack torch could not hold, even empty
        "stack_past_what_torch_holds",
        "checkpoint",
        {"src/model.safetensors": header(members("deepseek_v3", 1, 4, 2**60 - 1, 0))},
        ("convert", "qwen2_moe", "{d}/src", "{d}/out"),
        "is past what torch can hold: its dims (0 counted as 1) times its item size reach 2**63",
    ),
    Case(  # no tensor to make, and nothing to stack back: the key would vanish
        "unstack_of_zero_experts",
        "checkpoint",
        {"src/model.safetensors": header({DOWN.format(0): [0, 32, 16]})},
        REVERSE,
        "unstack over e of [0, 32, 16]: dim 0 has size 0, so it makes no tensor and the key would vanish",
    ),
]


def _section(path: str, heading: str) -> str:
    text = (ROOT / path).read_text()
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end != -1 else None]


SAFETY = _section("docs/safety.md", "### Groups and shapes")
# the cases whose messages docs/safety.md quotes, in its order
DOC_EXAMPLES = dict(
    zip(
        [
            "unstack_50_million_experts",
            "empty_experts_over_many_layers",
            "stack_past_what_torch_holds",
            "unstack_of_zero_experts",
        ],
        re.findall(r"^  (error: .*)$", SAFETY, re.M),
        strict=True,
    )
)


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=[c.name for c in HOSTILE_CASES])
def test_hostile_groups_and_shapes_are_refused_in_a_bounded_process(case: Case, tmp_path):
    outcome = check_case(case, tmp_path)
    first = outcome.err.splitlines()[0]
    if "limit" in case.expected:  # a limit names the file that holds the key
        assert first.startswith(f"error: {tmp_path}/src/model.safetensors: rule "), first
    if case.name in DOC_EXAMPLES:  # the message docs/safety.md quotes is the one this run prints
        assert first == DOC_EXAMPLES[case.name].replace("SRC", f"{tmp_path}/src")


# ---- in-process variants under an alarm and an allocation ceiling ------------------------------------


class Hang(Exception):
    pass


def bounded(argv: list[str], keys: int = 0) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stderr), under an alarm and a tracemalloc peak bound (that
    grows with the `keys` the conversion writes)."""

    def on_alarm(signum, frame):
        raise Hang(f"no answer within {TIME_LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    tracemalloc.start()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert peak < PEAK_BYTES + keys * PER_KEY_BYTES, f"{argv}: {peak} bytes at the peak"
    text = err.getvalue()
    assert "Traceback" not in text
    return code, text


def fresh(tmp_path: Path, files: dict[str, bytes]) -> Path:
    d = Path(tmp_path)
    for old in sorted(d.rglob("*"), reverse=True):
        old.unlink() if old.is_file() else old.rmdir()
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


def assert_refused(d: Path, code: int, text: str, *fragments: str) -> None:
    """Exit 2, one error (its first line first; more problems than one are listed under it), the
    fragments in it, nothing left behind."""
    lines = text.splitlines()
    assert code == 2, text
    assert lines[0].startswith("error: ")
    for f in fragments:
        assert f in text, (f, text)
    assert sum(line.startswith("error: ") for line in lines) == 1, text
    assert not (d / "out").exists() and not [p for p in d.rglob("*") if ".convspec-" in p.name]


def layout_of(path: Path) -> dict[str, tuple[list[int], str]]:
    return {k: (list(e.info.shape), e.info.dtype) for k, e in read_layout(path).items()}


LEADING = st.one_of(st.integers(0, 6), st.integers(MAX_MEMBERS + 1, MAX_MEMBERS + 3), st.integers(1, 2**80))
DIMS = st.one_of(st.integers(0, 4), st.sampled_from([2**20, 2**40, 2**61, 2**62]))


def unstacked_past_limit(made: dict) -> bool:
    """Whether unstacking `made` ({key: shape} of bf16 tensors, equal groups) passes bind's limit: more
    tensors than MAX_UNSTACKED plus one per UNSTACKED_BYTES they hold (checked as groups add up)."""
    held = sum(extent(s) if all(s) else 0 for s in made.values())  # bytes (extent counts a 0 as 1)
    return len(made) > MAX_UNSTACKED + held // UNSTACKED_BYTES


@CONVERSIONS
@given(
    spec=st.sampled_from(sorted(MOE)),
    experts=LEADING,
    zero=st.sampled_from(["inter", "hidden"]),
    data=st.data(),
)
def test_fused_experts_from_a_header_reverse(tmp_path, spec, experts, zero, data):
    """Fused experts of any leading size, a zero dim in either place: converted back to experts (and
    forward again, the same layout) when the count is within MAX_MEMBERS, else refused, before any
    per-output work, naming the file and the key."""
    inter, hidden = data.draw(DIMS), data.draw(DIMS)
    inter, hidden = (0, hidden) if zero == "inter" else (inter, 0)
    layers = data.draw(st.integers(1, 2))
    shapes = fused(spec, layers, experts, inter, hidden)
    d = fresh(tmp_path, {"src/model.safetensors": header(shapes)})
    keys = len(members(spec, layers, experts, inter, hidden)) if 0 < experts <= MAX_MEMBERS else 0
    code, text = bounded(["convert", spec, f"{d}/src", f"{d}/out", "--reverse"], keys)
    too_large = max(extent(s) for s in shapes.values()) >= MAX_EXTENT
    if unreadable(shapes):  # the reader refuses the file before any rule sees it
        assert_refused(d, code, text, READER_REFUSES)
    elif experts == 0:
        assert_refused(d, code, text, "dim 0 has size 0, so it makes no tensor and the key would vanish")
    elif too_large:  # torch could not hold the source: refused by the first op that takes it
        assert_refused(d, code, text)
        assert "past what torch can hold" in text or f"more than the limit of {MAX_MEMBERS}" in text
    elif experts > MAX_MEMBERS:
        assert_refused(d, code, text, f"more than the limit of {MAX_MEMBERS} per collection (keys: ")
        assert text.startswith(f"error: {d}/src/model.safetensors: rule "), text
        assert any(f"(keys: {k})" in text for k in shapes), text
    elif unstacked_past_limit(members(spec, layers, experts, inter, hidden)):
        assert_refused(d, code, text, "unstacking makes")  # many empty tensors: bind's MAX_UNSTACKED
    else:
        assert code == 0, text
        assert layout_of(d / "out") == {
            k: (s, "bfloat16") for k, s in members(spec, layers, experts, inter, hidden).items()
        }
        code, text = bounded(["convert", spec, f"{d}/out", f"{d}/back"], keys)  # reads as many keys
        assert code == 0, text
        assert layout_of(d / "back") == {k: (s, "bfloat16") for k, s in shapes.items()}


@CONVERSIONS
@given(
    spec=st.sampled_from(sorted(MOE)),
    experts=st.integers(1, 5),
    zero=st.sampled_from(["inter", "hidden", "both"]),
    data=st.data(),
)
def test_zero_size_experts_forward(tmp_path, spec, experts, zero, data):
    """Per-expert tensors with a zero dim in each place and dims up to 2**62 in the other: stacked to a
    zero-size fused tensor and unstacked back to the same layout, or refused where torch could not
    hold the stack."""
    inter, hidden = data.draw(DIMS), data.draw(DIMS)
    inter, hidden = {"inter": (0, hidden), "hidden": (inter, 0), "both": (0, 0)}[zero]
    shapes = members(spec, 1, experts, inter, hidden)
    d = fresh(tmp_path, {"src/model.safetensors": header(shapes)})
    code, text = bounded(["convert", spec, f"{d}/src", f"{d}/out"])
    if unreadable(shapes):  # the reader refuses the file before any rule sees it
        assert_refused(d, code, text, READER_REFUSES)
        return
    if max(extent(s) for s in fused(spec, 1, experts, inter, hidden).values()) >= MAX_EXTENT:
        assert_refused(d, code, text, "past what torch can hold")
        return
    assert code == 0, text
    assert layout_of(d / "out") == {
        k: (s, "bfloat16") for k, s in fused(spec, 1, experts, inter, hidden).items()
    }
    code, text = bounded(["convert", spec, f"{d}/out", f"{d}/back", "--reverse"])
    assert code == 0, text
    assert layout_of(d / "back") == {k: (s, "bfloat16") for k, s in shapes.items()}


@VARIANTS
@given(
    experts=st.integers(1, 40),
    layers=st.integers(1, 5),
    width=st.sampled_from([0, 1, 2, 64, 128]),
    allowance=st.integers(1, 100),
    per=st.sampled_from([16, 256]),
)
def test_tensors_from_unstacking_are_bounded_by_the_bytes_they_hold(
    monkeypatch, experts, layers, width, allowance, per
):
    """Unstacking makes at most MAX_UNSTACKED tensors in a conversion, plus one per UNSTACKED_BYTES
    they hold: refused exactly past that, and never for tensors of UNSTACKED_BYTES or more. Small
    limits here (the code reads them at each bind); the real ones run in HOSTILE_CASES."""
    monkeypatch.setattr(binding, "MAX_UNSTACKED", allowance)
    monkeypatch.setattr(binding, "UNSTACKED_BYTES", per)
    plan = convspec.compile("mixtral").inverse()
    layout = {DOWN.format(i): ((experts, width, 2), "bfloat16") for i in range(layers)}
    made, held = experts * layers, experts * layers * width * 4  # the excess only grows layer by layer
    if width * 4 < per and made > allowance + held // per:
        with pytest.raises(LimitError, match=f"more than the limit of {allowance} plus one per {per} bytes"):
            plan.bind(layout)
    else:
        assert len(plan.bind(layout).outputs) == made


@pytest.mark.parametrize("limit", [1, 5, 40])
def test_a_collection_of_exactly_the_limit_binds(monkeypatch, limit):
    """MAX_MEMBERS members bind, one more is refused, unstacked or stacked (stacking more than the
    inverse could unstack). A small limit here; the real one runs in HOSTILE_CASES."""
    monkeypatch.setattr(stacking, "MAX_MEMBERS", limit)
    monkeypatch.setattr(interpret, "MAX_MEMBERS", limit)  # the walk lives in interpret
    plan = convspec.compile("mixtral").inverse()
    assert len(plan.bind({DOWN.format(0): ((limit, 4, 0), "bfloat16")}).outputs) == limit
    with pytest.raises(LimitError, match=f"makes {limit + 1} tensors, more than the limit of {limit} per"):
        plan.bind({DOWN.format(0): ((limit + 1, 4, 0), "bfloat16")})
    forward = convspec.compile("mixtral")
    key = "model.layers.0.block_sparse_moe.experts.{}.w2.weight"
    assert len(forward.bind({key.format(e): ((4, 0), "bfloat16") for e in range(limit)}).outputs) == 1
    with pytest.raises(LimitError, match=f"stack over e makes {limit + 1} tensors"):
        forward.bind({key.format(e): ((4, 0), "bfloat16") for e in range(limit + 1)})
    nested = convspec.compile(parse_spec(NESTED, "nest.cspec"))  # a collection of collections
    side = int(limit**0.5) + 1
    with pytest.raises(LimitError, match=f"more than the limit of {limit} per collection"):
        nested.bind({"m.w": ((side, side, 0), "bfloat16")})


@VARIANTS
@given(
    digits=st.one_of(st.integers(2, 30), st.integers(900, 980), st.integers(4200, 4500)),
    lead=st.integers(5, 9),
    have=st.integers(1, 4),
)
def test_a_huge_expert_number_costs_one_key(tmp_path, digits, lead, have):
    """A key's number is text: the missing members are named without counting up to it, and a number
    past what int() reads (4,300 digits) is no traceback."""
    number = str(lead) + "0" * (digits - 1)
    key = "model.layers.0.block_sparse_moe.experts.{}.w2.weight"
    shapes = {key.format(e): [0, 4] for e in [*range(have), number]}
    d = fresh(tmp_path, {"src/model.safetensors": header(shapes)})
    code, text = bounded(["convert", "mixtral", f"{d}/src", f"{d}/out"])
    if len(key.format(number)) > MAX_KEY_CHARS:  # past what int() reads: refused as a key first
        assert_refused(d, code, text, f"characters long; at most {MAX_KEY_CHARS:,} are allowed")
        return
    shown = number if digits <= 24 else f"({digits} digits)"
    assert_refused(
        d, code, text, f"e={have} is missing: stack over {{e}} needs 0..", shown, f"has {have + 1} of them"
    )


@pytest.mark.parametrize(
    ("numbers", "message"),
    [
        ((0, 2), "e=1 is missing: stack over {e} needs 0..2 and has 2 of them (keys"),
        ((0, 1, 3, 5), "e=2 is missing: stack over {e} needs 0..5 and has 4 of them (missing 2, 4) (keys"),
        ((1,), "e=0 is missing: stack over {e} needs 0..1 and has 1 of them (keys"),
        (
            (0, 10**30 - 1),
            "needs 0..9999999999...9999 (30 digits) and has 2 of them (missing 1, 2, 3, 4, 5, 6, 7, 8)",
        ),
    ],
)
def test_missing_members_are_named_up_to_the_largest(numbers, message):
    key = "model.layers.0.block_sparse_moe.experts.{}.w2.weight"
    with pytest.raises(convspec.BindError) as exc:
        convspec.compile("mixtral").bind({key.format(e): ((2, 4), "bfloat16") for e in numbers})
    assert message in exc.value.problems[0]


@pytest.mark.parametrize("prefix", ["²", "٣", "1" + "0" * 960, "007", "x"])
def test_any_path_capture_sorts_without_int(prefix):
    """Group names are sorted numbers first: `²` (isdigit, but not int()) and a 961-digit number
    are sorted too, not a ValueError (a longer key is refused: MAX_KEY_CHARS)."""
    key = f"{prefix}.block_sparse_moe.experts.{{}}.w2.weight"
    layout = {key.format(e): ((2, 4), "bfloat16") for e in range(2)}
    layout |= {f"3.block_sparse_moe.experts.{e}.w2.weight": ((2, 4), "bfloat16") for e in range(2)}
    bound = convspec.compile("mixtral").bind(layout)
    assert f"{prefix}.mlp.experts.down_proj" in bound.outputs and "3.mlp.experts.down_proj" in bound.outputs


# ---- zero-size parts with data: split, chunk, cat, stack and unstack round trip -----------------------

SIZES = st.lists(st.integers(0, 3), min_size=1, max_size=4)


def _convert_and_back(d: Path, spec: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    (d / "src").mkdir(parents=True, exist_ok=True)
    save_file(tensors, d / "src/model.safetensors")
    code, text = bounded(["convert", spec, f"{d}/src", f"{d}/out"])
    assert code == 0, text
    code, text = bounded(["convert", spec, f"{d}/out", f"{d}/back", "--reverse"])
    assert code == 0, text
    back = load_file(d / "back/model.safetensors")
    assert sorted(back) == sorted(tensors)
    for k, t in tensors.items():
        assert bit_equal(back[k], t), k
    return load_file(d / "out/model.safetensors")


@VARIANTS
@given(sizes=SIZES, dim=st.integers(0, 1), other=st.integers(0, 3), data=st.data())
def test_split_with_zero_sizes_round_trips(tmp_path, sizes, dim, other, data):
    """split(sizes=[...]) with a 0 in any place, along either dim, the other dim 0 too: an empty part
    per zero, the parts as torch.split gives them, and cat(sizes=...) gives the source back."""
    names = [f"q{i}" for i in range(len(sizes))]
    spec = tmp_path / "split.cspec"
    spec.write_text(
        f"spec s\nconvert x = {{p:path}}.a\n     -> {', '.join('{p}.' + n for n in names)}"
        f" = split(x, dim={dim}, sizes={sizes})\n"
    )
    shape = [other, other]
    shape[dim] = sum(sizes)
    x = random_tensor(shape, data.draw(st.sampled_from(["float32", "bfloat16", "int8"])), 0)
    d = fresh(tmp_path / "run", {})
    out = _convert_and_back(d, str(spec), {"m.a": x})
    for n, part in zip(names, torch.split(x, sizes, dim=dim), strict=True):
        assert bit_equal(out[f"m.{n}"], part.contiguous()), n
    plan = convspec.compile(str(spec))  # the torch path (apply) agrees with the block-copy path
    for n, t in plan.apply({"m.a": x}).items():
        assert bit_equal(t, out[n]), n


@VARIANTS
@given(n=st.integers(1, 4), shape=st.lists(st.integers(0, 3), min_size=1, max_size=3), data=st.data())
def test_chunk_and_stack_with_zero_dims_round_trip(tmp_path, n, shape, data):
    """Members with a zero dim in any place stack to an empty stack and come back; a fused tensor
    with a zero dim is chunked into empty parts and cat back."""
    dim = data.draw(st.integers(0, len(shape) - 1))
    shape[dim] *= n
    spec = tmp_path / "chunk.cspec"
    outs = ", ".join(f"{{p}}.c{i}" for i in range(n))
    spec.write_text(
        f"spec s\nconvert x = {{p:path}}.a\n     -> {outs} = chunk(x, dim={dim})\n"
        "convert m = {p:path}.e.{i:int}.w\n     -> {p}.stacked ops [stack(i)]\n"
    )
    x = random_tensor(shape, "float32", 1)
    experts = {f"m.e.{i}.w": random_tensor(shape, "float32", 2 + i) for i in range(n)}
    d = fresh(tmp_path / "run", {})
    out = _convert_and_back(d, str(spec), {"m.a": x, **experts})
    assert out["m.stacked"].shape == (n, *shape)
    for i, part in enumerate(torch.chunk(x, n, dim=dim)):
        assert out[f"m.c{i}"].shape == part.shape


def test_the_issue_examples_convert(tmp_path):
    """The issue's two crashes: zero-size experts and split(sizes=[0, 48]) (a zip() ValueError)."""
    zero = {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in members("mixtral", 1, 4, 0, 32).items()}
    out = _convert_and_back(tmp_path / "experts", "mixtral", zero)
    assert {k: list(t.shape) for k, t in out.items()} == fused("mixtral", 1, 4, 0, 32)
    spec = tmp_path / "split.cspec"
    spec.write_text("spec t\nconvert x = {p:path}.a\n     -> {p}.q, {p}.k = split(x, sizes=[0, 48])\n")
    x = random_tensor((48, 4), "float32", 0)
    out = _convert_and_back(tmp_path / "split", str(spec), {"m.a": x})
    assert out["m.q"].shape == (0, 4) and bit_equal(out["m.k"], x)


# ---- casts give back every bit pattern --------------------------------------------------------------


def every_pattern(dtype: str) -> torch.Tensor:
    """All 2**(8 * itemsize) bit patterns of a 1- or 2-byte dtype, NaNs of every payload included."""
    width = torch.empty((), dtype=getattr(torch, dtype)).element_size() * 8
    ints = torch.arange(1 << width, dtype=torch.int32).to(getattr(torch, f"int{width}"))
    return ints.view(getattr(torch, dtype))


SMALL_EXACT = sorted((a, b) for a, b in EXACT if a in MANTISSA and a not in ("float32", "float64"))


@pytest.mark.parametrize(("src", "dst"), SMALL_EXACT, ids=[f"{a}-{b}" for a, b in SMALL_EXACT])
def test_exact_casts_give_back_every_bit_pattern(src, dst):
    """Every bf16, f16 (65,536 each) and float8 (256) pattern, cast up and back by the cast op and
    by a plan and its inverse, compared as bits; and the cast up changes no number (only NaNs)."""
    x = every_pattern(src)
    cast = OPS["cast"]
    up = cast.apply({"dtype": dst, "from": src}, [x])[0]
    back = cast.apply({"dtype": src, "from": dst}, [up])[0]
    assert bit_equal(back, x)
    nan = torch.isnan(x.to(torch.float32))
    assert torch.equal(torch.isnan(up), nan)
    assert bit_equal(up[~nan], x[~nan].to(getattr(torch, dst)))
    plan = convspec.compile(
        parse_spec(f"spec t\nconvert w = w -> v = cast(w, dtype={dst}, from={src})", "t.cspec")
    )
    assert plan.lossy == ()
    assert bit_equal(plan.inverse().apply(plan.apply({"w": x}))["w"], x)


@VARIANTS
@given(sign=st.booleans(), payload=st.integers(1, (1 << 23) - 1))
def test_float32_nans_survive_float64(sign, payload):
    x = (
        torch.tensor([(sign << 31) | 0x7F800000 | payload], dtype=torch.int64)
        .to(torch.int32)
        .view(torch.float32)
    )
    back = cast_tensor(cast_tensor(x, "float64"), "float32")
    assert bit_equal(back, x)


def test_narrowing_keeps_a_nans_sign_and_top_payload_never_an_infinity():
    x = torch.tensor([0x7F800001, 0xFF800001, 0x7FC12345, 0xFFFFFFFF], dtype=torch.int64)
    got = cast_tensor(x.to(torch.int32).view(torch.float32), "bfloat16").view(torch.int16).tolist()
    assert [v & 0xFFFF for v in got] == [0x7FC0, 0xFFC0, 0x7FC1, 0xFFFF]


def test_dtype_option_gives_back_every_bf16_pattern(tmp_path):
    """`convert --dtype float32` then `--dtype bfloat16` back: all 65,536 patterns, bit for bit."""
    x = every_pattern("bfloat16")
    (tmp_path / "src").mkdir()
    save_file({"m.a": x}, tmp_path / "src/model.safetensors")
    identity = tmp_path / "id.cspec"
    identity.write_text("spec t\nrename {p:path}.a -> {p}.a\n")
    for a, b, dtype in (("src", "up", "float32"), ("up", "back", "bfloat16")):
        code, text = bounded(
            ["convert", str(identity), f"{tmp_path}/{a}", f"{tmp_path}/{b}", "--dtype", dtype]
        )
        assert code == 0, text
    assert load_file(tmp_path / "up/model.safetensors")["m.a"].dtype == torch.float32
    assert bit_equal(load_file(tmp_path / "back/model.safetensors")["m.a"], x)


def test_meta_tensors_cast_without_looking_at_data():
    t = torch.empty((3, 4), dtype=torch.bfloat16, device="meta")
    assert cast_tensor(t, "float32").device.type == "meta"


# ---- the docs state the limits this code has ---------------------------------------------------------


def test_safety_doc_states_the_limits():
    """The numbers docs/safety.md gives are the code's; the messages it quotes are compared with the
    runs of HOSTILE_CASES (DOC_EXAMPLES)."""
    assert f"`MAX_MEMBERS` = {MAX_MEMBERS:,}" in SAFETY
    assert f"`MAX_UNSTACKED` = {MAX_UNSTACKED:,}" in SAFETY
    assert f"`UNSTACKED_BYTES` = {UNSTACKED_BYTES:,}" in SAFETY
    assert "`MAX_EXTENT` = 2**63" in SAFETY and MAX_EXTENT == 2**63
    assert set(DOC_EXAMPLES) <= {c.name for c in HOSTILE_CASES}


def test_ops_doc_states_the_cast_bit_exactness():
    doc = _section("docs/ops.md", "## cast")
    assert f"{every_pattern('bfloat16').numel():,} bf16 and f16 patterns" in doc
    assert f"{every_pattern('float8_e5m2').numel()} of each float8" in doc
    assert "test_hostile_bind.py" in doc


def test_the_catalogue_names_are_distinct_and_every_case_is_a_checkpoint():
    assert len({c.name for c in HOSTILE_CASES}) == len(HOSTILE_CASES)
    assert {c.kind for c in HOSTILE_CASES} == {"checkpoint"} and not any(c.xfail for c in HOSTILE_CASES)
