"""The recipe's track: section: where copa records runs for MLflow (copa.track does it)."""

from __future__ import annotations

from pydantic import Field, field_validator

from copa.recipe.data_schema import Section

DEFAULT_STORE = "sqlite:///runs/mlflow.db"  # relative to the folder copa runs in (as MLflow)


class TrackSection(Section):
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
        return value.strip()
