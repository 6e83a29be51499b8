"""Pictures: DOT that stays the same size for 2 or 60 layers, one group drawn in full, hostile keys
escaped, and graphviz (a system `dot` or graphviz-pure) turning it into real svg and png."""

from __future__ import annotations

import dataclasses
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

import convspec
from convspec import dot, pictures
from convspec.cli import main
from convspec.errors import ConvspecError
from convspec.keyshapes import compact_keys
from convspec.ops import TensorInfo
from convspec.pictures import render_dot

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "docs" / "img"))
from make_pictures import qwen2_moe_layout  # noqa: E402  (the layout the docs' picture draws)
from make_tiny_mixtral import make  # noqa: E402

needs_graphviz = pytest.mark.skipif(
    not pictures.find_graphviz(), reason="neither graphviz `dot` nor graphviz-pure is on PATH"
)


@pytest.fixture(scope="module")
def qwen60():
    return convspec.compile("qwen2_moe").bind(qwen2_moe_layout(60))


def _nodes_and_edges(text: str) -> tuple[int, int]:
    nodes = len(re.findall(r"^ *\w+ \[label=", text, re.M))
    edges = len(re.findall(r"^ *\w+ -> \w+", text, re.M))
    return nodes, edges


# ---- the DOT ---------------------------------------------------------------------------------


def test_dot_does_not_grow_with_layers(qwen60):
    plan = convspec.compile("qwen2_moe")
    small = dot.bound_dot(plan.bind(qwen2_moe_layout(2)))
    big = dot.bound_dot(qwen60)
    assert _nodes_and_edges(small) == _nodes_and_edges(big)
    # rule 1: 2 inputs, 3 ops, 1 output; rule 2: 3 nodes; the group: 6; edges include the pins of
    # the two input columns: no node or edge for any layer
    assert _nodes_and_edges(big) == (15, 14)
    assert len(big) < len(small) + 200  # only the counts in the labels differ
    assert "\u00d7 60 groups" in big and "\u00d7 2 groups" in small


def test_each_rule_is_drawn_once_renames_in_one_table():
    plan = convspec.compile("kimi_k25")  # 12 renames, then 7 converts
    text = dot.plan_dot(plan)
    converts = [r for r in plan.rules if r.kind == "convert"]
    for r in converts:
        assert text.count(f"subgraph cluster_r{r.index} ") == 1
        assert text.count(f"<b>rule {r.index + 1} \u00b7 convert</b>") == 1
    assert text.count("subgraph cluster_") == len(converts)
    tables = re.findall(r"^ *t\d+ \[label=<<table", text, re.M)
    assert len(tables) == 1  # the 12 renames: one node, a row each
    assert "<b>rules 1-12 \u00b7 12 renames</b>" in text
    assert text.count("<tr>") == 12 + 2
    for r in plan.rules:
        assert dot._h(r.inputs[0][1].text) in text


def test_rules_are_emitted_last_first_so_dot_draws_them_top_down():
    text = dot.plan_dot(convspec.compile("mixtral"))
    # under rankdir=LR dot stacks separate components bottom-up: the file lists rule 3, 2, then the table
    assert text.index("cluster_r2 ") < text.index("cluster_r1 ") < text.index("\n  t0 [label=")
    # inside a cluster, the inputs are pinned in spec order (a reversed flat chain)
    assert "{rank=same; r1_in0; r1_in1;}" in text and "r1_in1 -> r1_in0 [style=invis];" in text
    inverse = dot.plan_dot(convspec.compile("mixtral").inverse())  # and the outputs: gate above up
    assert "{rank=same; r1_out0; r1_out1;}" in inverse and "r1_out1 -> r1_out0 [style=invis];" in inverse


def test_ops_show_their_parameters_and_edges_their_values():
    text = dot.plan_dot(convspec.compile("mixtral"))
    assert "over=e, dim=0" in text  # stack, its default parts=1 left out
    assert "parts=1" not in text
    assert "dim=1, equal=true" in text
    assert 'r1_in0 -> r1_op0 [label="gate[e]"];' in text
    assert "r1_op0 -> r1_op2;" in text  # an unnamed single value needs no label
    inverse = dot.plan_dot(convspec.compile("mixtral").inverse())
    assert "(inverse)" in inverse
    assert '[label="%1"]' in inverse and '[label="%2"]' in inverse  # which output of chunk


