"""Hostile input, round two, class 1 (issue 14): matching and compiling cost bounded by limits the
user can see. A key longer than MAX_KEY_CHARS is refused before it is matched; a template with more
than MAX_OPEN_CAPTURES stretching captures (or two path captures side by side) is refused at compile
time; includes are counted as they expand and refused past MAX_EXPANDED_RULES; the overlap check
asks only the pairs of converts whose literal ends agree (at most MAX_OVERLAP_PAIRS).

HOSTILE_CASES run as real processes through tests/hostile.py (memory cap, time limit). The variant
generators run in-process under an alarm and a tracemalloc ceiling (the pattern of test_fuzz): the
alarm catches a runaway, it is no speed check."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from hostile import check_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_inputs import Case, tensors
from test_fuzz import bounded as fuzz_bounded

import convspec
from convspec import derived
from convspec.compile.compiler import (
    MAX_EXPANDED_RULES,
    MAX_OVERLAP_PAIRS,
    candidate_pairs,
    compile_spec,
    overlaps,
)
from convspec.compile.patterns import (
    MAX_AUTOMATA,
    MAX_OPEN_CAPTURES,
    Pattern,
    TooManyAutomata,
    automata_budget,
    intersection_witness,
    too_many_automata_message,
)
from convspec.compile.plan import MATCH_BLOCK
from convspec.errors import BindError, CompileError, ConvspecError, PlanError
from convspec.io.safetensors import MAX_KEY_CHARS
from convspec.ops.base import TensorInfo
from convspec.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
TIME_LIMIT_S = 60  # a hang fails the variant; each takes well under a second
PEAK_BYTES = 256 << 20  # a variant that expands without bound would pass this long before the alarm
VARIANTS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def bounded(fn, *args):
    """fn(*args), or the ConvspecError it raised, within this file's time and peak bounds."""
    return fuzz_bounded(fn, *args, time_limit_s=TIME_LIMIT_S, peak_bytes=PEAK_BYTES)


def _cspec(text: str, name: str = "t.cspec"):
    return parse_spec(text, name)


def _compile(text: str):
    return convspec.compile(_cspec(text))


# ---- the catalogue: one process each -------------------------------------------------------------

LONG_KEY = "block_sparse_moe." * 16_000  # 272 KB, the attack's key
ADJACENT = ".".join(f"{{c{i}:path?}}" for i in range(40))  # 40 optional paths side by side
SPREAD = ".x.".join(f"{{c{i}:path?}}" for i in range(40))  # 40 optional paths, a literal between each
PREFIXES = ", ".join(f"p{i}" for i in range(100))
AGAINST = ("compile", "{d}/spec.cspec", "--against", "{d}/src")
MANY = "".join(f"convert w = {{p:path}}.w{i} -> {{p}}.v{i} = transpose(w)\n" for i in range(400))
SAME_ENDS = "".join(
    f"convert w = {{a}}x{i}.{{p:path}}.w -> {{a}}x{i}.{{p}}.v{i} = transpose(w)\n" for i in range(400)
)

