"""Splits are deterministic, stratified for classification, and never overlap."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from copa.data import load_splits, read_table
from copa.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


def _inputs(recipe, rows):
    return {tuple(r[f] for f in recipe.task.input_fields) for r in rows}


def test_iris_splits_are_disjoint_stratified_and_deterministic() -> None:
    recipe = load_recipe(REPO / "recipes" / "iris.yaml")
    first, second = load_splits(recipe), load_splits(recipe)
    assert first == second
    train, val, test = (_inputs(recipe, s) for s in (first.train, first.val, first.test))
    assert not (train & val or train & test or val & test)
    assert (len(first.train), len(first.val), len(first.test)) == (60, 15, 74)
    counts = Counter(r["species"] for r in first.train)
    assert set(counts.values()) == {20}
    assert first.train[0]["sepal_length"] == "6.3"  # number_format ".1f"


def test_banking77_uses_its_own_test_file_without_leaks() -> None:
    recipe = load_recipe(REPO / "recipes" / "banking77.yaml")
    splits = load_splits(recipe)
    assert len(splits.test) == 200
    assert not _inputs(recipe, splits.test) & _inputs(recipe, splits.train + splits.val)
    assert {r["label"] for r in splits.train} <= set(recipe.task.choices)


def test_a_different_seed_gives_different_splits() -> None:
    iris = REPO / "recipes" / "iris.yaml"
    reseeded = load_recipe(iris, overrides={"data.splits.seed": 1})
    assert load_splits(reseeded).train != load_splits(load_recipe(iris)).train


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet"])
def test_loaders_read_every_format(tmp_path: Path, fmt: str) -> None:
    rows = [{"text": "hi", "label": "a"}, {"text": "yo", "label": "b"}]
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        path.write_text("text,label\nhi,a\nyo,b\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    assert read_table(path) == rows


def test_env_interpolation_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_text(
        "".join(json.dumps({"q": f"q{i}", "a": str(i)}) + "\n" for i in range(10)))
    (tmp_path / "r.yaml").write_text(
        "name: t\ntask: {signature: 'q -> a'}\n"
        "data: {source: '${MY_DIR:-nowhere}/x.jsonl', splits: {train: 5, val: 2, test: 3}}\n")
    recipe = load_recipe(tmp_path / "r.yaml", env={"MY_DIR": "d"})
    assert len(load_splits(recipe).train) == 5
