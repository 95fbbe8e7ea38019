"""The recipe schema: typed, strict sections (unknown keys are errors, values are checked).

Loading, `${VAR}` interpolation and error messages live in `copa.recipe`.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from copa.metrics import indistinguishable
from copa.models import EMBEDDED
from copa.recipe.data_schema import (  # noqa: F401 - the data sections are part of the schema
    USER_CODE,
    DataSection,
    RetrieveSection,
    Section,
    SplitSizes,
)
from copa.recipe.finetune_schema import (  # noqa: F401 - the finetune sections are part of it
    DEMO_WORDS,
    MAX_DEMOS,
    DemoDistribution,
    DistributedSection,
    EarlyStoppingSection,
    FinetuneEvalSection,
    FinetuneSection,
    check_metric_name,
)
from copa.recipe.serve_schema import (  # noqa: F401 - the serve sections are part of the schema
    ModelRef,
    ServedModel,
    ServeModels,
    ServeSection,
)
from copa.recipe.track_schema import TrackSection, track_value
from copa.recipe.values import (  # noqa: F401 - the ranges and names are part of the schema
    ADDED_LATER,
    DSPY_MEMBERS,
    FIELD_NAME,
    MAX_COUNT,
    MAX_SEED,
    MAX_THREADS,
    MAX_TOKENS,
    TEMPLATE_VARIABLES,
    bounded,
    field_name_problem,
    number_format_checked,
)
from copa.registry import METRICS, RECIPE_ARMS

MODEL_ALIASES = tuple(EMBEDDED)  # the models that ship inside PyPI packages
ARMS = RECIPE_ARMS  # the arms a recipe may name (copa.registry.ARMS)
BUILTIN_METRICS = tuple(METRICS)
DEFAULT_STRATEGY = "w -> p"  # copa's own pipeline: fine-tune, then prompts on the merged model


# What may name a run, a study or a starter recipe: it names a folder (and a file).
# (\Z, not $: "$" also matches before a final newline, and "iris\n" named a folder.)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class Problem(BaseModel):
    """One thing wrong with a recipe, located by file and dotted key path."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}: {where}{self.message}"


