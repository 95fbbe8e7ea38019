"""copa serve / predict / load under hostile rows: token limits per field, body size limits,
time limits, an in-flight limit, refusals that never echo the input, and a bounded load test of
a real `copa serve` on loopback (mixed valid, oversized and malformed requests).

The fast tests drive the real FastAPI app and copa's real BatchingEngine; only the program
behind the app is a small stand-in (answers from a function, records what reached it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import write_stub_model, write_tiny_recipe

from copa.recipe import load_recipe
from copa.use.limits import InputLimit, InputTooLong, choose_max_tokens, guessed_limit

REPO = Path(__file__).resolve().parent.parent
FIELDS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROW = dict(zip(FIELDS, (5.1, 3.5, 1.4, 0.2)))


# --- the limit itself ---------------------------------------------------------------------------

def test_a_field_over_the_token_limit_is_refused_without_echoing_it() -> None:
    counted: list[int] = []

    def count(text: str) -> int:
        counted.append(len(text))
        return len(text.split())

    limit = InputLimit(max_tokens=8, count=count, chars_per_token=10, how="--max-input-tokens")
    limit.check({"a": "one two three", "b": 4.5})
    with pytest.raises(InputTooLong, match=r"^b: 9 tokens, over the limit of 8 tokens per "
                                           r"input field \(--max-input-tokens\)$"):
        limit.check({"a": "x", "b": " ".join(["secret"] * 9)})
    counted.clear()
    with pytest.raises(InputTooLong, match="far more tokens") as info:
        limit.check({"a": "secret " * 1_000_000})
    assert counted == []  # refused on its length alone: 7 MB never tokenized
    assert "secret" not in str(info.value)
    together = InputLimit(max_tokens=8, count=count, max_total=10)
    with pytest.raises(InputTooLong, match="a, b: 12 tokens, over the limit of 10 tokens for "
                                           "the input fields together"):
        together.check({"a": "w " * 6, "b": "w " * 6})


def test_the_default_limit_comes_from_sequence_len_and_the_context() -> None:
    assert choose_max_tokens(None, sequence_len=512, context=8192, answer_tokens=64) == 512
    assert choose_max_tokens(None, sequence_len=4096, context=1024, answer_tokens=24) == 1000
    assert choose_max_tokens(2000, sequence_len=512, context=8192, answer_tokens=64) == 2000
    with pytest.raises(ValueError, match="leaves no room in the model's context of 1024"):
        choose_max_tokens(1020, sequence_len=512, context=1024, answer_tokens=64)
    with pytest.raises(ValueError, match=">= 1"):
        choose_max_tokens(0, sequence_len=512, context=None, answer_tokens=64)


# --- the engine: a caller that gave up costs the model nothing -------------------------------

class GatedModel:
    """Stands in for LocalModel: the first batch waits for `gate`; records every prompt."""

    path = "gated"

    def __init__(self) -> None:
        self.gate, self.started, self.seen = threading.Event(), threading.Event(), []

    def generate_detailed(self, prompts, max_new_tokens, stop, sampling=None):  # noqa: ANN001
        from copa.inference.local import Generation

        self.seen += [p[-1]["content"] for p in prompts]
        self.started.set()
        self.gate.wait()
        return [Generation("ok", 1, 1, "stop") for _ in prompts]


def test_the_engine_withdraws_a_queued_request_past_its_time_limit() -> None:
    import dspy
    from dspy.lm15 import Message, Request

    from copa.inference.engine import BatchingEngine, RequestTimeout, time_limit, wait_for

    model = GatedModel()
    engine = BatchingEngine(model, max_batch_size=1, batch_wait_ms=0)  # type: ignore[arg-type]
    try:
        first = engine.submit([{"role": "user", "content": "first"}], 4)
        assert model.started.wait(10)  # the worker is inside generate with it
        start = time.monotonic()
        with time_limit(0.3), pytest.raises(RequestTimeout, match="before the model started"):
            wait_for(engine.submit([{"role": "user", "content": "withdrawn"}], 4))
        assert time.monotonic() - start < 2
        lm = dspy.LM("local/gated", engine=engine, cache=False, max_tokens=4, num_retries=0)
        with time_limit(0.3), pytest.raises(Exception) as info:  # through DSPy, as serve calls
            lm(Request(model=lm.model, messages=(Message.user("also withdrawn"),)))
        chain, exc = [], info.value
        while exc is not None:
            chain.append(exc)
            exc = exc.__cause__ or exc.__context__
        assert any(isinstance(e, RequestTimeout) for e in chain), chain
        model.gate.set()
        assert first.result(10).text == "ok"
        assert engine.submit([{"role": "user", "content": "later"}], 4).result(10).text == "ok"
        assert model.seen == ["first", "later"]  # the withdrawn ones never reached the model
    finally:
        model.gate.set()
        engine.close()


# --- the app, with a stand-in program ----------------------------------------------------------

class Program:
    """What make_app needs of a loaded arm; answers after `delay` seconds (in the engine's
    place), records the rows that reached it."""

    input_fields, output_fields, arm = FIELDS, ["species"], "baseline"

    def __init__(self, recipe: Any, limit: InputLimit, delay: float = 0.0) -> None:
        self.bundle = SimpleNamespace(recipe=recipe, model_role="base")
        self.limit, self.delay, self.seen = limit, delay, []

    def answer(self, values: dict[str, Any]) -> dict[str, str]:
        from copa.inference.engine import wait_for

        self.limit.check({k: str(v) for k, v in values.items()})
        self.seen.append(values)
        if self.delay:  # like the engine: a Future the time limit can withdraw
            from concurrent.futures import Future

            future: Future = Future()
            threading.Timer(self.delay, lambda: future.done() or future.set_result(1)).start()
            wait_for(future)
        return {"species": "setosa"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("recipe")
    return load_recipe(write_tiny_recipe(folder, folder / "no-model-is-loaded"))


def client(program: Program, **options: Any) -> Any:
    from fastapi.testclient import TestClient

    from copa.use.serve import make_app

    return TestClient(make_app(program, **options))


def test_oversized_bodies_get_413_before_they_are_read(recipe: Any) -> None:
    program = Program(recipe, guessed_limit(16))
    app = client(program, max_body_bytes=2048)
    big = {**ROW, "sepal_length": "x" * 100_000}
    response = app.post("/predict", json=big)
    assert response.status_code == 413
    assert "over 2048 bytes" in response.json()["message"]
    assert len(response.content) < 300  # no echo

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"sepal_length": "'
        for _ in range(100):
            yield b"x" * 1000

    response = app.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert program.seen == []
    assert app.post("/predict", json=ROW).status_code == 200


def test_a_field_over_the_token_limit_gets_422_and_never_reaches_the_model(recipe: Any) -> None:
    program = Program(recipe, guessed_limit(16, how="copa serve --max-input-tokens N"))
    app = client(program)
    response = app.post("/predict", json={**ROW, "petal_width": "leak " * 40})
    assert response.status_code == 422
    body = response.json()
    assert body["message"].startswith("petal_width: ") and "over the limit of 16" in body["message"]
    assert "leak" not in response.text
    assert program.seen == []


@pytest.mark.parametrize("raw", [
    json.dumps(["secret" * 5000]).encode(),       # not an object
    json.dumps({**ROW, "sepal_length": {"secret": "x" * 5000}}).encode(),  # wrong type
    json.dumps({**ROW, "secret" * 100: 1}).encode(),   # unknown field, long name
    b"secret" * 5000,                                  # not JSON
    b"[" * 40_000,                                     # nested past the parser's depth
    b'{"sepal_length": ' + b"9" * 6000 + b"}",        # an integer past Python's digits limit
], ids=["list", "object-field", "long-key", "not-json", "deep", "huge-int"])
def test_malformed_bodies_are_refused_without_echoing_them(recipe: Any, raw: bytes) -> None:
    program = Program(recipe, guessed_limit(16))
    response = client(program).post("/predict", content=raw,
                                    headers={"content-type": "application/json"})
    assert response.status_code in (400, 422), response.text[:300]
    assert len(response.content) < 1200, response.text[:300]
    assert "secret" * 12 not in response.text and "9" * 100 not in response.text
    assert program.seen == []


@pytest.mark.parametrize("raw, content_type, said", [
    (json.dumps(ROW).encode(), "text/plain", "body: sent as text/plain: send a JSON object with "
                                             "Content-Type: application/json"),
    (json.dumps(ROW).encode(), None, "body: sent as no Content-Type: send a JSON object with "
                                     "Content-Type: application/json"),
    (b"", "application/json", "body: empty: send a JSON object of the input fields"),
    (json.dumps([ROW]).encode(), "application/json; charset=utf-8",
     "body: not a JSON object of the input fields"),
], ids=["text-plain", "no-content-type", "empty", "array"])
def test_a_body_refused_as_a_whole_says_why(recipe: Any, raw: bytes, content_type: str | None,
                                            said: str) -> None:
    """FastAPI reads a body as JSON only under a JSON content type: a valid JSON object sent as
    text/plain was refused as "Input should be a valid dictionary", as was an array, and an
    empty body as "body: Field required"."""
    program = Program(recipe, guessed_limit(16))
    headers = {"content-type": content_type} if content_type else {}
    response = client(program).post("/predict", content=raw, headers=headers)
    assert response.status_code == 422, response.text[:300]
    assert response.json()["message"] == f"{said} (the inputs are {', '.join(FIELDS)})"
    assert program.seen == []


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_number_that_is_not_finite_gets_422_naming_the_field(recipe: Any, value: str) -> None:
    """Python's JSON parser takes NaN and Infinity (not JSON) and reads 1e400 as inf."""
    program = Program(recipe, guessed_limit(16))
    raw = json.dumps({**ROW, "petal_width": 0.0}).encode().replace(b"0.0", value.encode())
    response = client(program).post("/predict", content=raw,
                                    headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text[:300]
    assert response.json()["message"] == ("petal_width: not a finite number (NaN, Infinity or "
                                          "past the float range)")
    assert program.seen == []


def test_an_integer_the_number_format_cannot_take_is_refused_naming_the_field(
        recipe: Any) -> None:
    """The tiny recipe formats numbers with '.1f', which turns an int into a float: one of 401
    digits cannot be (OverflowError, a 500 from copa serve before). copa serve answers 422, copa
    predict fails that row, both saying which field; the program never sees it."""
    from copa.use.predict import predict_rows

    seen: list[dict[str, Any]] = []
    loaded = _loaded(recipe, seen)
    huge = b'{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1' + b"0" * 400 + \
        b', "petal_width": 0.2}'
    app = client(loaded)  # type: ignore[arg-type]
    response = app.post("/predict", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text[:300]
    assert response.json()["message"] == (
        "petal_length: cannot be formatted as the training data's numbers were "
        "(prompt.number_format '.1f'): a number too large for number_format '.1f' (a float "
        "stops at 1.8e308)")
    assert seen == []
    assert app.post("/predict", json=ROW).json() == {"species": "setosa"}
    assert seen == [{"sepal_length": "5.1", "sepal_width": "3.5", "petal_length": "1.4",
                     "petal_width": "0.2"}]
    rows = [ROW, {**ROW, "petal_length": 10 ** 400}]
    out = predict_rows(loaded, rows, {f: f for f in FIELDS}, threads=1)
    assert out[0]["error"] is None and out[1]["prediction"] is None
    assert out[1]["error"].startswith("row 2: petal_length: cannot be formatted"), \
        out[1]["error"]
    assert len(seen) == 2


def _loaded(recipe: Any, seen: list[dict[str, Any]]) -> Any:
    """A LoadedProgram (copa.load's, serve's and predict's) over a stand-in program that
    records what reached it."""
    from contextlib import ExitStack

    from copa.use.load import LoadedProgram

    def program(**values: Any) -> Any:
        seen.append(values)
        return SimpleNamespace(species="setosa")

    bundle = SimpleNamespace(recipe=recipe, arm="baseline", model_role="base",
                             input_fields=FIELDS, output_fields=["species"])
    return LoadedProgram(bundle, program, None, None, ExitStack(),  # type: ignore[arg-type]
                         guessed_limit(16))


def test_an_input_no_data_cell_could_hold_is_refused_and_numpy_numbers_are_numbers(
        recipe: Any) -> None:
    """A loaded run takes what data loading takes, formatted as it formats it: a lone surrogate
    (a JSON "\\ud800" escape) was a 500 from copa serve and a tokenizer TypeError from
    copa.load; a frozenset or bytearray reached the model as its Python repr; a numpy int (a
    pandas row) was "5" where number_format '.1f' made the training data's "5.0", and a numpy
    float32 NaN passed as "nan"."""
    import numpy as np

    from copa.use.limits import InputRefused

    seen: list[dict[str, Any]] = []
    loaded = _loaded(recipe, seen)
    raw = json.dumps({**ROW, "sepal_width": "x"}).encode().replace(b'"x"', b'"a\\ud800"')
    response = client(loaded).post("/predict", content=raw,
                                   headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text[:300]
    assert response.json()["message"] == ("sepal_width: a lone surrogate \\ud800 (half of a "
                                          "UTF-16 pair) is not text")
    with pytest.raises(InputRefused, match="^sepal_width: a lone surrogate"):
        loaded(**{**ROW, "sepal_width": "\ud800"})
    for value, kind in ((frozenset(), "a frozenset"), (bytearray(b"x"), "bytes"),
                        ({"a": 1}, "an object")):
        with pytest.raises(TypeError, match=f"^sepal_width is {kind}: give it one text or"):
            loaded(**{**ROW, "sepal_width": value})
    with pytest.raises(InputRefused, match="^sepal_width: not a finite number"):
        loaded(**{**ROW, "sepal_width": np.float32("nan")})
    assert seen == []
    assert loaded(**{**ROW, "sepal_width": np.int64(5), "petal_width": np.float32(0.25)}) \
        .species == "setosa"
    assert seen == [{"sepal_length": "5.1", "sepal_width": "5.0", "petal_length": "1.4",
                     "petal_width": "0.2"}]


def test_a_request_past_its_time_limit_gets_504_and_others_still_answer(recipe: Any) -> None:
    program = Program(recipe, guessed_limit(16), delay=30.0)
    app = client(program, timeout_s=0.5)
    start = time.monotonic()
    response = app.post("/predict", json=ROW)
    assert response.status_code == 504
    assert "time limit of 0.5 s" in response.json()["message"]
    assert time.monotonic() - start < 5
    program.delay = 0.0
    assert app.post("/predict", json=ROW).status_code == 200


@contextmanager
def live(app: Any, **options: Any) -> Iterator[str]:
    """The app on a real uvicorn server on loopback, in this process (one event loop, one
    thread pool, the server configured as `copa serve` configures it; `options` for
    copa.use.serve.server_config)."""
    import uvicorn

    from copa.inference.servers import free_port
    from copa.use.serve import server_config

    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_health_answers_while_every_request_slot_is_busy(recipe: Any) -> None:
    """More requests in flight than the server's thread pool has threads (40): /health, on the
    event loop, still answers at once; one request past the in-flight limit gets 503 at once."""
    from copa.use.serve import make_app

    program = Program(recipe, guessed_limit(16), delay=3.0)
    raw = json.dumps(ROW).encode()
    with live(make_app(program, max_in_flight=45, timeout_s=20)) as url, \
            ThreadPoolExecutor(46) as pool:
        slow = [pool.submit(_post, url, raw) for _ in range(45)]
        time.sleep(1.0)  # all are in flight
        start = time.monotonic()
        with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
            assert response.status == 200
        assert time.monotonic() - start < 1.0
        status, _, _ = _post(url, raw)
        assert status == 503
        assert [f.result()[0] for f in slow] == [200] * 45
        program.delay = 0.0
        assert _post(url, raw)[0] == 200  # the slots came back


def test_idle_and_trickling_connections_are_closed_and_hold_no_place(recipe: Any) -> None:
    """More connections than uvicorn's limit that never send a whole request head (none at
    all, half a head, one byte after a kept-alive answer), and one that stops mid-body: at
    first every request gets 503 (their places are taken); past the read time limit the server
    has closed them (the body with 408) and answers again, while the client still holds them."""
    import http.client
    import socket
    from contextlib import ExitStack
    from urllib.parse import urlsplit

    from copa.use.serve import MAX_CONNECTIONS, make_app

    read_s = 2.0
    program = Program(recipe, guessed_limit(16))
    raw = json.dumps(ROW).encode()
    app = make_app(program, read_timeout_s=read_s)
    body_started = threading.Event()

    async def seen(scope: Any, receive: Any, send: Any) -> None:
        # uvicorn answers 503 to a head parsed while its places are full: the mid-body request
        # must be past that check (in the app) before the idle connections take the places
        if scope["type"] == "http" and scope["path"] == "/predict":
            body_started.set()
        await app(scope, receive, send)

    with live(seen, read_timeout_s=read_s) as url, ExitStack() as held:
        address = ("127.0.0.1", urlsplit(url).port)

        def connect() -> socket.socket:
            sock = held.enter_context(socket.create_connection(address, timeout=10))
            return sock

        kept = http.client.HTTPConnection(*address, timeout=10)
        held.callback(kept.close)
        kept.request("GET", "/health")
        assert kept.getresponse().read()  # answered: the connection is kept alive
        kept.sock.sendall(b"G")  # and a byte of the next request head, then nothing
        opened = time.monotonic()
        half_head = connect()
        half_head.sendall(b"POST /predict HTTP/1.1\r\nHost: copa\r\n")
        mid_body = connect()
        mid_body.sendall(b"POST /predict HTTP/1.1\r\nHost: copa\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 1000\r\n\r\n{")
        assert body_started.wait(10)
        idle = [connect() for _ in range(MAX_CONNECTIONS + 8)]
        time.sleep(0.3)
        assert _health(url) == 503  # every place is held
        while _health(url) != 200 and time.monotonic() < opened + read_s + 10:
            time.sleep(0.1)
        assert _health(url) == 200, f"still refused {time.monotonic() - opened:.1f} s on"
        assert _post(url, raw)[0] == 200
        assert all(sock.recv(1) == b"" for sock in [*idle, half_head, kept.sock])  # closed
        answer = mid_body.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert f"not received within {read_s:g} s".encode() in answer
        while answer:  # and closed after it
            answer = mid_body.recv(4096)


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_predict_rows_fails_a_long_row_in_its_row_and_goes_on(recipe: Any) -> None:
    from copa.use.predict import predict_rows

    program = Program(recipe, guessed_limit(16, how="copa predict --max-input-tokens N"))
    rows = [dict(ROW, id=0), dict(ROW, id=1, petal_width="w" * 500), dict(ROW, id=2)]
    out = predict_rows(program, rows, {f: f for f in FIELDS}, threads=2)
    assert [r["id"] for r in out] == [0, 1, 2]
    assert out[0]["error"] is None and out[2]["error"] is None
    assert out[1]["prediction"] is None
    assert out[1]["error"].startswith("row 2: petal_width: far more tokens, over the limit of 16")
    assert len(program.seen) == 2


# --- slow: a real `copa serve` under attack ----------------------------------------------------

def _post(url: str, raw: bytes, timeout: float = 120) -> tuple[int, bytes, float]:
    request = urllib.request.Request(f"{url}/predict", data=raw, method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), time.monotonic() - start
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.monotonic() - start
    except (urllib.error.URLError, ConnectionError) as exc:  # refused mid-upload: the 413
        return getattr(exc, "code", 0) or 0, str(exc).encode(), time.monotonic() - start


def _memory_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A finished run of the tiny recipe with the baseline arm only (no training: seconds)."""
    from copa import pipeline

    folder = tmp_path_factory.mktemp("baseline-run")
    path = write_tiny_recipe(folder, tiny_model_dir)
    text = path.read_text().replace("finetune:\n", "finetune:\n  enabled: false\n", 1)
    text = text.replace("optimize:\n", "optimize:\n  enabled: false\n", 1)
    path.write_text(text.replace("evaluate:\n", "evaluate:\n  arms: [baseline]\n", 1))
    return pipeline.run(path, run_dir=folder / "run", emit=lambda _: None).dir


def _attack(i: int) -> tuple[str, bytes]:
    """Request i of the load test: 6 in 10 valid, the rest oversized or malformed."""
    row = {f: round(4.0 + (i * 7 + k) % 30 / 10, 1) for k, f in enumerate(FIELDS)}
    kind = ["valid", "valid", "long-field", "valid", "big-body", "valid", "malformed", "valid",
            "not-json", "valid"][i % 10]
    if kind == "long-field":  # under the body limit, over the token limit
        row["petal_width"] = "word " * 2000
    elif kind == "big-body":
        row["petal_width"] = "x" * 2_000_000
    elif kind == "malformed":
        row = {"sepal_length": [row["sepal_length"]] * 1000, "petal_colour": "blue"}
    elif kind == "not-json":
        return kind, b"[" * 20_000 if i % 20 else b"{" * 20_000
    return kind, json.dumps(row).encode()


@pytest.mark.slow
def test_copa_serve_under_attack_answers_every_valid_request_and_stops_on_sigterm(
        baseline_run: Path, tmp_path: Path) -> None:
    from copa.inference.servers import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "copa.cli", "serve", str(baseline_run),
                             "--port", str(port), "--timeout", "60"], stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"copa serve did not come up: {(tmp_path / 'serve.log').read_text()}")
            time.sleep(0.5)
        start_kb = _memory_kb(proc.pid, "VmRSS")
        health: list[float] = []
        attacking = threading.Event()
        attacking.set()

        def watch_health() -> None:
            while attacking.is_set():
                t = time.monotonic()
                with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
                    assert response.status == 200
                health.append(time.monotonic() - t)
                time.sleep(0.1)

        watcher = threading.Thread(target=watch_health)
        watcher.start()
        requests = [_attack(i) for i in range(200)]
        began = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda r: (r[0], *_post(url, r[1])), requests))
        wall = time.monotonic() - began
        attacking.clear()
        watcher.join()
        peak_kb = _memory_kb(proc.pid, "VmHWM")

        valid = [(status, body, s) for kind, status, body, s in results if kind == "valid"]
        assert len(valid) == 120
        assert [status for status, _, _ in valid] == [200] * 120, [b[:200] for _, b, _ in valid]
        assert all(set(json.loads(body)) == {"species"} for _, body, _ in valid)
        refused = {kind: sorted({status for k, status, _, _ in results if k == kind})
                   for kind in ("long-field", "big-body", "malformed", "not-json")}
        assert refused["long-field"] == [422]
        assert set(refused["big-body"]) <= {413, 0}  # 0: the connection closed mid-upload
        assert refused["malformed"] == [422] and set(refused["not-json"]) <= {400, 422}
        assert max(health) < 1.0, health
        assert peak_kb - start_kb < 512 * 1024, (start_kb, peak_kb)  # never a 2 MB field's blowup
        latencies = sorted(s for _, _, s in valid)
        p95 = latencies[int(0.95 * len(latencies)) - 1]
        print(f"\nload test: {len(results)} requests from 16 clients in {wall:.1f} s; valid "
              f"{len(valid)}, all answered; p50 {latencies[len(latencies) // 2]:.3f} s, p95 "
              f"{p95:.3f} s; /health max {max(health):.3f} s over {len(health)} polls; RSS "
              f"{start_kb // 1024} MB after start, peak {peak_kb // 1024} MB")

        # SIGTERM while requests are in flight: the server is gone within seconds.
        with ThreadPoolExecutor(16) as pool:
            flight = [pool.submit(_post, url, _attack(i)[1], 60) for i in range(64)]
            time.sleep(0.5)
            stop = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            stopped = time.monotonic() - stop
            [f.result() for f in flight]
        assert stopped < 10, stopped
        # uvicorn re-raises the signal after its graceful shutdown: the exit says SIGTERM
        assert proc.returncode in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()
        print(f"SIGTERM under load: exited in {stopped:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in text and "WARNING" not in text, text[-2000:]


@pytest.mark.slow
def test_load_and_predict_apply_the_token_limit(baseline_run: Path, tmp_path: Path) -> None:
    """copa.load raises InputTooLong before the model runs; copa predict fails that row only;
    a limit past the model's context (1024 for the tiny model) is refused before loading."""
    from click.testing import CliRunner

    import copa
    from copa.cli import cli

    program = copa.load(str(baseline_run))
    assert program.limit.max_tokens == 128  # the tiny recipe's sequence_len, within 1024
    assert isinstance(program(**ROW).species, str)
    calls = len(program.lm.engine.batch_sizes)
    with pytest.raises(InputTooLong, match=r"petal_width: \d+ tokens, over the limit of 128"):
        program(**{**ROW, "petal_width": " x" * 300})
    assert len(program.lm.engine.batch_sizes) == calls  # the engine never saw it
    with pytest.raises(ValueError, match="leaves no room in the model's context of 1024"):
        copa.load(str(baseline_run), max_input_tokens=5000)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in (
        ROW, {**ROW, "sepal_width": "w " * 100_000}, ROW)))
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli, ["predict", str(baseline_run), "-i", str(rows), "-o",
                                      str(out), "--max-input-tokens", "64"])
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["error"] is None for w in written] == [True, False, True]
    assert written[1]["error"] == ("row 2: sepal_width: far more tokens, over the limit of 64 "
                                   "tokens per input field (copa predict --max-input-tokens N "
                                   "changes it)")
    result = CliRunner().invoke(cli, ["predict", str(baseline_run), "-i", str(rows),
                                      "--max-input-tokens", "5000"])
    assert result.exit_code == 2 and "--max-input-tokens: max_input_tokens 5000 leaves no room" \
        in result.output


