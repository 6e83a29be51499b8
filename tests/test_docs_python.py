"""Every Python block of the docs runs, as a reader would run it: the blocks of one page in order,
sharing their names, in a folder laid out like a checkout (`specs/` and `examples/` beside it),
after the `python examples/...` commands the paragraph above a block names (the setup it says it
needs). Blocks written as `>>>` sessions are doctests: what they print must be what the page shows.
docs/integrations.md's example is run by tests/test_integration_transformers.py."""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "README.md",
    "docs/usage.md",
    "docs/language.md",
    "docs/ops.md",
    "docs/schema.md",
    "docs/architecture.md",
    "docs/distributed.md",
    "docs/quantization.md",
    "docs/gguf.md",
    "docs/adapters.md",
    "docs/synthesis.md",
]
RUN_ELSEWHERE = {"docs/integrations.md"}
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(page: str) -> list[tuple[int, str, list[str]]]:
    """(line, code, setup commands) for each Python block of a page."""
    text = (ROOT / page).read_text(encoding="utf-8")
    out = []
    for m in BLOCK.finditer(text):
        above = text[: m.start()].rstrip().rsplit("\n\n", 1)[-1]
        setup = re.findall(r"`(python examples/[^`]+)`", above)
        out.append((text.count("\n", 0, m.start()) + 2, m.group(1), setup))
    return out


def test_every_page_with_python_blocks_is_run():
    pages = [
        p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    ]
    with_python = {p for p in pages if python_blocks(p)}
    assert with_python == set(PAGES) | RUN_ELSEWHERE


@pytest.mark.parametrize("page", PAGES)
def test_the_python_blocks_of_a_page_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no Python block"
    for name in ("specs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    globs: dict = {"__name__": "__main__"}
    parser = doctest.DocTestParser()
    for line, code, setup in blocks:
        for command in setup:
            args = command.split()
            res = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True)
            assert res.returncode == 0, f"{page}:{line}: setup `{command}` failed:\n{res.stderr[-2000:]}"
        where = f"{page}:{line}"
        if code.lstrip().startswith(">>>"):
            test = parser.get_doctest(code, globs, where, page, line - 1)
            runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
            runner.run(test, clear_globs=False)
            assert runner.summarize(verbose=False).failed == 0, f"{where}: the output differs (above)"
            globs = test.globs
        else:
            exec(compile(code, where, "exec"), globs)  # a failing block fails here, naming page:line
