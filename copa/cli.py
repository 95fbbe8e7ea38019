"""The `copa` command line. Parses arguments, calls copa's Python API, prints. No logic of its own.

Heavy modules (torch, dspy, axolotl) are imported only inside the commands that need them, so
`copa --help` and `copa validate` answer at once.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from copa.cli_errors import OneLineErrors
from copa.cli_errors import check_output as _check_output
from copa.cli_errors import errors as _errors
from copa.cli_errors import user_error as _user_error
from copa.cli_quiet import preload_noisy_modules, quiet_libraries
from copa.cli_see import compare_command, ui_command
from copa.cli_study import study_command
from copa.cli_use import USE_COMMANDS
from copa.pipeline import RECORD, STAGES

recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))
run_dir_opt = click.option("--run-dir", type=click.Path(file_okay=False),
                           help="Run directory (default: runs/<recipe name>).")


def _set(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    from copa.recipe.yamlread import YAMLProblem, read_yaml
    from copa.text import one_line

    overrides = {}
    for item in values:
        if "=" not in item:
            _user_error(f"--set {one_line(item, 80)}: write KEY.PATH=VALUE, e.g. "
                        "--set finetune.num_epochs=2")
        key, value = item.split("=", 1)
        try:
            overrides[key] = read_yaml(value)
        except YAMLProblem as exc:
            _user_error(f"--set {one_line(key, 80)}: the value is not valid YAML "
                        f"({exc}); quote a string, e.g. --set '{key}=\"...\"'")
    return overrides


wait_opt = click.option("--wait", is_flag=True,
                        help="If another copa command works in the run directory, wait for it "
                             "(default: exit 2 saying who holds it).")
set_opt = click.option("--set", "overrides", multiple=True, callback=_set, metavar="KEY=VALUE",
                       help="Override a recipe value, e.g. --set finetune.num_epochs=2.")


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="copa")
def cli(debug: bool) -> None:
    """copa: fine-tune a small model for one task with Axolotl, then optimize its prompts with
    DSPy, from one recipe file.

    \b
    Stages (each can run alone; each reads the previous stage's files in runs/<name>/):
      render -> train -> merge -> optimize -> evaluate

    \b
    Start here:
      copa init my-task          write a starter recipe
      copa validate my-task.yaml check it (exit 2 with every problem if not)
      copa run my-task.yaml      every stage, then the four-arm report

    \b
    Then use what it built (the arm best on val):
      copa predict runs/my-task -i rows.csv -o out.jsonl
      copa serve runs/my-task    an HTTP JSON service on 127.0.0.1:8000
      copa export runs/my-task DIR   a folder to share: model, program, model card
    """


@cli.command()
@recipe_arg
@click.option("--full", is_flag=True,
              help="Also render the Axolotl config and run Axolotl's own validation (slower).")
@set_opt
@_errors
def validate(recipe: str, full: bool, overrides: dict[str, Any]) -> None:
    """Check RECIPE: schema, model, template, data columns, splits. Exit 2 on any problem."""
    from copa.checks import check_recipe
    from copa.recipe import load_recipe

    checked = check_recipe(load_recipe(recipe, overrides=overrides))
    if full:
        import tempfile

        quiet_libraries()
        from copa.stages.render import render

        with tempfile.TemporaryDirectory() as tmp:
            render(checked, Path(tmp))
    s = checked.splits
    click.echo(f"{recipe}: ok ({checked.recipe.task.signature}; "
               f"train {len(s.train)}, val {len(s.val)}, test {len(s.test)})")
    for note in s.notes:
        click.echo(f"  note: {note}")


@cli.command()
@recipe_arg
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Folder to write into (default: RUN_DIR/rendered).")
@run_dir_opt
@wait_opt
@set_opt
@_errors
def render(recipe: str, output: str | None, run_dir: str | None, wait: bool,
           overrides: dict[str, Any]) -> None:
    """Render RECIPE: data splits, training rows, prompt preview and a validated axolotl.yml."""
    quiet_libraries()
    from copa.checks import check_recipe
    from copa.files import removed_on_failure
    from copa.recipe import load_recipe
    from copa.runs import run_dir_for, run_dir_locked
    from copa.stages.render import render as render_files

    if output and run_dir:
        raise click.UsageError("give -o/--output (a folder of its own) or --run-dir (its "
                               "rendered/ folder), not both")
    _check_output(output, "-o/--output", folder=True)
    _check_output(run_dir, "--run-dir", folder=True)
    checked = check_recipe(load_recipe(recipe, overrides=overrides))
    if output:
        out = Path(output)
        with removed_on_failure(out):  # a failed render leaves none of its files
            result = render_files(checked, out, emit=click.echo)
    else:  # into the run directory: not while another command works there
        directory = run_dir_for(checked.recipe, run_dir).resolve()
        out = directory / "rendered"
        with run_dir_locked(directory, wait=wait, emit=click.echo):
            result = render_files(checked, out, emit=click.echo)
    click.echo(f"wrote {out}/ (axolotl.yml, train.jsonl [{result.train_rows} rows], val.jsonl, "
               "splits/, prompt_preview.txt)")


def _stage_command(name: str, help_text: str):
    @cli.command(name=name, help=help_text)
    @recipe_arg
    @run_dir_opt
    @click.option("--force", is_flag=True, help=f"Re-run {name} even if its inputs are unchanged.")
    @wait_opt
    @set_opt
    @_errors
    def command(recipe: str, run_dir: str | None, force: bool, wait: bool,
                overrides: dict[str, Any]) -> None:
        _check_output(run_dir, "--run-dir", folder=True)
        quiet_libraries()
        preload_noisy_modules()
        from copa import pipeline

        pipeline.run(recipe, stages=[name], force=[name] if force else [], run_dir=run_dir,
                     emit=click.echo, overrides=overrides, wait=wait)

    return command


for _stage in RECORD:  # `copa train`, `copa merge`, ...: the stages with a command of their own
    if _stage.help:
        _stage_command(_stage.name, _stage.help)


@cli.command()
@recipe_arg
@run_dir_opt
@click.option("--force", "force", multiple=True, is_flag=False, flag_value="all",
              type=click.Choice(["all", *STAGES]),
              help="Re-run a stage (and what follows) even if unchanged; bare --force = all.")
@wait_opt
@set_opt
@_errors
def run(recipe: str, run_dir: str | None, force: tuple[str, ...], wait: bool,
        overrides: dict[str, Any]) -> None:
    """Every stage of RECIPE in order (unchanged ones are skipped), then the report."""
    _check_output(run_dir, "--run-dir", folder=True)
    quiet_libraries()
    preload_noisy_modules()
    from copa import pipeline

    forced = list(STAGES) if "all" in force else _with_downstream(force)
    result = pipeline.run(recipe, force=forced, run_dir=run_dir, emit=click.echo,
                          overrides=overrides, wait=wait)
    report_md = result.dir / "report.md"
    if report_md.is_file():
        click.echo("")
        click.echo(report_md.read_text())


def _with_downstream(stages: tuple[str, ...]) -> list[str]:
    if not stages:
        return []
    first = min(STAGES.index(s) for s in stages)
    return list(STAGES[first:])


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@_errors
def report(run_dir: str) -> None:
    """Print the report table of a finished run directory."""
    from copa.use.bundle import NotFinished, check_finished

    path = Path(run_dir) / "report.md"
    if not path.is_file():
        _user_error(f"{path} does not exist: run `copa run` or `copa evaluate`")
    try:
        check_finished(Path(run_dir))  # a stage before evaluate ran again: not this run's table
        text = path.read_text(encoding="utf-8")
    except NotFinished as exc:
        _user_error(str(exc))
    except UnicodeDecodeError as exc:
        _user_error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}): not a report "
                    "copa wrote; `copa evaluate RECIPE --force` writes it again")
    click.echo(text)


@cli.command()
@click.argument("name", default="my-task")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="File to write (default: NAME.yaml).")
@_errors
def init(name: str, output: str | None) -> None:
    """Write a starter recipe NAME.yaml (Iris + the embedded model) that validates as is."""
    from copa.files import atomic_write_text
    from copa.prompting import templates_dir
    from copa.recipe.schema import NAME

    if name.endswith((".yaml", ".yml")) and not name.startswith("."):
        # `copa init my-task.yaml` means the file my-task.yaml, the recipe my-task
        output = output or name
        name = name.rsplit(".", 1)[0]
    if not NAME.match(name):
        _user_error(f"NAME {name[:80]!r}: use letters, digits, '-', '_' or '.' (it names the "
                    "recipe and its run folder); -o says where the file goes")
    target = Path(output or f"{name}.yaml")
    if target.exists():
        _user_error(f"{target} exists; choose another name or -o")
    _check_output(output or str(target), "-o/--output")  # as typed: "sub/" is no file name
    text = (templates_dir() / "recipe" / "starter.yaml").read_text().replace("{{ name }}", name)
    atomic_write_text(target, text)  # its folder made, as output_problem allowed
    click.echo(f"wrote {target}: edit it, then `copa validate {shlex.quote(str(target))}`")


for command in USE_COMMANDS:
    cli.add_command(command)
cli.add_command(study_command(_errors, quiet_libraries, preload_noisy_modules))
cli.add_command(compare_command(_errors))
cli.add_command(ui_command(_errors))


def main() -> None:
    cli(prog_name="copa")


if __name__ == "__main__":
    main()