def test_drops_aliases_and_unless_are_marked(tmp_path):
    spec = tmp_path / "marks.yaml"
    spec.write_text(
        "spec: marks\ndoc: drops and aliases\nrules:\n"
        '  - drop: "{p:path}.rotary_emb.inv_freq"\n'
        '  - alias: "vision_model.{r:path}"\n    to: "{r}"\n'
        '  - rename: "model.{rest:path}"\n    to: "model.language_model.{rest}"\n'
        '    unless: ["model.language_model.{_r:path?}"]\n'
    )
    text = dot.plan_dot(convspec.compile(spec))
    assert "1 drop, 1 alias, 1 rename" in text
    assert f'bgcolor="{dot.C_DROP}"' in text and "<b>dropped</b>" in text
    assert "on load only" in text
    assert "unless " in text and "model.language_model.{_r:path?}" in text


def test_the_named_group_is_drawn_with_compacted_keys_and_inferred_shapes(qwen60):
    text = dot.bound_dot(qwen60, "p=model.layers.3")
    assert "<b>group p=model.layers.3 \u00b7 rule 1, one of 60</b>" in text
    assert "model.layers.3.mlp.experts.{0..63}.gate_proj.weight" in text
    assert "model.layers.3.mlp.experts.{0..63}.up_proj.weight" in text
    assert "64 \u00d7 [1408, 2048] bfloat16" in text  # the members
    assert "[64, 1408, 2048] bfloat16" in text  # each stack
    assert "[64, 2816, 2048] bfloat16" in text  # the cat, and its output key
    assert "model.layers.3.mlp.experts.gate_up_proj" in text
    assert "model.layers.3.mlp.experts.0." not in text  # no key drawn one by one
    assert "model.layers.4." not in text
    other = dot.bound_dot(qwen60, "2:p=model.layers.3")  # the same name in rule 2
    assert (
        "\u00b7 rule 2, one of 60</b>" in other
        and "model.layers.3.mlp.experts.{0..63}.down_proj.weight" in other
    )


def test_without_a_name_the_first_group_of_the_first_convert_is_drawn(qwen60):
    text = dot.bound_dot(qwen60)
    assert "<b>group p=model.layers.0 \u00b7 rule 1, one of 60</b>" in text  # numeric order: not layers.10
    assert "(p=model.layers.0 drawn below)" in text


def test_an_unknown_group_is_an_error_with_close_matches(qwen60):
    with pytest.raises(ConvspecError) as e:
        dot.bound_dot(qwen60, "p=model.layer.3")
    assert "no group 'p=model.layer.3'" in e.value.message
    assert e.value.hint.startswith("did you mean p=model.layers.3")
    with pytest.raises(ConvspecError) as e:
        dot.bound_dot(qwen60, "zzz")
    assert "groups are named like p=model.layers.0" in e.value.hint


def test_compact_keys_folds_number_ranges():
    keys = [f"m.layers.{i}.experts.{e}.w1.weight" for i in (0, 1, 2) for e in range(8)]
    assert compact_keys(keys) == [("m.layers.{0..2}.experts.{0..7}.w1.weight", keys)]
    ragged = [f"x.{e}.w" for e in (0, 1, 2, 3, 5, 9, 10)] + ["y.w"]
    assert [t for t, _ in compact_keys(ragged)] == ["x.{0..3,5,9,10}.w", "y.w"]
    not_a_product = ["a.0.b.0", "a.0.b.1", "a.1.b.0"]
    assert [t for t, _ in compact_keys(not_a_product)] == ["a.0.b.{0,1}", "a.1.b.0"]
    assert [t for t, _ in compact_keys(["k.01", "k.02"])] == ["k.{01,02}"]  # leading zeros as written


HOSTILE = 'we"ird\\<b>&amp;\n\t\x00}{]'


def _hostile_bound():
    plan = convspec.compile("mixtral")
    plan = dataclasses.replace(plan, name='n"a<m>e&\\', doc='line\nbreak "quoted" <tag> & \\n')
    layout = {
        f"{HOSTILE}.block_sparse_moe.experts.{e}.{w}.weight": TensorInfo((4, 2), "float32")
        for e in range(3)
        for w in ("w1", "w2", "w3")
    }
    return plan.bind(layout)


