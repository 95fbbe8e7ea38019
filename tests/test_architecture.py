"""The package layout's rules (docs/architecture.md), read from the source with `ast`: no import
circles among copa's modules, the light modules never load torch/dspy/axolotl, and data flows
down the tree (a stage never imports the pipeline, backends know nothing of DSPy)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

COPA = Path(__file__).resolve().parent.parent / "copa"
HEAVY = ("torch", "transformers", "dspy", "axolotl", "peft", "accelerate")
LIGHT = ("copa.recipe", "copa.recipe.load", "copa.recipe.schema", "copa.recipe.serve_schema",
         "copa.checks", "copa.data", "copa.data.sources", "copa.data.loaders",
         "copa.data.retrieval", "copa.data.demos", "copa.prompting", "copa.metrics",
         "copa.backends.valcurve",
         "copa.use.bundle", "copa.use.predict", "copa.use.ollama", "copa.use.gotemplate",
         "copa.study.spec", "copa.cli_study", "copa.registry", "copa.pipeline")
# (importer prefix, imported prefix): imports that would send data up the tree.
FORBIDDEN = [
    ("copa.stages", "copa.pipeline"), ("copa.stages", "copa.optimizer"),
    ("copa.runs", "copa.pipeline"), ("copa.runs", "copa.stages"),
    ("copa.backends", "copa.dspy"), ("copa.backends", "copa.stages"),
    ("copa.backends", "copa.pipeline"), ("copa.inference", "copa.stages"),
    ("copa.inference", "copa.pipeline"), ("copa.inference", "copa.dspy"),
    ("copa.dspy", "copa.stages"), ("copa.dspy", "copa.pipeline"), ("copa.dspy", "copa.runs"),
    ("copa.provider", "copa.stages"), ("copa.provider", "copa.pipeline"),
    ("copa.provider", "copa.optimizer"), ("copa.backends", "copa.provider"),
    ("copa.inference", "copa.provider"), ("copa.dspy", "copa.provider"),
    # copa.use reads finished runs; nothing below it knows it, and it never runs a stage.
    *[(low, "copa.use") for low in ("copa.stages", "copa.dspy", "copa.inference",
                                    "copa.backends", "copa.runs", "copa.pipeline",
                                    "copa.provider")],
    ("copa.use", "copa.pipeline"), ("copa.use", "copa.runs"),
    # a study runs pipelines; nothing the pipeline runs knows studies
    *[(low, "copa.study") for low in ("copa.stages", "copa.dspy", "copa.inference",
                                      "copa.backends", "copa.runs", "copa.pipeline",
                                      "copa.provider", "copa.use", "copa.recipe", "copa.stats")],
    *[(light, up) for light in ("copa.recipe", "copa.data", "copa.data.sources",
                                "copa.data.loaders", "copa.data.retrieval", "copa.data.demos",
                                "copa.prompting", "copa.metrics")
      for up in ("copa.stages", "copa.pipeline", "copa.runs", "copa.dspy", "copa.inference",
                 "copa.backends", "copa.optimizer", "copa.provider", "copa.use")],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(COPA.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(COPA.rglob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str, top_level_only: bool = False) -> set[str]:
    """Absolute names a module imports (`from a.b import c` gives a.b.c when that is a module,
    else a.b), skipping `if TYPE_CHECKING:` blocks; with top_level_only, only what runs on
    import (not inside functions)."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.add(full if full in MODULES else child.module)
            visit(child)

    visit(tree)
    return found


def copa_edges(top_level_only: bool = False) -> dict[str, set[str]]:
    return {m: {i for i in imports(m, top_level_only) if i in MODULES and i != m}
            for m in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle_of_three() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles_among_copa_modules() -> None:
    """Lazy imports inside functions count too: they are circles all the same."""
    assert len(MODULES) > 20
    assert find_cycle(copa_edges()) is None


def test_data_flows_down_the_tree() -> None:
    bad = [f"{m} imports {i}" for m, targets in copa_edges().items() for i in targets
           for low, high in FORBIDDEN
           if (m == low or m.startswith(low + ".")) and (i == high or i.startswith(high + "."))]
    assert not bad


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_nothing_heavy(module: str) -> None:
    """Neither the module itself (at any depth) nor anything it loads on import."""
    own = {i.split(".")[0] for i in imports(module)}
    assert not own & set(HEAVY)
    edges = copa_edges(top_level_only=True)
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        heavy = {i.split(".")[0] for i in imports(current, top_level_only=True)} & set(HEAVY)
        assert not heavy, f"{module} loads {current}, which imports {heavy}"
        todo.extend(edges[current])


def test_validating_a_recipe_loads_no_heavy_library() -> None:
    """The same rule, observed: importing the light modules leaves torch, dspy and axolotl out."""
    code = ("import sys\nimport copa, copa.cli, " + ", ".join(LIGHT) + "\n"
            f"print(sorted(set(sys.modules) & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