def _finished_run_without_a_model(tmp_path: Path) -> Path:
    """A run directory as the stages leave it (fine-tune-only arm best), with no model in it:
    whatever is refused before the model loads is refused on it."""
    recipe = write_tiny_recipe(tmp_path / "recipe", tmp_path / "no-model-is-loaded")
    run = tmp_path / "run"
    write_stub_model(run / "merged")
    (run / "manifest.json").write_text(json.dumps(
        {"recipe": str(recipe), "stages": {"evaluate": {"status": "done"}}}))
    (run / "report.json").write_text(json.dumps({
        "metric": "exact_match", "test_rows": 9,
        "arms": {"finetune_only": {"score": 1.0, "ci95": [1, 1], "n": 9}},
        "val": {"scores": {"finetune_only": 1.0}, "best_arm": "finetune_only"}}))
    return run


def test_serve_says_a_taken_port_before_loading_the_model(tmp_path: Path) -> None:
    import socket

    from click.testing import CliRunner

    from copa.cli import cli

    run = _finished_run_without_a_model(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", str(run), "--port", str(port)])
    output = result.output.strip()
    assert result.exit_code == 2 and len(output.splitlines()) == 1, output
    assert output.startswith(f"--host 127.0.0.1 --port {port}: cannot listen there"), output


@pytest.mark.parametrize("options, expected", [
    (["--timeout", "nan"], "copa serve: Invalid value for '--timeout': 'nan' is not a number of "
                           "seconds"),
    (["--read-timeout", "NaN"], "copa serve: Invalid value for '--read-timeout': 'NaN' is not "
                                "a number of seconds"),
    (["--port", "0"], "copa serve: Invalid value for '--port': 0 is not in the range "
                      "1<=x<=65535."),
    (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: not an address of this "
                                         "machine ("),
], ids=["timeout-nan", "read-timeout-nan", "port-0", "unknown-host"])
def test_serve_refuses_options_it_cannot_keep_before_loading_the_model(
        tmp_path: Path, options: list[str], expected: str) -> None:
    """Click's FloatRange lets NaN through (every comparison is false): --timeout nan answered
    every request 408 "within nan s"; --port 0 listened on a port it never said ("on
    http://127.0.0.1:0"); an unknown host was told to "choose another --port"."""
    from click.testing import CliRunner

    from copa.cli import cli

    run = _finished_run_without_a_model(tmp_path)
    result = CliRunner().invoke(cli, ["serve", str(run), *options])
    output = result.output.strip()
    assert result.exit_code == 2 and len(output.splitlines()) == 1, output
    assert output.startswith(expected), output


@pytest.mark.parametrize("name, content, expected", [
    ("deep.json", "[" * 100_000 + "]" * 100_000, "deep.json: JSON nested too deeply"),
    ("big.jsonl", '{"sepal_length": ' + "7" * 6000 + "}\n",
     "big.jsonl: line 1: Exceeds the limit (4300 digits) for integer string conversion"),
    ("long.csv", ",".join(FIELDS) + "\n" + "x" * 200_000 + ",1,2,3\n",
     "long.csv: line 2: field larger than field limit (131072)"),
], ids=["deep-json", "huge-integer", "long-csv-field"])
def test_predict_refuses_an_unreadable_input_file_in_one_line(tmp_path: Path, name: str,
                                                               content: str,
                                                               expected: str) -> None:
    """Before any model loads (a run directory as the stages leave it; no model in it)."""
    from click.testing import CliRunner

    from copa.cli import cli

    run = _finished_run_without_a_model(tmp_path)
    rows = tmp_path / name
    rows.write_text(content)
    result = CliRunner().invoke(cli, ["predict", str(run), "-i", str(rows)])
    output = result.output.strip()
    assert result.exit_code == 2 and len(output.splitlines()) == 1, output
    assert output.startswith(str(tmp_path)) and expected in output, output
