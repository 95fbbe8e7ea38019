"""MLflow tracking: one MLflow run per copa run, a nested run per stage that ran, a study as a
parent run with its cells nested. On by default into a local store (sqlite:///runs/mlflow.db:
no server, no network); the recipe's `track:` or the COPA_TRACK environment variable names
another store (a tracking server's URI), `track: false` or COPA_TRACK=off turns it off.

What goes where:
- the copa run: the recipe as params (flattened, dotted keys), every arm's test score and
  interval, the synergy and fine-tune gain, the val scores as metrics; report.json/md/png/html,
  recipe.json, the optimized programs and predictions/ as artifacts;
- the train stage's nested run: Axolotl's own MLflow integration writes the training curves
  and the trainer's arguments into it (the backend adds Axolotl's mlflow_tracking_uri /
  mlflow_experiment_name keys to a copy of the rendered config and hands the nested run's id
  to the trainer as MLFLOW_RUN_ID; the rendered axolotl.yml and the train key are unchanged);
- the optimize stage's nested run: each candidate's val score (step = its rank);
- every stage's nested run: its wall time and content key.

Tracking never fails a run: the first error (a server that does not answer, a store that
cannot be written) is one warning, and the run goes on untracked. MLflow is imported only when
tracking is on (the import and a new sqlite store take seconds: docs/performance.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from copa.track.store import sqlite_path, store_problem, store_uri

PARENT_ENV = "COPA_TRACK_PARENT"  # a study's MLflow run: cells nest under it
TRAIN_ENV = "COPA_MLFLOW_TRAIN"  # what the training backend needs to log into the train run
Emit = Any


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested recipe data as MLflow params: dotted keys, values as text."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = json.dumps(data) if isinstance(data, (list, bool)) or data is None else str(data)
    return {prefix.rstrip("."): text[:6000]}


_BAD = re.compile(r"[^\w./\- :]")
MAX_NAME = 250  # MLflow's limit for a param or metric key


def mlflow_name(name: str, always_tag: bool = False) -> str:
    """A param or metric key MLflow accepts, from any dotted recipe key or cell name: only
    letters, digits, _ - . / space and :, no path that normalizes to another ('a//b', 'a/../b',
    '/a', 'a/'), at most 250 characters (a longer one keeps its start and ends in a hash of the
    whole; always_tag: a hash even when it fits, to tell apart two names made one)."""
    safe = _BAD.sub("_", name)
    if posixpath.normpath(safe) != safe or safe.startswith(("/", "..")) or safe in ("", "."):
        safe = safe.replace("/", "_") or "_"
    if len(safe) <= MAX_NAME and not always_tag:
        return safe
    tag = "-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return safe[:MAX_NAME - len(tag)] + tag


def mlflow_params(params: Mapping[str, str]) -> dict[str, str]:
    """Params under names MLflow accepts; two keys made one name keep apart by their hashes
    (MLflow refuses a batch that names a key twice)."""
    names: dict[str, list[str]] = {}
    for key in params:
        names.setdefault(mlflow_name(key), []).append(key)
    return {mlflow_name(key, always_tag=len(keys) > 1): params[key]
            for keys in names.values() for key in keys}


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """report.json's results as MLflow metrics: test/<arm> and its ci_low / ci_high, the
    effects likewise, val/<arm>."""
    out: dict[str, float] = {}
    for arm, data in (report.get("arms") or {}).items():
        if data.get("failed") or data.get("score") is None:
            continue
        out[f"test/{arm}"] = float(data["score"])
        if data.get("ci95"):
            out[f"test/{arm}/ci_low"], out[f"test/{arm}/ci_high"] = map(float, data["ci95"])
    for name in ("synergy", "finetune_gain"):
        entry = report.get(name) or {}
        if entry.get("value") is not None:
            out[name] = float(entry["value"])
            out[f"{name}/ci_low"], out[f"{name}/ci_high"] = map(float, entry["ci95"])
    for arm, score in ((report.get("val") or {}).get("scores") or {}).items():
        if score is not None:
            out[f"val/{arm}"] = float(score)
    return out


def study_metrics(data: Mapping[str, Any]) -> dict[str, float]:
    """study.json's cells as metrics: <cell>/<arm>, <cell>/<effect> and their intervals."""
    out: dict[str, float] = {}
    for cell in data.get("cells") or []:
        name = mlflow_name(cell["cell"])
        for arm, entry in (cell.get("arms") or {}).items():
            out[f"{name}/{arm}"] = float(entry["mean"])
            out[f"{name}/{arm}/ci_low"], out[f"{name}/{arm}/ci_high"] = map(float,
                                                                            entry["ci95"])
        for effect, entry in (cell.get("effects") or {}).items():
            if entry.get("value") is None:
                continue
            out[f"{name}/{effect}"] = float(entry["value"])
            out[f"{name}/{effect}/ci_low"], out[f"{name}/{effect}/ci_high"] = map(
                float, entry["ci95"])
    return out


