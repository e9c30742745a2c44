"""The package's layers point down: an import from a package to one on a higher floor, or a
circle of imports between modules, fails here (every import counts, deferred ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

from common.config import REPO_ROOT

FLOORS = {  # top to bottom; a package imports only from floors below its own
    "copydet": 7,  # the command table imports every command
    "bench": 6, "calibration": 6,
    "pipeline": 5,
    "evaluation": 4, "merge": 4,
    "match_score": 3, "global_fea": 3, "preprocess": 3, "dedupe": 3,
    "local_fea": 2, "data": 2,
    "common": 1,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of the package: the package modules it imports (at any depth)."""
    modules = {module_name(p): p for package in FLOORS for p in (REPO_ROOT / package)
               .rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
        found[name] = {t for t in targets if t in modules}
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a package to one on its own floor or above (its own package aside)."""
    bad = []
    for source, targets in graph.items():
        top = source.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != top and FLOORS[other] >= FLOORS[top]:
                bad.append(f"{source} -> {target}")
    return sorted(bad)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles among modules (a package importing its own ``__init__`` aside)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if target == node or node.startswith(f"{target}."):
                continue  # itself (by its package name), or its own package's __init__
            if state.get(target) == "open":
                found.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_import_points_down() -> None:
    graph = imports()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk sees the code
    assert upward(graph) == []


def test_no_module_imports_itself_through_a_circle() -> None:
    assert circles(imports()) == []


def test_the_checks_catch_an_upward_import_and_a_circle() -> None:
    graph = {"merge.fuse": {"pipeline"}, "pipeline": {"merge.fuse"}, "common.io": set()}
    assert upward(graph) == ["merge.fuse -> pipeline"]
    assert circles(graph) == [["merge.fuse", "pipeline", "merge.fuse"]]


def test_tests_do_not_borrow_from_the_benchmarks() -> None:
    for path in (REPO_ROOT / "tests").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if n and n.split(".")[0] == "bench"], path
