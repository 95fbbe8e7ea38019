"""The one error path of the command line: every user error is one line naming the file and
key (or the option), exit 2; a failure of the work itself is one line, exit 1; tracebacks only
with --debug (or COPA_DEBUG). Click's own usage errors are said the same way."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import click

from copa.text import on_one_line

EXIT_RECIPE = 2
EXIT_FAILED = 1


def errors(func):
    """Turn known failures into one-line messages and exit codes; --debug shows the traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from copa.files import DamagedFile
        from copa.metrics import MetricValueError
        from copa.models import ModelFolderError
        from copa.prompting import PromptError
        from copa.recipe import RecipeError
        from copa.runs import RunDirBusy
        from copa.use.bundle import NotFinished
        from copa.use.export import ExportRefused
        from copa.use.predict import InputError

        ctx = click.get_current_context()
        debug = (ctx.find_root().params.get("debug") or os.environ.get("COPA_DEBUG"))
        try:
            return func(*args, **kwargs)
        except RecipeError as exc:
            if debug:
                raise
            for problem in exc.problems:
                click.echo(on_one_line(str(problem)), err=True)
            sys.exit(EXIT_RECIPE)
        except (PromptError, RunDirBusy, NotFinished, InputError, ExportRefused,
                MetricValueError, DamagedFile, ModelFolderError) as exc:
            if debug:
                raise
            click.echo(on_one_line(str(exc)), err=True)
            sys.exit(EXIT_RECIPE)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException:
            raise  # OneLineErrors says it in one line
        except OSError as exc:
            if debug:
                raise
            if not exc.filename:  # no path of the user's to name: copa's own failure, below
                _failed(exc)
            # a path the user gave that cannot be read or written: theirs to fix
            where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename
            click.echo(on_one_line(f"{where}: {exc.strerror or exc}"), err=True)
            sys.exit(EXIT_RECIPE)
        except Exception as exc:
            if debug:
                raise
            _failed(exc)

    return wrapper


def _failed(exc: BaseException) -> None:
    """A failure of the work itself: one line, exit 1; an unexpected exception says its type
    and how to see the traceback (it is not the user's to fix, so never hidden as theirs)."""
    name = type(exc).__name__
    if name in ("TrainError", "ModelError", "OptimizeError", "EvaluateError", "ServeError",
                "ExportError", "GGUFError"):
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"error: {name}: {exc} (run with --debug for the traceback)", err=True)
    sys.exit(EXIT_FAILED)


def user_error(message: str) -> None:
    """A user error found while reading the command line: one line, exit 2."""
    click.echo(message, err=True)
    sys.exit(EXIT_RECIPE)


class OneLineErrors(click.Group):
    """click's usage errors as one line ("copa predict: Missing option '-i' / '--input' (copa
    predict --help)") and exit 2, like every other user error, instead of a usage block."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        prog_name = "copa"  # also under `python -m copa.cli` and click's test runner
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `copa`: its help, as click
            click.echo(exc.format_message(), err=True)
            sys.exit(EXIT_RECIPE)
        except click.ClickException as exc:
            from copa.text import one_line

            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else self.command_named(args, prog_name)
            hint = f" ({where} --help)" if isinstance(exc, click.UsageError) else ""
            click.echo(f"{where}: {one_line(exc.format_message(), 500)}{hint}", err=True)
            sys.exit(EXIT_RECIPE if isinstance(exc, click.UsageError) else exc.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(EXIT_FAILED)

    def command_named(self, args: Any, prog_name: str) -> str:
        """The command path the arguments name ("copa validate"), for the errors click raises
        without a context (an option missing its value)."""
        words = list(sys.argv[1:] if args is None else args)
        path, group = [prog_name], self
        for word in words:
            command = group.commands.get(word) if isinstance(group, click.Group) else None
            if command is None:
                break
            path.append(word)
            group = command
        return " ".join(path)


def check_output(path: str | None, option: str, folder: bool = False) -> None:
    """An output path that cannot be written is a user error before any work (exit 2)."""
    from copa.files import output_problem
    from copa.use.predict import InputError

    problem = output_problem(path, folder) if path else None
    if problem:
        raise InputError(f"{path}: {problem} ({option})")
