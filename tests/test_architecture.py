"""The areas of the package import one another without cycles.

An area is a top-level subpackage (data, models, train, ...); each module directly in glassbox/ is a node of its
own, so the command line (root.cli, root.demo) may sit above every area and the utilities (root.atomic,
root.errors, root.config, root.distributed) below them, and a utility that reached up into an area would show up
as a cycle. Imports are read from the source (AST), at module level and inside functions alike, and under
TYPE_CHECKING too: a lazy or type-only import is still a dependency, and a cycle through one still means two
areas cannot be understood, tested or moved apart.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "glassbox"


@dataclass(frozen=True)
class ImportSite:
    source: str      # the importing node
    target: str      # the imported node
    file: str
    line: int
    statement: str


def package_folders(repo: Path) -> dict[str, Path]:
    """Dotted package -> its folder, from pyproject's package-dir (the one place the layout is declared)."""
    setuptools = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: repo / folder for pkg, folder in setuptools["package-dir"].items()}


def module_name(file: Path, folders: dict[str, Path]) -> str:
    """The dotted name `file` is imported under (a package's __init__ is the package itself)."""
    for pkg, folder in sorted(folders.items(), key=lambda kv: -len(kv[0])):
        if file.is_relative_to(folder):
            parts = [*pkg.split("."), *file.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(f"{file} lies in no package folder")


def node_of(module: str, root_modules: set[str], areas: set[str]) -> str | None:
    """The graph node of a dotted module name; None for anything outside the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return "root"
    if parts[1] in areas:
        return parts[1]
    return f"root.{parts[1]}" if parts[1] in root_modules else "root"


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The dotted names an import statement reaches; `from pkg import name` gives `pkg.name`, since `name` may be
    a submodule (`from glassbox import errors` depends on root.errors, not on the root package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer.split(".")
        package = package[:len(package) - node.level + (1 if is_package else 0)]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def import_sites(folders: dict[str, Path]) -> list[ImportSite]:
    """Every import from one node of the package into another, with where it is written."""
    areas = {pkg.split(".")[1] for pkg in folders if pkg != PACKAGE}
    root = folders[PACKAGE]
    root_modules = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    sites = []
    for folder in folders.values():
        for file in sorted(folder.rglob("*.py")):
            importer = module_name(file, folders)
            source = node_of(importer, root_modules, areas)
            tree = ast.parse(file.read_text(), filename=str(file))
            for stmt in ast.walk(tree):
                if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    continue
                for module in imported_modules(stmt, importer, file.stem == "__init__"):
                    target = node_of(module, root_modules, areas)
                    if target is not None and target != source:
                        sites.append(ImportSite(source, target, str(file.relative_to(folder.parent)), stmt.lineno,
                                                ast.unparse(stmt)))
    return sorted(set(sites), key=lambda s: (s.file, s.line, s.target))


def cycles(edges: set[tuple[str, str]]) -> list[set[str]]:
    """The strongly connected components of more than one node: sets of nodes that all reach one another."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reach = {n: reachable(n) for n in graph}
    components = {frozenset(m for m in reach[n] if n in reach[m]) | {n} for n in graph}
    return sorted((set(c) for c in components if len(c) > 1), key=sorted)


def describe(cycle: set[str], sites: list[ImportSite]) -> str:
    lines = [f"import cycle between {', '.join(sorted(cycle))}:"]
    lines += [f"  {s.source} -> {s.target}  {s.file}:{s.line}: {s.statement}"
              for s in sites if s.source in cycle and s.target in cycle]
    return "\n".join(lines)


def test_no_import_cycle_between_areas():
    sites = import_sites(package_folders(REPO))
    found = cycles({(s.source, s.target) for s in sites})
    assert not found, "\n".join(describe(c, sites) for c in found)


def test_cycle_finder_sees_a_planted_cycle(tmp_path: Path):
    """A cycle through a function-level import, planted in a throwaway package, is found and named, so the test
    above can fail; `from glassbox import name` and relative imports resolve to the node they reach."""
    for folder, text in {
        "glassbox/__init__.py": "",
        "glassbox/errors.py": "",
        "data/__init__.py": "",
        "data/store.py": "from glassbox.errors import GlassboxError\nfrom glassbox.train.loop import run\n",
        "train/__init__.py": "",
        "train/loop.py": "def run():\n    import glassbox.data.store\n",
        "models/__init__.py": "from glassbox import errors\nfrom ..data import store\n",
    }.items():
        (tmp_path / folder).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / folder).write_text(text)
    folders = {PACKAGE: tmp_path / "glassbox", **{f"{PACKAGE}.{a}": tmp_path / a for a in ("data", "train", "models")}}
    sites = import_sites(folders)
    assert {(s.source, s.target) for s in sites} == {
        ("data", "root.errors"), ("data", "train"), ("train", "data"), ("models", "root.errors"), ("models", "data")}
    assert cycles({(s.source, s.target) for s in sites}) == [{"data", "train"}]
    assert describe({"data", "train"}, sites).splitlines()[1:] == [
        "  data -> train  data/store.py:2: from glassbox.train.loop import run",
        "  train -> data  train/loop.py:2: import glassbox.data.store",
    ]
