"""The suite's own rule, read from its source with `ast`: every test asserts something (an
`assert`, a `pytest.raises` / `pytest.warns`, a library's `*.testing.assert_*` such as
`torch.testing.assert_close`, or a helper of its own file that does), so no
test passes by merely running."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CHECKS = ("pytest.raises", "pytest.warns", "pytest.fail")


def _checks(fn: ast.AST, helpers: dict[str, ast.AST], seen: frozenset[str]) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.startswith(CHECKS) or (".testing.assert_" in name):
                return True
            if name in helpers and name not in seen and _checks(helpers[name], helpers,
                                                                 seen | {name}):
                return True
    return False


def unchecked_tests(source: str) -> list[str]:
    tree = ast.parse(source)
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    helpers = {n.name: n for n in ast.walk(tree) if isinstance(n, functions)}
    tests = [n for n in tree.body if isinstance(n, functions)]
    tests += [m for n in tree.body if isinstance(n, ast.ClassDef) and n.name.startswith("Test")
              for m in n.body if isinstance(m, functions)]
    return [t.name for t in tests
            if t.name.startswith("test") and not _checks(t, helpers, frozenset({t.name}))]


def test_the_finder_tells_a_test_that_checks_from_one_that_runs() -> None:
    source = ("def helper(x):\n    assert x\n"
              "def test_a():\n    assert 1\n"
              "def test_b():\n    with pytest.raises(ValueError):\n        int('x')\n"
              "def test_c():\n    helper(1)\n"
              "def test_d():\n    print('ran')\n"
              "def test_f():\n    torch.testing.assert_close(1, 1)\n"
              "class TestE:\n    def test_e(self):\n        pass\n")
    assert unchecked_tests(source) == ["test_d", "test_e"]


def test_every_test_asserts_something() -> None:
    files = sorted(TESTS.glob("test_*.py"))
    assert len(files) > 30
    bare = [f"{path.name}::{name}" for path in files
            for name in unchecked_tests(path.read_text())]
    assert not bare, "tests that check nothing:\n" + "\n".join(bare)
