"""Layers import one way: the module import graph of convspec/ has no cycle, and every import goes to
a module of the same layer or a lower one. The graph is read with `ast`, so every import counts:
top-level ones and lazy ones inside functions alike. `from . import x` is an edge to the submodule
x (not to the package). Imports under `if TYPE_CHECKING:` are left out: they never run, they only
name types for annotations."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "convspec"

# Bottom to top, as the code stands. A module imports only from its own layer or the ones below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # what everything may use: messages, errors, dtypes, devices, the bounded tables beside a plan
    ("base", ("style", "errors", "dtypes", "devices", "derived", "frozen", "extras", "keyshapes")),
    # what each op means: parameters, shapes, the torch apply, the inverse
    ("ops", ("ops", "ops.*")),
    # bytes on disk: safetensors headers and reads, writers, side files, GGUF metadata; no spec, no plan
    ("io", ("io", "io.*", "manifest", "ggufmeta")),
    # spec text -> the spec model (the DSL, YAML, formatting)
    ("spec", ("spec", "spec.*")),
    # the spec model -> the Plan IR: patterns, the compiler, expressions, the plan and its JSON
    ("compile", ("compile", "compile.*", "quantization")),
    # a plan against a checkpoint: routing keys, binding, block runs, running ops, streaming, and
    # the runtime the plan's conveniences are routed through
    (
        "runtime",
        (
            "interpret",
            "routing",
            "bind",
            "companions",
            "blocks",
            "run",
            "streaming",
            "load_into",
            "regions",
            "ranks",
            "sharded",
            "shardplan",
            "parallel_convert",
            "gguf_output",
            "gguf_tokenizer",
            "adapters",
            "runtime",
        ),
    ),
    # the public Python API
    ("api", ("convspec", "api", "synthesis", "synthesis.*")),
    # what is built on the API: lint, explain, pictures, the transformers importer and exporter
    (
        "tools",
        (
            "lint",
            "explain",
            "layout_sources",
            "dot",
            "render",
            "pictures",
            "hf",
            "hf.*",
            "integrations",
            "integrations.*",
        ),
    ),
    # the command line
    ("cli", ("cli",)),
]


def module_names() -> dict[str, tuple[Path, bool]]:
    """Every module of the package by dotted name (`convspec.compile.plan`): its file, and whether
    it is a package's __init__."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of the import statements under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = (
                test.id
                if isinstance(test, ast.Name)
                else test.attr
                if isinstance(test, ast.Attribute)
                else ""
            )
            if name == "TYPE_CHECKING":
                skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the convspec modules it imports, anywhere in its text."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skip = _type_checking_only(tree)
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for a in node.names:  # `from . import x`: the submodule x, where there is one
                    targets.add(f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the modules along it (first one repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def layer_of(module: str) -> int | None:
    short = module.removeprefix("convspec.") if module != "convspec" else "convspec"
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if short == m or (m.endswith(".*") and short.startswith(m[:-1])):
                return i
    return None


def test_the_graph_sees_lazy_imports_and_submodules():
    graph = import_graph()
    assert "convspec.bind" in graph["convspec.runtime"]  # an import inside a function
    assert "convspec.runtime" in graph["convspec"]  # `from . import runtime`: the submodule
    assert "convspec.bind" not in graph["convspec.compile.plan"]  # only under TYPE_CHECKING


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py: {unplaced}"


def test_layers_import_one_way():
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in sorted(import_graph().items())
        for b in sorted(targets)
        if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)
    ]
    assert not upward, "imports going up a layer:\n" + "\n".join(upward)
