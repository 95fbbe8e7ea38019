"""Cross-checks a recipe needs beyond its schema: model, template, data, rendered examples.

Cheap (no torch / dspy / axolotl): this is what `copa validate` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from copa.data import Splits, load_splits
from copa.model_checks import check_model
from copa.prompting import PromptError, PromptSpec, build_messages, spec_from_recipe
from copa.recipe import Problem, Recipe, RecipeError
from copa.recipe.schema import DEFAULT_STRATEGY
from copa.recipe.serve_schema import ENGINES
from copa.registry import ARMS
from copa.usercode import optimizer_class, param_problem, user_code_problems


@dataclass(frozen=True)
class Checked:
    recipe: Recipe
    spec: PromptSpec
    splits: Splits


def _label(recipe: Recipe) -> str:
    return str(recipe.source_path) if recipe.source_path else "<recipe>"


def _role_problems(recipe: Recipe, label: str) -> list[Problem]:
    """optimize.proposer / optimize.teacher name a model that exists when the prompt stage runs."""
    problems = []
    opt = recipe.optimize
    for role in ("proposer", "teacher"):
        ref = getattr(opt, role)
        if not isinstance(ref, str) or ref == "base":
            continue
        where = f"optimize.{role}"
        if ref == "merged":
            if not recipe.finetune.enabled or opt.order == "p->w":
                problems.append(Problem(file=label, path=where, message=(
                    "'merged' exists only after fine-tuning, and with order p->w the prompt "
                    "stage runs before it: write base, a model, or {engine: openai, ...}")))
            continue
        found = check_model(ref, recipe.base_dir)
        if found:
            problems.append(Problem(file=label, path=where, message=found))
    return problems


def serve_problems(recipe: Recipe, label: str) -> list[Problem]:
    """A server the user runs (engine 'openai') with fine-tuned arms: each arm must ask it for
    its own model, or the merged arms score the base model and the fine-tune gain silently
    reads 0."""
    serve = recipe.serve
    merged_arms = {a for a in recipe.evaluate.arms if ARMS[a].model == "merged"}
    if not ENGINES[serve.engine].own_ids or not recipe.finetune.enabled or not merged_arms:
        return []
    merged = serve.models.merged
    fix = "write serve.models: {base: <id of the base model>, merged: <id of the fine-tuned model>}"
    if merged is None and serve.model:
        message = (f"serve.model '{serve.model}' would be asked for by the base AND the "
                   f"fine-tuned arms ({', '.join(sorted(merged_arms))}): {fix} instead")
    elif merged is None:
        message = (f"engine '{serve.engine}' with fine-tuning needs the fine-tuned model's id: "
                   f"{fix}")
    elif merged == serve.model_for("base"):
        message = (f"base and merged are both '{merged}': the fine-tuned arms would score the "
                   f"base model; {fix}")
    else:
        return []
    return [Problem(file=label, path="serve.models", message=message)]


def strategy_problems(recipe: Recipe, label: str) -> list[Problem]:
    """optimize.strategy (BetterTogether) against the keys that also say how fine-tuning and
    prompting meet: the older optimize.order, finetune.demos, and who serves the models."""
    opt, ft = recipe.optimize, recipe.finetune
    if opt.strategy == DEFAULT_STRATEGY:
        if ft.demos == "program":
            return [Problem(file=label, path="finetune.demos", message=(
                "'program' keeps a BetterTogether program's demos in its training rows: it needs "
                "optimize.strategy such as 'p -> w'; write 'none' or 'fixed' here"))]
        return []
    problems = []
    if opt.order != "w->p":
        problems.append(Problem(file=label, path="optimize.order", message=(
            f"optimize.strategy '{opt.strategy}' says the order of prompts and weights, and "
            "supersedes optimize.order: drop 'order' (order: p->w is copa's own demo-aware "
            "fine-tune, for the default strategy 'w -> p')")))
    if not ft.enabled:
        problems.append(Problem(file=label, path="optimize.strategy", message=(
            f"'{opt.strategy}' fine-tunes ('w') but finetune.enabled is false: enable it, or "
            "remove optimize.strategy")))
    if ft.demos == "fixed":
        problems.append(Problem(file=label, path="finetune.demos", message=(
            "'fixed' is for the default strategy 'w -> p'; with a strategy write 'none' "
            "(training rows carry no demos) or 'program' (they carry the program's demos)")))
    if ENGINES[recipe.serve.engine].own_ids:
        problems.append(Problem(file=label, path="serve.engine", message=(
            f"optimize.strategy '{opt.strategy}' makes new fine-tunes your server cannot know: "
            "use engine " + ", ".join(n for n, e in ENGINES.items() if not e.own_ids))))
    return problems


def demo_problems(recipe: Recipe, label: str) -> list[Problem]:
    """Demos as a training distribution (finetune.demos: {k, pick}) and the retrieved-demos
    program (optimize.optimizer: retrieved) against the keys they cannot go with."""
    opt, demos, problems = recipe.optimize, recipe.finetune.demos, []
    if not isinstance(demos, str) and (opt.order == "p->w" or opt.strategy != DEFAULT_STRATEGY):
        which = "optimize.order: p->w" if opt.order == "p->w" else "optimize.strategy"
        problems.append(Problem(file=label, path="finetune.demos", message=(
            f"{which} chooses the training rows' demos itself; a demo distribution "
            "({k, pick}) is for the default 'w -> p': drop one of the two")))
    if opt.optimizer != "retrieved":
        return problems
    unknown = sorted(set(opt.params) - {"k", "by"})
    k, by = opt.params.get("k", 3), opt.params.get("by", "bm25")
    if unknown:
        problems.append(Problem(file=label, path="optimize.params", message=(
            f"'retrieved' takes k (demos per input) and by (bm25 or hidden), not "
            f"{', '.join(unknown)}")))
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
        problems.append(Problem(file=label, path="optimize.params.k",
                                message=f"must be a whole number from 1 to 16 (got {k!r})"))
    if by not in ("bm25", "hidden"):  # copa.dspy.retrieved.METHODS (checks stay light)
        problems.append(Problem(file=label, path="optimize.params.by", message=(
            f"copa ranks demos by bm25 or hidden (the base model's hidden states), "
            f"got {by!r}")))
    if opt.order == "p->w" or opt.strategy != DEFAULT_STRATEGY:
        problems.append(Problem(file=label, path="optimize.optimizer", message=(
            "'retrieved' has no fixed demo set for a fine-tune to carry: use it with the "
            "default strategy 'w -> p' and order 'w->p'")))
    return problems


def optimizer_problems(recipe: Recipe, label: str) -> list[Problem]:
    """optimize.optimizer names an optimizer DSPy has, and optimize.params are keys it takes:
    a typo found here, not after the fine-tune has trained ('retrieved' is demo_problems';
    a user's class that does not import, user_code_problems')."""
    opt = recipe.optimize
    if not opt.enabled or opt.optimizer == "retrieved":
        return []
    try:
        cls = optimizer_class(opt.optimizer, recipe.base_dir)
    except ImportError as exc:
        if ":" in opt.optimizer:  # the user's module: user_code_problems says why
            return []
        return [Problem(file=label, path="optimize.optimizer", message=str(exc))]
    if not isinstance(cls, type):
        return [Problem(file=label, path="optimize.optimizer", message=(
            f"{opt.optimizer!r} is not a class (an optimizer class with compile())"))]
    problem = param_problem(cls, dict(opt.params))
    return [Problem(file=label, path="optimize.params", message=problem)] if problem else []


def retrieve_problems(recipe: Recipe, label: str) -> list[Problem]:
    """retrieve: fills a new input field from a query field of the signature, out of a corpus
    that has passages; data.answers_column's rows key must not shadow a field."""
    problems = []
    fields = recipe.task.input_fields + recipe.task.output_fields
    if recipe.data.answers_column and "answers" in fields:
        problems.append(Problem(file=label, path="data.answers_column", message=(
            "the gold answers are kept as 'answers', which is a field of the signature: "
            "rename that field")))
    section = recipe.retrieve
    if section is None:
        return problems
    if section.field in fields or section.field == "reasoning":
        problems.append(Problem(file=label, path="retrieve.field", message=(
            f"'{section.field}' is already a field of the signature; the passages need a field "
            "of their own (the default is 'passages')")))
    if section.query is not None and section.query not in recipe.task.input_fields:
        problems.append(Problem(file=label, path="retrieve.query", message=(
            f"'{section.query}' is not an input field of the signature "
            f"({', '.join(recipe.task.input_fields)})")))
    from copa.data.retrieval import recipe_passages

    try:
        passages = recipe_passages(recipe)
    except FileNotFoundError as exc:
        problems.append(Problem(file=label, path="retrieve.corpus", message=str(exc)))
    except ValueError as exc:
        problems.append(Problem(file=label, path="retrieve.corpus",
                                message=f"{section.corpus}: {exc}"))
    else:
        if not passages:
            problems.append(Problem(file=label, path="retrieve.corpus",
                                    message=f"{section.corpus}: no passages in it"))
    return problems


