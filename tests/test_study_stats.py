"""Issue 16: a study's statistics on fixed numbers, checked against hand computation, and its
file checks, cell names, commands and plots (no training: fast)."""

from __future__ import annotations

import itertools
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, write_tiny_recipe

from copa.recipe import Recipe, RecipeError, load_recipe
from copa.stats import effect, pooled_resampled_means, seed_interval, study_cell
from copa.study.cells import folder_part
from copa.study.execute import cell_command
from copa.study.spec import Study, load_study
from copa.study.write import markdown, plot

ARMS = ("baseline", "prompt_only", "finetune_only", "combined")


def test_synergy_and_interaction_of_fixed_means() -> None:
    means = {"baseline": 0.5, "prompt_only": 0.6, "finetune_only": 0.7, "combined": 0.9}
    assert effect("synergy", means) == pytest.approx(0.9 - 0.7)
    assert effect("interaction", means) == pytest.approx(0.9 - 0.7 - 0.6 + 0.5)
    # the better single arm is prompt-only here: synergy subtracts it, interaction does not care
    means["prompt_only"] = 0.8
    assert effect("synergy", means) == pytest.approx(0.1)
    assert effect("interaction", means) == pytest.approx(-0.1)


def test_a_cell_averages_its_seeds() -> None:
    seed0 = {"baseline": [0, 1, 0, 1], "prompt_only": [1, 1, 0, 1],
             "finetune_only": [1, 1, 1, 0], "combined": [1, 1, 1, 1]}
    seed1 = {"baseline": [0, 0, 0, 1], "prompt_only": [0, 0, 1, 1],
             "finetune_only": [1, 0, 1, 1], "combined": [1, 1, 0, 1]}
    cell = study_cell([seed0, seed1], resamples=500)
    # by hand: seed means b .5/.25, p .75/.5, f .75/.75, c 1/.75
    assert cell["arms"]["baseline"]["mean"] == pytest.approx(0.375)
    assert cell["arms"]["combined"]["seeds"] == [1.0, 0.75]
    assert cell["effects"]["synergy"]["value"] == pytest.approx(0.875 - 0.75)
    assert cell["effects"]["interaction"]["value"] == pytest.approx(0.875 - 0.75 - 0.625 + 0.375)
    assert cell["effects"]["interaction"]["seeds"] == pytest.approx([0.0, -0.25])
    assert cell["test_rows"] == [4, 4]


def test_the_pooled_interval_equals_the_hand_computed_distribution() -> None:
    """Two seeds of two rows, scores [0, 1] each: a seed's resampled mean is 0, .5, 1 with
    chances 1/4, 1/2, 1/4; the average of two such is 0, .25, .5, .75, 1 with chances
    1, 4, 6, 4, 1 in 16. Its 10% and 90% quantiles are .25 and .75, its 2.5% and 97.5%
    quantiles 0 and 1."""
    per_seed = [{"x": [0.0, 1.0]}, {"x": [1.0, 0.0]}]
    draws = pooled_resampled_means(per_seed, resamples=20000)["x"]
    values, counts = np.unique(draws, return_counts=True)
    assert list(values) == [0, 0.25, 0.5, 0.75, 1]
    assert counts / counts.sum() == pytest.approx(np.array([1, 4, 6, 4, 1]) / 16, abs=0.01)
    assert study_cell(per_seed, 20000, level=0.8)["arms"]["x"]["ci95"] == [0.25, 0.75]
    assert study_cell(per_seed, 20000)["arms"]["x"]["ci95"] == [0.0, 1.0]


def test_rows_are_resampled_within_seeds_and_paired_across_arms() -> None:
    # Seed 0 scores all 0, seed 1 all 1: resampled within each seed, the pooled mean is always
    # .5 (pooling the rows of both seeds into one resample would spread it).
    cell = study_cell([{"x": [0.0] * 5}, {"x": [1.0] * 5}], resamples=300)
    assert cell["arms"]["x"]["ci95"] == [0.5, 0.5]
    # Combined equals fine-tune-only row by row, prompt-only is below both: paired, the
    # synergy is exactly 0 in every resample (unpaired, it would not be).
    rows = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    seed = {"baseline": [0.0] * 6, "prompt_only": [0.0] * 6, "finetune_only": rows,
            "combined": rows}
    cell = study_cell([seed, seed], resamples=300)
    assert cell["effects"]["synergy"]["ci95"] == [0.0, 0.0]
    assert cell["effects"]["synergy"]["excludes_zero"] is False
    assert cell["effects"]["finetune_gain"]["excludes_zero"] is True


