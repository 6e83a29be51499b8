"""Pickle checkpoints are refused unless asked for, and then read with weights_only=True: a pickle
that would run code is refused, and its code never runs."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convspec.cli import main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from make_tiny_mixtral import make  # noqa: E402


@pytest.fixture
def pair(tmp_path):
    """The tiny Mixtral checkpoint as safetensors, and the same tensors as a pickle checkpoint."""
    st = tmp_path / "st"
    make(st, layers=2, experts=4)
    pk = tmp_path / "pk"
    pk.mkdir()
    torch.save(load_file(str(st / "model.safetensors")), pk / "pytorch_model.bin")
    (pk / "config.json").write_text((st / "config.json").read_text())
    return st, pk


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_a_pickle_checkpoint_is_refused_without_the_flag(pair, tmp_path, capsys):
    _, pk = pair
    assert main(["convert", "mixtral", str(pk), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(pk) in err and "--allow-pickle" in err
    assert not (tmp_path / "out").exists()


def test_with_the_flag_it_converts_to_the_same_bytes_as_from_safetensors(pair, tmp_path):
    st, pk = pair
    a, b = tmp_path / "from_st", tmp_path / "from_pk"
    assert main(["convert", "mixtral", str(st), str(a), "--quiet"]) == 0
    assert main(["convert", "mixtral", str(pk), str(b), "--quiet", "--allow-pickle"]) == 0
    assert files(a) == files(b)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".convspec-pickle")]  # cleaned up
    assert main(["verify", "mixtral", str(pk), "--allow-pickle"]) == 0


def test_a_sharded_pickle_checkpoint_with_its_index(pair, tmp_path):
    st, _ = pair
    sd = load_file(str(st / "model.safetensors"))
    keys = sorted(sd)
    d = tmp_path / "sharded"
    d.mkdir()
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, ks in halves.items():
        torch.save({k: sd[k] for k in ks}, d / name)
    index = {"weight_map": {k: name for name, ks in halves.items() for k in ks}}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (d / "config.json").write_text((st / "config.json").read_text())
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["convert", "mixtral", str(st), str(a), "--quiet"]) == 0
    assert main(["convert", "mixtral", str(d), str(b), "--quiet", "--allow-pickle"]) == 0
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(ta) == sorted(tb)  # the same tensors (laid out in the source's order, so not byte-equal)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_its_code_never_runs(tmp_path, capsys):
    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "pwned"
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _RunsCode(marker)}, f)
    assert main(["convert", "mixtral", str(d), str(tmp_path / "out"), "--allow-pickle"]) == 2
    err = capsys.readouterr().err
    assert f"{d / 'pytorch_model.bin'}: not loadable as weights only" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".convspec-pickle")]


def test_a_pickle_checkpoint_is_held_to_the_readers_rules_for_files(pair, tmp_path, capsys):
    """With --allow-pickle the same checks apply as to safetensors: no shard or side file from
    outside the checkpoint directory."""
    _, pk = pair
    secret = tmp_path / "secret.json"
    secret.write_text('{"num_local_experts": 4}')
    (pk / "config.json").unlink()
    (pk / "config.json").symlink_to(secret)
    assert main(["convert", "mixtral", str(pk), str(tmp_path / "out"), "--allow-pickle"]) == 2
    assert "outside the checkpoint directory" in capsys.readouterr().err
    (pk / "config.json").unlink()
    (pk / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere.bin"}}))
    assert main(["convert", "mixtral", str(pk), str(tmp_path / "out"), "--allow-pickle"]) == 2
    assert "outside the checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
