"""Determinism and integrity: converting twice gives the same bytes, and a hash manifest written at
conversion time proves later that neither the source nor the output changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from convspec import manifest
from convspec.cli import main
from convspec.io.safetensors import read_layout

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from make_tiny_mixtral import make  # noqa: E402


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    make(d, layers=2, experts=4)
    return d


def tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("extra", [[], ["--dtype", "float32"], ["--max-shard-size", "20KB"]])
def test_converting_twice_gives_identical_bytes_manifest_included(src, tmp_path, extra):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["convert", "mixtral", str(src), str(a), "--manifest", "--quiet", *extra]) == 0
    assert main(["convert", "mixtral", str(src), str(b), "--manifest", "--quiet", *extra]) == 0
    assert tree(a) == tree(b)
    assert manifest.MANIFEST in tree(a)


def test_the_manifest_holds_every_source_and_output_tensor(src, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", "mixtral", str(src), str(out), "--manifest", "--quiet"]) == 0
    m = json.loads((out / manifest.MANIFEST).read_text())
    assert m["spec"] == "mixtral" and m["reverse"] is False
    assert sorted(m["source"]) == sorted(read_layout(src))
    assert sorted(m["output"]) == sorted(read_layout(out))
    fused = m["output"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert fused["shape"] == [4, 96, 32] and fused["dtype"] == "bfloat16" and len(fused["sha256"]) == 64
    assert str(tmp_path) not in (out / manifest.MANIFEST).read_text()  # no absolute paths


def test_verify_manifest_passes_then_names_a_changed_output_tensor(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "mixtral", str(src), str(out), "--manifest", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", "mixtral", str(src), "--converted", str(out), "--manifest"]) == 0
    assert "match the manifest" in capsys.readouterr().out
    e = read_layout(out)["model.layers.1.mlp.experts.down_proj"]
    with open(e.file, "r+b") as f:  # one flipped bit in the middle of a tensor
        f.seek((e.start + e.end) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    assert main(["verify", "mixtral", str(src), "--converted", str(out), "--manifest"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "CHANGED output tensor model.layers.1.mlp.experts.down_proj changed since the conversion (sha256 differs)",
        f"1 difference(s) from the manifest among {len(read_layout(src)) + len(read_layout(out))} tensors",
    ]


def test_verify_manifest_names_a_changed_source_and_a_wrong_spec(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "mixtral", str(src), str(out), "--manifest", "--quiet"]) == 0
    from safetensors.torch import load_file, save_file

    f = src / "model.safetensors"
    sd = load_file(str(f))
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1
    save_file(sd, str(f))
    capsys.readouterr()
    assert main(["verify", "qwen2_moe", str(src), "--converted", str(out), "--manifest", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["problems"] == [
        "the manifest was written by spec mixtral, not qwen2_moe",
        "source tensor model.norm.weight changed since the conversion (sha256 differs)",
    ]


def test_a_source_manifest_is_not_copied_into_an_output_that_has_none(src, tmp_path):
    out, back = tmp_path / "out", tmp_path / "back"
    assert main(["convert", "mixtral", str(src), str(out), "--manifest", "--quiet"]) == 0
    assert main(["convert", "mixtral", str(out), str(back), "--reverse", "--quiet"]) == 0
    assert not (back / manifest.MANIFEST).exists()


def test_verify_manifest_without_one_is_an_error(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "mixtral", str(src), str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", "mixtral", str(src), "--converted", str(out), "--manifest"]) == 2
    assert "no manifest" in capsys.readouterr().err
    (out / manifest.MANIFEST).write_text('{"convspec_manifest": 9}')
    assert main(["verify", "mixtral", str(src), "--converted", str(out), "--manifest"]) == 2
    assert "not a convspec manifest" in capsys.readouterr().err
    assert main(["verify", "mixtral", str(src), "--manifest"]) == 2
