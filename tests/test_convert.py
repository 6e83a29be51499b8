"""Converting real files: sharded and single-file output, reverse, verify, atomicity, determinism."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import convspec
import convspec.streaming
from convspec.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from helpers.tensors import assert_same_state  # noqa: E402
from make_tiny_mixtral import make  # noqa: E402


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "tiny"
    make(d, layers=3, experts=5)
    (d / "tokenizer.json").write_text('{"fake": true}\n')
    return d


def _load_dir(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_sharded_convert_and_reverse_are_bit_exact(src, tmp_path):
    r = convspec.convert("mixtral", src, tmp_path / "fused", max_shard_size="40KB")
    assert len(r.files) > 1 and r.files[0] == f"model-00001-of-{len(r.files):05d}.safetensors"
    index = json.loads((tmp_path / "fused" / "model.safetensors.index.json").read_text())
    fused = _load_dir(tmp_path / "fused")
    assert set(index["weight_map"]) == set(fused)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in fused.values())
    with safe_open(str(tmp_path / "fused" / r.files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert (tmp_path / "fused" / "tokenizer.json").read_text() == '{"fake": true}\n'
    assert (tmp_path / "fused" / "config.json").read_bytes() == (src / "config.json").read_bytes()

    source = load_file(str(src / "model.safetensors"))
    expected = convspec.compile("mixtral").apply(source)
    assert sorted(fused) == sorted(expected) and all(torch.equal(fused[k], expected[k]) for k in fused)

    convspec.convert("mixtral", tmp_path / "fused", tmp_path / "back", reverse=True)
    back = _load_dir(tmp_path / "back")
    assert sorted(back) == sorted(source) and all(torch.equal(back[k], source[k]) for k in source)


def test_convert_is_deterministic(src, tmp_path):
    convspec.convert("mixtral", src, tmp_path / "a", max_shard_size="40KB")
    convspec.convert("mixtral", src, tmp_path / "b", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_a_failure_midway_leaves_nothing_behind(src, tmp_path, monkeypatch):
    import convspec.run as conv

    real = conv.run_group
    calls = {"n": 0}

    def failing(bound, group, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real(bound, group, tensors)

    monkeypatch.setattr(conv, "run_group", failing)
    # the groups compute (a file-to-file conversion copies every block move, whatever its runs)
    monkeypatch.setattr(convspec.streaming, "block_runs", lambda *a: None)
    with pytest.raises(RuntimeError, match="injected failure"):
        convspec.convert("mixtral", src, tmp_path / "out", max_shard_size="40KB")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_is_refused_unless_overwrite(src, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["convert", "mixtral", str(src), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").exists()
    assert main(["convert", "mixtral", str(src), str(tmp_path / "out"), "--overwrite"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _tensors_equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


def test_an_already_converted_checkpoint_passes_through_and_the_report_counts_it(src, tmp_path, capsys):
    convspec.convert("mixtral", src, tmp_path / "fused")
    fused = _load_dir(tmp_path / "fused")
    already = set(fused) - set(_load_dir(src))  # the keys only the target layout has
    assert main(["convert", "mixtral", str(tmp_path / "fused"), str(tmp_path / "twice")]) == 0
    out = capsys.readouterr().out
    assert f"{len(already)} of {len(fused)} keys are in the target layout already" in out
    assert _tensors_equal(_load_dir(tmp_path / "twice"), fused)
    r = convspec.convert("mixtral", tmp_path / "fused", tmp_path / "api")
    assert r.already == len(already) == r.bound.coverage()["already"]
    assert sorted(r.bound.already) == sorted(already)
    assert main(["convert", "mixtral", str(tmp_path / "fused"), str(tmp_path / "j"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["coverage"]["already"] == len(already)


def test_load_of_an_already_converted_checkpoint_equals_load_of_the_original(src, tmp_path):
    plan = convspec.compile("mixtral")
    convspec.convert("mixtral", src, tmp_path / "fused")
    first = plan.load(tmp_path / "fused")
    assert _tensors_equal(first, plan.load(src))
    assert first.already == len(set(first) - set(_load_dir(src))) > 0
    assert plan.load(src).already == 0


def test_load_save_back_load_gives_identical_bytes_every_time(src, tmp_path):
    plan = convspec.compile("mixtral")
    convspec.convert("mixtral", src, tmp_path / "fused")
    loaded = plan.load(tmp_path / "fused")
    saved = []
    for i in range(3):
        plan.inverse().save(loaded, tmp_path / f"back{i}")
        saved.append((tmp_path / f"back{i}" / "model.safetensors").read_bytes())
        again = plan.load(tmp_path / f"back{i}")
        assert _tensors_equal(again, loaded)
        loaded = again
    assert saved[0] == saved[1] == saved[2]
    assert _tensors_equal(_load_dir(tmp_path / "back0"), _load_dir(src))  # the original layout


def test_reverse_of_a_checkpoint_in_the_original_layout_passes_it_through(src, tmp_path, capsys):
    assert main(["convert", "mixtral", str(src), str(tmp_path / "back"), "--reverse"]) == 0
    out, err = capsys.readouterr()
    assert "keys are in the original layout already" in out and "--reverse" not in out + err
    assert _tensors_equal(_load_dir(tmp_path / "back"), _load_dir(src))


def test_a_checkpoint_the_spec_does_not_fit_is_still_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    (tmp_path / "other").mkdir()
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other" / "model.safetensors"))
    for extra in ([], ["--reverse"]):
        assert main(["convert", "mixtral", str(tmp_path / "other"), str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err
        assert "claims no key" in err and "check that the spec fits this model" in err
        assert "--reverse" not in err
    assert not (tmp_path / "out").exists()


def test_strict_accepts_target_layout_keys_and_refuses_a_group_in_both_layouts(src, tmp_path, capsys):
    from safetensors.torch import save_file

    fused = convspec.compile("mixtral").apply(_load_dir(src))
    experts = {k: v for k, v in fused.items() if ".mlp." in k}
    (tmp_path / "fused").mkdir()
    save_file(experts, str(tmp_path / "fused" / "model.safetensors"))
    assert main(["convert", "mixtral", str(tmp_path / "fused"), str(tmp_path / "a"), "--strict"]) == 0
    capsys.readouterr()
    # layer 0's experts in both layouts: the same group twice
    mixed = {
        **_load_dir(src),
        "model.layers.0.mlp.experts.down_proj": experts["model.layers.0.mlp.experts.down_proj"],
    }
    (tmp_path / "mixed").mkdir()
    save_file(mixed, str(tmp_path / "mixed" / "model.safetensors"))
    for extra in ([], ["--strict"]):
        assert main(["convert", "mixtral", str(tmp_path / "mixed"), str(tmp_path / "b"), *extra]) == 2
        err = capsys.readouterr().err
        assert "two sources map to the key model.layers.0.mlp.experts.down_proj" in err
    assert not (tmp_path / "b").exists()


def test_dry_run_writes_nothing(src, tmp_path, capsys):
    assert main(["convert", "mixtral", str(src), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^model\.layers\.2\.mlp\.experts\.gate_up_proj +\[5, 96, 32\] +bfloat16$", out, re.M)
    assert not (tmp_path / "out").exists()


def test_verify_passes_on_good_data(src, capsys):
    assert main(["verify", "mixtral", str(src)]) == 0
    assert capsys.readouterr().out.strip() == "ok: 69 tensors come back bit for bit"


def test_load_stream_and_save(src, tmp_path):
    plan = convspec.compile("mixtral")
    loaded = plan.load(src)
    streamed = dict(plan.stream(src))
    assert sorted(loaded) == sorted(streamed)
    assert all(torch.equal(loaded[k], streamed[k]) for k in loaded)
    assert loaded["model.layers.1.mlp.experts.down_proj"].shape == (5, 32, 48)
    as_f32 = plan.load(src, dtype="float32")
    assert as_f32["model.norm.weight"].dtype == torch.float32
    plan.inverse().save(loaded, tmp_path / "saved")
    back = _load_dir(tmp_path / "saved")
    source = load_file(str(src / "model.safetensors"))
    assert sorted(back) == sorted(source) and all(torch.equal(back[k], source[k]) for k in source)


def test_missing_source_exits_2(tmp_path, capsys):
    assert main(["convert", "mixtral", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_verify_converted_passes_then_fails_on_a_tampered_file(src, tmp_path, capsys):
    dst = tmp_path / "fused"
    convspec.convert("mixtral", src, dst)
    assert main(["verify", "mixtral", str(src), "--converted", str(dst)]) == 0
    assert capsys.readouterr().out.strip() == f"ok: 30 tensors match {dst} bit for bit"
    # flip one byte inside the data of a fused tensor, keeping the header intact
    path = dst / "model.safetensors"
    data = bytearray(path.read_bytes())
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert "model.layers.1.mlp.experts.gate_up_proj" in keys
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["verify", "mixtral", str(src), "--converted", str(dst)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "bits differ" in out and "1 mismatch(es) among 30 tensors checked" in out


def test_stale_temporary_from_a_dead_run_is_removed(src, tmp_path):
    stale = tmp_path / ".out.convspec-tmp-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    convspec.convert("mixtral", src, tmp_path / "out")
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_progress_shows_on_a_terminal_and_not_with_quiet(src, tmp_path, capsys, monkeypatch):
    import convspec.cli as cli

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    ticks = iter(range(0, 10_000))
    monkeypatch.setattr(
        cli._Progress,
        "__init__",
        lambda self: (
            (
                setattr(self, "clock", lambda: next(ticks)),
                setattr(self, "start", 0),
                setattr(self, "last", 0),
                setattr(self, "n", 0),
                setattr(self, "bytes", 0),
            )
            and None
        ),
    )
    assert main(["convert", "mixtral", str(src), str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "30 tensors" in err and "MiB/s" in err
    assert main(["convert", "mixtral", str(src), str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_bad_checkpoints_exit_2_and_leave_nothing(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    assert main(["convert", "mixtral", str(bad), str(tmp_path / "o1")]) == 2
    assert "header length" in capsys.readouterr().err
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors"}}'
    )
    assert main(["convert", "mixtral", str(idx), str(tmp_path / "o2")]) == 2
    assert "shard model-00001-of-00002.safetensors is listed but missing" in capsys.readouterr().err
    (idx / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    assert main(["convert", "mixtral", str(idx), str(tmp_path / "o3")]) == 2
    assert "outside the checkpoint directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "idx"]


def test_a_list_of_files_and_a_single_file_are_checkpoints_too(src, tmp_path):
    convspec.convert("mixtral", src, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    plan = convspec.compile("mixtral")
    from_list = plan.inverse().load(shards)
    from_file = plan.load(src / "model.safetensors")
    source = load_file(str(src / "model.safetensors"))
    assert sorted(from_list) == sorted(source) and all(torch.equal(from_list[k], source[k]) for k in source)
    assert len(from_file) == 30
    dup = [src / "model.safetensors", src / "model.safetensors"]
    with pytest.raises(convspec.ConvspecError, match="appears in both"):
        plan.load(dup)


def test_convert_says_what_it_cleaned_up_from_a_dead_run(src, tmp_path, capsys):
    stale = tmp_path / ".out.convspec-tmp-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert main(["convert", "mixtral", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "note: removed .out.convspec-tmp-999999999, left by a conversion that died" in err


def test_usage_md_already_converted_example_is_what_convert_prints(tmp_path, capsys):
    """docs/usage.md's example: /tmp/tiny as examples/make_tiny_mixtral.py makes it, fused, converted again."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "usage.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n *(convspec convert mixtral /tmp/tiny-fused .*?)```", text, re.S).group(1)
    command, *expected = [line.strip() for line in block.strip().splitlines()]
    make(tmp_path / "tiny")
    convspec.convert("mixtral", tmp_path / "tiny", tmp_path / "tiny-fused")
    args = command.replace("/tmp/", f"{tmp_path}/").split()[1:]
    assert main(args) == 0
    out = capsys.readouterr().out.replace(f"{tmp_path}/", "/tmp/")
    assert out.splitlines() == [e.removeprefix("# ") for e in expected]


