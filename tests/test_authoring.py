"""docs/authoring.md stays true: its commands print what it shows, its draft has the mistakes it
describes, and the spec it ends with is clean, round-trips bit for bit and fits transformers' Mixtral."""

from __future__ import annotations

import difflib
import html
import importlib.util
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch

import convspec
from convspec import cli, pictures
from convspec.io.safetensors import read_layout
from convspec.lint import RULES, check_spec

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "authoring.md"
EXAMPLES = ROOT / "examples" / "authoring"
DRAFT = EXAMPLES / "orca_draft.yaml"
FINAL = EXAMPLES / "orca.yaml"
PICTURE = ROOT / "docs" / "img" / "orca-plan.svg"
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

sys.path.insert(0, str(EXAMPLES))
from make_checkpoint import make  # noqa: E402


@pytest.fixture(scope="module")
def orca(tmp_path_factory) -> Path:
    """The walkthrough's checkpoint, made once for the module."""
    out = tmp_path_factory.mktemp("authoring") / "orca"
    make(out)
    return out


def _layout(path: Path) -> dict:
    return {k: e.info for k, e in read_layout(path).items()}


# ---- the doc's console blocks, run again -----------------------------------------------------------


def _console_blocks(text: str) -> list[list[str]]:
    return [m.group(1).splitlines() for m in re.finditer(r"^```console\n(.*?)^```$", text, re.M | re.S)]


def _steps(block: list[str]):
    """(command, heredoc body or None, expected output lines) for each `$ ` line of a block."""
    i = 0
    while i < len(block):
        assert block[i].startswith("$ "), f"not a command, and no command before it: {block[i]}"
        command, body = block[i][2:], None
        i += 1
        if command.endswith("<<'EOF'"):
            end = block.index("EOF", i)
            body, i = "\n".join(block[i:end]) + "\n", end + 1
        start = i
        while i < len(block) and not block[i].startswith("$ "):
            i += 1
        yield command, body, block[start:i]


def _fits(expected: list[str], actual: list[str]) -> bool:
    """Whether `actual` is `expected` with each `...` line standing for one or more lines."""
    pattern = "".join(r"(?:.*\n)+?" if line == "..." else re.escape(line) + r"\n" for line in expected)
    return re.fullmatch(pattern, "".join(line.rstrip() + "\n" for line in actual)) is not None


def _run(command: str, body: str | None, capsys) -> str | None:
    """Run one doc command in-process; its output, or None when it cannot run here."""
    words = shlex.split(command.split(" <<")[0])
    if words[0] == "convspec":
        if "--format" in words and not pictures.find_graphviz():
            return None
        cli.main(words[1:])
    elif words[:2] == ["python", "-"]:
        if "transformers" in body and not HAS_TRANSFORMERS:
            return None
        exec(compile(body, "<doc>", "exec"), {"__name__": "__doc__"})
    elif words[0] == "python":
        if "load_mixtral" in words[1] and not HAS_TRANSFORMERS:
            return None
        argv, sys.argv = sys.argv, words[1:]
        try:
            runpy.run_path(str(ROOT / words[1]), run_name="__main__")
        finally:
            sys.argv = argv
    elif words[:2] == ["cat", ">"]:
        Path(words[2]).write_text(body)
    elif words[0] == "cat":
        print(Path(words[1]).read_text(), end="")
    else:
        raise AssertionError(f"the test does not know how to run: {command}")
    out, err = capsys.readouterr()
    return out + err


