"""The `copa study` command (registered by copa.cli, which hands in its error handling and
library quieting: this module imports nothing of copa's CLI, so there is no import circle)."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def _seed_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    from copa.recipe.schema import MAX_SEED

    parts = [part.strip() for part in value.split(",")]
    if value.strip() and not all(parts):  # "1,,2" or "1,": a seed left out, not a spacing
        raise click.BadParameter(f"{value!r}: a seed is missing between commas, "
                                 "e.g. --seeds 0,1")
    # int() also reads '+2', '1_0' and other scripts' digits: a seed is written in plain
    # digits ('-1' goes on to the range's message)
    if not all(re.fullmatch(r"-?[0-9]+", part) for part in parts if part):
        raise click.BadParameter(f"{value!r}: write whole numbers separated by commas, "
                                 "e.g. --seeds 0,1")
    seeds = [int(part) for part in parts if part]
    if not seeds:
        raise click.BadParameter("give at least one seed, e.g. --seeds 0")
    if any(not 0 <= seed <= MAX_SEED for seed in seeds):
        raise click.BadParameter(f"{value!r}: seeds are whole numbers from 0 to {MAX_SEED}")
    if len(set(seeds)) < len(seeds):
        raise click.BadParameter(f"{value!r}: a seed is repeated")
    return seeds


def study_command(errors: Callable[[Any], Any], quiet: Callable[[], None],
                  preload: Callable[[], None]) -> click.Command:
    @click.command(name="study")
    @click.argument("study_file", metavar="STUDY.yaml", required=False,
                    type=click.Path(dir_okay=False))
    @click.option("--report", "report_dir", type=click.Path(file_okay=False, exists=True),
                  help="Re-aggregate and print the study in DIR (no cell runs).")
    @click.option("--executor", type=click.Choice(["sequential", "ray"]), default="sequential",
                  show_default=True, help="ray: each cell a Ray task with the study's "
                  "resources (a local Ray instance, or --ray-address / RAY_ADDRESS).")
    @click.option("--ray-address", metavar="ADDRESS", help="A running Ray cluster to use.")
    @click.option("--print-commands", is_flag=True,
                  help="Print one `copa run ... --set ...` command per cell (for Slurm, "
                       "Kubernetes jobs, ...) and run nothing; then `copa study --report DIR`.")
    @click.option("--out", "out_dir", type=click.Path(file_okay=False),
                  help="Study folder (default: the study's run_dir, else runs/<name>).")
    @click.option("--seeds", callback=_seed_list, metavar="0,1,...",
                  help="Run only these seeds now, e.g. --seeds 0 for a first look; a later run "
                  "skips the cells already finished, and the report covers every finished seed.")
    def study(study_file: str | None, report_dir: str | None, executor: str,
              ray_address: str | None, print_commands: bool, out_dir: str | None,
              seeds: list[int] | None) -> None:
        """Run STUDY.yaml: a base recipe over a grid of overrides and several seeds, every cell
        an ordinary run directory under runs/<study>/<cell>/seed-<n>/ (finished cells are
        skipped; a killed study continues), then study.json, study.md and study.png with the
        arms' means over seeds, the synergy and interaction, and their 95% intervals."""
        if (study_file is None) == (report_dir is None):
            raise click.UsageError("give STUDY.yaml, or --report DIR (one of the two)")
        from copa.files import output_problem

        problem = output_problem(Path(out_dir), folder=True) if out_dir else None
        if problem:
            raise click.BadParameter(f"{out_dir}: {problem}", param_hint="--out")
        run(study_file, report_dir, executor, ray_address, print_commands, out_dir, seeds)

    @errors
    def run(study_file: str | None, report_dir: str | None, executor: str,
            ray_address: str | None, print_commands: bool, out_dir: str | None,
            seeds: list[int] | None) -> None:
        quiet()
        if report_dir is not None:
            from copa.study.runner import report_study

            report_study(report_dir)
            click.echo((Path(report_dir) / "study.md").read_text())
            return
        if print_commands:
            from copa.study.runner import study_commands

            found, commands = study_commands(study_file, out_dir, seeds)
            click.echo("\n".join(commands))
            click.echo(f"# then: copa study --report {shlex.quote(str(found.dir))}", err=True)
            return
        preload()
        from copa.study.runner import run_study

        data, results = run_study(study_file, executor=executor, out_dir=out_dir,
                                  emit=click.echo, ray_address=ray_address, seeds=seeds)
        from copa.study.write import markdown

        failed = [r for r in results if r["status"] == "failed"]
        click.echo("")
        click.echo(markdown(data))
        if failed:
            for result in failed:
                click.echo(f"cell {result['dir']} failed: {result['error']}", err=True)
            sys.exit(1)

    return study

