"""The recipe's track: section: where copa records runs for MLflow (copa.track does it)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from copa.recipe.data_schema import Section

MAX_EXPERIMENT_CHARS = 500  # MLflow's limit
DEFAULT_STORE = "sqlite:///runs/mlflow.db"  # relative to the folder copa runs in (as MLflow)


class TrackSection(Section):
    enabled: bool = True
    mlflow: str = Field(
        DEFAULT_STORE, description="MLflow tracking URI: a local sqlite:/// store (default "
        "runs/mlflow.db, no server needed) or a tracking server's http(s):// address. The "
        "COPA_TRACK environment variable overrides it ('off' turns tracking off).")
    experiment: str | None = Field(
        None, description="MLflow experiment (default: the recipe's name; a study's cells go "
        "into the study's).")

    @field_validator("mlflow")
    @classmethod
    def _uri(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("write a tracking URI, e.g. sqlite:///runs/mlflow.db, or "
                             "'track: false' to turn tracking off")
        problem = uri_problem(value.strip())
        if problem:
            raise ValueError(problem)
        return value.strip()

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, value: str | None) -> str | None:
        # MLflow refuses a name past 500 characters: the run went on untracked, with a warning
        if value is not None and not 0 < len(value.strip()) <= MAX_EXPERIMENT_CHARS:
            raise ValueError(f"an experiment name of 1 to {MAX_EXPERIMENT_CHARS} characters "
                             f"(got {len(value.strip())})")
        return value


# MLflow's stores without '://': Databricks workspaces. A bare path would be MLflow's file store,
# which this MLflow refuses ("in maintenance mode"), in a traceback from `copa ui`.
_NO_SCHEME_STORES = ("databricks", "databricks-uc", "uc")


def uri_problem(uri: str) -> str | None:
    """Why `uri` is no tracking URI copa can use (a bare path, an sqlite:/// naming no file),
    or None: the recipe's track.mlflow, COPA_TRACK and `copa ui --store` are checked alike."""
    if "://" not in uri and uri not in _NO_SCHEME_STORES:
        return (f"{uri[:200]!r} is not a tracking URI: write sqlite:///{uri[:200]} (a local "
                "file) or a tracking server's http(s):// address")
    if uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].strip("/"):
        return f"{uri!r} names no file: write e.g. {DEFAULT_STORE}"
    return None


def track_value(value: Any) -> Any:
    """`track: false` / `track: true` as the section (one section type: one error line)."""
    if isinstance(value, bool):
        return {"enabled": value}
    if value is None or isinstance(value, dict) or isinstance(value, TrackSection):
        return {} if value is None else value
    raise ValueError(f"write 'track: false' (off) or a mapping such as "
                     f"'track: {{mlflow: {DEFAULT_STORE}}}' (got {value!r})")