def test_the_seed_interval_is_students_t() -> None:
    # mean .6, sd .1414, t(0.975, 1 df) = 12.706: .6 -/+ 12.706 * .1414 / sqrt(2)
    lo, hi = seed_interval([0.5, 0.7])
    assert (lo, hi) == pytest.approx((0.6 - 1.27062, 0.6 + 1.27062), abs=1e-4)
    assert seed_interval([0.5]) is None


def test_folder_names_of_grid_values() -> None:
    assert folder_part("p -> w -> p") == "p-w-p"
    assert folder_part(0.001) == "0.001"
    assert folder_part(True) == "true"
    assert folder_part(None) == "none"


# Study files are read and their cells' recipes validated without loading the model: a path
# to a model folder that is never opened will do.
MODEL = Path("/no/model/needed")


def _study(folder: Path, text: str) -> Path:
    recipe = write_tiny_recipe(folder, MODEL)
    path = folder / "s.yaml"
    path.write_text(f"recipe: {recipe.name}\n" + text)
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_study(path)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("text, expected", [
    ("grid: {finetune.lora_rr: [8, 16]}\n", "s.yaml: grid.finetune.lora_rr: 8: unknown key "
     "(did you mean 'lora_r'?)"),
    ("grid: {finetune.lora_r: [0, 16]}\n", "s.yaml: grid.finetune.lora_r: 0: must be at least 1"),
    ("grid: {finetune.seed: [1, 2]}\n", "s.yaml: grid.finetune.seed: the study's 'seeds:' sets "
     "finetune.seed; list the values under 'seeds:' instead"),
    ("grid: {finetune.lora_r: 8}\n", "s.yaml: grid.finetune.lora_r: Input should be a valid "
     "list"),
    ("grid: {finetune.lora_r: []}\n", "give at least one value"),
    ("seeds: []\n", "s.yaml: seeds: give at least one seed"),
    ("arms: [baseline, best]\n", "s.yaml: arms[1]: Input should be"),
    ("resources: {num_gpu: 1}\n", "s.yaml: resources.num_gpu: unknown key"),
    ("sweep: {}\n", "s.yaml: sweep: unknown key (a study has: name, recipe, grid"),
    ("grid: {optimize.strategy: ['w -> p', 'w->p']}\n", "s.yaml: grid.optimize.strategy: values "
     "['w -> p', 'w->p'] give the same folder name twice"),
    # pydantic would read true as seed 1 and '3' as seed 3
    ("seeds: [true]\n", "s.yaml: seeds: seeds are whole numbers from 0 to 4294967295 (got true)"),
    ("seeds: ['3', 2]\n", "s.yaml: seeds: seeds are whole numbers from 0 to 4294967295 (got '3')"),
    # one recipe twice: equal numbers, and values the recipe resolves alike
    ("grid: {finetune.lora_r: [8, 8.0]}\n", "s.yaml: grid: finetune.lora_r: values 8 and 8.0 are "
     "the same value"),
    ("grid: {finetune.learning_rate: [1.0e-3, '1e-3']}\n", "s.yaml: grid.finetune.learning_rate: "
     "0.001 and '1e-3' give the same recipe"),
    # `--set finetune.axolotl.a=b=1` reads as key finetune.axolotl.a
    ("grid: {finetune.axolotl.a=b: [1, 2]}\n", "s.yaml: grid.finetune.axolotl.a=b: a key with '='"),
    ("set: {finetune.axolotl.a=b: 1}\n", "s.yaml: set.finetune.axolotl.a=b: a key with '='"),
])
def test_a_bad_study_file_names_the_key_and_what_to_write(
        tmp_path: Path, text: str, expected: str) -> None:
    problems = _problems(_study(tmp_path, text))
    assert any(expected in p for p in problems), problems


