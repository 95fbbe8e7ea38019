"""The recipe: schema (copa.recipe.schema), YAML loading with env interpolation and error
reporting (copa.recipe.load). The cross-checks before any training read the data too, so they
live one room up (copa.checks).

Nothing here imports torch, transformers, dspy or axolotl: `copa validate` answers fast.
"""

from copa.recipe.load import (
    MAX_RECIPE_BYTES,
    SERVER_KEY_ENV,
    interpolate,
    load_recipe,
    recipe_from_dict,
    recipe_key_dict,
    recipe_read_back,
    recipe_section_dict,
    recipe_to_write,
)
from copa.recipe.schema import (
    ARMS,
    BUILTIN_METRICS,
    MODEL_ALIASES,
    DataSection,
    EvaluateSection,
    FinetuneSection,
    ModelSection,
    OptimizeSection,
    Problem,
    PromptSection,
    Recipe,
    RecipeError,
    ServeSection,
    TaskSection,
    parse_signature,
)

__all__ = [
    "ARMS", "BUILTIN_METRICS", "MAX_RECIPE_BYTES", "MODEL_ALIASES", "DataSection",
    "EvaluateSection", "FinetuneSection", "ModelSection", "OptimizeSection", "Problem",
    "PromptSection", "Recipe", "RecipeError", "ServeSection", "TaskSection", "interpolate",
    "load_recipe", "parse_signature", "recipe_from_dict", "recipe_read_back",
    "recipe_key_dict", "recipe_section_dict", "recipe_to_write", "SERVER_KEY_ENV",
]
