"""The shape of the house, checked from the source: imports go one way, nothing reaches for another
module's private names, modules stay small and every package says what it holds.

Floors, lowest first (docs/ARCHITECTURE.md draws them): the model and training math (`k2train`), the
layout and process groups, the parallel mechanisms (`pipeline`, `zero1`, `checkpoint`), the planner,
the runtime that drives a rank, the profiler, the command line (`launch`), the benchmarks. A module may
import its own floor or lower. Imports inside functions count too: a lazy import is still a
dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("k2train", "parallel", "launch", "benchmarks")
MAX_LINES = 400

# Top-level modules of parallel/ that everything else in it builds on.
PARALLEL_BASE = {"parallel", "parallel.layout", "parallel.state", "parallel.signals", "parallel.preflight",
                 "parallel.collectives"}
PARALLEL_FLOORS = {"pipeline": 2, "zero1": 2, "checkpoint": 2, "plan": 3, "profiling": 5}
# `python -m k2train` (torchrun's entry) is the program, not a library module: it may call the
# command line.
ENTRY_POINTS = {"k2train.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(packages=PACKAGES) -> dict[str, Path]:
    return {module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}


def floor(module: str) -> int:
    top = module.split(".")[0]
    if top == "k2train":
        return 0
    if top == "launch":
        return 6
    if top == "benchmarks":
        return 7
    if module in PARALLEL_BASE:
        return 1
    sub = module.split(".")[1]
    return PARALLEL_FLOORS.get(sub, 4)


def resolve(target: str, known: set[str]) -> str | None:
    """The known module an import names: the longest known prefix of `target`."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in known:
            return name
    return None


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, lazy ones too."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := resolve(alias.name, known)) is not None:
                    found.append((target, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                # `from parallel.checkpoint import hf_source` imports a module; `... import Name` a name.
                sub = resolve(f"{base}.{alias.name}", known)
                if sub is not None and sub == f"{base}.{alias.name}":
                    found.append((sub, [], node.lineno))
                elif (target := resolve(base, known)) is not None:
                    found.append((target, [alias.name], node.lineno))
    return found


def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    files = source_files()
    known = set(files)
    return {m: imports_of(m, p, known) for m, p in files.items()}


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_imports_go_down_the_floors_never_up():
    upward = [
        f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)}) on line {line}"
        for m, edges in graph().items() if m not in ENTRY_POINTS
        for t, _, line in edges if floor(t) > floor(m)
    ]
    assert not upward, "imports that go up a floor:\n" + "\n".join(upward)


def test_there_are_no_import_cycles():
    edges = {m: sorted({t for t, _, _ in es if t != m}) for m, es in graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in edges.get(m, []):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_takes_a_private_name_from_another():
    files = {**source_files(), **source_files(("tests",))}
    known = set(source_files())
    taken = []
    for m, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        modules = {}  # local names bound to our modules, to catch `module._name`
        for t, names, line in imports_of(m, path, known):
            taken += [f"{m} line {line} imports {n} from {t}" for n in names if private(n) and t != m]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if resolve(a.name, known) and a.asname:
                        modules[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if f"{node.module}.{a.name}" in known:
                        modules[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in modules):
                taken.append(f"{m} line {node.lineno} reads {modules[node.value.id]}.{node.attr}")
    assert not taken, "private names reached across modules:\n" + "\n".join(taken)


def test_every_module_is_small():
    files = {**source_files(), **source_files(("tests",))}
    long = [f"{m}: {n} lines" for m, p in files.items() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


def test_every_package_says_what_it_holds():
    silent = [
        str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")
        if not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not silent, "packages without a docstring in __init__.py: " + ", ".join(silent)


def test_the_checks_see_what_they_check():
    """The walk finds the imports it judges: a known downward import is there, so the checks above
    cannot pass by seeing nothing."""
    edges = graph()
    assert ("parallel.layout", ["Layout"]) in [(t, n) for t, n, _ in edges["parallel.state"]]
    assert floor("parallel.pipeline.stages") == 2 and floor("parallel.runner") == 4
    assert len(edges) > 100