def check_recipe(recipe: Recipe) -> Checked:
    """Everything a run needs, checked before any training; raises RecipeError with all problems."""
    label = _label(recipe)
    problems: list[Problem] = serve_problems(recipe, label) + strategy_problems(recipe, label)
    model_problem = check_model(recipe.model.base, recipe.base_dir)
    if model_problem:
        problems.append(Problem(file=label, path="model.base", message=model_problem))
    problems.extend(_role_problems(recipe, label))
    problems.extend(retrieve_problems(recipe, label))
    problems.extend(demo_problems(recipe, label))
    problems.extend(optimizer_problems(recipe, label))
    user_code = user_code_problems({"task.module": recipe.task.module,
                                    "evaluate.metric": recipe.evaluate.metric,
                                    "finetune.eval.metric": getattr(recipe.finetune.eval,
                                                                    "metric", None) or "",
                                    "optimize.optimizer": recipe.optimize.optimizer},
                                   recipe.base_dir)
    problems += [Problem(file=label, path=key, message=msg) for key, msg in user_code.items()]
    spec = None
    try:
        spec = spec_from_recipe(recipe)
    except PromptError as exc:
        problems.append(Problem(file=exc.file, path=exc.where, message=exc.message))
    splits = None
    try:
        splits = load_splits(recipe)
    except RecipeError as exc:
        problems.extend(exc.problems)
    if spec is not None and splits is not None:
        try:
            # Render one example with a demo: undefined variables and sandbox refusals show here.
            example = splits.train[0]
            demos = splits.train[1:2]
            # Fields the rows get later: reasoning (a CoT program writes it), passages (the
            # retriever finds them at render time).
            later = {}
            if recipe.task.module == "chain_of_thought" and "reasoning" not in example:
                later["reasoning"] = "..."
            if recipe.retrieve is not None:
                later[recipe.retrieve.field] = ["...", "..."]
            example = {**example, **later}
            demos = [{**d, **later} for d in demos]
            build_messages(spec, example, demos, target=example)
        except PromptError as exc:
            problems.append(Problem(file=exc.file, path=exc.where, message=exc.message))
    if problems:
        raise RecipeError(problems)
    assert spec is not None and splits is not None
    return Checked(recipe=recipe, spec=spec, splits=splits)
