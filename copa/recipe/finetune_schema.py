"""The recipe's `finetune:` section: LoRA/QLoRA settings, the schedule, precision, demos in the
training rows (a word or a distribution), scale-out, and scoring val while training (eval,
early stopping). Split from copa.recipe.schema, which holds the rest of a recipe."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from copa.recipe.data_schema import USER_CODE, Section
from copa.recipe.values import ADDED_LATER, MAX_COUNT, MAX_SEED, MAX_TOKENS, bounded
from copa.registry import METRICS

_Section = Section


def check_metric_name(value: str) -> str:
    """A built-in metric's name or a user function 'package.module:function'; raises ValueError."""
    if value not in METRICS and not USER_CODE.match(value):
        raise ValueError(
            f"unknown metric {value!r}: use one of {', '.join(METRICS)} "
            "or a user function 'package.module:function'"
        )
    return value



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

    @field_validator("min_delta")
    @classmethod
    def _delta(cls, value: float) -> float:
        return bounded(value, 0.0, 1e6, hint="0.02 = 2 points of the metric")


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
        if value is not None and value < 1:  # not "no limit" (-1 in transformers): say so
            raise ValueError(f"must be at least 1 (got {value}); for no step limit leave it out "
                             "and set num_epochs")
        return None if value is None else bounded(value, 1, MAX_COUNT)

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
