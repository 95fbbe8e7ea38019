"""The recipe schema: typed, strict sections (unknown keys are errors, values are checked).

Loading, `${VAR}` interpolation and error messages live in `copa.recipe`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from copa.models import EMBEDDED
from copa.recipe.data_schema import (  # noqa: F401 - the data sections are part of the schema
    USER_CODE,
    DataSection,
    RetrieveSection,
    Section,
    SplitSizes,
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
        None, description="Python format spec applied to float inputs, e.g. '.1f'."
    )

    @field_validator("number_format")
    @classmethod
    def _number_format(cls, value: str | None) -> str | None:
        return value if not value else number_format_checked(value)


class DistributedSection(_Section):
    processes: int = 1
    backend: Literal["none", "deepspeed", "fsdp"] = "none"
    zero_stage: Literal[1, 2, 3] = 2
    launcher: Literal["accelerate", "torchrun"] = "accelerate"

    @field_validator("processes")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return bounded(value, 1, 1024)


class FinetuneEvalSection(_Section):
    """finetune.eval: the val split scored with the task metric while the model trains."""

    every: int = Field(..., description="Score val every N optimizer steps (and at the last).")
    metric: str | None = Field(None, description="Default: evaluate.metric.")

    @field_validator("every")
    @classmethod
    def _every(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1 step (got {value})")
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str | None) -> str | None:
        return None if value is None else check_metric_name(value)


class EarlyStoppingSection(_Section):
    """finetune.early_stopping: stop when val has not improved for `patience` evaluations;
    the best evaluated checkpoint is the one merged."""

    patience: int = Field(3, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="What counts as an improvement, in the "
                             "metric's units (0.02 = 2 points); 0: any gain.")

    @field_validator("patience")
    @classmethod
    def _patience(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1 evaluation (got {value})")
        return value


DEMO_WORDS = ("none", "fixed", "program")
MAX_DEMOS = 16


class DemoDistribution(_Section):
    """finetune.demos as a distribution: every training row gets k demos, k drawn per row from
    [lo, hi]; `random` draws other train rows, `retrieved` takes the row's nearest train rows
    (BM25 over the input fields). Either way never the row itself, never a val or test row."""

    k: tuple[int, int]
    pick: Literal["random", "retrieved"] = "random"

    @field_validator("k", mode="before")
    @classmethod
    def _range(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"write k: [lo, hi] (two whole numbers) or k: N (got {value!r})")
        lo, hi = value
        if not 0 <= lo <= hi <= MAX_DEMOS or hi == 0:
            raise ValueError(f"needs 0 <= lo <= hi <= {MAX_DEMOS} and hi >= 1 (got {list(value)}); "
                             "for no demos write demos: none")
        return (lo, hi)

    @classmethod
    def from_mapping(cls, value: dict[str, Any]) -> DemoDistribution:
        """Validated, with one line per problem (the recipe's error names finetune.demos)."""
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            said = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'demos'}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
            raise ValueError(said) from None


