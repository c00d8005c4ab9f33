"""Imports run one way (README "What is where"): the project's import graph, read with ``ast``, has no
cycle and no arrow from a lower layer to a higher one; project modules are imported at module level
only (a function-level import is for an optional third-party package); tools and scripts start
through ``initialize``, never ``training``."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module may import from its own layer (without a cycle) and from the layers below.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("ground", frozenset({"mpu", "atomic", "errors", "microbatches", "parallel_layout"})),
    ("parts", frozenset({"checkpointing", "model", "data_utils", "fp16", "learning_rates", "arguments",
                         "flag_rules"})),
    ("formats", frozenset({"conversion"})),
    ("run services", frozenset({"restore", "resilience", "performance", "metrics", "initialize", "schedules"})),
    ("run", frozenset({"training", "evaluation", "generation", "serving"})),
)
ENTRY = len(LAYERS)  # entry scripts, tools/, scripts/, openwebtext/, bench/: everything else
SKIPPED = {"tests", "docker", "cache", "checkpoints", "runs", "data"}
LAUNCH_FOLDERS = ("tools", "scripts", "openwebtext")


def project_files(root: str = REPO) -> Iterator[tuple[str, str]]:
    """(dotted module name, path) of every Python file of the project."""
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (rel != "." or d not in SKIPPED))
        for name in sorted(files):
            if name.endswith(".py"):
                parts = [] if rel == "." else rel.split(os.sep)
                stem = name[:-3]
                module = ".".join(parts if stem == "__init__" else [*parts, stem])
                yield module, os.path.join(folder, name)


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    return ENTRY


def _resolve(module: str, path: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: str, known: set[str]) -> Iterator[tuple[str, int, bool]]:
    """(imported project module, line, at module level) for each import in ``path``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    # Parents by node id, built for this tree while it is alive (ids of collected trees are reused).
    parents = {id(child): parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    top_level = {id(node) for node in ast.walk(tree)
                 if not any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                            for p in _parents(parents, node))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            name = _project_module(target, known)
            if name is not None and name != module:
                yield name, node.lineno, id(node) in top_level


def _parents(table: dict[int, ast.AST], node: ast.AST) -> Iterator[ast.AST]:
    while id(node) in table:
        node = table[id(node)]
        yield node


def _project_module(target: str, known: set[str]) -> str | None:
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph(root: str = REPO) -> dict[str, list[tuple[str, int, bool]]]:
    files = dict(project_files(root))
    known = set(files)
    return {module: sorted(set(imports_of(module, path, known))) for module, path in files.items()}


def layer_violations(graph: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    """Arrows against the layer order, function-level project imports, and tools importing training."""
    problems = []
    for module, edges in sorted(graph.items()):
        for target, line, top in edges:
            if layer_of(target) > layer_of(module):
                problems.append(f"{module}:{line} imports {target}, a higher layer")
            if not top:
                problems.append(f"{module}:{line} imports {target} inside a function")
            if module.split(".")[0] in LAUNCH_FOLDERS and target.split(".")[0] == "training":
                problems.append(f"{module}:{line} imports training; tools and scripts import initialize")
    return problems


def cycles(graph: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_project_imports_one_way_without_cycles():
    graph = import_graph()
    assert "training" in graph and "mpu.layers" in graph and "tools.reshard_checkpoint" in graph
    assert layer_violations(graph) == []
    assert cycles(graph) == []


@pytest.fixture
def tiny_project(tmp_path):
    (tmp_path / "mpu").mkdir()
    (tmp_path / "mpu" / "__init__.py").write_text("from .layers import Linear\n")
    (tmp_path / "mpu" / "layers.py").write_text("import torch\n")
    (tmp_path / "training.py").write_text("import mpu\nfrom restore import save\n")
    (tmp_path / "restore.py").write_text("import mpu\n")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "tool.py").write_text("from initialize import run_main\n")
    (tmp_path / "initialize.py").write_text("def f():\n    import tensorboard\n")
    return tmp_path


def test_a_clean_tiny_project_passes(tiny_project):
    graph = import_graph(str(tiny_project))
    assert graph["training"] == [("mpu", 1, True), ("restore", 2, True)]
    assert graph["mpu"] == [("mpu.layers", 1, True)]
    assert layer_violations(graph) == [] and cycles(graph) == []


@pytest.mark.parametrize("path, text, expected", [
    ("mpu/layers.py", "import torch\nfrom training import pretrain\n", "mpu.layers:2 imports training, a higher layer"),
    ("restore.py", "import mpu\n\ndef f():\n    import mpu.layers\n", "restore:4 imports mpu.layers inside a function"),
    ("tools/tool.py", "from training import pretrain\n", "tools.tool:1 imports training; tools and scripts"),
])
def test_a_reversed_or_hidden_import_is_reported(tiny_project, path, text, expected):
    (tiny_project / path).write_text(text)
    problems = layer_violations(import_graph(str(tiny_project)))
    assert any(p.startswith(expected) for p in problems), problems


def test_a_cycle_within_a_layer_is_reported(tiny_project):
    (tiny_project / "restore.py").write_text("import mpu\nimport initialize\n")
    (tiny_project / "initialize.py").write_text("from restore import save\n")
    graph = import_graph(str(tiny_project))
    assert layer_violations(graph) == []  # the same layer: allowed one way
    assert cycles(graph) == [["initialize", "restore"]]
