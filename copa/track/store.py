"""The tracking store: which one a recipe and the environment name, whether copa can use it
(said at once, before MLflow retries or prints a traceback), and MLflow's UI on it."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from copa.recipe.track_schema import DEFAULT_STORE

ENV = "COPA_TRACK"  # a tracking URI, or off
OFF = ("0", "off", "false", "no", "none")


def store_uri(track: Any = True, environ: Mapping[str, str] | None = None) -> str | None:
    """The tracking store a recipe's `track:` value and the environment name; None = off.
    COPA_TRACK=off wins, then `track: false`, then COPA_TRACK's URI, then the recipe's."""
    environ = os.environ if environ is None else environ
    env = (environ.get(ENV) or "").strip()
    if env.lower() in OFF:
        return None
    if track is False or getattr(track, "enabled", True) is False:
        return None
    uri = env or getattr(track, "mlflow", None) or DEFAULT_STORE
    return absolute(uri)


def absolute(uri: str) -> str:
    """A relative sqlite store made absolute (cells, the trainer's process and `copa ui` may
    start elsewhere: they must find the same file)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def store_problem(uri: str) -> str | None:
    """Why copa cannot use the store `uri`, said at once, or None: not a tracking URI, or an
    sqlite file that cannot be opened (a folder, a place no file can be made, a file that is no
    SQLite database), which MLflow retries for minutes, logging each try."""
    from copa.recipe.track_schema import uri_problem

    problem = uri_problem(uri)
    path = sqlite_path(uri)
    if problem or path is None:
        return problem
    from copa.files import output_problem

    problem = output_problem(path)
    if problem is None and path.exists():
        import contextlib
        import sqlite3

        try:
            with contextlib.closing(sqlite3.connect(str(path), timeout=5)) as db:
                db.execute("PRAGMA schema_version")
        except sqlite3.Error as exc:
            problem = f"not an SQLite database ({exc})"
    return f"{path}: {problem}" if problem else None


# The backend stores `mlflow ui` serves (SQLAlchemy dialects may add a driver: postgresql+psycopg2).
UI_STORE_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql")


def ui_store_problem(uri: str) -> str | None:
    """Why `copa ui` cannot serve `uri`, or None: store_problem's reasons, a tracking server
    (it has its own UI) or a scheme MLflow's UI has no store for (its traceback otherwise)."""
    problem = store_problem(uri)
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if problem or not scheme or scheme in UI_STORE_SCHEMES:
        return problem
    if scheme in ("http", "https"):
        return f"{uri} is a tracking server: open that address for its own UI"
    return (f"MLflow's UI has no store for '{scheme}://': give sqlite:///FILE (a local file) or "
            f"a database URI ({', '.join(s + '://' for s in UI_STORE_SCHEMES[2:])})")


def ui_command_line(store: str | None, port: int) -> tuple[list[str], str]:
    """`mlflow ui` on loopback on copa's store (COPA_TRACK, else the default store)."""
    import sys

    uri = absolute(store) if store else (store_uri(True) or absolute(DEFAULT_STORE))
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    path = sqlite_path(uri)
    if path is not None:
        command += ["--default-artifact-root", (path.parent / "mlartifacts").as_uri()]
    return command, uri


def run_ui(command: list[str]) -> int:
    """Run `mlflow ui` in a process group of its own until it ends, Ctrl-C or SIGTERM; then
    end the whole group (mlflow starts uvicorn below it, which would outlive a plain kill)."""
    import signal
    import subprocess

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    proc = subprocess.Popen(command, start_new_session=True)
    code = 130
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:
                time.sleep(1)  # let uvicorn's workers follow before the group is checked again
    return code
