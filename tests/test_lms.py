"""copa.dspy.lms, the one place a recipe's serve: settings become a dspy.LM, and the engine table
(copa.recipe.serve_schema.ENGINES) that validation and it both read."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from conftest import write_tiny_recipe

from copa.dspy import lms
from copa.recipe import RecipeError, ServeSection, load_recipe
from copa.recipe.serve_schema import ENGINES


def test_the_engine_table_is_what_a_recipe_may_name_and_what_starts() -> None:
    assert set(typing.get_args(ServeSection.model_fields["engine"].annotation)) == set(ENGINES)
    for name, engine in ENGINES.items():
        assert callable(lms.starter(name)), name  # its dotted path imports
        assert set(engine.settings) <= set(ServeSection.model_fields), name
    with pytest.raises(RecipeError, match="serve.engine"):
        load_recipe(Path("recipes/iris.yaml"), overrides={"serve.engine": "tgi"})


def test_a_setting_only_another_engine_reads_is_refused_with_the_engines_that_read_it(
        ) -> None:
    with pytest.raises(RecipeError, match="serve.precision: only for engine 'local'; engine "
                       "'transformers' serves in the dtype"):
        load_recipe(Path("recipes/iris.yaml"), overrides={"serve.engine": "transformers",
                                                          "serve.precision": "fp32"})
    # the default value is no setting at all
    assert load_recipe(Path("recipes/iris.yaml"), overrides={
        "serve.engine": "vllm", "serve.precision": "auto"}).serve.engine == "vllm"


def test_serve_settings_reach_both_local_engines_alike(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    """model_lm (an arm's BatchingEngine) and copa.lm (the provider's RoutingEngine) take their
    arguments from the one mapping of serve: settings."""
    import copa

    recipe = load_recipe(write_tiny_recipe(tmp_path, tiny_model_dir), overrides={
        "serve.max_batch_size": 3, "serve.batch_wait_ms": 7.0, "serve.prefix_cache": False})
    with lms.model_lm(recipe, str(tiny_model_dir), "base") as lm:
        engine = lm.engine
    assert (engine.max_batch_size, engine.batch_wait_s) == (3, 0.007)
    assert engine.model.prefix_cache is False
    routed = copa.lm(str(tiny_model_dir), recipe=recipe, run_dir=tmp_path / "run")
    settings = routed.engine.settings
    assert (settings["max_batch_size"], settings["batch_wait_ms"], settings["prefix_cache"]) \
        == (3, 7.0, False)
