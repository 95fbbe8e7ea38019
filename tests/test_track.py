"""MLflow tracking (copa.track), read back through MLflow's own client.

conftest.py turns tracking off for every test (COPA_TRACK=off: MLflow's import and a new
sqlite store cost seconds per run); the tests here turn it ON explicitly, each into a store of
its own under tmp_path, by setting COPA_TRACK to that store's URI.

- a tiny run (real Axolotl training) writes one MLflow run: the recipe as params, every arm's
  score and interval as metrics, the report, programs and predictions as artifacts, a nested
  run per stage, and Axolotl's own training curve in the train stage's run;
- a study writes a parent run with its cells nested, and its cells' arms and effects (the
  synergy and interaction) with their intervals as its metrics;
- a tracking server that does not answer is one warning, and the run finishes.
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from conftest import write_tiny_recipe

from copa import pipeline
from copa.track import environ_set, flatten, report_metrics
from copa.track.store import ENV, store_uri


def tracking_on(uri: str) -> AbstractContextManager[None]:
    return environ_set(ENV, uri)


def runs_in(uri: str) -> tuple[Any, list[Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, max_results=500)


def children(runs: list[Any], parent: Any) -> list[Any]:
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


# ---- fast: where the store is, what is logged ---------------------------------------------

def test_the_store_follows_env_then_recipe_and_off_wins(tmp_path: Path) -> None:
    from copa.recipe.track_schema import TrackSection

    assert store_uri(True, {}) == f"sqlite:///{Path('runs/mlflow.db').resolve()}"
    assert store_uri(False, {ENV: "http://server:5000"}) is None  # track: false
    assert store_uri(TrackSection(mlflow="http://a:1"), {ENV: "off"}) is None
    assert store_uri(TrackSection(mlflow="http://a:1"), {}) == "http://a:1"
    assert store_uri(TrackSection(mlflow="http://a:1"), {ENV: "http://b:2"}) == "http://b:2"


def test_a_recipe_turns_tracking_off_or_names_its_store_in_one_line(tmp_path: Path) -> None:
    from copa.recipe import RecipeError, load_recipe

    recipe = write_tiny_recipe(tmp_path, tmp_path / "model")
    base = recipe.read_text()
    recipe.write_text(base + "track: false\n")
    assert store_uri(load_recipe(recipe).track, {}) is None
    recipe.write_text(base + "track: {mlflow: 'http://tracker:5000'}\n")
    assert store_uri(load_recipe(recipe).track, {}) == "http://tracker:5000"
    recipe.write_text(base + "track: yes please\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert len(caught.value.problems) == 1 and caught.value.problems[0].path == "track"


def test_a_store_or_experiment_copa_cannot_use_is_said_at_once_in_one_line(tmp_path: Path) -> None:
    """A bare path (MLflow's file store, refused by this MLflow in a traceback), an sqlite URI
    naming a folder (COPA_TRACK=sqlite:/// is the current folder: MLflow retried it for minutes,
    logging every try) or a file that is no database: the recipe refuses it, a run warns once
    and goes on untracked, `copa ui` exits 2 in one line without starting MLflow (also for a
    scheme its UI has no store for, where MLflow printed a traceback, or a tracking server). An
    experiment name MLflow refuses (past 500 characters) is the recipe's error too."""
    from click.testing import CliRunner

    from copa.cli import cli
    from copa.recipe import RecipeError, load_recipe
    from copa.track import Tracker

    recipe = write_tiny_recipe(tmp_path, tmp_path / "model")
    base = recipe.read_text()
    for store, said in (("runs/mlflow.db", "'runs/mlflow.db' is not a tracking URI: write "
                                           "sqlite:///runs/mlflow.db"),
                        ("sqlite:///", "'sqlite:///' names no file")):
        recipe.write_text(base + f"track: {{mlflow: '{store}'}}\n")
        with pytest.raises(RecipeError) as caught:
            load_recipe(recipe)
        assert [(p.path, p.message) for p in caught.value.problems] == [
            ("track.mlflow", caught.value.problems[0].message)]
        assert said in caught.value.problems[0].message
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("hello\n")
    for store, said in ((f"sqlite:///{tmp_path}", f"{tmp_path}: is a folder; give a file name"),
                        (f"sqlite:///{not_a_database}", f"{not_a_database}: not an SQLite "
                                                        "database"),
                        ("runs/mlflow.db", "'runs/mlflow.db' is not a tracking URI")):
        warnings: list[str] = []
        tracker = Tracker(store, emit=warnings.append)
        tracker.open("exp", "run", {}, {})
        assert not tracker.on and len(warnings) == 1 and said in warnings[0], warnings
    for store, said in ((f"sqlite:///{not_a_database}", "not an SQLite database"),
                        ("runs/mlflow.db", "is not a tracking URI"),
                        ("ftp://host/runs", "MLflow's UI has no store for 'ftp://'"),
                        ("https://mlflow.example", "is a tracking server")):
        result = CliRunner().invoke(cli, ["ui", "--store", store, "--port", "5999"])
        output = result.output.strip()
        assert result.exit_code == 2 and len(output.splitlines()) == 1, output
        assert output.startswith("copa ui: Invalid value for --store: "), output
        assert said in output, output
    assert not_a_database.read_text() == "hello\n"
    for name, length in (("x" * 501, 501), ("  ", 0)):
        recipe.write_text(base + f"track: {{experiment: '{name}'}}\n")
        with pytest.raises(RecipeError) as caught:
            load_recipe(recipe)
        assert [p.path for p in caught.value.problems] == ["track.experiment"]
        assert f"an experiment name of 1 to 500 characters (got {length})" in \
            caught.value.problems[0].message


def test_report_data_becomes_params_and_metrics() -> None:
    assert flatten({"finetune": {"max_steps": 3, "axolotl": {}}, "arms": ["a"]}) == {
        "finetune.max_steps": "3", "arms": '["a"]'}
    metrics = report_metrics({"arms": {"baseline": {"score": 0.5, "ci95": [0.25, 0.75]},
                                       "combined": {"failed": True, "score": None}},
                              "synergy": {"value": None, "comparable": False},
                              "val": {"scores": {"baseline": 0.4}}})
    assert metrics == {"test/baseline": 0.5, "test/baseline/ci_low": 0.25,
                       "test/baseline/ci_high": 0.75, "val/baseline": 0.4}


# ---- slow: real runs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
                ) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("tracked")
    recipe = write_tiny_recipe(folder, tiny_model_dir)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    messages: list[str] = []
    with tracking_on(uri):
        run = pipeline.run(recipe, run_dir=folder / "run", emit=messages.append)
    return {"uri": uri, "dir": run.dir, "messages": messages}


