"""Serve a model folder over an OpenAI-compatible HTTP API on loopback and point DSPy at it.

`serving(kind, ...)` starts a server process for the block's lifetime: "vllm" (CUDA) or
"transformers" (`transformers serve`, runs on CPU); `server_lm` points DSPy at any server (one the
user runs, too). Which recipe engine uses which is copa.recipe.serve_schema.ENGINES's business. A
started server never outlives the block: it is stopped on normal exit, on an exception, on
Ctrl-C, on SIGTERM to this process, and (as a last resort) at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dspy

HOST = "127.0.0.1"

# DSPy (lm15) model prefix for every OpenAI-compatible server. Not "openai/": that dialect sends
# the token limit as `max_completion_tokens`, which `transformers serve` silently ignores (it then
# generates 1024 tokens per call). The vLLM dialect sends `max_tokens`, which vLLM,
# `transformers serve` and the other common self-hosted servers all honour.
LM_PREFIX = "hosted_vllm"


class ServeError(Exception):
    """A model server could not be started, or is misconfigured."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _executable(name: str) -> str:
    # Prefer the script next to this interpreter: a venv's bin/ need not be on PATH.
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        hint = {"vllm": "pip install vllm (CUDA machines)",
                "transformers": "pip install 'transformers[serving]'"}.get(name, "")
        raise ServeError(f"{name!r} is not installed or not on PATH; {hint}")
    return found


def served_model_id(engine: str, model_path: str, name: str) -> str:
    """The `model` value requests must carry. vLLM serves under --served-model-name; `transformers
    serve` is pinned to its FORCE_MODEL argument and rejects any other id with HTTP 400."""
    return model_path if engine == "transformers" else name


def server_command(engine: str, model_path: str, port: int, *, name: str | None = None,
                   extra_args: Sequence[str] = (), trust_remote_code: bool = False) -> list[str]:
    """The argv that serves model_path on 127.0.0.1:port with an OpenAI-compatible API."""
    # both servers spell the recipe's model.trust_remote_code the same way
    trust = ["--trust-remote-code"] if trust_remote_code else []
    if engine == "vllm":
        return [_executable("vllm"), "serve", model_path, "--host", HOST, "--port", str(port),
                "--served-model-name", name or model_path, *trust, *extra_args]
    if engine == "transformers":
        # The model is the positional FORCE_MODEL: preloaded before the port opens, never unloaded.
        # It is parsed as "id@revision", so an "@" in the path would be misread.
        if "@" in model_path:
            raise ServeError(f"transformers serve cannot load a path containing '@': {model_path}")
        return [_executable("transformers"), "serve", model_path, "--host", HOST,
                "--port", str(port), *trust, *extra_args]
    raise ServeError(f"unknown server engine {engine!r}; copa starts vllm or transformers")


# --- process bookkeeping -------------------------------------------------------------------------

_LIVE: set[ServerProcess] = set()
_LIVE_LOCK = threading.Lock()
_PREVIOUS_SIGTERM: Any = None  # the handler we replaced, while ours is installed


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Python's default SIGTERM action ends the process without running `finally` blocks or atexit
    # hooks, which would orphan the server (it runs in its own session). Raising instead unwinds
    # every `with serving(...)` block, which stops its server.
    raise SystemExit(128 + signum)


def _set_sigterm(handler: Any) -> bool:
    try:
        signal.signal(signal.SIGTERM, handler)
        return True
    except ValueError:  # not the main thread: signals can only be (re)set there
        return False


def _track(server: ServerProcess) -> None:
    global _PREVIOUS_SIGTERM
    with _LIVE_LOCK:
        _LIVE.add(server)
        # Only take over SIGTERM if nobody else handles it (an app's own handler stays in charge).
        if _PREVIOUS_SIGTERM is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL \
                and _set_sigterm(_on_sigterm):
            _PREVIOUS_SIGTERM = signal.SIG_DFL


def _untrack(server: ServerProcess) -> None:
    global _PREVIOUS_SIGTERM
    with _LIVE_LOCK:
        _LIVE.discard(server)
        if not _LIVE and _PREVIOUS_SIGTERM is not None \
                and signal.getsignal(signal.SIGTERM) is _on_sigterm \
                and _set_sigterm(_PREVIOUS_SIGTERM):
            _PREVIOUS_SIGTERM = None


