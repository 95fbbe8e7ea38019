"""copa's built-in names, one table each: the data loaders (data.loader), the task metrics
(evaluate.metric, finetune.eval.metric) and the arms (evaluate.arms, `--arm`, the reports).
Recipe validation and its error messages, the CLI's `--help`, dispatch and the reports' labels
all read these tables, so a new built-in is one entry here and the function it names.

Pure data at the bottom of the tree (no copa imports, nothing heavy): the recipe schema, the
statistics and the stages all read it. A function is named by 'module:function', imported only
when it is used (`builtin`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


def builtin(path: str) -> Any:
    """The object a table names as 'module:function'."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# ---- loaders: how rows come out of a nested or derived data file ------------------------------

@dataclass(frozen=True)
class Loader:
    function: str  # 'module:function'(rows read from the file, **loader_options) -> rows
    help: str  # what the rows it gives are (data.loader's description)
    options: dict[str, tuple[str, ...] | type] = field(default_factory=dict)  # name -> allowed
    options_help: str = ""  # the loader_options it takes (data.loader_options' description)
    reads: str | None = None  # the format it reads with data.format auto (None: by suffix)


LOADERS: dict[str, Loader] = {
    "squad": Loader(
        "copa.data.loaders:squad_rows",
        "articles -> paragraphs -> questions, each row with its paragraph as 'context'",
        {"impossible": ("drop", "keep"), "impossible_answer": str},
        "impossible (drop | keep), impossible_answer (the answer a kept unanswerable question "
        "gets)", reads="json"),
    "gsm8k": Loader(
        "copa.data.loaders:gsm8k_rows",
        "question, reasoning = the worked solution, answer = the number after '####'",
        {"calculations": ("strip", "keep")},
        "calculations (strip | keep the <<a*b=c>> annotations)"),
}


# ---- metrics: a prediction scored against the example's answer --------------------------------

@dataclass(frozen=True)
class Metric:
    # 'module:function': score(gold, prediction, choices) -> float; with `golds`,
    # score(every accepted answer, prediction) -> float, the best match (data.answers_column)
    function: str
    golds: bool = False
    # scores the answer's first line only: a gold answer of several lines never matches
    first_line: bool = False


METRICS: dict[str, Metric] = {
    "exact_match": Metric("copa.metrics:exact_match"),
    "label_accuracy": Metric("copa.metrics:label_accuracy", first_line=True),
    "gsm8k_answer": Metric("copa.metrics:gsm8k_answer"),
    "token_f1": Metric("copa.metrics:token_f1"),
    "squad_em": Metric("copa.metrics:squad_em", golds=True),
    "squad_f1": Metric("copa.metrics:squad_f1", golds=True),
}


# ---- arms: the four cells of the 2x2 design, and the demo-trained fine-tune beside them -------

@dataclass(frozen=True)
class Arm:
    model: str  # "base" or "merged": the weights it runs on
    prompt: str  # "plain" (the program as written) or "DSPy" (the prompt stage's program)
    label: str  # its row in report.md's summary and the export's card
    short: str  # its name in tables (report.md, study.md)
    color: str  # its bar in report.png, report.html and study.html
    single_lever: bool = False  # pulls one lever (weights or prompt): synergy is against these
    in_recipe: bool = True  # evaluate.arms may name it (else a run reports it where it applies)

    @property
    def optimized(self) -> bool:
        """Whether it runs the prompt stage's program (program_<arm>.json)."""
        return self.prompt == "DSPy"


ARMS: dict[str, Arm] = {
    "baseline": Arm("base", "plain", "baseline (base model, plain prompt)", "baseline",
                    "#9e9e9e"),
    "prompt_only": Arm("base", "DSPy", "prompt-only (base model + DSPy)", "prompt-only",
                       "#64b5f6", single_lever=True),
    "finetune_only": Arm("merged", "plain", "fine-tune-only (merged model, plain prompt)",
                         "fine-tune-only", "#ffb74d", single_lever=True),
    # a fine-tune whose rows carried demos, prompted plainly: reported beside fine-tune-only
    # (then the demo-free fine-tune) when the recipe's fine-tune saw demos
    "demo_finetune": Arm("merged", "plain",
                         "demo-aware fine-tune only (demo-trained model, plain prompt)",
                         "demo-aware fine-tune only", "#90a4ae", single_lever=True,
                         in_recipe=False),
    "combined": Arm("merged", "DSPy", "combined (merged model + DSPy)", "combined", "#66bb6a"),
}
RECIPE_ARMS = tuple(name for name, arm in ARMS.items() if arm.in_recipe)
SINGLE_ARMS = tuple(name for name, arm in ARMS.items() if arm.single_lever)
OPTIMIZED_ARMS = tuple(name for name, arm in ARMS.items() if arm.optimized)
DEMO_ARM = "demo_finetune"
