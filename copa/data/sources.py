"""Where a recipe's rows come from: scikit-learn's Iris, a `datasets` folder or hub dataset
(`hf:`), or a file read by copa.data.loaders; and what identifies each source's content for the
render stage's key (so data edited in place re-renders)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

from copa.data.loaders import LoaderError, load_rows
from copa.recipe import Problem, Recipe, RecipeError

IRIS_COLUMNS = ("sepal_length", "sepal_width", "petal_length", "petal_width")


class DataError(RecipeError):
    """Data that a recipe points at is unusable."""


def data_problem(recipe: Recipe, path: str, message: str) -> DataError:
    label = str(recipe.source_path) if recipe.source_path else "<recipe>"
    return DataError([Problem(file=label, path=path, message=message)])


def iris_rows() -> list[dict[str, Any]]:
    # Read the CSV scikit-learn ships, without importing sklearn (slow) — same data as load_iris.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-learn is not installed (pip install scikit-learn)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "iris.csv"
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    species = lines[0].split(",")[2:]
    rows = []
    for line in lines[1:]:
        *features, target = line.split(",")
        row: dict[str, Any] = {name: float(v) for name, v in zip(IRIS_COLUMNS, features)}
        row["species"] = species[int(target)]
        rows.append(row)
    return rows


def load_source(recipe: Recipe, source: str, key: str) -> list[dict[str, Any]]:
    """Rows from a recipe's data source string; errors name the recipe key."""
    if recipe.data.loader and (source == "sklearn:iris" or source.startswith("hf:")):
        raise data_problem(recipe, "data.loader", f"a loader reads a file, and {source} is none: "
                                              "remove data.loader or point the source at a file")
    try:
        if source == "sklearn:iris":
            return iris_rows()
        if source.startswith("hf:"):
            return _hub_rows(source[3:], recipe.base_dir)
        data = recipe.data
        return load_rows(recipe.resolve(source), fmt=data.format, max_mb=data.max_file_mb,
                         loader=data.loader, options=data.loader_options,
                         base_dir=recipe.base_dir)
    except FileNotFoundError as exc:
        raise data_problem(recipe, key, str(exc)) from None
    except LoaderError as exc:
        raise data_problem(recipe, "data.loader", f"{source}: {exc}") from None
    except ValueError as exc:
        raise data_problem(recipe, key, f"{source}: {exc}") from None


def _hub_rows(name: str, base_dir: Path) -> list[dict[str, Any]]:
    """`hf:NAME[:SPLIT]`: a folder written by `datasets`' save_to_disk (relative to the recipe;
    no hub needed), else a dataset on the hub (or in its local cache)."""
    dataset_name, _, split = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise ValueError("the 'datasets' package is needed for hf: sources") from None
    folder = Path(dataset_name).expanduser()
    folder = folder if folder.is_absolute() else base_dir / folder
    saved = folder.is_dir() and any((folder / f).is_file()
                                    for f in ("dataset_dict.json", "state.json"))
    split = split or "train"
    if saved:
        try:
            dataset = datasets.load_from_disk(str(folder))
        except Exception as exc:  # a damaged or foreign folder: say which
            raise ValueError(f"could not load the saved dataset {folder} ({exc})") from None
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"no split '{split}' in {folder} (it has "
                                 f"{', '.join(dataset)}); write hf:{dataset_name}:SPLIT")
            dataset = dataset[split]
        return [dict(row) for row in dataset]
    try:
        dataset = datasets.load_dataset(dataset_name, split=split)
    except Exception as exc:  # offline, unknown name: say which
        raise ValueError(f"could not load '{dataset_name}' from the hub ({exc})") from None
    return [dict(row) for row in dataset]


def _hub_cache() -> Path:
    # huggingface_hub's cache folder, found as it finds it (without importing it: light module).
    import os

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return Path(home).expanduser() / "hub"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def source_identity(recipe: Recipe, source: str) -> dict[str, Any]:
    """What identifies a data source's rows: the sha256 of a file, the package version (and
    file) of built-in data, a local dataset folder's hash or a hub dataset's cached revision.
    The render stage's key holds it, so data edited in place re-renders the splits."""
    from copa.files import sha256_file, sha256_tree

    if source == "sklearn:iris":
        identity: dict[str, Any] = {"source": source,
                                    "scikit-learn": _package_version("scikit-learn")}
        spec = importlib.util.find_spec("sklearn")
        if spec is not None and spec.submodule_search_locations:
            csv_path = (Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
                        / "iris.csv")
            identity["sha256"] = sha256_file(csv_path) if csv_path.is_file() else None
        return identity
    if source.startswith("hf:"):
        name = source[3:].partition(":")[0]
        identity = {"source": source, "datasets": _package_version("datasets")}
        for folder in dict.fromkeys([Path(name), recipe.resolve(name)]):
            if folder.exists():  # a local dataset folder or file: its content
                identity[str(folder.resolve())] = sha256_tree(folder)
        ref = _hub_cache() / f"datasets--{name.replace('/', '--')}" / "refs" / "main"
        if ref.is_file():  # a hub dataset: the revision its cache resolves to
            identity["revision"] = ref.read_text().strip()
        return identity
    path = recipe.resolve(source)
    return {"source": source, "sha256": sha256_file(path) if path.is_file() else None}


def data_identity(recipe: Recipe) -> list[dict[str, Any]]:
    """source_identity of every data source the recipe reads."""
    sources = [recipe.data.source] + ([recipe.data.test_source] if recipe.data.test_source else [])
    return [source_identity(recipe, s) for s in sources]