@pytest.mark.slow
def test_a_run_is_one_mlflow_run_with_params_metrics_and_artifacts(tracked_run: dict) -> None:
    client, runs = runs_in(tracked_run["uri"])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1
    run = top[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    assert params["finetune.max_steps"] == "3" and params["evaluate.metric"] == "label_accuracy"
    report = json.loads((tracked_run["dir"] / "report.json").read_text())
    for arm, data in report["arms"].items():
        assert run.data.metrics[f"test/{arm}"] == pytest.approx(data["score"])
        assert run.data.metrics[f"test/{arm}/ci_low"] == pytest.approx(data["ci95"][0])
    assert run.data.metrics["synergy"] == pytest.approx(report["synergy"]["value"])
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.html", "recipe.json", "predictions", "optimize"} <= names
    predictions = {f.path for f in client.list_artifacts(run.info.run_id, "predictions")}
    assert "predictions/combined.jsonl" in predictions
    # the prompt as sent, for report.html: the adapter's messages for the first test row
    sent = report["prompt_sent"]["combined"]["messages"]
    assert sent[0]["role"] == "system" and sent[-1]["role"] == "user"


@pytest.mark.slow
def test_each_stage_is_a_nested_run_and_axolotl_logs_the_training_curve(
        tracked_run: dict) -> None:
    client, runs = runs_in(tracked_run["uri"])
    top = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    stages = {r.info.run_name: r for r in children(runs, top)}
    assert set(stages) == {"render", "train", "merge", "optimize", "evaluate"}
    assert all(r.info.status == "FINISHED" and "seconds" in r.data.metrics
               for r in stages.values())
    train = stages["train"]
    # written by Axolotl's MLflow integration (HF's MLflowCallback) in the trainer's process
    losses = client.get_metric_history(train.info.run_id, "loss")
    assert len(losses) >= 1 and all(m.value > 0 for m in losses)
    assert "learning_rate" in train.data.params  # the trainer's own arguments
    candidates = client.get_metric_history(stages["optimize"].info.run_id,
                                           "val/combined/candidate")
    assert candidates
    assert not (tracked_run["dir"] / "rendered" / "axolotl.yml").read_text().count("mlflow")


STUDY = """\
recipe: tiny.yaml
grid:
  evaluate.max_tokens: [4, 6]
seeds: [0]
bootstrap: 200
"""


def untrained(recipe: Path) -> Path:
    """The tiny recipe without fine-tuning or prompt optimization: the two base-model arms,
    evaluated only (seconds, not minutes)."""
    text = recipe.read_text().replace("finetune:\n", "finetune:\n  enabled: false\n", 1)
    recipe.write_text(text.replace("optimize:\n", "optimize:\n  enabled: false\n", 1))
    return recipe


@pytest.mark.slow
def test_a_study_is_a_parent_run_with_its_cells_nested(tmp_path: Path,
                                                       tiny_model_dir: Path) -> None:
    """Two cells, evaluation only (the study's logging does not depend on what the cells
    trained; its synergy metrics are checked on hand-made data below)."""
    from copa.study.runner import run_study

    untrained(write_tiny_recipe(tmp_path, tiny_model_dir))
    (tmp_path / "grid.yaml").write_text(STUDY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_on(uri):
        data, results = run_study(tmp_path / "grid.yaml", out_dir=tmp_path / "out",
                                  emit=lambda m: None)
    assert [r["status"] for r in results] == ["finished", "finished"]
    client, runs = runs_in(uri)
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_name for r in top] == ["grid"]
    cells = children(runs, top[0])
    assert sorted(r.data.tags["copa.run_dir"].split("/out/")[1] for r in cells) == [
        "max_tokens=4/seed-0", "max_tokens=6/seed-0"]
    assert all(children(runs, cell) for cell in cells)  # each cell's stages under it
    metrics = top[0].data.metrics
    for cell in data["cells"]:
        name = cell["cell"].replace("=", "_")
        assert metrics[f"{name}/prompt_gain"] == pytest.approx(
            cell["effects"]["prompt_gain"]["value"])
        assert metrics[f"{name}/baseline/ci_low"] == pytest.approx(
            cell["arms"]["baseline"]["ci95"][0])
    assert "study.html" in {f.path for f in client.list_artifacts(top[0].info.run_id)}


def test_a_variable_set_for_a_block_is_as_it_was_after_it_even_on_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What hands the train stage's and a study's MLflow run to their child processes."""
    monkeypatch.delenv("COPA_TEST_VAR", raising=False)
    with environ_set("COPA_TEST_VAR", "inner"):
        assert os.environ["COPA_TEST_VAR"] == "inner"
    assert "COPA_TEST_VAR" not in os.environ
    monkeypatch.setenv("COPA_TEST_VAR", "outer")
    with pytest.raises(RuntimeError), environ_set("COPA_TEST_VAR", "inner"):
        raise RuntimeError
    assert os.environ["COPA_TEST_VAR"] == "outer"
    with environ_set("COPA_TEST_VAR", None):  # None: left as it is
        assert os.environ["COPA_TEST_VAR"] == "outer"
    assert os.environ["COPA_TEST_VAR"] == "outer"


def test_a_study_cells_synergy_and_interaction_become_metrics() -> None:
    from copa.track import study_metrics

    effect = {"value": 0.1, "ci95": [-0.05, 0.2], "excludes_zero": False}
    data = {"cells": [{"cell": "lr=0.001", "arms": {"combined": {"mean": 0.9,
                                                                  "ci95": [0.8, 1.0]}},
                       "effects": {"synergy": effect, "interaction": {**effect, "value": 0.3},
                                   "finetune_gain": {"value": None, "comparable": False}}}]}
    assert study_metrics(data) == {
        "lr_0.001/combined": 0.9, "lr_0.001/combined/ci_low": 0.8,
        "lr_0.001/combined/ci_high": 1.0, "lr_0.001/synergy": 0.1,
        "lr_0.001/synergy/ci_low": -0.05, "lr_0.001/synergy/ci_high": 0.2,
        "lr_0.001/interaction": 0.3, "lr_0.001/interaction/ci_low": -0.05,
        "lr_0.001/interaction/ci_high": 0.2}


def test_recipe_keys_mlflow_would_refuse_are_logged_under_names_it_takes(tmp_path: Path) -> None:
    """A user's optimize.params or finetune.axolotl key becomes a param name: past 250
    characters, with characters MLflow refuses, or a path ('a//b', 'x/') it refused the whole
    batch, and the run went on untracked ('store not usable'). Now each is logged, apart."""
    from copa.track import Tracker

    long_key = "optimize.params." + "k" * 300
    params = {long_key: "1", "finetune.axolotl.a$b": "2", "finetune.axolotl.a%b": "3",
              "optimize.params.a//b": "4", "optimize.params.x/": "5", "data.columns.tür": "6",
              "task.name": "7"}
    warnings: list[str] = []
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", emit=warnings.append)
    tracker.open("exp", "run", params, {})
    assert tracker.on and not warnings, warnings
    logged = tracker.client.get_run(tracker.run_id).data.params
    assert sorted(logged.values()) == ["1", "2", "3", "4", "5", "6", "7"]
    assert logged["task.name"] == "7" and logged["data.columns.tür"] == "6"  # kept as they were
    assert all(len(name) <= 250 for name in logged)
    assert any(name.startswith("optimize.params.kkk") for name in logged)


@pytest.mark.slow
def test_a_tracking_server_that_does_not_answer_is_one_warning(tmp_path: Path,
                                                               tiny_model_dir: Path) -> None:
    recipe = untrained(write_tiny_recipe(tmp_path, tiny_model_dir))
    messages: list[str] = []
    with tracking_on("http://127.0.0.1:9"):  # nothing listens on the discard port
        run = pipeline.run(recipe, run_dir=tmp_path / "run", emit=messages.append)
    warnings = [m for m in messages if "tracking" in m]
    assert len(warnings) == 1 and warnings[0].startswith("warning: tracking: MLflow store "
                                                         "http://127.0.0.1:9 is not usable")
    assert (run.dir / "report.json").is_file()
    stages = json.loads((run.dir / "manifest.json").read_text())["stages"]
    assert all(entry["status"] == "done" for entry in stages.values())


def test_copa_ui_runs_mlflow_ui_on_loopback_on_the_store(tmp_path: Path) -> None:
    """The command line only: a test that starts MLflow's server took 70-230 s on this
    shared machine (four uvicorn imports), too much for the suite; it was run by hand."""
    from copa.track.store import ui_command_line

    command, uri = ui_command_line(f"sqlite:///{tmp_path / 'm.db'}", 5001)
    assert command[1:4] == ["-m", "mlflow", "ui"]
    assert command[command.index("--backend-store-uri") + 1] == uri == \
        f"sqlite:///{tmp_path / 'm.db'}"
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "5001"
    with tracking_on("off"):  # no --store, tracking off: still the default store
        assert ui_command_line(None, 5000)[1] == store_uri(True, {})
