"""copa: fine-tune a small LM for one task with Axolotl, then optimize its prompts with DSPy.

The light API (recipes, rendering) imports nothing heavy; `COPAOptimizer` pulls in DSPy on use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["AxolotlProvider", "COPAOptimizer", "lm", "load", "load_recipe", "run",
           "__version__"]


def run(recipe: str, **kwargs: Any) -> Any:
    """Every stage of a recipe, as `copa run` does; returns the pipeline Run."""
    from copa.pipeline import run as run_pipeline

    return run_pipeline(recipe, **kwargs)


def load(path: str, arm: str = "best", max_input_tokens: int | None = None) -> Any:
    """One arm of a finished run directory (or a `copa export` folder) as a callable DSPy
    program bound to its model and template adapter: `load("runs/iris")(**inputs).species`.
    `arm="best"` is the arm with the best val score; or baseline, prompt_only, finetune_only,
    combined. An input field over `max_input_tokens` (default: the recipe's
    finetune.sequence_len, within the model's context) raises copa.use.limits.InputTooLong, and
    a number the recipe's number_format cannot format InputRefused (its base), before the model
    runs."""
    from copa.use.load import load as load_arm

    return load_arm(path, arm, max_input_tokens=max_input_tokens)


def load_recipe(path: str, **kwargs: Any) -> Any:
    from copa.recipe import load_recipe as load

    return load(path, **kwargs)


def lm(model: str, **kwargs: Any) -> Any:
    """A dspy.LM on copa's engine whose provider is AxolotlProvider, so DSPy's weight
    optimizers (BootstrapFinetune, BetterTogether) fine-tune it with Axolotl:
    `copa.lm("smollm2-135m-instruct", recipe="recipes/iris.yaml")`. See copa.provider.lm."""
    from copa.provider.lm import provider_lm

    return provider_lm(model, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "COPAOptimizer":
        from copa.optimizer import COPAOptimizer

        return COPAOptimizer
    if name == "AxolotlProvider":
        from copa.provider.lm import AxolotlProvider

        return AxolotlProvider
    raise AttributeError(name)
