"""The package layout's rules, read from the source with `ast` and from docs/architecture.md,
which holds them: the rank of every room (a module imports only its own room and rooms of a
lower rank, so data flows down the tree), no import circles, every module listed with a line
saying what it owns, and the light modules never load torch/dspy/axolotl."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COPA = ROOT / "copa"
DOC = ROOT / "docs" / "architecture.md"
HEAVY = ("torch", "transformers", "dspy", "axolotl", "peft", "accelerate")
LIGHT = ("copa.recipe", "copa.recipe.load", "copa.recipe.schema", "copa.recipe.serve_schema",
         "copa.recipe.finetune_schema",
         "copa.checks", "copa.data", "copa.data.sources", "copa.data.loaders",
         "copa.data.retrieval", "copa.data.demos", "copa.prompting", "copa.metrics",
         "copa.backends", "copa.backends.valcurve",
         "copa.use.bundle", "copa.use.predict", "copa.use.ollama", "copa.use.gotemplate",
         "copa.study.spec", "copa.cli_study", "copa.registry", "copa.pipeline")


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


# --- ranks: docs/architecture.md's table is the one place they are written ----------------

def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end != -1 else None]


def read_ranks(text: str) -> dict[str, int]:
    """Room -> rank from the doc's rank table: each row `| rank | `room`, `room` | ...`, a room
    being a folder (`recipe/`: every module in it), a module (`files.py`) or `__init__.py`
    (the copa package itself)."""
    ranks: dict[str, int] = {}
    for line in _section(text, "## Ranks").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].isdigit():
            continue
        for name in re.findall(r"`([^`]+)`", cells[1]):
            room = "copa" if name == "__init__.py" else "copa." + name.removesuffix(
                ".py").removesuffix("/").replace("/", ".")
            assert room not in ranks, f"{name} has two ranks in {DOC.name}"
            ranks[room] = int(cells[0])
    return ranks


def room_of(module: str, ranks: dict[str, int]) -> str | None:
    """The room a module lives in: its own row, else the nearest folder row above it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in ranks and (n == len(parts) or candidate != "copa"):
            return candidate
    return None


def up_arrows(edges: dict[str, set[str]], ranks: dict[str, int]) -> list[str]:
    """Imports from a room to a room of the same or a higher rank (within a room, any)."""
    bad = []
    for module, targets in sorted(edges.items()):
        src = room_of(module, ranks)
        for target in sorted(targets):
            dst = room_of(target, ranks)
            if src and dst and src != dst and ranks[dst] >= ranks[src]:
                bad.append(f"{module} (rank {ranks[src]}) imports {target} (rank {ranks[dst]})")
    return bad


RANKS = read_ranks(DOC.read_text())


def listed_modules(text: str) -> set[str]:
    """The modules docs/architecture.md's tree names, one line each: `name.py` entries two
    spaces deep per folder level (deeper lines continue a description)."""
    block = text.split("```", 2)[1]
    folders: list[str] = []
    found = set()
    for line in block.splitlines():
        match = re.match(r"^((?:  )+)([\w]+(?:\.py|/))(?:\s|$)", line)
        if not match or len(match.group(1)) // 2 > len(folders) + 1:
            continue
        depth = len(match.group(1)) // 2 - 1  # copa/'s own entries are depth 0
        del folders[depth:]
        name = match.group(2)
        if name.endswith("/"):
            folders.append(name[:-1])
            found.add(".".join(["copa", *folders]))  # the folder's __init__.py
        else:
            found.add(".".join(["copa", *folders, name.removesuffix(".py")]).removesuffix(
                ".__init__"))
    return found


def test_the_cycle_finder_finds_a_circle_of_three() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles_among_copa_modules() -> None:
    """Lazy imports inside functions count too: they are circles all the same."""
    assert len(MODULES) > 20
    assert find_cycle(copa_edges()) is None


def test_every_module_has_a_rank() -> None:
    """A new module (or folder) joins a row of the rank table, and no row names a room that
    is gone."""
    assert len(set(RANKS.values())) > 5
    unranked = sorted(m for m in MODULES if room_of(m, RANKS) is None)
    assert not unranked, f"give these a rank in {DOC.name}: {unranked}"
    stale = sorted(r for r in RANKS if r not in MODULES)
    assert not stale, f"{DOC.name} ranks rooms that are gone: {stale}"


def test_no_import_points_up_the_ranks() -> None:
    """Lazy imports inside functions count (a deferred import is a dependency all the same);
    only `if TYPE_CHECKING:` blocks, which never run, are left out."""
    bad = up_arrows(copa_edges(), RANKS)
    assert not bad, "imports against the rank order:\n" + "\n".join(bad)


def test_the_rank_rule_refuses_an_up_arrow_and_a_sideways_one() -> None:
    ranks = {"copa.files": 1, "copa.recipe": 2, "copa.data": 3, "copa.inference": 3}
    assert up_arrows({"copa.recipe.schema": {"copa.files", "copa.recipe.values"}}, ranks) == []
    assert up_arrows({"copa.files": {"copa.recipe.load"}}, ranks) == [
        "copa.files (rank 1) imports copa.recipe.load (rank 2)"]
    assert up_arrows({"copa.data.splits": {"copa.inference.local"}}, ranks) == [
        "copa.data.splits (rank 3) imports copa.inference.local (rank 3)"]


BACKENDS_FRONT = {"copa.backends", "copa.backends.valcurve"}


def test_code_outside_backends_knows_only_their_front() -> None:
    """A second backend plugs in as an entry of copa.backends.BACKENDS: outside backends/,
    nothing names a backend's own module (valcurve is finetune.eval's spec and curve, which
    the stages and the training process share)."""
    edges = copa_edges()
    assert "copa.backends.axolotl" in edges["copa.backends"]  # the front does reach it
    bad = sorted(f"{m} imports {i}" for m, targets in edges.items()
                 if not (m == "copa.backends" or m.startswith("copa.backends."))
                 for i in targets if i.startswith("copa.backends.") and i not in BACKENDS_FRONT)
    assert not bad, "import copa.backends (get_backend) instead:\n" + "\n".join(bad)


def test_the_docs_list_every_module() -> None:
    """docs/architecture.md's tree has a line for every module under copa/ (a package's
    __init__ is its folder's line), and none for a module that is gone."""
    listed = listed_modules(DOC.read_text())
    missing = sorted(set(MODULES) - listed)
    assert not missing, f"add a line to {DOC.name}'s tree for: {missing}"
    gone = sorted(listed - set(MODULES))
    assert not gone, f"{DOC.name}'s tree lists modules that are gone: {gone}"


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