def test_every_command_on_the_page_prints_what_the_page_shows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    here = {"/tmp/": f"{tmp_path}/", "docs/img/orca-plan.svg": f"{tmp_path}/orca-plan.svg"}
    ran, failures = 0, []
    for block in _console_blocks(DOC.read_text()):
        for command, body, expected in _steps(block):
            real_command, real_body = command, body
            for a, b in here.items():
                real_command = real_command.replace(a, b)
                real_body = real_body and real_body.replace(a, b)
            out = _run(real_command, real_body, capsys)
            if out is None:
                continue
            ran += 1
            actual = out.replace(f"{tmp_path}/", "/tmp/").splitlines()
            if not _fits(expected, actual):
                diff = difflib.unified_diff(expected, actual, "docs/authoring.md", "real", lineterm="")
                failures.append(f"$ {command}\n" + "\n".join(diff))
    assert ran >= 20, f"only {ran} commands ran"
    assert not failures, "\n\n".join(failures)
    drawn = tmp_path / "orca-plan.svg"
    if drawn.exists():  # graphviz was there: the committed picture is the one the command draws
        assert _labels(drawn) == _labels(PICTURE), "docs/img/orca-plan.svg is stale: run the command again"


def _labels(svg: Path) -> set[str]:
    return {html.unescape(t) for t in re.findall(r">([^<>]+)</text>", svg.read_text())}


# ---- the draft's mistakes, and the fixed spec ---------------------------------------------------------


def test_the_draft_alone_has_a_shadowed_rename_and_a_rename_saving_back_never_undoes():
    report = check_spec(str(DRAFT))
    assert [(f.code, f.line) for f in report.findings] == [("W201", 12), ("W207", 8)]
    w207 = report.findings[1]
    assert w207.message.startswith("saving back never undoes rule 1: on the way back the inverse of rule 2 ")
    assert f"{w207.message}; {w207.hint}" in DOC.read_text()


def test_the_checkpoint_finds_the_expert_converts_placed_before_their_rename(orca):
    report = check_spec(str(DRAFT), orca / "config.json", _layout(orca), checkpoint=str(orca))
    found = [(f.code, f.line) for f in report.findings]
    # no W206 for rule 3 (W201 says it), no W207 per key (the static W207 explains them)
    assert found == [("W201", 12), ("W207", 8), ("W206", 32), ("W206", 37)]
    hints = [f.hint for f in report.findings if f.code == "W206" and f.hint]
    assert [h.split(": ")[-1] for h in hints] == ["move rule 11 after rule 13", "move rule 12 after rule 13"]
    doc = DOC.read_text()
    assert all(h in doc for h in hints)
    # 100% "claimed" although the experts are only renamed: the doc warns about exactly this
    assert report.coverage["unmatched"] == 0 and report.coverage["converted"] == 4


def test_the_draft_inverse_sends_layer_keys_to_the_wrong_place(orca):
    plan = convspec.compile(convspec.load_spec(str(DRAFT)), config=orca / "config.json")
    back = plan.inverse().apply({"model.layers.0.input_layernorm.weight": torch.zeros(2)})
    assert list(back) == ["transformer.layers.0.ln_1.weight"]


def _draft_with_the_converts_after_rule_13(renames_before: str, renames_after: str) -> str:
    """The draft with its first renames swapped for others and its expert converts moved below rule 13."""
    text = DRAFT.read_text()
    assert renames_before in text
    text = text.replace(renames_before, renames_after)
    start, end = text.index("  - convert:\n      gate:"), text.index('  - rename: "{p:path}.moe.experts')
    return text[:start] + text[end:] + text[start:end]


DRAFT_RENAMES = """  - rename: transformer.h.{i:int}.{rest:path}
    to: model.layers.{i}.{rest}
  - rename: transformer.{rest:path}
    to: model.{rest}
  - rename: transformer.wte.weight
    to: model.embed_tokens.weight
"""
# W201's hint followed: rule 3 moved above the rule that shadows it
HINTED_RENAMES = """  - rename: transformer.wte.weight
    to: model.embed_tokens.weight
  - rename: transformer.h.{i:int}.{rest:path}
    to: model.layers.{i}.{rest}
  - rename: transformer.{rest:path}
    to: model.{rest}
"""
# W207's second fix, as step 9 spells it: the common part first, the specific part of its output after
COMMON_FIRST_RENAMES = """  - rename: transformer.{rest:path}
    to: model.{rest}
  - rename: model.h.{i:int}.{rest:path}
    to: model.layers.{i}.{rest}
  - rename: model.wte.weight
    to: model.embed_tokens.weight
"""


