"""The `copa` command line. Parses arguments, calls copa's Python API, prints. No logic of its own.

Heavy modules (torch, dspy, axolotl) are imported only inside the commands that need them, so
`copa --help` and `copa validate` answer at once.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from copa.cli_errors import EXIT_FAILED, OneLineErrors
from copa.cli_errors import check_output as _check_output
from copa.cli_errors import errors as _errors
from copa.cli_errors import user_error as _user_error
from copa.cli_see import compare_command, ui_command
from copa.cli_study import study_command
from copa.pipeline import RECORD, STAGES
from copa.registry import ARMS


def _quiet_libraries() -> None:
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Batch-size-independent float32 matmuls, so batched greedy outputs equal one-at-a-time
    # ones; MKL reads it once, before torch's first matmul (see copa.inference.engine).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    # DSPy warns per call (e.g. an answer cut at max_tokens): thousands of lines for a file of
    # rows or a server's traffic. The stages keep DSPy's chatter in their logs instead.
    logging.getLogger("dspy").setLevel(logging.ERROR)
    # bitsandbytes (imported with Axolotl, to validate a config) looks for a kernels-community
    # CPU kernel and logs a warning when offline; torchao logs its CUDA kernels' absence.
    for name in ("bitsandbytes", "torchao"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _preload_noisy_modules() -> None:
    """torchao prints load failures of its CUDA kernels on import (harmless on CPU); import it
    once here with those prints silenced, before a model load pulls it in loudly."""
    import importlib.util

    from copa.files import quiet_fds

    if importlib.util.find_spec("torchao") is not None:
        with quiet_fds():
            import torchao  # noqa: F401

            try:  # its prototype formats register enums with torch's pytree, loudly
                importlib.import_module("torchao.prototype.mx_formats")
            except Exception:  # an optional, experimental module: never fail a run on it
                pass


def _quiet_dspy() -> None:
    """DSPy sets its logger to INFO when imported (after _quiet_libraries ran): a warning per
    call (an answer cut at max_tokens) would flood a server's or a file's output."""
    import logging

    logging.getLogger("dspy").setLevel(logging.ERROR)


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

        _quiet_libraries()
        from copa.stages.render import render

        with tempfile.TemporaryDirectory() as tmp:
            render(checked, Path(tmp))
    s = checked.splits
    click.echo(f"{recipe}: ok ({checked.recipe.task.signature}; "
               f"train {len(s.train)}, val {len(s.val)}, test {len(s.test)})")


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
    _quiet_libraries()
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
        _quiet_libraries()
        _preload_noisy_modules()
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
    _quiet_libraries()
    _preload_noisy_modules()
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
    path = Path(run_dir) / "report.md"
    if not path.is_file():
        _user_error(f"{path} does not exist: run `copa run` or `copa evaluate`")
    click.echo(path.read_text())


@cli.command()
@click.argument("name", default="my-task")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="File to write (default: NAME.yaml).")
@_errors
def init(name: str, output: str | None) -> None:
    """Write a starter recipe NAME.yaml (Iris + the embedded model) that validates as is."""
    import re

    from copa.files import atomic_write_text
    from copa.prompting import templates_dir

    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", name):
        _user_error(f"NAME {name[:80]!r}: use letters, digits, '-', '_' or '.' (it names the "
                    "recipe and its run folder); -o says where the file goes")
    target = Path(output or f"{name}.yaml")
    if target.exists():
        _user_error(f"{target} exists; choose another name or -o")
    _check_output(output or str(target), "-o/--output")  # as typed: "sub/" is no file name
    text = (templates_dir() / "recipe" / "starter.yaml").read_text().replace("{{ name }}", name)
    atomic_write_text(target, text)  # its folder made, as output_problem allowed
    click.echo(f"wrote {target}: edit it, then `copa validate {shlex.quote(str(target))}`")


def _limit_tokens(bundle: Any, max_input_tokens: int | None) -> int:
    from copa.use.limits import limit_tokens
    from copa.use.predict import InputError

    try:
        return limit_tokens(bundle.recipe, bundle.model_path, max_input_tokens)
    except ValueError as exc:
        raise InputError(f"--max-input-tokens: {exc}") from None


def _check_port(host: str, port: int) -> None:
    """A port taken (or a host this machine does not have) is said before the model loads."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as exc:
        # a name that resolves to nothing, or an address of another machine: the host is wrong
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            _user_error(f"--host {host}: not an address of this machine ({exc.strerror or exc}); "
                        "give one such as 127.0.0.1 (this machine only) or 0.0.0.0 (all)")
        _user_error(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                    "choose another --port")


