"""The commands that use a finished run (or a `copa export` folder): predict, serve, export."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from copa.cli_errors import EXIT_FAILED, check_output, errors, user_error
from copa.cli_quiet import preload_noisy_modules, quiet_dspy, quiet_libraries
from copa.registry import ARMS


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
            user_error(f"--host {host}: not an address of this machine ({exc.strerror or exc}); "
                        "give one such as 127.0.0.1 (this machine only) or 0.0.0.0 (all)")
        user_error(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
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


@click.command()
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
@errors
def predict(run_dir: str, input_path: str, output: str | None, arm: str,
            threads: int | None, max_input_tokens: int | None) -> None:
    """Predict on every row of a file with a finished run (or a `copa export` folder): one JSON
    line per input row, in order: the row, "prediction" and "error" (null, or why it failed;
    a field over the token limit fails its row only). The output is strict JSON: a number that
    is not finite (NaN, Infinity) in an input row is written as null."""
    quiet_libraries()
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

    check_output(output, "-o/--output")
    if output and same_file(input_path, output):  # the input would be gone once it is written
        raise InputError(f"{output}: is the input file (-i {input_path}); predictions would "
                         "overwrite it: give -o another file")
    bundle = open_bundle(run_dir, arm)
    _limit_tokens(bundle, max_input_tokens)
    rows = read_rows(input_path)
    mapping = check_columns(rows, bundle.input_fields, bundle.recipe.data.columns, input_path)
    preload_noisy_modules()
    from copa.use.load import load_bundle

    quiet_dspy()
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


@click.command()
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
@errors
def serve(run_dir: str, host: str, port: int, arm: str, api_key: str | None,
          max_input_tokens: int | None, timeout_s: float, max_body_bytes: int | None,
          read_timeout_s: float) -> None:
    """Serve a finished run (or a `copa export` folder) over HTTP: POST /predict with the input
    fields as JSON answers the output fields; GET /health; API docs at /docs. Fields over the
    token limit, bodies over the size limit and requests past the time limit are refused
    without touching the model; SIGTERM / Ctrl-C stop it within seconds."""
    quiet_libraries()
    from copa.use.bundle import open_bundle

    bundle = open_bundle(run_dir, arm)
    _limit_tokens(bundle, max_input_tokens)
    _check_port(host, port)
    api_key = api_key or None
    preload_noisy_modules()
    from copa.use.load import load_bundle
    from copa.use.serve import LOOPBACK, make_app, run_server

    quiet_dspy()
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


@click.command(name="export")
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
@errors
def export_command(run_dir: str, out_dir: str, arm: str, fmt: str, outtype: str,
                   verify: bool) -> None:
    """Write one arm of a finished run into OUT_DIR, usable without the run directory: the model,
    the optimized program, the prompt template and recipe, and a model card (README.md).
    --format gguf writes model.gguf and an Ollama Modelfile instead of the model folder."""
    check_output(out_dir, "OUT_DIR", folder=True)  # a file, or an unwritable place
    quiet_libraries()
    if fmt == "gguf":
        preload_noisy_modules()
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


USE_COMMANDS = [predict, serve, export_command]