class FinetuneSection(_Section):
    enabled: bool = True
    adapter: Literal["qlora", "lora", "auto"] = "auto"
    load_in_4bit: bool | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    sequence_len: int = 512
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_epochs: float | None = 3
    max_steps: int | None = None
    learning_rate: float = 2e-4
    lr_scheduler: Literal["constant", "cosine", "linear", "constant_with_warmup"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    val_set_size: float = 0.0
    seed: int = 0
    save_steps: int = Field(25, description="Checkpoint every N steps (what a killed run resumes "
                            "from).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Training precision. auto: bf16 on a GPU, fp32 on a CPU "
        "(copa.precision); bf16 on a CPU is only faster with AVX-512 BF16 or AMX.")
    demos: str | DemoDistribution = Field(
        "none",
        description="Demo-aware fine-tuning: 'fixed' puts the demo set the prompt stage will use "
        "into every training row, rendered exactly as at inference; 'program' (with "
        "optimize.strategy) keeps the demos the program holds at each 'w' step in its rows; "
        "a mapping {k: [lo, hi], pick: random | retrieved} gives every row k other train rows "
        "as demos, k drawn per row (seeded by finetune.seed).",
    )
    num_demos: int = 3
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    eval: FinetuneEvalSection | None = Field(
        None, json_schema_extra=ADDED_LATER,
        description="Score val with the task metric during training: {every: N}.")
    early_stopping: EarlyStoppingSection | None = Field(
        None, json_schema_extra=ADDED_LATER,
        description="Stop on a val plateau and merge the best checkpoint (needs eval).")
    axolotl: dict[str, Any] = Field(
        default_factory=dict, description="Passed through into the Axolotl config."
    )

    @field_validator("learning_rate")
    @classmethod
    def _lr(cls, value: float) -> float:
        if math.isfinite(value) and not value > 0:
            raise ValueError(f"must be > 0 (got {value}); a typical LoRA value is 2e-4")
        return bounded(value, 0.0, 1.0, low_open=True, hint="a typical LoRA value is 2e-4")

    @field_validator("micro_batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha",
                     "save_steps")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1 (got {value})")
        return bounded(value, 1, MAX_COUNT)

    @field_validator("sequence_len")
    @classmethod
    def _seq(cls, value: int) -> int:
        if value < 16:
            raise ValueError(f"must be at least 16 tokens (got {value})")
        return bounded(value, 16, MAX_TOKENS)

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        return bounded(value, 0, MAX_SEED)

    @field_validator("num_epochs")
    @classmethod
    def _epochs(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or value > 100_000):
            raise ValueError(f"must be a finite number of epochs, at most 100000 (got {value!r});"
                             " or leave it out and set max_steps")
        return value

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int | None) -> int | None:
        return None if value is None or value < 1 else bounded(value, 1, MAX_COUNT)

    @field_validator("lora_dropout", "val_set_size")
    @classmethod
    def _unit(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"must be in [0, 1) (got {value})")
        return value

    @field_validator("weight_decay", "max_grad_norm")
    @classmethod
    def _non_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return bounded(value, 0.0, 1e6)

    @field_validator("demos", mode="before")
    @classmethod
    def _demos(cls, value: Any) -> Any:
        if isinstance(value, DemoDistribution):
            return value
        if isinstance(value, dict):
            return DemoDistribution.from_mapping(value)
        if value not in DEMO_WORDS:
            raise ValueError(f"must be {', '.join(DEMO_WORDS)} or a mapping such as "
                             "{k: [0, 3], pick: random} (got " + repr(value) + ")")
        return value

    @field_validator("warmup_steps", "num_demos")
    @classmethod
    def _count(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return bounded(value, 0, MAX_COUNT)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneSection:
        if self.num_epochs is None and self.max_steps is None:
            raise ValueError("set num_epochs or max_steps")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError("num_epochs must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if self.adapter == "qlora" and self.load_in_4bit is False:
            raise ValueError(
                "adapter 'qlora' needs 4-bit loading: remove 'load_in_4bit: false' "
                "or write 'adapter: lora'"
            )
        if self.adapter == "lora" and self.load_in_4bit:
            raise ValueError(
                "'load_in_4bit: true' with 'adapter: lora' is QLoRA: write 'adapter: qlora'"
            )
        if self.early_stopping is not None and self.eval is None:
            raise ValueError("early_stopping stops on the val score that finetune.eval "
                             "measures: add 'eval: {every: N}' (N steps between evaluations)")
        sharded = self.distributed.backend == "fsdp" or (
            self.distributed.backend == "deepspeed" and self.distributed.zero_stage == 3)
        if self.eval is not None and sharded:
            raise ValueError("finetune.eval generates on the first process alone, which needs "
                             "the whole model there: not with fsdp or deepspeed zero_stage 3 "
                             "(use zero_stage 1 or 2, or drop eval)")
        return self


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
        0.0, ge=0.0, lt=1.0, json_schema_extra=ADDED_LATER,
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
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", value):
            raise ValueError("use letters, digits, '-', '_' or '.' (it names the run folder)")
        return value

    @property
    def base_dir(self) -> Path:
        return self.source_path.parent if self.source_path else Path.cwd()

    def resolve(self, value: str) -> Path:
        """A path from the recipe, relative to the recipe file's folder."""
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (self.base_dir / path)


def check_metric_name(value: str) -> str:
    """A built-in metric's name or a user function 'package.module:function'; raises ValueError."""
    if value not in METRICS and not USER_CODE.match(value):
        raise ValueError(
            f"unknown metric {value!r}: use one of {', '.join(METRICS)} "
            "or a user function 'package.module:function'"
        )
    return value


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