def test_a_conversion_of_block_moves_copies_them_whatever_their_size_and_imports_no_torch(src, tmp_path):
    """The tiny Mixtral's stacks and joins move runs of a few hundred bytes: converting file to file,
    they are copied (no tensor is made, so torch is never imported), and the bytes are the ops'."""
    code = (
        "import sys, convspec\n"
        f"convspec.convert('mixtral', {str(src)!r}, {str(tmp_path / 'out')!r})\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
    plan = convspec.compile("mixtral", config=src / "config.json")
    assert_same_state(_load_dir(tmp_path / "out"), plan.apply(_load_dir(src)))


def test_a_convert_that_writes_an_input_as_it_is_binds_applies_and_converts(tmp_path):
    """`-> {p}.s = x`: the target is the input itself (bind took the source key for its info)."""
    from safetensors.torch import save_file

    spec = tmp_path / "bare.yaml"
    spec.write_text(
        'spec: bare\nrules:\n  - convert:\n      x: "{p:path}.scale"\n    to:\n      "{p}.s": x\n'
    )
    plan = convspec.compile(spec)
    assert plan.bind({"a.scale": ((2,), "float32")}).outputs == {"a.s": ((2,), "float32")}
    assert plan.inverse().apply({"a.s": torch.ones(2)})["a.scale"].tolist() == [1.0, 1.0]
    (tmp_path / "src").mkdir()
    save_file({"a.scale": torch.arange(2.0)}, str(tmp_path / "src" / "model.safetensors"))
    assert main(["convert", str(spec), str(tmp_path / "src"), str(tmp_path / "out"), "--quiet"]) == 0
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["a.s"].tolist() == [0.0, 1.0]