def test_a_missing_base_recipe_is_named(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("recipe: nowhere.yaml\n")
    assert "s.yaml: recipe: " in _problems(path)[0]
    assert "no such file" in _problems(path)[0]


def test_a_study_too_large_to_run_is_refused_before_its_cells_are_built(tmp_path: Path) -> None:
    """A grid of 5 keys x 10 values is 100000 runs (each a training): --print-commands spent
    six minutes and 650 MB checking every cell's recipe before anything said so. The count is
    grid points x seeds, said at once; at the limit a study is still read."""
    keys = ["finetune.lora_r", "finetune.lora_alpha", "finetune.num_epochs",
            "finetune.micro_batch_size", "finetune.gradient_accumulation_steps"]
    grid = "grid:\n" + "".join(f"  {k}: [{', '.join(str(v) for v in range(1, 11))}]\n"
                               for k in keys)
    problems = _problems(_study(tmp_path, grid))
    assert problems == [f"{tmp_path}/s.yaml: grid: 100000 grid points x 1 seed(s) = 100000 "
                        "runs; a study runs at most 1000: give fewer values, or split it into "
                        "studies"]
    assert "= 1200 runs" in _problems(_study(tmp_path, (
        "grid: {finetune.lora_r: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}\n"
        f"seeds: [{', '.join(str(s) for s in range(100))}]\n")))[0]
    few = f"seeds: [{', '.join(str(s) for s in range(100))}]\ngrid: {{finetune.lora_r: " \
          "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n"
    assert len(load_study(_study(tmp_path, few)).cells) == 1000


def test_a_study_naming_itself_as_its_recipe_says_so(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("recipe: s.yaml\ngrid: {finetune.lora_r: [8, 16]}\n")
    assert _problems(path) == [f"{path}: recipe: names this study file itself; write the base "
                               "recipe's path, relative to the study file"]


def test_cells_are_the_grid_product_times_the_seeds(tmp_path: Path) -> None:
    path = _study(tmp_path, (
        "grid:\n  optimize.strategy: ['w -> p', 'p -> w']\n  finetune.lora_r: [8, 16]\n"
        "seeds: [3, 4]\narms: [combined, baseline]\nset: {evaluate.bootstrap: 300}\n"))
    study = load_study(path)
    assert [c.rel_dir for c in study.cells][:3] == [
        "strategy=w-p,lora_r=8/seed-3", "strategy=w-p,lora_r=8/seed-4",
        "strategy=w-p,lora_r=16/seed-3"]
    assert len(study.cells) == 8
    cell = study.cells[-1]
    assert cell.overrides == {"evaluate.bootstrap": 300, "optimize.strategy": "p -> w",
                              "finetune.lora_r": 16, "data.splits.seed": 4, "finetune.seed": 4,
                              "evaluate.arms": ["baseline", "combined"]}
    assert study.dir == Path.cwd() / "runs" / "s"


def test_printed_commands_set_what_the_study_sets(tmp_path: Path) -> None:
    """Each printed `copa run` line, parsed as the shell and `copa run --set` parse it, loads
    the same recipe the study's cell loads."""
    path = _study(tmp_path, (
        "grid:\n  optimize.strategy: ['w -> p', 'p -> w -> p']\n  task.instructions: ['1', "
        "'Say: yes']\nseeds: [0, 2]\n"))
    study = load_study(path)
    for cell in study.cells:
        args = shlex.split(cell_command(study, cell))
        assert args[:5] == ["copa", "run", str(study.recipe), "--run-dir",
                            str(study.dir / cell.rel_dir)]
        sets = dict(a.split("=", 1) for a in args[6::2])
        overrides = {k: yaml.safe_load(v) for k, v in sets.items()}
        assert overrides == cell.overrides
        assert load_recipe(study.recipe, overrides=overrides) == \
            load_recipe(study.recipe, overrides=cell.overrides)
    assert isinstance(study.cells[0].overrides["task.instructions"], str)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "studies").glob("*.yaml")))
def test_the_shipped_studies_load_and_pass_copas_checks(name: str) -> None:
    """Every shipped study's cells are recipes `copa run` accepts (the checks that need no data
    or model files): a change to a base recipe that breaks a study shows here, not hours into
    it (the Banking77 recipe's switch to retrieved demos left data_size's random-search
    params behind)."""
    from copa.checks import demo_problems, optimizer_problems, strategy_problems

    study = load_study(REPO / "studies" / f"{name}.yaml")
    assert len(study.spec.seeds) >= 3
    assert study.cells
    for recipe in _first_seed_recipes(study):
        assert not (demo_problems(recipe, name) + optimizer_problems(recipe, name)
                    + strategy_problems(recipe, name))


def _data(grid: dict) -> dict:
    def arms(shift: float) -> dict:
        return {a: {"mean": 0.5 + shift * i / 10, "ci95": [0.4, 0.7], "seeds": [0.5],
                    "seed_ci95": None} for i, a in enumerate(ARMS)}

    keys = list(grid)
    import itertools
    cells = []
    for i, combo in enumerate(itertools.product(*grid.values())):
        cells.append({"cell": f"c{i}", "values": dict(zip(keys, combo)), "seeds": [0, 1],
                      "status": "finished", "arms": arms(i),
                      "effects": {"synergy": {"value": 0.02, "ci95": [-0.01, 0.05],
                                              "excludes_zero": False},
                                  "interaction": {"value": -0.05, "ci95": [-0.09, -0.01],
                                                  "excludes_zero": True}}})
    return {"study": "t", "recipe": "r.yaml", "metric": "label_accuracy", "grid": grid,
            "seeds": [0, 1], "arms": list(ARMS), "bootstrap": 100, "method": "m",
            "cells": cells, "runs": [], "findings": ["c0: synergy ..."]}


