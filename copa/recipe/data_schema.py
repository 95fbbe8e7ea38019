"""The recipe's data-side sections: where rows come from (`data:`) and what a program retrieves
(`retrieve:`). Split from copa.recipe.schema, which holds the rest of a recipe."""

from __future__ import annotations

import math
import re
import typing
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from copa.recipe.values import ADDED_LATER
from copa.registry import LOADERS

USER_CODE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")


def _is_number_type(annotation: Any) -> bool:
    """int, float, their Optional, or a Literal of numbers (not a field that also takes bool)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return bool(args) and all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                  for a in args)
    if args:
        return bool not in args and any(_is_number_type(a) for a in args if a is not type(None))
    return annotation in (int, float)


class Section(BaseModel):
    """A recipe section: unknown keys are errors, defaults are checked too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_flag_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for a number: `lora_r: true` would train with rank 1
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _is_number_type(field.annotation):
            raise ValueError(f"{str(value).lower()} is a yes/no value; this key takes a number")
        return value


class SplitSizes(Section):
    train: int | float = 0.6
    val: int | float = 0.1
    test: int | float = 0.3
    seed: int = 0

    @field_validator("train", "val", "test")
    @classmethod
    def _positive(cls, value: int | float) -> int | float:
        if not math.isfinite(value) or value > 2**31 - 1:
            raise ValueError(f"must be a finite row count or fraction (got {value!r})")
        if value <= 0:
            raise ValueError("must be > 0 (a row count, or a fraction below 1)")
        if isinstance(value, float) and value >= 1 and not value.is_integer():
            raise ValueError("a fraction must be below 1; write a whole number for a row count")
        if isinstance(value, float) and value == 1.0:  # "all the rows" is no split
            raise ValueError("1.0 reads as one row, not all of them: write 1 for one row, or a "
                             "fraction below 1 for a share of the rows")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        if not 0 <= value <= 2**32 - 1:
            raise ValueError(f"must be a whole number from 0 to {2**32 - 1} (got {value})")
        return value


class DataSection(Section):
    source: str = Field(
        ...,
        description="A file (csv, jsonl, json, parquet), 'sklearn:iris', or 'hf:<dataset name>'.",
    )
    format: Literal["auto", "csv", "jsonl", "json", "parquet"] = "auto"
    loader: str | None = Field(
        None, json_schema_extra=ADDED_LATER,
        description="How rows come out of a nested file: " + ", ".join(
            f"'{name}' ({entry.help})" for name, entry in LOADERS.items()) + ", or a user "
        "function 'package.module:function' called as function(path, **loader_options) -> "
        "list of dicts.")
    loader_options: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra=ADDED_LATER,
        description="".join(
            f"{name}: {entry.options_help}; " for name, entry in LOADERS.items())
        + "a user loader gets them as keyword arguments.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="signature field -> column name in the data."
    )
    splits: SplitSizes = Field(default_factory=SplitSizes)
    test_source: str | None = Field(
        None, description="Optional separate file for the test split (e.g. a dataset's test.csv)."
    )
    group_by: str | None = Field(
        None, json_schema_extra=ADDED_LATER,
        description="A column whose rows stay together in one split (e.g. 'title' for a "
        "SQuAD article, 'context' for a paragraph), so no group is in both train and test.")
    answers_column: str | None = Field(
        None, json_schema_extra=ADDED_LATER,
        description="A column listing every accepted answer (SQuAD's 'answers'): squad_em "
        "/ squad_f1 score the best match over them and RAG recall@k looks for any of them.")
    stratify: bool = True
    dedupe: bool = True
    filter_labels: list[str] | None = Field(
        None, description="Keep only rows whose output value is one of these."
    )
    max_file_mb: int = 512

    @field_validator("filter_labels")
    @classmethod
    def _filter_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an empty list keeps no row: write null to keep every label")
        return value

    @field_validator("loader")
    @classmethod
    def _loader(cls, value: str | None) -> str | None:
        if value is not None and value not in LOADERS and not USER_CODE.match(value):
            raise ValueError(f"unknown loader {value!r}: use {' or '.join(LOADERS)}, "
                             "or a user function 'package.module:function'")
        return value

    @model_validator(mode="after")
    def _loader_options(self) -> DataSection:
        entry = LOADERS.get(self.loader or "")
        if self.loader_options and self.loader is None:
            raise ValueError("loader_options need a loader: set data.loader")
        if entry is None:
            return self  # a user loader takes what it takes
        allowed = entry.options
        for key, value in self.loader_options.items():
            if key not in allowed:
                raise ValueError(f"loader_options.{key}: the {self.loader} loader takes "
                                 f"{', '.join(allowed)}")
            kind = allowed[key]
            if isinstance(kind, tuple) and value not in kind:
                raise ValueError(f"loader_options.{key}: write one of {', '.join(kind)} "
                                 f"(got {value!r})")
            if kind is str and not isinstance(value, str):
                raise ValueError(f"loader_options.{key}: must be text (got {value!r})")
        return self


class RetrieveSection(Section):
    """Retrieval-augmented answering: k passages for each question, from a corpus."""

    corpus: str = Field(..., description="The passages: a csv / jsonl / json / parquet file "
                        "(one passage per row, in text_column) or a SQuAD file (its paragraphs).")
    format: Literal["auto", "csv", "jsonl", "json", "parquet", "squad"] = Field(
        "auto", description="auto: by the file's suffix, and a JSON file in SQuAD layout gives "
        "its paragraphs.")
    text_column: str = Field("text", description="The column holding a passage's text "
                             "(tables only).")
    k: int = Field(3, description="Passages retrieved per question.")
    retriever: Literal["bm25"] = Field("bm25", description="bm25: lexical BM25 (bm25s).")
    query: str | None = Field(None, description="The input field searched for (default: the "
                              "signature's first input).")
    field: str = Field("passages", description="The input field the passages fill, put before "
                       "the signature's inputs; templates see it as a list of texts.")

    @field_validator("k")
    @classmethod
    def _k(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1 (got {value})")
        return value
