"""Imports point one way: no cycle between project modules; kernels/ and dataloading/ are leaves.

The graph is read from the source with `ast`, so it also sees imports inside functions (lazy
imports still close a cycle when both functions run) and needs nothing importable. Imports
under `if TYPE_CHECKING:` are left out: they never run.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "img2vec", "dataloading")
LEAVES = {"kernels": ("img2vec", "dataloading"), "dataloading": ("img2vec", "kernels")}  # leaf -> may not import


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project packages (a package is its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports: `import a.b`, `from a import b` (b a module or a name of a), relative."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            for alias in node.names:
                sub = f"{base_name}.{alias.name}"
                targets.add(sub if sub in modules else base_name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    # `import a.b.c` names a module; keep the longest project module each target names.
    resolved = set()
    for target in targets:
        parts = target.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in modules:
                resolved.add(".".join(parts[:k]))
                break
    return resolved - {module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_sees_every_kind_of_import() -> None:
    """The walker itself: relative, from-package, dotted and function-level imports all become edges."""
    graph = _graph()
    assert {"dataloading.base", "dataloading.dali", "dataloading.torch_loader"} <= graph["dataloading.loader"]
    assert "dataloading" in graph["img2vec.train"]  # from dataloading import LoaderSpec, build_loader
    assert "dataloading.datasets" in graph["img2vec.visualize"]  # imported inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_project_modules() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_leaf_packages_import_no_other_project_package() -> None:
    bad = [f"{module} imports {target}" for module, targets in _graph().items() for target in sorted(targets)
           if module.split(".")[0] in LEAVES and target.split(".")[0] in LEAVES[module.split(".")[0]]]
    assert not bad, "; ".join(bad)


def test_nothing_imports_the_training_entry_point() -> None:
    importers = sorted(module for module, targets in _graph().items() if "img2vec.train" in targets)
    assert not importers, importers