def live_servers() -> list[ServerProcess]:
    """Servers started by this process and not yet stopped."""
    with _LIVE_LOCK:
        return list(_LIVE)


@atexit.register
def stop_all() -> None:
    """Stop every server this process started (also runs at interpreter exit)."""
    for server in live_servers():
        server.stop(grace_s=5.0)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (cannot happen for our own group)
        return True
    return True


class ServerProcess:
    """A server process in its own session, ready once GET /v1/models answers.

    Use as a context manager: entering starts it and waits until it answers (or raises ServeError
    with the log's last lines); leaving, however it happens, stops its whole process group.
    """

    def __init__(self, command: Sequence[str], port: int, log_path: Path | str, *,
                 startup_timeout_s: float = 300.0, env: Mapping[str, str] | None = None) -> None:
        self.command = list(command)
        self.port = port
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.env = dict(env) if env is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._stop_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> ServerProcess:
        if self._proc is not None:
            raise ServeError("server already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Own session: a terminal Ctrl-C reaches only us, so shutdown is ours to order, and
            # the server's helpers (vLLM spawns engine processes) share one group to kill.
            self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=self.env,
                                          start_new_session=True)
        _track(self)
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_base}/models", timeout=5) as response:
                response.read()
        except urllib.error.HTTPError:
            # Any HTTP status means the server is up: both engines load the model before they
            # serve. (`transformers serve` answers 500 here when the HF hub cache dir is missing.)
            return True
        except (urllib.error.URLError, OSError):
            return False
        return True

    def wait_ready(self) -> None:
        assert self._proc is not None, "start() first"
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServeError(f"server exited with code {code} before answering "
                                 f"({' '.join(self.command)}); last log lines from "
                                 f"{self.log_path}:\n{self.log_tail()}")
            if self._answers():
                if self._proc.poll() is None:  # not another process that holds the port
                    return
                continue
            if time.monotonic() > deadline:
                raise ServeError(f"server did not answer on {self.api_base}/models within "
                                 f"{self.startup_timeout_s:.0f} s; last log lines from "
                                 f"{self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after grace_s. Idempotent."""
        with self._stop_lock:
            proc = self._proc
            if proc is None or self._stopped:  # never signal a reaped (reusable) pid again
                return
            pgid = proc.pid  # start_new_session: the server leads its own group
            with suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait()
            # Helpers may outlive the leader; give them a moment, then kill the rest.
            deadline = time.monotonic() + min(grace_s, 5.0)
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _group_alive(pgid):
                with suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                # Orphaned helpers are reaped by init, not by us: wait until that has happened.
                deadline = time.monotonic() + 5.0
                while _group_alive(pgid) and time.monotonic() < deadline:
                    time.sleep(0.05)
            # Untrack only once it is gone, so atexit retries if this stop was interrupted.
            self._stopped = True
            _untrack(self)

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# --- DSPy ----------------------------------------------------------------------------------------

def server_lm(api_base: str, model: str, *, api_key: str = "copa",
              max_tokens: int = 64) -> dspy.LM:
    """A greedy dspy.LM for an OpenAI-compatible server. cache=False: DSPy's response cache would
    key on the model id, not on the weights behind it."""
    import dspy

    return dspy.LM(f"{LM_PREFIX}/{model}", api_base=api_base, api_key=api_key, cache=False,
                   temperature=0.0, max_tokens=max_tokens)


@contextmanager
def serving(engine: str, model_path: str, name: str, *, max_tokens: int = 64,
            log_dir: Path | None = None, startup_timeout_s: float = 300.0,
            trust_remote_code: bool = False) -> Iterator[dspy.LM]:
    """A dspy.LM on a server for model_path that copa starts ("vllm" or "transformers") on a
    free loopback port for the duration of the block, its log in log_dir."""
    port = free_port()
    command = server_command(engine, model_path, port, name=name,
                             trust_remote_code=trust_remote_code)
    folder = log_dir if log_dir is not None else Path(tempfile.gettempdir()) / "copa-serve"
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "model")
    log_path = folder / f"{engine}-{label}-{port}.log"
    with ServerProcess(command, port, log_path, startup_timeout_s=startup_timeout_s) as server:
        yield server_lm(server.api_base, served_model_id(engine, model_path, name),
                        max_tokens=max_tokens)
