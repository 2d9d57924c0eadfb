"""The import structure of the package, read from the source (no module is imported).

Layers, from the bottom: the ground floor (errors, fields, files, runtime) imports nothing above it; the
maths core (kac, rng, paths, solvers, guidance) imports only itself and the ground floor's errors, never I/O,
training or the CLI; the networks never import the training loop; nothing outside ``distillkac.cli`` imports
the CLI; and the module graph has no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "distillkac"

GROUND_FLOOR = {"distillkac.errors", "distillkac.fields", "distillkac.files", "distillkac.runtime"}
MATHS_CORE = {"distillkac.kac", "distillkac.rng", "distillkac.paths", "distillkac.solvers", "distillkac.guidance"}
TRAINING = {"distillkac.train", "distillkac.distill", "distillkac.stages", "distillkac.demo", "distillkac.reproduce"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def resolve(name: str) -> str:
    """The project module an import names (``distillkac.nets.unet.UNet`` -> ``distillkac.nets.unet``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> set[str]:
    """Every project module that ``module`` imports, at any depth of its source (function-local ones too)."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: climb node.level - 1 packages up from this one
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {resolve(n) for n in names if n == "distillkac" or n.startswith("distillkac.")}
    found.discard(module)
    found.discard("distillkac")
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_the_package_is_read():
    assert {"distillkac.kac", "distillkac.train", "distillkac.cli", "distillkac.runtime"} <= set(MODULES)
    assert "distillkac.rng" in GRAPH["distillkac.kac"]


@pytest.mark.parametrize("module", sorted(GROUND_FLOOR))
def test_ground_floor_imports_only_the_ground_floor(module):
    assert GRAPH[module] <= GROUND_FLOOR, GRAPH[module] - GROUND_FLOOR


@pytest.mark.parametrize("module", sorted(MATHS_CORE))
def test_maths_core_imports_only_maths_and_errors(module):
    allowed = MATHS_CORE | {"distillkac.errors"}
    assert GRAPH[module] <= allowed, GRAPH[module] - allowed


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("distillkac.nets")))
def test_networks_do_not_import_the_training_loop(module):
    assert not GRAPH[module] & TRAINING
    assert not any(m.startswith(("distillkac.cli", "distillkac.metrics", "distillkac.data")) for m in GRAPH[module])


def test_nothing_outside_the_cli_imports_it():
    offenders = {m: {i for i in imports if i.startswith("distillkac.cli")} for m, imports in GRAPH.items()
                 if not m.startswith("distillkac.cli") and m != "distillkac.__main__"}
    assert not any(offenders.values()), offenders


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        if state.get(module) == "open":
            return [*trail[trail.index(module):], module]
        if state.get(module) == "done":
            return None
        state[module] = "open"
        for imported in sorted(graph[module]):
            if not imported.startswith(module + "."):  # a package re-exporting its own submodules
                cycle = visit(imported, [*trail, module])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    return next((c for c in (visit(m, []) for m in sorted(graph)) if c), None)


def test_the_module_graph_has_no_cycles():
    assert find_cycle(GRAPH) is None


def test_the_cycle_search_finds_a_planted_cycle():
    graph = {m: set(imports) for m, imports in GRAPH.items()}
    graph["distillkac.kac"].add("distillkac.train")
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "distillkac.kac" in cycle
