"""The package's layering, read from its source: every import points down, and none loops.

Layers, bottom to top (the README's "Layout" says the same in prose). A module may import
from its own layer and the layers below it, never from one above; imports inside functions
count too (they are how a cycle hides).

1. foundations: the math, the data, the optimizers, the run-folder format, the network
   plans and what both engines draw, the post's facts (its logs, its ladder, its recipe)
2. evidence: numbers over seeds, verdicts, figures, the HTML page (reads run folders)
3. networks: bnlab's BN modules, the manual engine, the autograd models, the BN-statistics
   toolkit; the manual engine and the autograd models never import each other
4. train: one run, both engines: its config, its model (either engine), the loop
5. reports: a comparison's report, the post's section, from run folders alone
6. experiments: cases and presets, comparisons, studies
7. commands: the CLI, benchmarks, the gradient checks
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bnlab"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("bnlab.functional", "bnlab.optim", "bnlab.data", "bnlab.runs",
                     "bnlab.plans", "bnlab.initializers", "bnlab.progress", "bnlab.post",
                     "bnlab.post.log", "bnlab.post.ladder", "bnlab.post.recipe", "bnlab.argtypes",
                     "bnlab.kernels", "bnlab.precision",
                     "bnlab.functional_sync", "bnlab.tensorboard")),
    ("evidence", ("bnlab.evidence", "bnlab.evidence.*")),
    ("networks", ("bnlab", "bnlab.nn", "bnlab.manual", "bnlab.manual.*", "bnlab.models",
                  "bnlab.post.net", "bnlab.post.manual_net", "bnlab.bnstats", "bnlab.variants",
                  "bnlab.variants.*", "bnlab.sync_batchnorm", "bnlab.distributed",
                  "bnlab.init_health")),
    ("train", ("bnlab.config", "bnlab.engines", "bnlab.train")),
    ("reports", ("bnlab.report", "bnlab.report_summary", "bnlab.report_differences",
                 "bnlab.post.report")),
    ("experiments", ("bnlab.cases", "bnlab.compare", "bnlab.studies", "bnlab.studies.*")),
    ("commands", ("bnlab.cli", "bnlab.cli.*", "bnlab.bench", "bnlab.bench_engine", "bnlab.checks",
                  "bnlab.check_engines", "bnlab.bench_distributed", "bnlab.__main__")),
]
# siblings in one layer that must stay apart: (importer pattern, imported pattern)
APART = [("bnlab.models", "bnlab.manual*"), ("bnlab.manual*", "bnlab.models"),
         ("bnlab.manual*", "bnlab.post.net"), ("bnlab.post.net", "bnlab.manual*"),
         ("bnlab.post.net", "bnlab.post.manual_net"),
         ("bnlab.post.manual_net", "bnlab.post.net"), ("bnlab.post.manual_net", "bnlab.models")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The bnlab modules ``name`` imports (at the top or inside functions)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "bnlab")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            if base.split(".")[0] != "bnlab":
                continue
            for alias in node.names:  # "from bnlab import data": the module bnlab.data
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    found.discard(name)
    return {m for m in found if m in MODULES}


def layer_of(name: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return index
    raise AssertionError(f"{name} has no layer: add it to LAYERS in {__file__} and to the "
                         "README's layout")


def upward_imports(graph: dict[str, set[str]], name: str) -> list[str]:
    """What ``name`` imports from a layer above its own, or from a sibling it must not."""
    mine = layer_of(name)
    bad = [f"{m} ({LAYERS[layer_of(m)][0]})" for m in sorted(graph[name]) if layer_of(m) > mine]
    bad += [f"{m} (kept apart)" for m in sorted(graph[name]) for a, b in APART
            if fnmatch.fnmatchcase(name, a) and fnmatch.fnmatchcase(m, b)]
    return bad


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every loop a depth-first walk of ``graph`` meets, as the modules along it."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


GRAPH = {name: imports_of(name) for name in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_import_points_down(name):
    bad = upward_imports(GRAPH, name)
    assert not bad, f"{name} ({LAYERS[layer_of(name)][0]}) imports upwards: {', '.join(bad)}"


def test_no_import_cycles():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_cycle_an_upward_import_and_a_crossing():
    fake = {"bnlab.functional": {"bnlab.train"}, "bnlab.train": {"bnlab.functional"},
            "bnlab.models": {"bnlab.manual.layers"}, "bnlab.manual.layers": set()}
    assert upward_imports(fake, "bnlab.functional") == ["bnlab.train (train)"]
    assert upward_imports(fake, "bnlab.train") == []
    assert upward_imports(fake, "bnlab.models") == ["bnlab.manual.layers (kept apart)"]
    assert find_cycles(fake) == [["bnlab.functional", "bnlab.train", "bnlab.functional"]]
    assert "bnlab.train" in imports_of("bnlab.compare")  # the parser sees real imports
