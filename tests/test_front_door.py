"""What a new user meets first: the package's metadata (licence, version, typing marker, extras), the
CLI's --version, the public API's docstrings and their examples (run here), keyword-only flags of
`convspec.convert`, and a typed error naming the extra where transformers is missing."""

from __future__ import annotations

import doctest
import importlib.metadata
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import convspec
from convspec.bind import BoundPlan
from convspec.cli import main
from convspec.compile.plan import Plan
from convspec.load_into import LoadReport

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
sys.path.insert(0, str(ROOT / "examples"))
from make_tiny_mixtral import make  # noqa: E402

# ---- the package ----------------------------------------------------------------------------------


def test_the_licence_file_is_the_licence_pyproject_names():
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert re.match(r"\s*Apache License\s+Version 2\.0, January 2004", text)
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_version_is_written_once_and_the_installed_metadata_agrees():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "convspec.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", convspec.__version__)
    try:
        installed = importlib.metadata.version("convspec")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("convspec is not installed here (run from a checkout)")
    assert installed == convspec.__version__


def test_convspec_version_prints_the_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"convspec {convspec.__version__}\n"


def test_the_package_is_marked_typed_and_ships_the_marker():
    assert (ROOT / "convspec" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["convspec"]


def test_the_extras_say_what_needs_what():
    extras = PYPROJECT["project"]["optional-dependencies"]
    deps = " ".join(PYPROJECT["project"]["dependencies"])
    assert "numpy" not in deps and "transformers" not in deps  # decided in docs/decisions.md
    assert extras["transformers"] == ["transformers==5.23.0"]
    test = extras["test"]
    assert "convspec[transformers,pictures]" in test
    for needed in ("pytest", "hypothesis", "ruff", "jsonschema", "numpy"):
        assert any(d.startswith(needed) for d in test), needed
    pins = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    assert "\ntransformers==5.23.0\n" in pins and "\nnumpy==" in pins


# ---- transformers is an extra ------------------------------------------------------------------


@pytest.fixture
def no_transformers(monkeypatch):
    """`import transformers` fails, as where the extra is not installed."""
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)


def test_the_exporter_without_transformers_names_the_extra(no_transformers):
    from convspec.integrations.transformers import to_weight_conversions

    with pytest.raises(convspec.TransformersMissing) as e:
        to_weight_conversions(convspec.compile("mixtral"))
    assert "exporting a plan to transformers needs transformers" in e.value.message
    assert e.value.hint == "pip install 'convspec[transformers]'"


def test_import_transformers_without_transformers_is_one_message_and_exit_2(no_transformers, capsys):
    assert main(["import-transformers", "qwen3_moe"]) == 2
    err = capsys.readouterr().err
    assert "convspec import-transformers needs transformers, which is not installed" in err
    assert "pip install 'convspec[transformers]'" in err and "Traceback" not in err


def test_the_importer_s_mapping_without_transformers_names_the_extra(no_transformers):
    from convspec.hf.mapping import raw_mapping

    with pytest.raises(convspec.TransformersMissing) as e:
        raw_mapping()
    assert e.value.hint == "pip install 'convspec[transformers]'"


def test_importing_convspec_imports_neither_torch_nor_numpy():
    code = "import sys, convspec; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


# ---- convert's flags -----------------------------------------------------------------------------


def test_convert_takes_its_flags_by_keyword_only(tmp_path):
    params = inspect.signature(convspec.convert).parameters
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == ["spec", "src", "dst"]
    make(tmp_path / "tiny")
    with pytest.raises(TypeError, match="positional argument"):
        convspec.convert("mixtral", tmp_path / "tiny", tmp_path / "out", True)  # reverse? device?
    assert not (tmp_path / "out").exists()


# ---- docstrings ----------------------------------------------------------------------------------

PUBLIC = {
    "load_spec": convspec.load_spec,
    "compile": convspec.compile,
    "convert": convspec.convert,
    "Plan": Plan,
    "Plan.inverse": Plan.inverse,
    "Plan.bind": Plan.bind,
    "Plan.apply": Plan.apply,
    "Plan.stream": Plan.stream,
    "Plan.load": Plan.load,
    "Plan.load_into": Plan.load_into,
    "Plan.save": Plan.save,
    "Plan.to_json": Plan.to_json,
    "Plan.from_json": Plan.from_json,
    "Plan.check": Plan.check,
    "BoundPlan": BoundPlan,
    "LoadReport": LoadReport,
}


@pytest.mark.parametrize("name", list(PUBLIC))
def test_the_public_api_documents_arguments_returns_raises_and_an_example(name):
    doc = inspect.getdoc(PUBLIC[name]) or ""
    assert "Example:\n    >>> " in doc, name
    if inspect.isclass(PUBLIC[name]):
        if name != "Plan":
            assert "Attributes:\n" in doc, name
        return
    params = [p for p in inspect.signature(PUBLIC[name]).parameters if p != "self"]
    if params:
        assert "Args:\n" in doc, name
        args = doc.split("Args:\n", 1)[1].split("\n\n", 1)[0]
        for p in params:  # every argument is described (several may share a line: "src, device:")
            assert re.search(rf"^    (\w+, )*{p}(, \w+)*:", args, re.M), f"{name}: argument {p}"
    assert "Returns:\n" in doc, name
    if name != "Plan.to_json":  # writes a string; it raises nothing of its own
        assert "Raises:\n" in doc, name


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
    """The docstrings' examples run in a folder holding the bundled tiny checkpoint, as
    `python examples/make_tiny_mixtral.py tiny-mixtral` makes it."""
    d = tmp_path_factory.mktemp("docstrings")
    make(d / "tiny-mixtral")
    return d


@pytest.mark.parametrize("name", list(PUBLIC))
def test_the_docstring_examples_run_and_print_what_they_show(name, example_dir, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(example_dir)
    obj = PUBLIC[name]
    globs = {"convspec": convspec, "torch": torch, "transformers": transformers}
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs=globs)
    assert tests and tests[0].examples, name
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0, name