HOSTILE_CASES = [
    Case(
        "key_272kb",
        "checkpoint",
        {"src/model.safetensors": tensors(LONG_KEY, "model.a")},
        ("convert", "mixtral", "{d}/src", "{d}/out"),
        "error: {d}/src/model.safetensors: key 'block_sparse_moe.block_sparse_moe.block_sparse_moe...' "
        f"is 272,000 characters long; "
        f"at most {MAX_KEY_CHARS:,} are allowed",
    ),
    Case(
        "forty_adjacent_optional_paths",
        "spec",
        {
            "spec.cspec": f"spec t\nrename {ADJACENT}.a -> {ADJACENT}.b\n",
            "src/model.safetensors": tensors("a"),
        },
        AGAINST,
        "{d}/spec.cspec:2:20: error: ",
    ),
    Case(
        "forty_separated_optional_paths",
        "spec",
        {"spec.cspec": f"spec t\nrename {SPREAD}.a -> {SPREAD}.b\n", "src/model.safetensors": tensors("a")},
        AGAINST,
        f"{{d}}/spec.cspec:2:35: error: {SPREAD}.a: 40 captures can stretch",
    ),
    Case(
        "three_captures_in_one_segment",
        "spec",
        {
            "spec.cspec": "spec t\nrename m.{a}_{b}_{c}.x -> m.{a}.{b}.{c}\n",
            "src/model.safetensors": tensors("m._" + "_" * 900 + ".y"),
        },
        AGAINST,
        f"{{d}}/spec.cspec:2:19: error: m.{{a}}_{{b}}_{{c}}.x: 3 captures can stretch ({{a}}, {{b}}, {{c}}); "
        f"at most {MAX_OPEN_CAPTURES} may",
    ),
    Case(
        "includes_nested_under_100_prefixes",
        "spec",
        {
            "s0.cspec": f"spec s0\ninclude s1 under {PREFIXES}\n",
            "s1.cspec": f"spec s1\ninclude s2 under {PREFIXES}\n",
            "s2.cspec": f"spec s2\ninclude s3 under {PREFIXES}\n",
            "s3.cspec": "spec s3\nrename {p:path}.a -> {p}.b\n",
            "src/model.safetensors": tensors("m.a"),
        },
        ("compile", "{d}/s0.cspec", "--against", "{d}/src"),
        f"{{d}}/s1.cspec:2:1: error: include s2 under 100 prefixes: expanding the includes would make "
        f"more than {MAX_EXPANDED_RULES:,} rules",
    ),
    Case(
        "include_under_10000_prefixes",
        "spec",
        {
            "spec.cspec": "spec t\ninclude mixtral under " + ", ".join(f"p{i}" for i in range(10_000)) + "\n",
            "src/model.safetensors": tensors("m.a"),
        },
        ("convert", "{d}/spec.cspec", "{d}/src", "{d}/out"),
        f"{{d}}/spec.cspec:2:1: error: include mixtral under 10,000 prefixes: expanding the includes would "
        f"make more than {MAX_EXPANDED_RULES:,} rules",
    ),
    Case(  # 400 converts checked for overlaps at once; the one overlap, the last pair, is still found
        "four_hundred_converts_one_overlap",
        "spec",
        {
            "spec.cspec": f"spec t\n{MANY}convert w = {{p:path}}.w399 -> {{p}}.z = transpose(w)\n",
            "src/model.safetensors": tensors("m.a"),
        },
        AGAINST,
        "{d}/spec.cspec:402:1: error: rules 400 and 401 can both claim the key ",
    ),
    Case(
        "four_hundred_converts_alike",
        "spec",
        {"spec.cspec": f"spec t\n{SAME_ENDS}", "src/model.safetensors": tensors("m.a")},
        AGAINST,
        f"error: 79,800 pairs of convert inputs begin and end with the same text, so each pair must be "
        f"checked for a key both can claim; at most {MAX_OVERLAP_PAIRS:,} are checked",
    ),
]


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=lambda c: c.name)
def test_hostile_case_is_refused_within_bounds(case, tmp_path):
    check_case(case, tmp_path)


# ---- keys: any length, any repetition ------------------------------------------------------------

MIXTRAL = None


def _mixtral():
    global MIXTRAL
    if MIXTRAL is None:
        MIXTRAL = convspec.compile("mixtral")
    return MIXTRAL


WORDS = ["block_sparse_moe", "mlp", "experts", "w1", "weight", "0", "a", "model", ""]


@VARIANTS
@given(
    word=st.sampled_from(WORDS),
    times=st.integers(1, 20_000),
    tail=st.sampled_from(["", ".", ".experts.0.w1.weight", ".w1.weightx", ".."]),
)
def test_a_key_of_any_length_is_matched_or_refused_in_bounded_time(word, times, tail):
    """Repeated segments (the attack's shape: the literal of a rename at every position, a tail
    that fails at the end) are routed when short enough and refused, naming the key, when not."""
    key = (word + ".") * times + tail if word else "." * times + tail
    out = bounded(_mixtral().bind, {key: TensorInfo((4,), "F32"), "model.a": TensorInfo((4,), "F32")})
    if len(key) > MAX_KEY_CHARS:
        assert isinstance(out, BindError), out
        assert f"is {len(key):,} characters long; at most {MAX_KEY_CHARS:,} are allowed" in out.message
        assert repr(key[:50] + "...") in out.message or repr(key) in out.message
    else:
        assert not isinstance(out, BindError) or "characters long" not in str(out)


