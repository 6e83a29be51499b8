"""docs/architecture.md stays true: its layer table is tests/test_layers.py's LAYERS, every file and
dotted name it gives exists, the Op members its table explains are Op's, no module outside
convspec/ops compares a value with an op's name, and compiling and binding import no torch. Its
`>>>` blocks run in tests/test_docs_python.py."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

from test_layers import LAYERS

from convspec.ops import OPS, Op

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "architecture.md"
TEXT = PAGE.read_text(encoding="utf-8")


def layer_table() -> list[tuple[str, list[str]]]:
    """The page's layer table, bottom to top: (layer, modules), a row without a name continuing the
    row above it."""
    section = TEXT.split("## The layers", 1)[1]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    rows: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if "│" not in line:
            continue
        head, modules, *_ = line.split("│")
        name = head.strip()
        if name:
            rows.append((name, modules.split()))
        else:
            rows[-1][1].extend(modules.split())
    return rows[::-1]


def test_the_layer_table_is_the_one_the_layers_test_holds():
    def members(modules: list[str]) -> list[str]:  # `io.*` in the table: the package and its modules
        return sorted({n for m in modules for n in ([m[:-2], m] if m.endswith(".*") else [m])})

    table = [(name, members(modules)) for name, modules in layer_table()]
    assert table == [(name, sorted(members)) for name, members in LAYERS]


def test_every_file_the_page_names_exists():
    named = set(re.findall(r"`([\w./-]+\.(?:py|md|lark|cspec|yaml))`", TEXT))
    named |= set(re.findall(r'"(specs/[\w.]+)"', TEXT))
    assert named, "the page names no file"
    missing = [
        n
        for n in sorted(named)
        if not any((d / n).is_file() for d in (ROOT, ROOT / "convspec", ROOT / "docs"))
    ]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def _classes() -> dict[str, str]:
    """Every top-level class of convspec/ by name: the module that defines it."""
    out = {}
    for path in sorted((ROOT / "convspec").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, module)
    return out


def _resolves(name: str, classes: dict[str, str]) -> bool:
    """Whether `Class.attr`, `module.attr` (under convspec) or `convspec.attr` names something real."""
    parts = name.removeprefix("convspec.").split(".")
    if parts[0] in classes:
        obj, rest = importlib.import_module(classes[parts[0]]), parts
    else:
        for i in range(len(parts), -1, -1):
            try:
                obj, rest = importlib.import_module(".".join(["convspec", *parts[:i]])), parts[i:]
                break
            except ImportError:
                continue
    for p in rest:
        if not hasattr(obj, p):
            return False
        obj = getattr(obj, p)
    return True


def test_every_dotted_name_the_page_gives_is_real():
    files = (".py", ".md", ".json", ".lark", ".cspec", ".yaml")
    names = {n for n in re.findall(r"`((?:[A-Za-z_]\w*\.)+[A-Za-z_]\w*)`", TEXT) if not n.endswith(files)}
    assert len(names) > 20
    classes = _classes()
    unknown = [n for n in sorted(names) if not _resolves(n, classes)]
    assert not unknown, f"docs/architecture.md names what convspec does not have: {unknown}"


def test_the_op_members_the_page_explains_are_ops():
    section = TEXT.split("### An op", 1)[1].split("###", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    members = {m.split("(")[0] for row in rows for m in re.findall(r"`([^`]+)`", row)}
    declared = set(dir(Op)) | set(Op.__annotations__)  # `name` is declared, each op gives it
    assert members and not [m for m in sorted(members) if m not in declared]


def test_no_module_outside_ops_compares_a_value_with_an_op_name():
    names = set(OPS)
    found = []
    for path in sorted((ROOT / "convspec").rglob("*.py")):
        if path.relative_to(ROOT / "convspec").parts[0] == "ops":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
            elif isinstance(node, ast.Dict):
                sides = [k for k in node.keys if k is not None]
            elif isinstance(node, ast.Subscript):
                sides = [node.slice]
            else:
                continue
            hits = {c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant)} & names
            if hits:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(hits)}")
    assert not found, "op names outside convspec/ops (ask the op class instead):\n" + "\n".join(found)


def test_compiling_and_binding_import_no_torch():
    code = (
        "import sys, convspec\n"
        "plan = convspec.compile('mixtral')\n"
        "keys = [f'model.layers.0.block_sparse_moe.experts.{e}.w{i}.weight' for e in range(8) for i in (1, 2, 3)]\n"
        "plan.bind({k: ((14336, 4096), 'bfloat16') for k in keys})\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
