"""The command line's output contract: --json on every command (errors too), colour only on a
terminal, nothing half-written, exit codes 0 (fine), 1 (findings), 2 (a usage or input error)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from convspec.cli import main
from convspec.style import Style, table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from make_tiny_mixtral import make  # noqa: E402

GOOD = 'spec: t\nrules:\n  - rename: "{p:path}.a"\n    to: "{p}.b"\n'
BAD = 'spec: t\nrules:\n  - rename: "{p:path}.a"\n    to: "{p}.{q}"\n'


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    make(d, layers=2, experts=4)
    return d


@pytest.mark.parametrize(
    "argv",
    [
        ["compile", "no_such_spec", "--json"],
        ["check", "no_such_spec.yaml", "--json"],
        ["explain", "no_such_spec", "k", "--json"],
        ["convert", "no_such_spec", "src", "dst", "--json"],
        ["verify", "mixtral", "/nonexistent/dir", "--json"],
        ["fmt", "missing.yaml", "--json"],
        ["import-transformers", "no_such_model_type_xyz", "--json"],
    ],
)
def test_every_command_reports_errors_as_json_with_json(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    error = json.loads(captured.err)["error"]
    assert error["message"] and error["type"].endswith("Error")
    assert captured.out == ""


def test_a_spec_error_in_json_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    assert main(["compile", str(path), "--json"]) == 2
    error = json.loads(capsys.readouterr().err)["error"]
    assert (error["file"], error["line"], error["col"]) == (str(path), 4, 10)
    assert "{q}" in error["message"] and error["hint"]


def test_compile_list_and_convert_and_verify_speak_json(ckpt, tmp_path, capsys):
    assert main(["compile", "--list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mixtral"].startswith("Mixtral")
    assert main(["convert", "mixtral", str(ckpt), str(tmp_path / "out"), "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["tensors"] == 41 - 24 + 4 and done["coverage"]["converted"] == 24
    assert main(["convert", "mixtral", str(ckpt), str(tmp_path / "dry"), "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["outputs"]["model.layers.0.mlp.experts.gate_up_proj"]["shape"][0] == 4
    assert not (tmp_path / "dry").exists()
    assert main(["verify", "mixtral", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "checked": 41,
        "total": 41,
        "ok": True,
        "stopped": False,
        "mismatches": [],
    }


def test_errors_are_plain_off_a_terminal_and_coloured_on_one(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    assert main(["compile", str(path)]) == 2
    plain = capsys.readouterr().err
    assert plain.startswith(f"{path}:4:10: error: ") and "\033[" not in plain
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert main(["compile", str(path)]) == 2
    assert "\033[1;31merror\033[0m" in capsys.readouterr().err
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["compile", str(path)]) == 2
    assert "\033[" not in capsys.readouterr().err


def test_style_and_table_align_coloured_cells_by_their_printed_width():
    s = Style(True)
    rows = table([(s.bold("a"), "1"), ("long", "2")], indent="")
    assert rows == ["\033[1ma\033[0m     1", "long  2"]


def test_fmt_formats_every_file_before_writing_any(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    messy = 'spec: t\nrules:\n  - {rename: "{p:path}.a", to: "{p}.b"}\n'
    good.write_text(messy)
    bad.write_text("spec: t\nrules: [\n")
    assert main(["fmt", str(good), str(bad)]) == 2
    assert good.read_text() == messy  # untouched: the bad file stopped the run before any write
    capsys.readouterr()
    assert main(["fmt", str(good)]) == 0
    assert good.read_text() != messy
    assert main(["fmt", str(good), "--check"]) == 0


def test_fmt_json_with_a_translation_is_one_json_document(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(GOOD)
    assert main(["fmt", str(path), "--to", "cspec", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["text"].startswith("spec t") and result["output"] == str(path)


def test_fmt_output_must_be_named_for_its_syntax(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(GOOD)
    assert main(["fmt", str(path), "--to", "cspec", "-o", str(tmp_path / "t2.yaml")]) == 2
    assert "writes a .cspec file" in capsys.readouterr().err
    assert not (tmp_path / "t2.yaml").exists()
    assert main(["fmt", str(path), "--to", "cspec", "-o", str(tmp_path / "t.cspec"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["changed"] is True
    assert main(["fmt", str(path), "--to", "cspec", "-o", str(tmp_path / "t.cspec"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["changed"] is False  # already holds that text


def test_explain_exits_1_when_the_group_has_a_problem(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "gap"
    d.mkdir()
    t = torch.zeros(2, 2, dtype=torch.bfloat16)
    keys = [f"model.layers.0.block_sparse_moe.experts.{e}.w{w}.weight" for e in (0, 2) for w in (1, 3)]
    save_file({k: t.clone() for k in keys}, str(d / "model.safetensors"))
    assert main(["explain", "mixtral", keys[0], "--against", str(d)]) == 1
    assert "e=1 is missing" in capsys.readouterr().out


def test_group_needs_a_checkpoint_and_a_picture(capsys):
    assert main(["compile", "mixtral", "--group", "p=model.layers.0"]) == 2
    assert "--group draws one group of a checkpoint" in capsys.readouterr().err


def test_a_spec_that_is_not_utf8_is_an_error_at_its_first_bad_byte(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"spec: t\ndoc: caf\xe9\n")
    assert main(["compile", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"{path}:2:9: error: the file is not UTF-8 text (byte 0xe9)")
    assert main(["fmt", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert path.read_bytes() == b"spec: t\ndoc: caf\xe9\n"
    assert main(["check", str(path)]) == 1
    assert capsys.readouterr().out.startswith(f"{path}:2:9: E001 the file is not UTF-8 text")


def test_a_directory_is_not_a_spec(tmp_path, capsys):
    for command in (["compile", str(tmp_path)], ["check", str(tmp_path)], ["fmt", str(tmp_path)]):
        assert main(command) == 2
        assert "is a directory" in capsys.readouterr().err


def test_verify_says_what_a_lost_key_came_back_as_and_when_it_stopped(ckpt, tmp_path, capsys):
    # forward: the specific rename first; backward the general one runs first and takes its keys
    spec = tmp_path / "bad_inverse.yaml"
    spec.write_text(
        'spec: t\nrules:\n  - rename: "model.layers.{i:int}.{rest:path}"\n    to: "net.blocks.{i}.{rest}"\n'
        '  - rename: "model.{rest:path}"\n    to: "net.{rest}"\n'
    )
    assert main(["verify", str(spec), str(ckpt)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("MISMATCH model.layers.0.")
    assert "missing after the round trip (it came back as model.blocks.0." in out[0]
    assert "bfloat16" in out[0] and "torch." not in out[0]
    assert len(out) == 21 and out[-1].endswith("; stopped at the first 20 (the source has 41 tensors)")
    assert main(["verify", str(spec), str(ckpt), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["stopped"] is True and result["total"] == 41 and len(result["mismatches"]) == 20


def test_schema_takes_json_like_every_command(capsys):
    assert main(["schema", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "convspec spec"


def test_schema_to_a_file_with_json_says_where(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["schema", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"output": str(out)}
    assert json.loads(out.read_text())["title"] == "convspec spec"


def test_fmt_to_another_file_says_it_wrote_it(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(GOOD)
    assert main(["fmt", str(path), "-o", str(tmp_path / "u.yaml")]) == 0
    assert capsys.readouterr().err.strip() == f"wrote {tmp_path / 'u.yaml'}"
    assert main(["fmt", str(path), "-o", str(tmp_path / "u.yaml")]) == 0
    assert capsys.readouterr().err.strip() == f"{tmp_path / 'u.yaml'} already holds it"