class _Seconds(click.FloatRange):
    """A FloatRange that refuses NaN (every comparison with it is false, so click's range lets
    it through: `--timeout nan` answered every request 408 at once)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return number


max_input_tokens_opt = click.option(
    "--max-input-tokens", type=click.IntRange(min=1), metavar="N",
    help="Longest input field, in tokens (default: the recipe's finetune.sequence_len, within "
         "the model's context); a longer one is refused before the model sees it.")
arm_opt = click.option("--arm", default="best", show_default=True,
                       type=click.Choice(["best", *ARMS]),
                       help="Which arm: best = the best on the val split (never on test).")
use_dir_arg = click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False))


@cli.command()
@use_dir_arg
@click.option("-i", "--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="Rows to predict on: .csv, .jsonl, .json or .parquet, one column per input "
                   "field.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="JSONL file to write (default: standard output).")
@arm_opt
@click.option("--threads", type=click.IntRange(min=1, max=256),
              help="Rows in flight at once (default: the recipe's evaluate.num_threads).")
@max_input_tokens_opt
@_errors
def predict(run_dir: str, input_path: str, output: str | None, arm: str,
            threads: int | None, max_input_tokens: int | None) -> None:
    """Predict on every row of a file with a finished run (or a `copa export` folder): one JSON
    line per input row, in order: the row, "prediction" and "error" (null, or why it failed;
    a field over the token limit fails its row only). The output is strict JSON: a number that
    is not finite (NaN, Infinity) in an input row is written as null."""
    _quiet_libraries()
    from copa.files import atomic_write_text, same_file
    from copa.use.bundle import open_bundle
    from copa.use.predict import (
        InputError,
        check_columns,
        output_line,
        predict_rows,
        progress_bar,
        read_rows,
    )

    _check_output(output, "-o/--output")
    if output and same_file(input_path, output):  # the input would be gone once it is written
        raise InputError(f"{output}: is the input file (-i {input_path}); predictions would "
                         "overwrite it: give -o another file")
    bundle = open_bundle(run_dir, arm)
    _limit_tokens(bundle, max_input_tokens)
    rows = read_rows(input_path)
    mapping = check_columns(rows, bundle.input_fields, bundle.recipe.data.columns, input_path)
    _preload_noisy_modules()
    from copa.use.load import load_bundle

    _quiet_dspy()
    with load_bundle(bundle, emit=lambda m: click.echo(m, err=True),
                     max_input_tokens=max_input_tokens,
                     how="copa predict --max-input-tokens N changes it") as program, \
            progress_bar(len(rows), bundle.arm) as tick:
        results = predict_rows(program, rows, mapping,
                               threads or bundle.recipe.evaluate.num_threads, tick)
    text = "".join(output_line(r) for r in results)
    failed = sum(r["error"] is not None for r in results)
    if output:
        atomic_write_text(Path(output), text)
    else:
        click.echo(text, nl=False)
    click.echo(f"{len(results)} rows predicted with the {bundle.arm} arm, {failed} failed"
               + (f" -> {output}" if output else ""), err=True)
    if failed == len(results):
        sys.exit(EXIT_FAILED)


@cli.command()
@use_dir_arg
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback: only this machine).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="Port to listen on (1-65535).")
@arm_opt
@click.option("--api-key", envvar="COPA_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /predict (or set COPA_API_KEY).")
@max_input_tokens_opt
@click.option("--timeout", "timeout_s", type=_Seconds(min=0.1, max=3600), default=60.0,
              show_default=True, help="One request's time limit in seconds (504 past it).")
@click.option("--max-body-bytes", type=click.IntRange(min=256), metavar="N",
              help="Largest request body read (413 over it; default: every field at its token "
                   "limit).")
@click.option("--read-timeout", "read_timeout_s", type=_Seconds(min=0.1, max=3600),
              default=10.0, show_default=True,
              help="Seconds a client has to send a request head (then its connection is closed) "
                   "and again to send the body (408 past it): idle connections hold no place.")
@_errors
def serve(run_dir: str, host: str, port: int, arm: str, api_key: str | None,
          max_input_tokens: int | None, timeout_s: float, max_body_bytes: int | None,
          read_timeout_s: float) -> None:
    """Serve a finished run (or a `copa export` folder) over HTTP: POST /predict with the input
    fields as JSON answers the output fields; GET /health; API docs at /docs. Fields over the
    token limit, bodies over the size limit and requests past the time limit are refused
    without touching the model; SIGTERM / Ctrl-C stop it within seconds."""
    _quiet_libraries()
    from copa.use.bundle import open_bundle

    bundle = open_bundle(run_dir, arm)
    _limit_tokens(bundle, max_input_tokens)
    _check_port(host, port)
    api_key = api_key or None
    _preload_noisy_modules()
    from copa.use.load import load_bundle
    from copa.use.serve import LOOPBACK, make_app, run_server

    _quiet_dspy()
    if host not in LOOPBACK and api_key is None:
        click.echo(f"warning: listening on {host} without --api-key: anyone who reaches this "
                   "port can use the model", err=True)
    with load_bundle(bundle, emit=lambda m: click.echo(m, err=True),
                     max_input_tokens=max_input_tokens,
                     how="copa serve --max-input-tokens N changes it") as program:
        app = make_app(program, api_key, timeout_s=timeout_s, max_body_bytes=max_body_bytes,
                       read_timeout_s=read_timeout_s)
        click.echo(f"serving the {bundle.arm} arm of {bundle.root} on http://{host}:{port} "
                   f"(POST /predict, GET /health, docs at /docs; input fields up to "
                   f"{program.limit.max_tokens} tokens); Ctrl-C stops", err=True)
        engine = getattr(program.lm, "engine", None)
        # On stop, what is still queued fails at once: no request thread outlives the server.
        run_server(app, host, port, read_timeout_s=read_timeout_s, on_stop=lambda: getattr(
            engine, "close", lambda wait=True: None)(wait=False))


@cli.command(name="export")
@use_dir_arg
@click.argument("out_dir", type=click.Path())
@arm_opt
@click.option("--format", "fmt", default="hf", show_default=True, type=click.Choice(["hf", "gguf"]),
              help="hf: a folder copa, transformers and vLLM load; gguf: model.gguf and an "
                   "Ollama Modelfile for llama.cpp / Ollama.")
@click.option("--outtype", default="f16", show_default=True,
              type=click.Choice(["f32", "f16", "q8_0"]), help="GGUF weight type (--format gguf).")
@click.option("--verify", is_flag=True,
              help="Score the GGUF on the run's test split and compare with the run's own "
                   "answers; the numbers go into the model card (--format gguf).")
@_errors
def export_command(run_dir: str, out_dir: str, arm: str, fmt: str, outtype: str,
                   verify: bool) -> None:
    """Write one arm of a finished run into OUT_DIR, usable without the run directory: the model,
    the optimized program, the prompt template and recipe, and a model card (README.md).
    --format gguf writes model.gguf and an Ollama Modelfile instead of the model folder."""
    _check_output(out_dir, "OUT_DIR", folder=True)  # a file, or an unwritable place
    _quiet_libraries()
    if fmt == "gguf":
        _preload_noisy_modules()
        from copa.use.export_gguf import export_gguf

        out = export_gguf(run_dir, out_dir, arm, outtype, verify, emit=click.echo)
        click.echo(f"wrote {out}/ (model.gguf, Modelfile, chat-example.json, README.md); try "
                   f"`cd {out} && ollama create NAME -f Modelfile`")
        return
    from copa.use.export import ExportRefused, export

    if verify or outtype != "f16":
        raise ExportRefused("--outtype and --verify go with --format gguf")

    out = export(run_dir, out_dir, arm, emit=click.echo)
    click.echo(f"wrote {out}/ (model/, program.json, template.jinja, recipe.yaml, README.md); "
               f"try `copa serve {shlex.quote(str(out))}`")


cli.add_command(study_command(_errors, _quiet_libraries, _preload_noisy_modules))
cli.add_command(compare_command(_errors))
cli.add_command(ui_command(_errors))


def main() -> None:
    cli(prog_name="copa")


if __name__ == "__main__":
    main()