def test_hostile_text_is_escaped():
    text = dot.bound_dot(_hostile_bound())
    safe = dot.bound_dot(
        convspec.compile("mixtral").bind(
            {
                f"plain.block_sparse_moe.experts.{e}.{w}.weight": TensorInfo((4, 2), "float32")
                for e in range(3)
                for w in ("w1", "w2", "w3")
            }
        )
    )
    assert text.count("\n") == safe.count("\n")  # no raw newline from a key or the doc
    assert "\x00" not in text and "\t" not in text
    assert "we&quot;ird\\&lt;b&gt;&amp;amp;\\n\\t\\x00}{]" in text
    assert "<b>n&quot;a&lt;m&gt;e&amp;\\</b>" in text
    assert _nodes_and_edges(text) == _nodes_and_edges(safe)


@needs_graphviz
def test_graphviz_accepts_hostile_text():
    svg = render_dot(dot.bound_dot(_hostile_bound()), "svg").decode()
    shown = html.unescape(re.sub(r"<[^>]+>", "\0", svg))
    assert 'we"ird\\<b>&amp;\\n\\t\\x00}{].block_sparse_moe.experts.{0..2}.w1.weight' in shown
    assert 'n"a<m>e&\\' in shown


@needs_graphviz
def test_render_dot_gives_real_svg_and_png(qwen60):
    text = dot.bound_dot(qwen60)
    svg = render_dot(text, "svg")
    assert b"<svg" in svg[:1000] and svg.rstrip().endswith(b"</svg>")
    assert b"gate_up_proj" in svg
    png = render_dot(text, "png")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(svg) < 100_000  # a 60-layer MoE draws as small as a 2-layer one


@needs_graphviz
def test_render_dot_reports_graphviz_errors():
    with pytest.raises(ConvspecError) as e:
        render_dot("digraph {", "svg")
    assert "failed to draw the svg" in e.value.message and "syntax error" in e.value.message
    with pytest.raises(ConvspecError, match="pictures are svg or png"):
        render_dot("digraph { a }", "pdf")


def test_render_dot_without_graphviz_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no dot, no graphviz-pure
    with pytest.raises(ConvspecError) as e:
        render_dot("digraph { a }", "svg")
    assert e.value.message == "drawing svg needs graphviz"
    assert e.value.hint == "pip install 'convspec[pictures]' (or apt-get install graphviz)"
    monkeypatch.setattr(pictures.shutil, "which", lambda name: None)
    with pytest.raises(ConvspecError, match="drawing png needs graphviz"):
        render_dot("digraph { a }", "png")


def test_render_dot_times_out_as_a_convspec_error(monkeypatch):
    def slow(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs["timeout"])

    monkeypatch.setattr(pictures, "find_graphviz", lambda: ["/usr/bin/dot"])
    monkeypatch.setattr(pictures.subprocess, "run", slow)
    with pytest.raises(ConvspecError, match=r"took longer than 5s"):
        render_dot("digraph { a }", "svg", timeout=5)


def test_a_failing_dot_hands_over_to_graphviz_pure(monkeypatch):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd[0])
        if cmd[0] == "dot":
            return subprocess.CompletedProcess(cmd, 1, b"", b'Format: "png" not recognized')
        return subprocess.CompletedProcess(cmd, 0, b"\x89PNG...", b"")

    monkeypatch.setattr(pictures, "find_graphviz", lambda: ["dot", "graphviz-pure"])
    monkeypatch.setattr(pictures.subprocess, "run", run)
    assert render_dot("digraph { a }", "png") == b"\x89PNG..."
    assert calls == ["dot", "graphviz-pure"]


# ---- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny-mixtral"
    make(d, layers=2, experts=8)
    return d


@needs_graphviz
def test_cli_writes_svg_and_png(tmp_path, ckpt):
    svg = tmp_path / "plan.svg"
    assert main(["compile", "mixtral", "--format", "svg", "-o", str(svg)]) == 0
    assert b"<svg" in svg.read_bytes()[:1000]
    png = tmp_path / "bound.png"
    assert main(["compile", "mixtral", "--format", "png", "--against", str(ckpt), "-o", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_cli_dot_format_and_unknown_group(capsys, ckpt):
    assert main(["compile", "mixtral", "--format", "dot"]) == 0
    assert capsys.readouterr().out.startswith("digraph")
    assert (
        main(["compile", "mixtral", "--format", "dot", "--against", str(ckpt), "--group", "p=model.layers.1"])
        == 0
    )
    assert "<b>group p=model.layers.1 \u00b7 rule 2, one of 2</b>" in capsys.readouterr().out
    assert (
        main(["compile", "mixtral", "--format", "dot", "--against", str(ckpt), "--group", "p=layers.1"]) == 2
    )
    err = capsys.readouterr().err
    assert "no group 'p=layers.1'" in err and "did you mean p=model.layers.1" in err
