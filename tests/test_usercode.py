"""The user's own code named by a recipe ('module:name'), imported from the recipe's folder."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from copa.usercode import import_object

NAMES = ("same_named_metric", "same_named_pkg")


def _recipe_folder(root: Path, name: str, score: float) -> Path:
    """A recipe folder with a metric module and a package, both named as in the other folder."""
    folder = root / name
    (folder / "same_named_pkg").mkdir(parents=True)
    (folder / "same_named_metric.py").write_text(
        f"def metric(example, prediction, trace=None):\n    return {score}\n")
    (folder / "same_named_pkg" / "__init__.py").write_text("")
    (folder / "same_named_pkg" / "scoring.py").write_text(f"def score():\n    return {score}\n")
    return folder


@pytest.fixture
def clean_imports() -> Iterator[None]:
    path_before = list(sys.path)
    yield
    sys.path[:] = path_before
    for name in [n for n in sys.modules if n.split(".")[0] in NAMES]:
        del sys.modules[name]


@pytest.mark.usefixtures("clean_imports")
def test_two_recipe_folders_with_same_named_modules_each_get_their_own(tmp_path: Path) -> None:
    first = _recipe_folder(tmp_path, "a", 1.0)
    second = _recipe_folder(tmp_path, "b", 0.0)
    assert import_object("same_named_metric:metric", first)(None, None) == 1.0
    kept = import_object("same_named_metric:metric", second)
    assert kept(None, None) == 0.0
    assert import_object("same_named_metric:metric", first)(None, None) == 1.0
    assert kept(None, None) == 0.0  # what was imported before keeps its own module
    assert import_object("same_named_pkg.scoring:score", second)() == 0.0
    assert import_object("same_named_pkg.scoring:score", first)() == 1.0


@pytest.mark.usefixtures("clean_imports")
def test_a_recipe_folder_never_shadows_an_installed_module(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "json.py").write_text("def dumps(obj):\n    return 'shadowed'\n")
    assert import_object("json:dumps", folder)([1]) == "[1]"
