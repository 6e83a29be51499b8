"""How a SPEC argument is read, the same in every command and in `load_spec`: a path has a `/` or a
spec suffix and must be a spec file; anything else is a built-in name, and the working directory is
never looked at, so a folder or file there named like a built-in (`mixtral`) does not shadow it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import convspec
from convspec.cli import main
from convspec.errors import SpecNotFoundError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from make_tiny_mixtral import make  # noqa: E402

MINE = "spec mine\nrename {p:path}.a -> {p}.b\n"


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working directory holding a Mixtral checkpoint folder named `mixtral`."""
    make(tmp_path / "mixtral", layers=2, experts=4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")
    return tmp_path


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_the_issues_command_converts_with_a_folder_named_like_the_spec(here, capsys):
    assert main(["convert", "mixtral", "mixtral", "mixtral-fused", "--quiet"]) == 0
    assert (here / "mixtral-fused" / "model.safetensors").is_file()
    assert main(["verify", "mixtral", "mixtral", "--converted", "mixtral-fused"]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["compile", "mixtral", "--against", "mixtral", "--json"],
        ["check", "mixtral", "--against", "mixtral", "--json"],
        ["explain", "mixtral", "model.layers.0.block_sparse_moe.experts.0.w1.weight", "--against", "mixtral"],
        ["verify", "mixtral", "mixtral", "--json"],
        ["convert", "mixtral", "mixtral", "out", "--dry-run", "--json"],
    ],
    ids=lambda a: a[0],
)
def test_every_command_reads_a_bare_name_as_the_builtin(argv, here, capsys):
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    plain = [a for a in argv[2:] if a != "--json"]
    assert main([argv[0], "./mixtral", *plain]) == 2  # the folder, named as a path, is no spec
    assert _err(capsys)[0] == "error: ./mixtral is a directory, not a spec file"
    assert out


def test_a_spec_file_named_like_a_builtin_is_read_only_as_a_path(here, capsys):
    (here / "mixtral").rename(here / "ckpt")
    (here / "mixtral").write_text(MINE)
    assert convspec.load_spec("mixtral").name == "mixtral"  # the built-in, not the file
    assert convspec.load_spec("./mixtral").name == "mine"
    assert convspec.load_spec(Path("mixtral")).name == "mine"  # a Path is always a path
    assert main(["compile", "./mixtral", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "mine"


def test_paths_that_do_not_name_a_spec_file(here, capsys):
    (here / "mine").write_text(MINE)
    cases = {
        "./mixtral": (
            "error: ./mixtral is a directory, not a spec file",
            "  hint: pass a .yaml, .yml or .cspec file; the built-in spec is named mixtral, with no path or suffix",
        ),
        "mixtral.yaml": (
            "error: spec file mixtral.yaml does not exist",
            "  hint: the built-in spec is named mixtral, with no path or suffix",
        ),
        "nowhere/x.cspec": (
            "error: spec file nowhere/x.cspec does not exist",
            "  hint: check the path, or name a built-in spec (no path, no suffix): see `convspec compile --list`",
        ),
        "mine": (
            "error: no built-in spec or model type named 'mine'",
            "  hint: a name is never read from the working directory; for the file mine here, pass ./mine",
        ),
    }
    for spec, lines in cases.items():
        assert main(["compile", spec]) == 2
        assert tuple(_err(capsys)) == lines, spec
    with pytest.raises(SpecNotFoundError, match="is a directory"):
        convspec.load_spec(Path("mixtral"))


def test_an_include_never_reads_the_working_directory(here):
    (here / "qwen2_moe").write_text(MINE)  # a bare file named like the included built-in
    spec = here / "sub" / "vlm.cspec"
    spec.parent.mkdir()
    spec.write_text("spec vlm\ninclude qwen2_moe under model.language_model\n")
    plan = convspec.compile(convspec.load_spec(spec))
    assert plan.rules and all(str(r.where).startswith("specs/qwen2_moe.yaml:") for r in plan.rules)


def test_usage_md_shows_the_rule_as_it_runs(tmp_path):
    """The console session in docs/usage.md, run line by line in an empty folder: the same output."""
    text = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    section = text[text.index("## SPEC: a built-in name or a file") :]
    block = re.search(r"```console\n(.*?)```", section, re.S).group(1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    steps = re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", block, re.M)
    assert len(steps) == 7
    for command, expected in steps:
        command = re.sub(r"^convspec ", f"{sys.executable} -m convspec.cli ", command)
        p = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.stdout + p.stderr == expected, command


@pytest.mark.parametrize(
    "spec", ["x" * 5000, "/" + "x" * 5000 + ".yaml", "./" + "x/" * 3000], ids=["name", "file", "deep_path"]
)
def test_a_name_too_long_for_the_file_system_is_one_message(spec, here, capsys):
    """The file system refuses to look such a name up (ENAMETOOLONG): it is no file and no folder."""
    assert main(["compile", spec]) == 2
    lines = _err(capsys)
    assert len(lines) == 2 and lines[0].startswith("error: "), lines[:3]


@pytest.mark.parametrize("command", ["check", "compile"])
def test_a_spec_path_that_is_a_pipe_is_refused_at_once_not_waited_on(command, tmp_path, capsys):
    os.mkfifo(tmp_path / "spec.cspec")
    assert main([command, str(tmp_path / "spec.cspec")]) == 2  # no writer ever opens it: would hang
    assert _err(capsys)[0] == f"error: {tmp_path}/spec.cspec: not a regular file (a named pipe)"


def test_a_spec_file_larger_than_any_spec_of_that_many_characters_is_not_read_whole(tmp_path, capsys):
    from convspec.spec.source import MAX_SPEC_BYTES, MAX_SPEC_CHARS

    assert MAX_SPEC_BYTES == 4 * MAX_SPEC_CHARS  # UTF-8: at most 4 bytes a character
    path = tmp_path / "spec.yaml"
    with open(path, "wb") as f:
        f.truncate(MAX_SPEC_BYTES + 1)  # sparse: costs no disk
    assert main(["check", str(path)]) == 2
    assert _err(capsys)[0] == (
        f"error: {path}: {MAX_SPEC_BYTES + 1} bytes, over the limit of {MAX_SPEC_BYTES} bytes for a spec file"
    )


def test_the_index_reads_each_header_as_the_whole_file_gives_it():
    """_builtin_index parses only what comes before `rules:`; for every built-in spec that gives the
    name and model types the whole file gives, and a file whose name comes after its rules is read whole."""
    import yaml

    from convspec.api import _builtin_dir, _header

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for entry in sorted(_builtin_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")):
            text = entry.read_text(encoding="utf-8")
            whole = yaml.load(text, Loader=loader)
            head = _header(text, loader)
            assert (head["spec"], head.get("model_types")) == (whole["spec"], whole.get("model_types"))
    late = "rules:\n  - drop: x\nspec: late\nmodel_types: [a]\n"
    assert _header(late, loader)["model_types"] == ["a"]