@pytest.mark.parametrize("grid", [{"data.splits.train": [50, 100, 200]},
                                  {"finetune.lora_r": [8, 16], "task.instructions": ["a", "b"]},
                                  {"optimize.strategy": ["w -> p", "p -> w"]}, {}])
def test_the_plot_and_tables_of_every_grid_shape(grid: dict) -> None:
    data = _data(grid)
    png = plot(data)
    assert png.startswith(b"\x89PNG")
    text = markdown(data)
    assert "| c0 | 2 | 50.0 [40.0, 70.0]" in text
    assert "-5.0* [-9.0, -1.0]" in text and "+2.0 [-1.0, 5.0]" in text


def test_an_override_into_an_overridden_section_leaves_the_callers_value_alone(
        tmp_path: Path) -> None:
    """The demos study sets optimize.params, then each cell one key inside it: the study's
    value must stay as written for the next cell."""
    recipe = write_tiny_recipe(tmp_path, MODEL)
    params = {"max_bootstrapped_demos": 0}
    loaded = load_recipe(recipe, overrides={"optimize.params": params,
                                            "optimize.params.max_labeled_demos": 4})
    assert loaded.optimize.params == {"max_bootstrapped_demos": 0, "max_labeled_demos": 4}
    assert params == {"max_bootstrapped_demos": 0}


def _first_seed_recipes(study: Study) -> list[Recipe]:
    """The recipe of every grid point on the study's first seed, as copa loads it."""
    return [load_recipe(study.recipe, overrides=c.overrides) for c in study.cells
            if c.seed == study.spec.seeds[0]]


def test_the_demos_study_gives_each_cell_its_own_demo_count() -> None:
    study = load_study(REPO / "studies" / "demos.yaml")
    counts = [c.overrides["optimize.params"] for c in study.cells if c.seed == 0]
    assert counts == [{"max_bootstrapped_demos": 0}] * 5
    recipes = _first_seed_recipes(study)
    assert [r.optimize.params["max_labeled_demos"] for r in recipes] == [0, 1, 2, 4, 8]


def test_the_demos_aware_study_prompts_a_demo_trained_fine_tune_with_k_demos() -> None:
    from copa.checks import demo_problems

    study = load_study(REPO / "studies" / "demos_aware.yaml")
    recipes = _first_seed_recipes(study)
    assert [r.optimize.params["max_labeled_demos"] for r in recipes] == [0, 1, 2, 4, 8]
    assert all(r.model_dump(mode="json")["finetune"]["demos"] == {"k": [0, 3], "pick": "random"}
               and not r.optimize.guard for r in recipes)
    assert not any(demo_problems(r, "demos_aware") for r in recipes)


def test_the_in_context_study_crosses_demo_training_with_the_combined_program() -> None:
    """Three ways to train (no demos, random and retrieved k in [0, 3]) x two programs (the
    optimizer's pick, retrieved demos), every cell a recipe copa's checks accept."""
    from copa.checks import demo_problems

    study = load_study(REPO / "studies" / "in_context.yaml")
    assert study.spec.seeds == [0, 1, 2] and len(study.cells) == 18
    recipes = _first_seed_recipes(study)
    demos = [r.model_dump(mode="json")["finetune"]["demos"] for r in recipes]
    # grid order is run order: the demo-aware cells, retrieved first, before the demo-free ones
    assert demos == [{"k": [0, 3], "pick": "retrieved"}] * 2 + [
        {"k": [0, 3], "pick": "random"}] * 2 + ["none"] * 2
    assert [r.optimize.optimizer for r in recipes] == [
        "retrieved", "BootstrapFewShotWithRandomSearch"] * 3
    assert all(r.data.splits.train == 40 and r.optimize.guard for r in recipes)
    assert not any(demo_problems(r, "in_context") for r in recipes)
    assert len({c.name for c in study.cells}) == 6


def test_the_in_context_200_study_asks_the_same_question_at_200_rows() -> None:
    """Random training demos vs none, the retrieved-demos program, on 200 train rows with the
    40-row study's val and test sizes (so a seed's test rows are the same in both)."""
    from copa.checks import demo_problems

    study = load_study(REPO / "studies" / "in_context_200.yaml")
    assert study.spec.seeds == [0, 1, 2] and len(study.cells) == 6
    recipes = _first_seed_recipes(study)
    demos = [r.model_dump(mode="json")["finetune"]["demos"] for r in recipes]
    assert demos == [{"k": [0, 3], "pick": "random"}, "none"]
    assert all(r.optimize.optimizer == "retrieved" and r.optimize.guard for r in recipes)
    assert all((r.data.splits.train, r.data.splits.val, r.data.splits.test) == (200, 30, 100)
               for r in recipes)
    assert all(r.finetune.num_epochs == 3 and r.finetune.early_stopping is None
               for r in recipes)
    assert not any(demo_problems(r, "in_context_200") for r in recipes)


