"""The commands that look at finished runs: `copa compare` (runs side by side, paired
differences) and `copa ui` (MLflow's UI on the tracking store). copa.cli registers them and hands
in its error handling; this module imports nothing of copa's CLI (no import circle)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

EXIT_USAGE = 2


def compare_command(errors: Callable[[Any], Any]) -> click.Command:
    @click.command(name="compare")
    @click.argument("run_dirs", metavar="RUN_A RUN_B [RUN ...]", nargs=-1, required=True,
                    type=click.Path(file_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
    @click.option("--html", "html_path", type=click.Path(dir_okay=False),
                  help="Also write a self-contained HTML page (charts and table) here.")
    @click.option("--png", "png_path", type=click.Path(dir_okay=False),
                  help="Also write the charts as a PNG here.")
    @click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=10),
                  help="Bootstrap resamples for the paired differences.")
    @click.option("--seed", default=0, show_default=True, type=int,
                  help="Seed of the bootstrap's resampling.")
    @errors
    def compare(run_dirs: tuple[str, ...], as_json: bool, html_path: str | None,
                png_path: str | None, bootstrap: int, seed: int) -> None:
        """The arms of several finished runs side by side, and each run's difference from the
        first run (RUN_A), arm by arm, with a paired-bootstrap 95% interval: did my change
        help? Runs must share their test rows (checked by hash; refused otherwise)."""
        from copa.files import atomic_write_bytes, atomic_write_text, output_problem
        from copa.use import compare as view

        for path, option in ((html_path, "--html"), (png_path, "--png")):
            problem = output_problem(path) if path else None
            if problem:
                raise click.BadParameter(f"{path}: {problem}", param_hint=option)
        try:
            data = view.compare(list(run_dirs), resamples=bootstrap, seed=seed)
        except view.CompareError as exc:
            click.echo(f"copa compare: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        if html_path:
            atomic_write_text(Path(html_path), view.html(data))
        if png_path:
            atomic_write_bytes(Path(png_path), view.png(data))
        click.echo(json.dumps(data, indent=2) if as_json else view.text(data))
        for path in (html_path, png_path):
            if path:
                click.echo(f"wrote {path}", err=True)

    return compare


def ui_command(errors: Callable[[Any], Any]) -> click.Command:
    @click.command(name="ui")
    @click.option("--store", metavar="URI",
                  help="Tracking store (default: COPA_TRACK, else sqlite:///runs/mlflow.db).")
    @click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
    @errors
    def ui(store: str | None, port: int) -> None:
        """Start MLflow's UI on 127.0.0.1 (this machine only) on copa's tracking store: every
        run's recipe, training curves, arms with intervals, reports and predictions."""
        from copa.track.store import run_ui, ui_command_line, ui_store_problem

        command, uri = ui_command_line(store, port)
        problem = ui_store_problem(uri)
        if problem:  # else MLflow's traceback, or minutes of retries on an sqlite file
            raise click.BadParameter(problem, param_hint="--store" if store else
                                     "the store (COPA_TRACK)")
        click.echo(f"MLflow UI for {uri} on http://127.0.0.1:{port} (Ctrl-C stops)", err=True)
        sys.exit(run_ui(command))

    return ui
