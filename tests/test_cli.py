"""The CLI: `convspec compile` in every format, against a checkpoint, and its errors (exit 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.processes import cli_without_torch

import convspec
from convspec.cli import main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from make_tiny_mixtral import make  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny-mixtral"
    make(d, layers=2, experts=11)
    return d


def test_compile_text_shows_rules_inverse_and_regex(capsys):
    assert main(["compile", "mixtral"]) == 0
    out = capsys.readouterr().out
    assert f"rule 2  convert  {convspec.compile('mixtral').rules[1].where}" in out
    assert "op   %3 = cat(%1, %2, dim=1, equal=true)" in out
    assert "inverse: exact" in out
    assert "(?P<r1_0__e>(?:0|[1-9][0-9]*))" in out


def test_compile_by_model_type_resolves_the_shared_spec(capsys):
    assert main(["compile", "deepseek_v3"]) == 0
    assert capsys.readouterr().out.startswith("plan qwen2_moe:")


def test_compile_json_round_trips_into_a_plan(capsys):
    import convspec

    assert main(["compile", "mixtral", "--format", "json"]) == 0
    text = capsys.readouterr().out
    plan = convspec.Plan.from_json(text)
    assert plan.to_json() == convspec.compile("mixtral").to_json()


def test_compile_dot_draws_each_rule_once(capsys, ckpt):
    assert main(["compile", "mixtral", "--format", "dot", "--against", str(ckpt)]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph plan {")
    # the two converts once each (not once per layer), plus the one group drawn in full
    assert dot.count("subgraph cluster_r") == 2
    assert dot.count("subgraph cluster_group") == 1
    assert dot.count("{p:path}.block_sparse_moe.{rest:path}") == 1  # the rename, in its table
    assert '<b>cat</b><br/><font point-size="9" color="#4b5563">dim=1, equal=true</font>' in dot
    assert re.search(r"^ *r1_op2 \[label=<<b>cat</b>", dot, re.M)


def test_compile_against_lists_groups_in_numeric_order(capsys, ckpt):
    assert main(["compile", "mixtral", "--against", str(ckpt)]) == 0
    out = capsys.readouterr().out
    i9 = out.index("model.layers.0.block_sparse_moe.experts.9.w1.weight")
    i10 = out.index("model.layers.0.block_sparse_moe.experts.10.w1.weight")
    assert i9 < i10
    assert re.search(
        r"out  model\.layers\.0\.mlp\.experts\.gate_up_proj +\[11, 96, 32\] +bfloat16 +66\.0 KiB", out
    )
    assert "unmatched  15  (passed through unchanged)" in out
    assert "renamed    2" in out


def test_compile_against_json_has_groups_and_coverage(capsys, ckpt):
    assert main(["compile", "mixtral", "--against", str(ckpt), "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["groups"]) == 4
    assert d["coverage"]["converted"] == 2 * 11 * 3
    g = next(g for g in d["groups"] if g["rule"] == 3 and g["group"] == {"p": "model.layers.1"})
    assert g["outputs"] == {
        "model.layers.1.mlp.experts.down_proj": {"shape": [11, 32, 48], "dtype": "bfloat16"}
    }


def test_bad_spec_exits_2_with_one_message(tmp_path, capsys):
    bad = tmp_path / "bad.cspec"
    bad.write_text("spec bad\nconvert a = {p:path}.w -> {p}.x = stak(a, over=e)\n")
    assert main(["compile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{bad}:2:")
    assert "unknown op 'stak'" in err
    assert "did you mean 'stack'?" in err
    assert "Traceback" not in err


def test_unknown_spec_name_suggests(capsys):
    assert main(["compile", "mixtrl"]) == 2
    err = capsys.readouterr().err
    assert "no built-in spec or model type named 'mixtrl'" in err
    assert "did you mean mixtral" in err


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["compile", "mixtral", "--against", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    save_file(
        {
            "m.block_sparse_moe.experts.0.w1.weight": torch.zeros(2, 2),
            "m.block_sparse_moe.experts.2.w1.weight": torch.zeros(2, 2),
            "m.block_sparse_moe.experts.0.w3.weight": torch.zeros(2, 2),
            "m.block_sparse_moe.experts.2.w3.weight": torch.zeros(2, 2),
        },
        str(tmp_path / "model.safetensors"),
    )
    assert main(["compile", "mixtral", "--against", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "group p=m: e=1 is missing" in err
    assert "m.block_sparse_moe.experts.0.w1.weight" in err


def test_console_script_runs_as_a_process():
    r = subprocess.run(
        [sys.executable, "-m", "convspec.cli", "compile", "--list"], capture_output=True, text=True
    )
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert {"mixtral", "qwen2_moe", "legacy", "split_qkv"} <= set(names)


def test_example_main_job_runs(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mixtral_roundtrip.py"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "bit-exact against the source" in r.stdout


def test_compile_against_reads_headers_without_importing_torch(ckpt):
    """Binding is headers and shapes only: `compile --against` must not pay torch's import time."""
    last, output = cli_without_torch(["compile", "mixtral", "--against", str(ckpt)])
    assert last == "NO-TORCH 0", output