class Tracker:
    """An MLflow run and its nested runs, written through MlflowClient (explicit run ids: no
    global active run to leak between runs, cells or threads). Every call is guarded."""

    def __init__(self, uri: str | None, emit: Emit = print):
        self.uri = uri
        self.emit = emit
        self.client: Any = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.stage_runs: dict[str, str] = {}

    @property
    def on(self) -> bool:
        return self.uri is not None

    def _failed(self, exc: BaseException) -> None:
        self.emit(f"warning: tracking: MLflow store {self.uri} is not usable "
                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
                  f"; this run goes on untracked (track: false or COPA_TRACK=off turns "
                  "tracking off)")
        self.uri = None

    def _call(self, what: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.on:
            return None
        try:
            return what(*args, **kwargs)
        except Exception as exc:  # tracking never fails a run
            self._failed(exc)
            return None

    # ---- opening ------------------------------------------------------------------------------

    def _connect(self) -> None:
        problem = store_problem(self.uri)
        if problem:  # said at once: MLflow retries an sqlite file it cannot open for minutes
            raise ValueError(problem)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a dead server: seconds
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if self.uri.startswith(("http://", "https://")):
            _probe(self.uri)
        import logging

        for name in ("mlflow", "alembic"):  # its INFO lines ("Creating ...") are not copa's
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        path = sqlite_path(self.uri)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        path = sqlite_path(self.uri)  # a local store keeps its files next to it
        where = (path.parent / "mlartifacts").as_uri() if path is not None else None
        return self.client.create_experiment(name, artifact_location=where)

    def open(self, experiment: str, name: str, params: Mapping[str, str],
             tags: Mapping[str, str], parent: str | None = None) -> None:
        """Connect and create the run (nested under `parent`, a run id, when given)."""
        def create() -> None:
            self._connect()
            self.experiment_id = (self.client.get_run(parent).info.experiment_id if parent
                                  else self._experiment(experiment))
            all_tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
            run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
            self.run_id = run.info.run_id
            self._params(self.run_id, params)

        self._call(create)

    def _params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in mlflow_params(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[i:i + 100])

    # ---- writing ------------------------------------------------------------------------------

    def metrics(self, values: Mapping[str, float], run_id: str | None = None,
                step: int = 0) -> None:
        def log() -> None:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            items = [Metric(mlflow_name(k), float(v), stamp, step) for k, v in values.items()]
            for i in range(0, len(items), 500):
                self.client.log_batch(run_id or self.run_id, metrics=items[i:i + 500])

        if values and (run_id or self.run_id):
            self._call(log)

    def artifacts(self, paths: list[Path], folder: str | None = None,
                  run_id: str | None = None) -> None:
        def log() -> None:
            for path in paths:
                if path.is_dir():
                    self.client.log_artifacts(run_id or self.run_id, str(path),
                                              folder or path.name)
                elif path.is_file():
                    self.client.log_artifact(run_id or self.run_id, str(path), folder)

        if self.run_id:
            self._call(log)

    def close(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._call(self.client.set_terminated, self.run_id, status)

    @contextmanager
    def stage(self, name: str, key: str | None = None) -> Iterator[None]:
        """A stage's nested run around its work. The train stage's run id (with the store and
        experiment) goes to the training backend through TRAIN_ENV."""
        if not (self.on and self.run_id):
            yield
            return
        run = self._call(self.client.create_run, self.experiment_id, run_name=name,
                         tags={"mlflow.parentRunId": self.run_id, "copa.stage": name,
                               "copa.stage_key": key or ""})
        if run is None:
            yield
            return
        stage_id = run.info.run_id
        self.stage_runs[name] = stage_id
        experiment = self._call(self.client.get_experiment, self.experiment_id)
        train = (json.dumps({"uri": self.uri, "run_id": stage_id, "experiment": experiment.name})
                 if name == "train" and experiment is not None else None)
        start, status = time.time(), "FAILED"
        try:
            with environ_set(TRAIN_ENV, train):
                yield
            status = "FINISHED"
        finally:
            self.metrics({"seconds": time.time() - start}, stage_id)
            if self.on:
                self._call(self.client.set_terminated, stage_id, status)


@contextmanager
def environ_set(name: str, value: str | None) -> Iterator[None]:
    """The environment variable `name` set to value around a block (left as it is when value
    is None), and as it was before afterwards: what a stage's or a study's child processes
    read to find their MLflow run."""
    saved = os.environ.get(name)
    if value:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _probe(uri: str) -> None:
    """A tracking server that does not answer within seconds fails here, once, instead of in
    MLflow's retries (minutes)."""
    import urllib.request

    with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
        response.read(64)


# ---- a copa run ----------------------------------------------------------------------------------

RUN_ARTIFACTS = ("report.json", "report.md", "report.png", "report.html", "recipe.json",
                 "manifest.json")


def log_results(tracker: Tracker, run_dir: Path) -> None:
    """What a finished (or partly finished) run left: metrics from report.json, the optimize
    stage's candidates, the files as artifacts."""
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except ValueError:
            report = {}
        tracker.metrics(report_metrics(report))
    optimize = run_dir / "optimize" / "optimize.json"
    if optimize.is_file() and "optimize" in tracker.stage_runs:
        try:
            info = json.loads(optimize.read_text())
        except ValueError:
            info = {}
        for arm, entry in info.items():
            for rank, candidate in enumerate(entry.get("candidates") or []):
                if candidate.get("val_score") is not None:
                    tracker.metrics({f"val/{arm}/candidate": candidate["val_score"]},
                                    tracker.stage_runs["optimize"], step=rank)
            for name, score in (entry.get("val_scores") or {}).items():
                if score is not None:
                    tracker.metrics({f"val/{arm}/{name}": score}, tracker.stage_runs["optimize"])
    tracker.artifacts([run_dir / name for name in RUN_ARTIFACTS])
    tracker.artifacts([run_dir / "predictions"], "predictions")
    programs = sorted((run_dir / "optimize").glob("*.json")) if (run_dir / "optimize").is_dir() \
        else []
    tracker.artifacts(programs, "optimize")


@contextmanager
def tracking(run: Any) -> Iterator[Tracker]:
    """Around a copa run's stages: the MLflow run (nested under a study's, if COPA_TRACK_PARENT
    names one), its results and files logged at the end, FAILED if a stage raised."""
    from copa.recipe import recipe_to_write

    recipe = run.recipe
    tracker = Tracker(store_uri(recipe.track), run.emit)
    if not tracker.on:
        yield tracker
        return
    experiment = getattr(recipe.track, "experiment", None) or recipe.name
    tracker.open(experiment, run.dir.name if os.environ.get(PARENT_ENV) else recipe.name,
                 flatten(recipe_to_write(recipe)),
                 {"copa.run_dir": str(run.dir), "copa.recipe": str(recipe.source_path or ""),
                  "mlflow.source.name": "copa"},
                 parent=os.environ.get(PARENT_ENV) or None)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        log_results(tracker, run.dir)
        tracker.close(status)
        if tracker.on and tracker.run_id:
            run.emit(f"tracked: MLflow run {tracker.run_id} in {tracker.uri} (copa ui)")


@contextmanager
def study_tracking(name: str, track: Any, study_dir: Path, params: Mapping[str, str],
                   emit: Emit = print) -> Iterator[Tracker]:
    """A study's parent run: its cells (run meanwhile, in this process or in Ray workers that
    get COPA_TRACK_PARENT) nest under it; study_results logs the aggregate."""
    tracker = Tracker(store_uri(track), emit)
    if not tracker.on:
        yield tracker
        return
    tracker.open(getattr(track, "experiment", None) or name, name, params,
                 {"copa.study_dir": str(study_dir), "mlflow.source.name": "copa study"})
    status = "FAILED"
    try:
        with environ_set(PARENT_ENV, tracker.run_id):
            yield tracker
        status = "FINISHED"
    finally:
        tracker.close(status)


def study_results(tracker: Tracker, study_dir: Path, data: Mapping[str, Any]) -> None:
    tracker.metrics(study_metrics(data))
    tracker.artifacts([Path(study_dir) / f"study.{ext}" for ext in ("json", "md", "png", "html")])