def _worst_keys(n: int) -> list[str]:
    """Keys of n characters that make a backtracking regex try every split: repetitions of a short
    literal, each ending where a whole match must fail (a trailing or doubled dot, a wrong last word)."""
    out = []
    for unit in ("a.", "x.", "a.x.", "_", "a_", "0."):
        body = unit * (n // len(unit))
        out += [body[: n - 1] + ".", body[: n - 2] + "..", body[: n - 1] + "q"]
    return out


OPEN_TEMPLATES = [
    "{p:path}.a.{rest:path}",
    "{p:path?}.a.{rest:path?}",
    "{p:path}.x.{rest:path}.b",
    "{p:path}.{x}.{rest:path}.b",
    "m.{a}_{b}.x",
    "{a}_{b}",
    "{p:path?}.a.{q:path}",
    "{p:path}.{a}_x.{q:path}",
]


@pytest.mark.parametrize("template", OPEN_TEMPLATES)
def test_a_template_at_the_limit_matches_a_hostile_key_at_the_limit(template):
    """A template with MAX_OPEN_CAPTURES stretching captures compiles, and binding keys of
    MAX_KEY_CHARS built to make its regex backtrack through every split ends (under the alarm)."""
    plan = _compile(f"spec t\nrename {template} -> z.{template}\n")
    layout = {k: TensorInfo((4,), "F32") for k in _worst_keys(MAX_KEY_CHARS)}
    out = bounded(plan.bind, layout)
    assert not isinstance(out, ConvspecError) or "characters long" not in out.message


def _template(paths: int, separated: bool, fragments: int) -> tuple[str, list[int]]:
    """A template with `paths` optional paths (a literal segment between each, or side by side) and a
    segment of `fragments` captures; the columns (1-based, in the template) of its captures."""
    sep = ".x." if separated else "."
    caps = [f"{{c{i}:path?}}" for i in range(paths)]
    segment = "_".join(f"{{f{i}}}" for i in range(fragments))
    text = sep.join(caps) + ".lit" + (f".{segment}" if segment else "")
    return text, [m.start() + 2 for m in re.finditer(r"\{", text)]  # a capture's column is its name's


@VARIANTS
@given(paths=st.integers(0, 40), separated=st.booleans(), fragments=st.integers(0, 6))
def test_templates_are_refused_past_the_open_capture_limit(paths, separated, fragments):
    """Any number of optional paths, side by side or apart, and of captures sharing a segment: the
    compiler refuses a template whose matching could take (key length) ** (MAX_OPEN_CAPTURES + 1)
    steps, at the capture that passes the limit; it compiles every other."""
    text, cols = _template(paths, separated, fragments)
    src = f"spec t\ndrop {text}\n"
    out = bounded(_compile, src)
    stretching = paths + (fragments if fragments > 1 else 0)
    side_by_side = paths > 1 and not separated
    if side_by_side:
        assert isinstance(out, CompileError), text
        assert "side by side" in out.message
        assert (out.span.line, out.span.col) == (2, len("drop ") + cols[1])
    elif stretching > MAX_OPEN_CAPTURES:
        assert isinstance(out, CompileError), text
        assert f"{stretching} captures can stretch" in out.message
        assert (out.span.line, out.span.col) == (2, len("drop ") + cols[MAX_OPEN_CAPTURES])
    else:
        assert not isinstance(out, ConvspecError), out
        bounded(out.bind, {k: TensorInfo((4,), "F32") for k in _worst_keys(MAX_KEY_CHARS)})


def test_a_rename_target_counts_with_its_sources_types():
    """The inverse matches keys with a rename's target: `{p}.{a}_{b}.{q}` stretches four ways."""
    out = bounded(_compile, "spec t\nrename {p:path}.{a}.{b}.{q:path} -> {p}.{a}_{b}.{q}\n")
    assert isinstance(out, CompileError)
    assert "{p}.{a}_{b}.{q}: 4 captures can stretch ({p}, {a}, {b}, {q})" in out.message


def test_a_plan_read_from_json_is_held_to_the_same_limit():
    """Plan.from_json checks its templates as the compiler does: a third stretching capture is refused."""
    text = convspec.compile(_cspec("spec t\ndrop {a:path}.x.{b:path}.y\n")).to_json()
    text = text.replace('["lit", ".y", null]', '["lit", ".y.", null], ["cap", "c", "path"]')
    text = text.replace('"{a:path}.x.{b:path}.y"', '"{a:path}.x.{b:path}.y.{c:path}"')
    with pytest.raises(PlanError, match="3 captures can stretch"):
        convspec.Plan.from_json(text)


# ---- includes: any depth, any number of prefixes -------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("width", [9, 31, 1000])
def test_include_expansion_is_counted_before_it_is_made(tmp_path, depth, width):
    """A chain of `depth` specs, each including the next under `width` prefixes: the expanded size is
    width ** depth (plus the levels' own rules); past MAX_EXPANDED_RULES it is refused at the include
    that would pass it, before it is expanded (the memory ceiling holds at 1000 ** 4)."""
    prefixes = ", ".join(f"p{i}" for i in range(width))
    for level in range(depth):
        (tmp_path / f"s{level}.cspec").write_text(f"spec s{level}\ninclude s{level + 1} under {prefixes}\n")
    (tmp_path / f"s{depth}.cspec").write_text(f"spec s{depth}\nrename {{p:path}}.a -> {{p}}.b\n")
    out = bounded(convspec.compile, tmp_path / "s0.cspec")
    # rules made, deepest level first: the last spec's rule, then width copies at each level up
    made = [sum(width**k for k in range(up + 1)) for up in range(depth + 1)]
    if made[-1] > MAX_EXPANDED_RULES:
        up = next(u for u in range(depth + 1) if made[u] > MAX_EXPANDED_RULES)
        assert isinstance(out, CompileError), (depth, width)
        assert f"include s{depth - up + 1} under" in out.message
        assert "expanding the includes would make more than" in out.message
        assert (Path(out.span.file).name, out.span.line, out.span.col) == (f"s{depth - up}.cspec", 2, 1)
    else:
        assert not isinstance(out, ConvspecError), out
        assert len(out.rules) == width**depth


def test_guards_of_earlier_prefixes_count():
    """`under p0, ..., pN, ""` adds to every rename under "" a guard per earlier prefix: counted too."""
    n = MAX_EXPANDED_RULES // 2
    prefixes = ", ".join(f"p{i}" for i in range(n))
    out = bounded(_compile, f'spec t\ninclude mixtral under {prefixes}, "" only renames\n')
    assert isinstance(out, CompileError)
    assert out.message.startswith(
        f"include mixtral under {n + 1:,} prefixes (the guards of its earlier prefixes)"
    )


# ---- overlaps: only the pairs that could meet, the same findings ---------------------------------

SEGMENTS = ["a", "b", "w1", "{s}", "{i:int}", "{s}_x", "x_{s}"]  # each capture renamed apart below


@st.composite
def templates(draw):
    lead = draw(st.sampled_from(["", "{p:path}.", "{p:path?}.", "m.", "m.{p:path}."]))
    body = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3))
    return lead + ".".join(
        b.replace("{s}", f"{{s{k}}}").replace("{i:", f"{{i{k}:") for k, b in enumerate(body)
    )