def test_the_in_context_77_study_asks_it_on_every_intent() -> None:
    """All 77 intents as choices (none filtered out), ~4 train rows per intent, 8 rows a step as
    in the 10-intent studies (2 x 4 accumulation), rows of ~0.6-0.75k tokens within the limit."""
    import csv

    from copa.checks import demo_problems

    study = load_study(REPO / "studies" / "in_context_77.yaml")
    recipes = _first_seed_recipes(study)
    assert [r.model_dump(mode="json")["finetune"]["demos"] for r in recipes] == [
        {"k": [0, 3], "pick": "random"}, "none"]
    for r in recipes:
        assert len(set(r.task.choices)) == 77 and r.data.filter_labels is None
        assert r.data.splits.train == 308 and r.finetune.sequence_len >= 768
        assert r.finetune.micro_batch_size * r.finetune.gradient_accumulation_steps == 8
        assert r.optimize.optimizer == "retrieved" and r.optimize.guard
    with open(REPO / "tests" / "fixtures" / "data" / "banking77" / "train.csv") as f:
        assert {row["category"] for row in csv.DictReader(f)} <= set(recipes[0].task.choices)
    assert not any(demo_problems(r, "in_context_77") for r in recipes)


def test_the_gemma_study_repeats_the_demo_free_200_row_cell_on_the_other_model() -> None:
    """Per seed, the Gemma cell is in_context_200's demos=none cell but for the model and what
    Gemma needs (micro-batch x accumulation, still 8 rows a step; the learning rate): the same
    splits, schedule and program, so the two models' synergies answer the same question."""
    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                out |= flat(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
        return out

    gemma, smollm = (load_study(REPO / "studies" / f"{n}.yaml")
                     for n in ("gemma_in_context_200", "in_context_200"))
    assert gemma.spec.seeds == smollm.spec.seeds
    for seed in gemma.spec.seeds:
        (g,) = [flat(load_recipe(gemma.recipe, overrides=c.overrides).model_dump(mode="json"))
                for c in gemma.cells if c.seed == seed]
        (s,) = [flat(load_recipe(smollm.recipe, overrides=c.overrides).model_dump(mode="json"))
                for c in smollm.cells
                if c.seed == seed and c.values["finetune.demos"] == "none"]
        differ = {k for k in g.keys() | s.keys() if g.get(k) != s.get(k)}
        assert differ == {"model.base", "finetune.micro_batch_size",
                          "finetune.gradient_accumulation_steps", "finetune.learning_rate"}
        assert g["model.base"] == "gemma3-270m"
        assert (g["finetune.micro_batch_size"] * g["finetune.gradient_accumulation_steps"]
                == s["finetune.micro_batch_size"] * s["finetune.gradient_accumulation_steps"])


def test_a_long_grid_value_gets_a_short_distinct_folder_name() -> None:
    names = [folder_part("You are given four measurements " + tail) for tail in "ab"]
    assert all(len(n) <= 40 for n in names) and names[0] != names[1]


def test_print_commands_then_report_on_nothing_run_yet(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from copa.cli import cli

    path = _study(tmp_path, "grid:\n  finetune.lora_r: [8, 16]\nseeds: [0, 1]\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["study", str(path), "--print-commands", "--out", str(out)])
    assert result.exit_code == 0, result.output
    commands = [line for line in result.output.splitlines() if line.startswith("copa run ")]
    assert len(commands) == 4 and (out / "plan.json").is_file()
    # seed-major, as a study runs: the whole grid on seed 0 before any cell's seed 1
    dirs = [line.split("--run-dir ")[1].split()[0].split("/")[-2:] for line in commands]
    assert dirs == [["lora_r=8", "seed-0"], ["lora_r=16", "seed-0"],
                    ["lora_r=8", "seed-1"], ["lora_r=16", "seed-1"]]
    assert not list(out.glob("*/seed-*"))  # printed, not run
    result = CliRunner().invoke(cli, ["study", "--report", str(out)])
    assert result.exit_code == 0, result.output
    assert "lora_r=8: not finished, no result" in result.output
    assert (out / "study.png").read_bytes().startswith(b"\x89PNG")


def test_the_command_says_what_it_needs(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from copa.cli import cli

    assert CliRunner().invoke(cli, ["study"]).exit_code == 2
    bad = _study(tmp_path, "grid: {finetune.lora_r: [0]}\n")
    result = CliRunner().invoke(cli, ["study", str(bad)])
    assert result.exit_code == 2
    assert "grid.finetune.lora_r: 0: must be at least 1" in result.output
    result = CliRunner().invoke(cli, ["study", "--report", str(tmp_path)])
    assert result.exit_code == 2 and "not a study folder" in result.output


def test_a_problem_every_cell_shares_stops_the_study_before_any_cell(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from copa.cli import cli

    path = _study(tmp_path, "grid:\n  finetune.lora_r: [8, 16]\nseeds: [0, 1]\n"
                            "set:\n  data.source: missing.csv\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["study", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.count("data.source") == 1 and "missing.csv" in result.output
    assert not list(out.glob("*/seed-*"))  # no cell started


def test_seeds_on_the_command_line_choose_which_seeds_run_now(tmp_path: Path) -> None:
    """`copa study --seeds 1` runs (here: prints) only seed 1's cells, with seed 1 set where the
    file's seeds would be, while plan.json keeps every seed of the file (plus any other one
    given), so that seeds run one command at a time end in one report over all of them; a bad
    list (not numbers, empty, out of range, a repeat) is a usage error naming --seeds."""
    from click.testing import CliRunner

    from copa.cli import cli

    path = _study(tmp_path, "grid:\n  finetune.lora_r: [8, 16]\nseeds: [0, 1, 2]\n")
    study = load_study(path, seeds=[1])
    assert [c.rel_dir for c in study.cells] == ["lora_r=8/seed-1", "lora_r=16/seed-1"]
    assert {c.overrides["data.splits.seed"] for c in study.cells} == {1}
    out = tmp_path / "out"
    for seeds, printed in (("1", {1}), ("2,7", {2, 7})):
        result = CliRunner().invoke(cli, ["study", str(path), "--print-commands", "--seeds", seeds,
                                          "--out", str(out)])
        assert result.exit_code == 0, result.output
        commands = [line for line in result.output.splitlines() if line.startswith("copa run ")]
        assert len(commands) == 2 * len(printed)
        assert {int(c.split("seed-")[1].split()[0]) for c in commands} == printed
    plan = json.loads((out / "plan.json").read_text())
    assert plan["seeds"] == [0, 1, 2, 7]
    assert sorted({c["dir"] for c in plan["cells"]}) == sorted(
        f"lora_r={r}/seed-{s}" for r in (8, 16) for s in (0, 1, 2, 7))
    for bad, said in (("one", "e.g. --seeds 0,1"), ("1,1", "a seed is repeated"),
                      ("", "give at least one seed"), ("-1", "from 0 to 4294967295"),
                      ("1,,2", "a seed is missing"), ("1,", "a seed is missing"),
                      ("1_0", "e.g. --seeds 0,1"), ("+2", "e.g. --seeds 0,1"),
                      ("\u0663", "e.g. --seeds 0,1")):
        result = CliRunner().invoke(cli, ["study", str(path), "--seeds", bad])
        assert result.exit_code == 2 and "'--seeds'" in result.output and said in result.output


def test_bettertogether_cells_fine_tune_in_one_study_folder(tmp_path: Path) -> None:
    """p -> w and p -> w -> p on one seed hand BootstrapFinetune the same rows: with one
    finetunes/ for the study, the content-named fine-tune is trained once, not once a cell."""
    from copa.study.shared import link_finetunes

    study = tmp_path / "study"
    first, second = study / "strategy=p-w" / "seed-0", study / "strategy=p-w-p" / "seed-0"
    for cell in (first, second):
        cell.mkdir(parents=True)
        link_finetunes(cell, study)
    (first / "finetunes" / "f155aea381cd5361").mkdir()
    assert (second / "finetunes" / "f155aea381cd5361").is_dir()  # one folder, seen by both
    assert os.readlink(first / "finetunes") == "../../finetunes"  # relative: the study can move
    link_finetunes(first, study)  # again: unchanged
    assert (first / "finetunes" / "f155aea381cd5361").is_dir()
    own = study / "strategy=p-w" / "seed-1"
    (own / "finetunes" / "0123456789abcdef").mkdir(parents=True)
    link_finetunes(own, study)  # fine-tuned on its own before: kept, not replaced
    assert not (own / "finetunes").is_symlink()
    assert (own / "finetunes" / "0123456789abcdef").is_dir()


@pytest.mark.parametrize("grid", [
    # a key whose last part is the user's text, under free-form mappings
    {"finetune.axolotl./tmp/copa-escape": [1, 2]},
    {"finetune.axolotl.x/y/copa-escape": [1], "optimize.params./abs/dir": [3, 4]},
    # values: absolute paths and '..'
    {"finetune.axolotl.note": ["/etc", "..", "../../x"]},
], ids=["absolute-key", "slash-keys", "values"])
def test_cell_folders_never_leave_the_study_folder(tmp_path: Path, grid: dict) -> None:
    path = _study(tmp_path, f"grid: {yaml.safe_dump(grid, default_flow_style=True)}")
    study = load_study(path, out_dir=tmp_path / "study")
    root = (tmp_path / "study").resolve()
    assert len(study.cells) == len(list(itertools.product(*grid.values())))
    for cell in study.cells:
        assert not Path(cell.rel_dir).is_absolute() and ".." not in Path(cell.rel_dir).parts
        target = (root / cell.rel_dir).resolve()
        assert target.parent.parent == root, cell.rel_dir  # <cell>/seed-<n>, one level down
        assert f"--run-dir {root}/{cell.rel_dir.split('/')[0]}/" in cell_command(study, cell)


def test_a_grid_key_with_dotdot_is_not_a_key_path(tmp_path: Path) -> None:
    problems = _problems(_study(tmp_path, "grid: {optimize.params.../../../x: [1, 2]}\n"))
    assert problems and all("grid.optimize.params.../../../x" in p and "not a key path" in p
                            for p in problems)


def test_seeds_out_of_range_are_refused(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from copa.cli import cli

    assert any("seeds: seeds are whole numbers from 0 to 4294967295 (got -1)" in p
               for p in _problems(_study(tmp_path, "seeds: [0, -1]\n")))
    path = _study(tmp_path, "seeds: [0]\n")
    for seeds in ("-3", f"{2**40}", "0,1e3"):
        result = CliRunner().invoke(cli, ["study", str(path), "--print-commands", "--seeds", seeds])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert "Traceback" not in result.output and "Error:" not in result.output


def test_a_study_tables_what_each_guard_margin_would_have_kept(tmp_path: Path) -> None:
    from copa.study.aggregate import aggregate
    from copa.study.write import markdown

    arms = ["baseline", "prompt_only", "finetune_only", "combined"]
    # seed 0: the guard kept the pick (val +0.1), which gained 20 points on test;
    # seed 1: it declined a pick whose val gain was 0 and whose test score lost 40 points.
    gains = {0: (0.1, 0.8, 0.6), 1: (0.0, 0.2, 0.6)}
    cells = []
    for seed, (val_gain, pick, plain) in gains.items():
        run = tmp_path / f"cell/seed-{seed}"
        (run / "predictions").mkdir(parents=True)
        for arm in arms:
            (run / "predictions" / f"{arm}.jsonl").write_text(
                '{"inputs": {"x": "1"}, "gold": "a", "score": 1.0}\n')
        guard = {"combined": {"kept": "optimized" if val_gain else "plain",
                              "val_gain": val_gain,
                              "test": {"kept": None, "pick": pick, "plain": plain}}}
        (run / "report.json").write_text(json.dumps(
            {"metric": "label_accuracy", "arms": {a: {} for a in arms}, "guard": guard}))
        cells.append({"name": "cell", "values": {}, "seed": seed, "dir": f"cell/seed-{seed}"})
    plan = {"study": "s", "recipe": "r.yaml", "grid": {}, "seeds": [0, 1], "arms": arms,
            "bootstrap": 50, "cells": cells}
    data = aggregate(plan, tmp_path)
    assert list(data["guard_margins"]) == ["combined"]
    margins = {o["margin"]: o for o in data["guard_margins"]["combined"]}
    assert margins[0.0]["kept_pick"] == 1 and margins[0.0]["mean_test_gain"] == pytest.approx(0.1)
    assert margins[0.1]["kept_pick"] == 0 and margins[0.1]["mean_test_gain"] == 0.0
    table = markdown(data)
    assert "| 0 | 1 of 2 | +10.0 |" in table and "| 0.1 | 0 of 2 | +0.0 |" in table
    assert "| off | 2 of 2 | -10.0 |" in table


@pytest.mark.parametrize("text, said", [
    ('grid: {"": [1, 2]}\n', "grid: key '' is not a key path"),
    ('set: {"": 3}\n', "set: key '' is not a key path"),
    ('grid: {" ": [1]}\n', "grid: key ' ' is not a key path"),
    ("set: {finetune..lora_r: 4}\n", "set.finetune..lora_r: not a key path")])
def test_a_key_that_is_not_a_key_path_is_named_in_the_study_file(tmp_path: Path, text: str,
                                                                  said: str) -> None:
    """Not blamed on the base recipe and a --set option the user never gave."""
    problems = _problems(_study(tmp_path, text))
    assert problems == [f"{tmp_path / 's.yaml'}: {said}: write section.key, e.g. "
                        "finetune.lora_r"]


def test_run_dir_is_checked_like_out_and_named_in_the_study_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for run_dir, said in ((tmp_path / "afile", "exists and is not a folder"),
                          ("/proc/x", "cannot create it")):  # /proc: even root cannot
        problems = _problems(_study(tmp_path, f"run_dir: {run_dir}\n"))
        assert len(problems) == 1
        assert problems[0].startswith(f"{tmp_path / 's.yaml'}: run_dir: {run_dir}: {said}")


def test_the_printed_report_hint_quotes_its_path(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from copa.cli import cli

    path = _study(tmp_path, "seeds: [0]\n")
    out = tmp_path / "my study"
    result = CliRunner().invoke(cli, ["study", str(path), "--print-commands", "--out", str(out)])
    assert result.exit_code == 0, result.output
    hint = next(line for line in result.stderr.splitlines() if line.startswith("# then: "))
    assert shlex.split(hint.removeprefix("# then: ")) == ["copa", "study", "--report", str(out)]


ROWS = [{"inputs": {"x": str(i)}, "gold": "a", "prediction": "a", "score": float(i % 2)}
        for i in range(6)]


def _finished_study(folder: Path) -> Path:
    """plan.json and one finished cell (report.json, four arms' predictions), as copa writes
    them."""
    cell = {"name": "base", "values": {}, "seed": 0, "dir": "base/seed-0", "overrides": {}}
    plan = {"study": "s", "file": "s.yaml", "recipe": "r.yaml", "grid": {}, "seeds": [0],
            "arms": list(ARMS), "bootstrap": 100, "cells": [cell]}
    (folder / "plan.json").write_text(json.dumps(plan))
    run = folder / "base" / "seed-0"
    (run / "predictions").mkdir(parents=True)
    for arm in ARMS:
        (run / "predictions" / f"{arm}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in ROWS))
    (run / "report.json").write_text(json.dumps(
        {"metric": "label_accuracy", "arms": {a: {"score": 0.5, "n": len(ROWS)} for a in ARMS}}))
    return run


@pytest.mark.parametrize("damage, said", [
    ("plan cut short", "plan.json: not readable JSON"),
    ("plan a list", "plan.json: not a study plan"),
    ("cell without dir", "plan.json: cells[0].dir: "),
    ("cell dir outside", "plan.json: cells[0].dir: '../x' is not a folder inside"),
    ("predictions cut mid-line", "combined.jsonl: line 6: not a JSON line"),
    ("predictions cut at a line", "combined.jsonl: 4 rows, but"),
    ("predictions cut, no count", "combined.jsonl: its test rows differ from baseline.jsonl's"),
    ("score null", "combined.jsonl: line 2: score null is not a finite number"),
    ("report guard not a mapping", "seed-0/report.json: synergy or guard is not a mapping"),
])
def test_a_damaged_study_is_one_line_naming_the_file(tmp_path: Path, damage: str,
                                                     said: str) -> None:
    from click.testing import CliRunner

    from copa.cli import cli

    run = _finished_study(tmp_path)
    ok = CliRunner().invoke(cli, ["study", "--report", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    for name in ("study.json", "study.md", "study.png", "study.html"):
        (tmp_path / name).unlink(missing_ok=True)
    plan = json.loads((tmp_path / "plan.json").read_text())
    rows = run / "predictions" / "combined.jsonl"
    text = rows.read_text()
    if damage == "plan cut short":
        (tmp_path / "plan.json").write_text(json.dumps(plan)[:60])
    elif damage == "plan a list":
        (tmp_path / "plan.json").write_text("[]")
    elif damage.startswith("cell"):
        plan["cells"][0]["dir"] = "../x"
        if damage == "cell without dir":
            del plan["cells"][0]["dir"]
        (tmp_path / "plan.json").write_text(json.dumps(plan))
    elif damage == "predictions cut mid-line":
        rows.write_text(text[:-10])
    elif damage.startswith("predictions cut"):
        rows.write_text("".join(text.splitlines(keepends=True)[:4]))
        if "no count" in damage:
            report = json.loads((run / "report.json").read_text())
            report["arms"] = {a: {"score": 0.5} for a in ARMS}
            (run / "report.json").write_text(json.dumps(report))
    elif damage.startswith("report"):
        report = json.loads((run / "report.json").read_text())
        (run / "report.json").write_text(json.dumps({**report, "guard": {"combined": 1}}))
    else:
        rows.write_text(text.replace('"score": 1.0', '"score": null', 1))
    result = CliRunner().invoke(cli, ["study", "--report", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert said in result.output and str(tmp_path) in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "study.json").exists()  # nothing half-written