class RecipeError(Exception):
    """A recipe (or something it names) is unusable; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


_Section = Section


class ModelSection(_Section):
    base: str = Field(
        "smollm2-135m-instruct",
        description="An embedded model (smollm2-135m-instruct, gemma3-270m), a local HF "
                    "model dir, a .gguf file or a hub id.",
    )
    trust_remote_code: bool = False


class TaskSection(_Section):
    signature: str = Field(..., description="DSPy signature, e.g. 'text -> label'.")
    instructions: str = ""
    module: Literal["predict", "chain_of_thought"] | str = "predict"
    choices: list[str] | None = None

    @field_validator("signature")
    @classmethod
    def _signature_shape(cls, value: str) -> str:
        parse_signature(value)
        return value

    @field_validator("module")
    @classmethod
    def _module_name(cls, value: str) -> str:
        if value not in ("predict", "chain_of_thought") and not USER_CODE.match(value):
            raise ValueError(
                "must be 'predict', 'chain_of_thought' or a user module 'package.module:Class'"
            )
        return value

    @field_validator("choices")
    @classmethod
    def _choices_unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if len(value) < 2:
                raise ValueError("needs at least two choices (or leave it out)")
            if len(set(value)) != len(value):
                raise ValueError("choices must be unique")
            for choice in value:  # a label the model must write, on one line, as the data has it
                if not choice.strip():
                    raise ValueError(f"{choice!r} is blank: no answer can be scored as it")
                if choice != choice.strip():
                    raise ValueError(f"{choice!r} has spaces around it: write it without "
                                     "them, and the data's labels too")
                if "\n" in choice or "\r" in choice:
                    raise ValueError(f"{choice!r} spans lines; a choice is one line (the scorer "
                                     "reads the answer's first line)")
            same = indistinguishable(value)
            if same and unicodedata.normalize("NFC", same[0]) == unicodedata.normalize(
                    "NFC", same[1]):  # they look the same: show the code points
                raise ValueError(f"{ascii(same[0])} and {ascii(same[1])} are one label in two "
                                 "Unicode forms (composed and decomposed): keep one")
            if same:
                raise ValueError(
                    f"{same[0]!r} and {same[1]!r} are one label to the scorer (it ignores case, "
                    "Unicode composition, surrounding quotes, brackets and '*', and trailing "
                    ".,;:!?), so no answer could tell them apart: rename one")
        return value

    @property
    def input_fields(self) -> list[str]:
        return parse_signature(self.signature)[0]

    @property
    def output_fields(self) -> list[str]:
        return parse_signature(self.signature)[1]


class PromptSection(_Section):
    template: str = Field("prompts/default.jinja", description="Jinja prompt template file.")
    number_format: str | None = Field(
        None, description="Python format spec for input values that are numbers (JSON / "
        "YAML numbers, CSV cells that are plain decimals), e.g. '.1f'; outputs keep the data's "
        "text.")

    @field_validator("number_format")
    @classmethod
    def _number_format(cls, value: str | None) -> str | None:
        return value if not value else number_format_checked(value)


class OptimizeSection(_Section):
    enabled: bool = True
    optimizer: str = Field(
        "BootstrapFewShotWithRandomSearch",
        description="A DSPy optimizer class name (dspy.<Name>) or 'package.module:Class'.",
    )
    params: dict[str, Any] = Field(default_factory=dict)
    order: Literal["w->p", "p->w"] = "w->p"
    strategy: str = Field(
        DEFAULT_STRATEGY, json_schema_extra=ADDED_LATER,
        description="'w -> p': copa's own pipeline; any other BetterTogether "
        "strategy ('p -> w', 'p -> w -> p') runs BetterTogether with the recipe's optimizer as "
        "'p' and BootstrapFinetune through Axolotl as 'w'.")
    guard: bool = Field(
        True,
        description="Keep the plain program if prompt optimization does not beat it on val.",
    )
    guard_margin: float = Field(
        0.0, json_schema_extra=ADDED_LATER,
        description="How much more than the plain program a prompt-optimized one must score on "
                    "val to be kept, in the metric's units (0.05 = 5 points; 0: any gain).",
    )
    adapter: Literal["template", "chat"] = "template"
    num_threads: int = 8
    proposer: ModelRef = Field(
        None, description="The model that writes instructions / reflections (MIPROv2 "
        "prompt_model, GEPA reflection_lm): base | merged | model | {engine: openai, ...}.")
    teacher: ModelRef = Field(
        None, description="The model that bootstraps demos (BootstrapFewShot* teacher).")
    max_tokens: int = Field(
        512, ge=16,
        description="Token budget of the optimizer's own generations (instruction proposals, "
                    "GEPA's reflections), apart from the task's answer length.",
    )

    @field_validator("num_threads")
    @classmethod
    def _threads(cls, value: int) -> int:
        return bounded(value, 1, MAX_THREADS)

    @field_validator("max_tokens")
    @classmethod
    def _budget(cls, value: int) -> int:
        return bounded(value, 16, MAX_TOKENS)

    @field_validator("guard_margin")
    @classmethod
    def _margin(cls, value: float) -> float:
        if math.isfinite(value) and value >= 1.0:
            raise ValueError(f"must be below 1 (got {value}): scores are fractions, 0.05 = 5 "
                             "points")
        return bounded(value, 0.0, 1.0, hint="0.05 = 5 points of the metric; 0: any gain")

    @field_validator("params")
    @classmethod
    def _params_seed(cls, value: dict[str, Any]) -> dict[str, Any]:
        seed = value.get("seed")  # the optimizer's seed (a study sets it per cell)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED} (got {seed!r})")
        return value

    @field_validator("optimizer")
    @classmethod
    def _name(cls, value: str) -> str:
        if not (FIELD_NAME.match(value) or USER_CODE.match(value)):
            raise ValueError("must be a DSPy optimizer name such as 'MIPROv2' or 'pkg.mod:Class'")
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        return normalize_strategy(value)

    @model_validator(mode="after")
    def _margin_needs_the_guard(self) -> OptimizeSection:
        if self.guard_margin and not self.guard:
            raise ValueError("guard_margin is the val guard's margin, and guard is false (the "
                             "optimizer's pick is kept whatever val says): drop guard_margin, "
                             "or write guard: true")
        return self


class EvaluateSection(_Section):
    metric: str = "exact_match"
    arms: list[Literal[RECIPE_ARMS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(ARMS)
    )
    bootstrap: int = 1000
    max_tokens: int = 64
    num_threads: int = 8
    max_errors: int = Field(
        0, description="Failed calls (the engine or server raised) one arm, or one candidate on "
        "val, may have before the stage fails; those within it score 0 and are counted in the "
        "report. An answer that does not parse is a wrong answer, not a failed call.")

    @field_validator("max_errors")
    @classmethod
    def _max_errors(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value}); 0 fails on the first failed call")
        return bounded(value, 0, MAX_COUNT)

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap(cls, value: int) -> int:
        return bounded(value, 10, 1_000_000, hint="1000 resamples is usual")

    @field_validator("max_tokens")
    @classmethod
    def _budget(cls, value: int) -> int:
        return bounded(value, 1, MAX_TOKENS, hint="the longest answer, in tokens, e.g. 64")

    @field_validator("num_threads")
    @classmethod
    def _threads(cls, value: int) -> int:
        return bounded(value, 1, MAX_THREADS)

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        return check_metric_name(value)

    @field_validator("arms")
    @classmethod
    def _arms(cls, value: list[str]) -> list[str]:
        return named_arms(value)


class Recipe(_Section):
    name: str
    model: ModelSection = Field(default_factory=ModelSection)
    task: TaskSection
    data: DataSection
    retrieve: RetrieveSection | None = None
    prompt: PromptSection = Field(default_factory=PromptSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    optimize: OptimizeSection = Field(default_factory=OptimizeSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    # MLflow tracking (copa.track): on by default, a local store; false turns it off
    track: TrackSection = Field(default_factory=TrackSection)
    run_dir: str | None = Field(None, description="Where runs go; default runs/<name>.")

    # Where the recipe was read from; not part of the YAML.
    source_path: Path | None = Field(None, exclude=True)

    @field_validator("track", mode="before")
    @classmethod
    def _track(cls, value: Any) -> Any:
        return track_value(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("use letters, digits, '-', '_' or '.' (it names the run folder)")
        return value

    @property
    def base_dir(self) -> Path:
        return self.source_path.parent if self.source_path else Path.cwd()

    def resolve(self, value: str) -> Path:
        """A path from the recipe, relative to the recipe file's folder."""
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (self.base_dir / path)