@VARIANTS
@given(st.lists(templates(), min_size=2, max_size=7))
def test_the_overlap_check_finds_exactly_what_every_pair_would(texts):
    """candidate_pairs drops only pairs that cannot meet: the overlaps found are those of the plain
    all-pairs check, in the same order (the linter reports them all)."""
    src = "spec t\n" + "".join(f"convert w = {t} -> o{i}.{t} = transpose(w)\n" for i, t in enumerate(texts))
    try:
        plan = compile_spec(_cspec(src), check_overlaps=False)
    except ConvspecError:
        return  # a template refused on its own (a capture named twice, say)
    origins = [""] * len(plan.rules)
    fast = [(a.index, na, b.index, nb, w) for a, na, b, nb, w in overlaps(list(plan.rules), origins)]
    claims = [(r, n, p) for r in plan.rules for n, p in r.inputs]
    slow = []
    for i, (ra, na, pa) in enumerate(claims):
        for rb, nb, pb in claims[i + 1 :]:
            w = intersection_witness(pa, pb)
            if w is not None:
                slow.append((ra.index, na, rb.index, nb, w))
    assert fast == slow


def test_candidate_pairs_are_few_for_distinct_ends():
    """400 converts with distinct literal ends: no pair is even asked."""
    plan = compile_spec(_cspec(f"spec t\n{MANY}"), check_overlaps=False)
    pats = [p for r in plan.rules for _, p in r.inputs]
    assert candidate_pairs(pats, [""] * len(pats)) == []


# ---- first_match after a rename: per block, the same answer --------------------------------------

RULE_TEMPLATES = ["{p:path}.a", "{p:path}.b", "x.{s}", "{p:path}.{i:int}", "x.a", "{p:path?}.c.{r:path?}"]


@VARIANTS
@given(
    picks=st.lists(st.integers(0, len(RULE_TEMPLATES) - 1), min_size=1, max_size=3 * MATCH_BLOCK),
    key=st.sampled_from(["x.a", "m.b", "x.7", "c", "m.c.d", "q.q"]),
    start=st.integers(0, 3 * MATCH_BLOCK),
)
def test_first_match_from_any_start_is_the_first_rule_that_matches(picks, key, start):
    src = "spec t\n" + "".join(f"drop {RULE_TEMPLATES[k]}\n" for k in picks)
    plan = compile_spec(_cspec(src), check_overlaps=False)
    want = next(
        (
            (r.index, "x", r.inputs[0][1].match(key))
            for r in plan.rules[start:]
            if r.inputs[0][1].match(key) is not None
        ),
        None,
    )
    got = plan.first_match(key, start)
    if want is None:
        assert got is None
    else:
        assert got[:2] == want[:2]
        assert got[2] == {k: v or "" for k, v in want[2].items()}


