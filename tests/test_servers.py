"""copa.inference.servers: servers on loopback that never outlive their block.

Fast tests drive ServerProcess with small stand-in processes (a stdlib HTTP server, processes that
die or never listen). Slow tests run the real thing on CPU: `transformers serve` with the tiny
random Llama, DSPy talking to it over HTTP, and cleanup on exception, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest

from copa.inference import servers as serve
from copa.inference.servers import ServeError, ServerProcess, live_servers, server_command, serving

REPO = Path(__file__).resolve().parent.parent
STARTUP_S = 240.0  # `transformers serve` takes ~20 s alone; the CPU may be shared

# A stand-in OpenAI-compatible server: answers GET /v1/models, and has a helper child in its
# process group (as vLLM has engine processes). argv: port, "ignore-term" to ignore SIGTERM.
FAKE_SERVER = textwrap.dedent("""\
    import http.server, signal, subprocess, sys
    if "ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the helper below
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"object": "list", "data": [{"id": "fake", "object": "model"}]}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
""")


def assert_gone(pid: int, port: int) -> None:
    """No process with that pid, none left in its process group, nothing listening on the port."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))


def kill_group(pid: int | None) -> None:
    """Failure-path cleanup so a failing test does not leak a server into the machine."""
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- fast: ServerProcess with stand-in processes ------------------------------------------------

def test_free_port_is_bindable() -> None:
    port = serve.free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert sock.getsockname() == ("127.0.0.1", port)