def test_following_only_the_w201_and_w206_hints_leaves_the_catch_all_undoing_two_renames(orca, tmp_path):
    # the doc's step 9: rule 3 moved above the catch-all, the converts below rule 13
    hinted = tmp_path / "hinted.yaml"
    hinted.write_text(_draft_with_the_converts_after_rule_13(DRAFT_RENAMES, HINTED_RENAMES))
    report = check_spec(str(hinted), orca / "config.json", _layout(orca), checkpoint=str(orca))
    assert [(f.code, f.message.split(":")[0]) for f in report.findings] == [
        ("W207", "saving back never undoes rule 2"),  # transformer.h.{i} -> model.layers.{i}
        ("W207", "saving back never undoes rule 1"),  # transformer.wte.weight -> model.embed_tokens.weight
    ]
    assert all("the inverse of rule 3 takes" in f.message for f in report.findings)  # the catch-all
    assert report.coverage["converted"] == 100
    assert cli.main(["verify", str(hinted), str(orca)]) == 1
    plan = convspec.compile(convspec.load_spec(str(hinted)), config=orca / "config.json")
    assert list(plan.inverse().apply({"model.layers.3.post_attention_layernorm.weight": torch.zeros(1)})) == [
        "transformer.layers.3.ln_2.weight"
    ]


def test_w207s_other_fix_the_catch_all_first_checks_clean_and_round_trips(orca, tmp_path):
    common_first = tmp_path / "common_first.yaml"
    common_first.write_text(_draft_with_the_converts_after_rule_13(DRAFT_RENAMES, COMMON_FIRST_RENAMES))
    report = check_spec(str(common_first), orca / "config.json", _layout(orca), checkpoint=str(orca))
    assert report.findings == [] and report.coverage["converted"] == 100
    assert cli.main(["verify", str(common_first), str(orca)]) == 0
    doc = " ".join(DOC.read_text().split())
    assert "`model.h.{i:int}.{rest:path} -> model.layers.{i}.{rest}`" in doc


def test_the_fixed_spec_is_clean_and_claims_every_key(orca):
    assert check_spec(str(FINAL)).findings == []
    report = check_spec(str(FINAL), orca / "config.json", _layout(orca), checkpoint=str(orca))
    assert report.findings == []
    assert report.coverage == {
        "keys": 119,
        "converted": 100,
        "renamed": 19,
        "dropped": 0,
        "unmatched": 0,
        "already": 0,
        "claimed_share": 1.0,
    }