def test_a_chain_of_renames_makes_regexes_linear_in_the_rules():
    """Renames each leading to the next: a key through all of them is matched from every start, and
    the regexes made hold about as many alternatives as there are rules (one regex per start, as
    before, held n**2 / 2: a chain of MAX_EXPANDED_RULES renames took minutes to bind)."""
    n = 300
    plan = _compile("spec t\n" + "".join(f"rename {{p:path}}.a{i} -> {{p}}.a{i + 1}\n" for i in range(n)))
    out = bounded(plan.bind, {"x.a0": TensorInfo((4,), "F32")})
    assert out.passthrough == {"x.a0": f"x.a{n}"}
    tables = derived._tables.get(id(plan), {}).values()
    made = sum(len(v[1]) for v in tables if isinstance(v, tuple) and isinstance(v[1], dict))
    assert made <= 3 * n, made


# ---- the docs state each limit and its message ---------------------------------------------------


def test_the_docs_state_every_limit_and_its_message():
    safety = (ROOT / "docs" / "safety.md").read_text(encoding="utf-8")
    section = safety.split("### Compile and matching", 1)[1]
    language = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    for number in (MAX_KEY_CHARS, MAX_OPEN_CAPTURES, MAX_EXPANDED_RULES, MAX_OVERLAP_PAIRS):
        assert f"{number:,}" in section, number
        assert f"{number:,}" in language, number
    messages = [
        bounded(_mixtral().bind, {"a." * 600 + "b": TensorInfo((4,), "F32")}).message,
        bounded(_compile, "spec t\ndrop {a:path}.x.{b:path}.y.{c:path}\n").message,
        bounded(_compile, "spec t\ndrop {a:path}.{b:path}.y\n").message,
        bounded(
            _compile, "spec t\ninclude mixtral under " + ", ".join(f"p{i}" for i in range(400)) + "\n"
        ).message,
        bounded(_compile, "spec t\n" + "".join(SAME_ENDS.splitlines(keepends=True)[:201])).message,
    ]
    for m in messages:
        assert m in section, m
        assert m in language, m


def _alike(n: int) -> str:
    """n converts whose templates begin, end and split alike: only an automaton tells two apart."""
    return "spec t\n" + "".join(
        f"convert w = {{a}}x{i}y{{b}}.w -> {{a}}x{i}y{{b}}.v{i} = transpose(w)\n" for i in range(n)
    )


def test_check_builds_at_most_max_automata_intersections(tmp_path):
    """`check` compares templates pairwise; where nothing but an automaton tells them apart, it stops
    at MAX_AUTOMATA with one finding instead of running for minutes (400 such converts took 277 s).
    Under an alarm only: tracemalloc's tracing would multiply the time of the very work counted."""
    from convspec.lint import check_spec

    path = tmp_path / "alike.cspec"
    path.write_text(_alike(150))  # 11,175 pairs, each needing an automaton
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(60)
    try:
        report = check_spec(str(path))
    finally:
        signal.alarm(0)
    assert [(f.code, f.message) for f in report.findings] == [("E002", too_many_automata_message())]


def _timeout(*_):
    raise AssertionError("check ran past 60 s: its work is not bounded")


def test_the_automata_limit_is_stated_and_counts_every_intersection():
    with automata_budget(3):
        a, b = Pattern("{a}x1y{b}", (("cap", "a", "seg"), ("lit", "x1y", None), ("cap", "b", "seg"))), None
        b = Pattern("{a}x2y{b}", (("cap", "a", "seg"), ("lit", "x2y", None), ("cap", "b", "seg")))
        for _ in range(3):
            intersection_witness(a, b)
        with pytest.raises(TooManyAutomata):
            intersection_witness(a, b)
    intersection_witness(a, b)  # no budget outside the block
    safety = (ROOT / "docs" / "safety.md").read_text(encoding="utf-8")
    language = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    assert f"{MAX_AUTOMATA:,}" in too_many_automata_message()
    assert too_many_automata_message() in safety.split("### Compile and matching", 1)[1]
    assert too_many_automata_message() in language
    from convspec.spec.source import MAX_SPEC_BYTES, MAX_SPEC_CHARS

    assert f"`MAX_SPEC_BYTES` = {MAX_SPEC_BYTES:,}" in safety and f"{MAX_SPEC_CHARS:,}" in safety