def test_server_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve, "_executable", lambda name: name)
    assert server_command("vllm", "/m/merged", 8123, name="merged") == [
        "vllm", "serve", "/m/merged", "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "merged"]
    assert server_command("transformers", "/m/merged", 8123) == [
        "transformers", "serve", "/m/merged", "--host", "127.0.0.1", "--port", "8123"]
    with pytest.raises(ServeError, match="'@'"):
        server_command("transformers", "/m/a@b", 8123)
    with pytest.raises(ServeError, match="unknown"):
        server_command("llamacpp", "/m/merged", 8123)


def test_serving_starts_only_the_servers_copa_knows() -> None:
    # "openai" is a recipe engine, not a server copa starts (copa.dspy.lms reaches it)
    for kind in ("openai", "tgi"):
        with pytest.raises(ServeError, match="unknown"), serving(kind, "/m", "m"):
            pass


def test_ready_then_stops_whole_group(tmp_path: Path) -> None:
    port = serve.free_port()
    server = ServerProcess([sys.executable, "-c", FAKE_SERVER, str(port)], port,
                           tmp_path / "fake.log", startup_timeout_s=60)
    try:
        with server:
            assert server in live_servers()
            assert server.api_base == f"http://127.0.0.1:{port}/v1"
        assert server not in live_servers()
        assert_gone(server.pid, port)
    finally:
        kill_group(server.pid)


def test_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    port = serve.free_port()
    server = ServerProcess([sys.executable, "-c", FAKE_SERVER, str(port), "ignore-term"], port,
                           tmp_path / "fake.log", startup_timeout_s=60)
    try:
        server.start()
        server.wait_ready()
        server.stop(grace_s=1.0)
        assert_gone(server.pid, port)
        server.stop()  # idempotent
    finally:
        kill_group(server.pid)


def test_server_that_dies_reports_its_log(tmp_path: Path) -> None:
    port = serve.free_port()
    command = [sys.executable, "-c", "print('no GPU found, giving up'); raise SystemExit(3)"]
    server = ServerProcess(command, port, tmp_path / "dies.log", startup_timeout_s=60)
    with pytest.raises(ServeError, match=r"code 3(.|\n)*no GPU found"), server:
        pass
    assert not live_servers()


def test_startup_timeout_stops_the_server(tmp_path: Path) -> None:
    port = serve.free_port()
    command = [sys.executable, "-c", "import time; time.sleep(600)"]  # never listens
    server = ServerProcess(command, port, tmp_path / "silent.log", startup_timeout_s=1.0)
    try:
        with pytest.raises(ServeError, match="did not answer"), server:
            pass
        assert_gone(server.pid, port)
    finally:
        kill_group(server.pid)


# --- slow: a real `transformers serve` on CPU ---------------------------------------------------

class RawAdapter(dspy.ChatAdapter):
    """ChatAdapter's prompt, the completion taken verbatim as the one output: a random tiny model
    writes no field markers, so ChatAdapter's own parse would fail."""

    def __init__(self) -> None:
        super().__init__(use_json_adapter_fallback=False)

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        return {name: completion for name in signature.output_fields}


def local_greedy(model_dir: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """What the model itself answers, greedily, in this process: what a server of it must send."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Any, ServerProcess]]:
    """One `serving("transformers", ...)` block shared by the slow tests that only talk to it;
    leaving it must stop the server (checked on teardown)."""
    before = set(live_servers())
    with serving("transformers", str(tiny_model_dir), "tiny", max_tokens=8,
                 log_dir=tmp_path_factory.mktemp("serve-logs"),
                 startup_timeout_s=STARTUP_S) as lm:
        (server,) = set(live_servers()) - before
        yield lm, server
    assert server not in live_servers()
    assert_gone(server.pid, server.port)


@pytest.mark.slow
def test_transformers_engine_round_trip(served: tuple[Any, ServerProcess],
                                        tiny_model_dir: Path) -> None:
    lm, server = served
    assert lm.model == f"hosted_vllm/{server.command[2]}"  # the FORCE_MODEL path is the id
    messages = [{"role": "user", "content": "Name a flower."}]
    first = lm(messages=messages)
    # The served model's own greedy answer (8 tokens), not an empty or another model's reply.
    assert first == [local_greedy(tiny_model_dir, messages, 8)]
    assert lm(messages=messages) == first  # temperature 0 is greedy on this server
    with dspy.context(lm=lm, adapter=RawAdapter()):
        prediction = dspy.Predict("question -> answer")(question="What is 2 + 2?")
    # DSPy's prompt went to the server and the server's answer came back as the field.
    sent = lm.history[-1]["messages"]
    assert "What is 2 + 2?" in sent[-1]["content"]
    assert prediction.answer == local_greedy(tiny_model_dir, sent, 8)


@pytest.mark.slow
def test_openai_engine_uses_a_running_server(served: tuple[Any, ServerProcess],
                                             tiny_model_dir: Path, tmp_path: Path) -> None:
    from conftest import write_tiny_recipe

    from copa.dspy.lms import model_lm
    from copa.recipe import load_recipe

    _, server = served
    before = set(live_servers())
    # The user's server: `transformers serve` answers only to its FORCE_MODEL path as model id.
    recipe = load_recipe(write_tiny_recipe(tmp_path, tiny_model_dir), overrides={
        "serve.engine": "openai", "serve.api_base": server.api_base,
        "serve.model": str(tiny_model_dir), "evaluate.max_tokens": 4})
    with model_lm(recipe, "/not/asked/for", "base") as lm:
        out = lm(messages=[{"role": "user", "content": "Hello"}])
        assert set(live_servers()) == before  # nothing started
    # The user's server answered with the model it serves, under the recipe's max_tokens (4).
    assert out == [local_greedy(tiny_model_dir, [{"role": "user", "content": "Hello"}], 4)]
    assert server.pid is not None
    os.kill(server.pid, 0)  # a user-run server is left running


def chat_requests(log_path: Path) -> int:
    """Chat completions the server answered, from its own access log."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    return sum("POST /v1/chat/completions" in line for line in text.splitlines())


@pytest.mark.slow
def test_a_proposer_given_as_a_served_model_is_called_over_http(
        served: tuple[Any, ServerProcess], tiny_model_dir: Path, tmp_path: Path) -> None:
    """`optimize.proposer: {engine: openai, api_base, model}`: GEPA's reflection model is the
    user's server (a real `transformers serve` on loopback), reached over HTTP; the task's own
    calls stay on the local engine, so the server answers only the few reflections."""
    from conftest import write_prompt_only_recipe

    from copa import pipeline

    _, server = served
    path = write_prompt_only_recipe(tmp_path, tiny_model_dir,
        "  optimizer: GEPA\n  params: {max_metric_calls: 20}\n  max_tokens: 16\n"
        f"  proposer: {{engine: openai, api_base: '{server.api_base}', "
        f"model: '{tiny_model_dir}'}}\n")
    before = chat_requests(server.log_path)
    run = pipeline.run(path, stages=["optimize"], run_dir=tmp_path / "run", emit=lambda _: None)
    log = (run.optimize_dir / "dspy-prompt_only.log").read_text()
    assert "Iteration 1: Selected program" in log  # GEPA reflected at least once
    reflections = chat_requests(server.log_path) - before
    metric_calls = 20
    assert 1 <= reflections < metric_calls  # the reflections, not the task's rollouts


@pytest.mark.slow
def test_exception_inside_serving_stops_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    before = set(live_servers())
    server: ServerProcess | None = None
    try:
        with pytest.raises(Boom), serving("transformers", str(tiny_model_dir), "tiny",
                                          log_dir=tmp_path, startup_timeout_s=STARTUP_S):
            (server,) = set(live_servers()) - before
            os.kill(server.pid, 0)
            raise Boom
        assert server is not None and server not in live_servers()
        assert_gone(server.pid, server.port)
    finally:
        kill_group(server.pid if server else None)


# The script first takes SIGINT as a terminal's Python does (KeyboardInterrupt): started in the
# background by a non-interactive shell (`bash .ci/run &`), it inherits SIGINT ignored.
INTERRUPTED_SCRIPT = textwrap.dedent("""\
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from pathlib import Path
    from copa.inference.servers import live_servers, serving
    with serving("transformers", sys.argv[1], "tiny", log_dir=Path(sys.argv[2]),
                 startup_timeout_s=float(sys.argv[3])):
        (server,) = live_servers()
        print(server.pid, server.port, "ready", flush=True)
        time.sleep(600)  # "optimizing"
""")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_to_parent_stops_server(signum: int, tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    stderr_path = tmp_path / "script.err"
    with open(stderr_path, "w") as stderr:  # a file: an undrained pipe could block the script
        proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_SCRIPT, str(tiny_model_dir),
                                 str(tmp_path), str(STARTUP_S)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr,
                                text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    pid: int | None = None
    try:
        line = lines.get(timeout=STARTUP_S + 60)
        pid_text, port_text, word = line.split()
        assert word == "ready"
        pid, port = int(pid_text), int(port_text)
        os.kill(pid, 0)
        proc.send_signal(signum)
        proc.wait(timeout=60)
        assert proc.returncode != 0  # interrupted, not finished
        assert_gone(pid, port)
    except (queue.Empty, ValueError):
        proc.kill()
        proc.wait()
        pytest.fail(f"script never got ready: {stderr_path.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_group(pid)