def test_the_fixed_spec_round_trips_bit_for_bit(orca):
    from safetensors.torch import load_file

    sd = load_file(str(orca / "model.safetensors"))
    plan = convspec.compile(convspec.load_spec(str(FINAL)), config=orca / "config.json")
    out = plan.apply(sd)
    back = plan.inverse().apply(out)
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k].view(torch.int16), sd[k].view(torch.int16)) for k in sd)
    q, k, v = (out[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), sd["transformer.h.1.attn.c_attn.weight"])
    gate_up = out["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(gate_up[5, :48], sd["transformer.h.1.moe.experts.5.gate.weight"])
    assert torch.equal(gate_up[5, 48:], sd["transformer.h.1.moe.experts.5.up.weight"])


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_the_converted_keys_and_shapes_are_mixtrals(orca):
    import transformers
    from load_mixtral import mixtral_config

    config = mixtral_config(json.loads((orca / "config.json").read_text()))
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(config)
    want = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    plan = convspec.compile(convspec.load_spec(str(FINAL)), config=orca / "config.json")
    bound = plan.bind(_layout(orca))
    assert {k: tuple(shape) for k, (shape, _) in bound.outputs.items()} == want


# ---- what the page quotes ---------------------------------------------------------------------------


def test_the_page_quotes_the_spec_files_as_they_are():
    quoted = re.findall(r"^<!-- file: (\S+) -->\n```yaml\n(.*?)^```$", DOC.read_text(), re.M | re.S)
    assert sorted(path for path, _ in quoted) == [
        "examples/authoring/orca.yaml",
        "examples/authoring/orca_draft.yaml",
    ]
    for path, text in quoted:
        assert text == (ROOT / path).read_text(), f"docs/authoring.md quotes {path} differently"


def test_the_lint_table_is_lint_rules():
    rows = re.findall(r"^\| ([EWI]\d{3}) \| `([a-z-]+)` \| (\w+) \| ([^|]+?) \|", DOC.read_text(), re.M)
    assert rows == [(r.code, r.name, r.severity, r.summary) for r in RULES.values()]


def test_the_picture_is_the_fixed_specs_expert_group():
    assert "(img/orca-plan.svg)" in DOC.read_text()
    labels = _labels(PICTURE)
    assert "model.layers.0.mlp.experts.gate_up_proj" in labels
    assert "[8, 96, 32] bfloat16" in labels
    assert "{p:path}.moe.experts.{rest:path}" in labels


def test_a_cat_on_the_wrong_dim_is_clean_and_invertible_and_only_the_shape_shows_it(orca, tmp_path):
    # the doc's point in step 10: lint and verify cannot tell dim=0 from dim=1, the shapes can
    wrong = tmp_path / "dim0.yaml"
    wrong.write_text(FINAL.read_text().replace("stack(up, over=e), dim=1,", "stack(up, over=e), dim=0,"))
    assert wrong.read_text() != FINAL.read_text()
    report = check_spec(str(wrong), orca / "config.json", _layout(orca), checkpoint=str(orca))
    assert report.findings == []
    plan = convspec.compile(convspec.load_spec(str(wrong)), config=orca / "config.json")
    shape, _ = plan.bind(_layout(orca)).outputs["model.layers.0.mlp.experts.gate_up_proj"]
    assert tuple(shape) == (16, 48, 32)
    assert cli.main(["verify", str(wrong), str(orca)]) == 0


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_load_mixtral_builds_on_meta_and_leaves_nothing_there(orca):
    import transformers
    from load_mixtral import load, mixtral_config

    model, report = load(orca)
    assert report.ok and report.on_meta == []
    assert not [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    # the rotary inv_freq no checkpoint holds: what a model built on the CPU computes for itself
    cpu = transformers.MixtralForCausalLM(mixtral_config(json.loads((orca / "config.json").read_text())))
    buffers = dict(cpu.named_buffers())
    assert buffers and all(torch.equal(t, buffers[k]) for k, t in model.named_buffers())


# ---- the pictures under docs/img --------------------------------------------------------------------


@pytest.mark.skipif(
    not pictures.find_graphviz(), reason="neither graphviz `dot` nor graphviz-pure is on PATH"
)
def test_the_pictures_under_docs_img_are_what_make_pictures_draws(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # make_pictures changes into the repository root; this puts it back after
    make_pictures = runpy.run_path(str(ROOT / "docs" / "img" / "make_pictures.py"))
    make_pictures["main"](tmp_path)
    drawn = sorted(p.name for p in tmp_path.iterdir())
    assert drawn == sorted(p.name for p in PICTURE.parent.iterdir() if p.suffix in (".svg", ".png"))
    for name in drawn:
        if name.endswith(".svg"):
            assert _labels(tmp_path / name) == _labels(PICTURE.parent / name), f"docs/img/{name} is stale"
        else:
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spec = (ROOT / "specs" / "qwen2_moe.yaml").read_text().splitlines()
    line = spec.index("  - convert:") + 1  # rule 1 of the spec as it is now: the picture cites it
    assert any(
        f"specs/qwen2_moe.yaml:{line}:5" in s for s in _labels(PICTURE.parent / "qwen2_moe-60-layers.svg")
    )
