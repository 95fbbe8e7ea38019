"""The recipe's track: section: where copa records runs for MLflow (copa.track does it)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from copa.recipe.data_schema import Section

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
        return value.strip()


def track_value(value: Any) -> Any:
    """`track: false` / `track: true` as the section (one section type: one error line)."""
    if isinstance(value, bool):
        return {"enabled": value}
    if value is None or isinstance(value, dict) or isinstance(value, TrackSection):
        return {} if value is None else value
    raise ValueError(f"write 'track: false' (off) or a mapping such as "
                     f"'track: {{mlflow: {DEFAULT_STORE}}}' (got {value!r})")