def named_arms(value: list[str]) -> list[str]:
    """A list of arms as a recipe or study names them: at least one, each once."""
    if not value:
        raise ValueError(f"name at least one arm of {', '.join(ARMS)}")
    return list(dict.fromkeys(value))


def normalize_strategy(strategy: str) -> str:
    """'p->w ->p' -> 'p -> w -> p' (BetterTogether splits on ' -> '); raises ValueError."""
    steps = [step.strip() for step in str(strategy).split("->")]
    if not all(step in ("p", "w") for step in steps) or "w" not in steps:
        raise ValueError(f"{strategy!r} is not a strategy: write steps 'p' (prompts) and 'w' "
                         "(weights) joined by '->', with at least one 'w', e.g. 'p -> w -> p'")
    return " -> ".join(steps)


def parse_signature(signature: str) -> tuple[list[str], list[str]]:
    """'a, b -> c' -> (['a', 'b'], ['c']); raises ValueError with the fix."""
    if signature.count("->") != 1:
        raise ValueError("write it as 'input1, input2 -> output', with exactly one '->'")
    left, right = (side.strip() for side in signature.split("->"))
    for side in (left, right):  # 'a,, b' or 'a, b,' would drop a field without a word
        if "," in side and not all(f.strip() for f in side.split(",")):
            raise ValueError(f"'{side}': an empty field between commas; remove the extra ','")
    fields = [f.strip() for f in left.split(",") + right.split(",") if f.strip()]
    for field in fields:  # DSPy's `name: type`; copa's fields are text, read as text
        name, _, kind = field.partition(":")
        if kind.strip() not in ("", "str"):
            raise ValueError(f"'{field}': copa's fields are text (the prompt shows them, the "
                             f"metric reads the answer as text), so a type other than str is "
                             f"not used: write '{name.strip()}'")
    inputs = [f.strip().split(":")[0].strip() for f in left.split(",") if f.strip()]
    outputs = [f.strip().split(":")[0].strip() for f in right.split(",") if f.strip()]
    if not inputs or not outputs:
        raise ValueError("needs at least one input and one output field, e.g. 'text -> label'")
    for name in inputs + outputs:
        problem = field_name_problem(name)
        if problem:
            raise ValueError(problem)
    if len(set(inputs + outputs)) != len(inputs) + len(outputs):
        raise ValueError("field names must be unique")
    return inputs, outputs
