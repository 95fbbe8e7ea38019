"""copa serve: a loaded arm as an HTTP JSON service (FastAPI on uvicorn).

POST /predict takes the signature's input fields and answers its output fields; GET /health
says it is up and what it serves; /docs and /openapi.json describe the request and response
models, which are generated from the signature. Requests run in FastAPI's thread pool, so
concurrent ones meet in the one engine, which batches them.

No request can stall the others: a body over the size limit is refused (413) before it is read
whole, each field over the token limit (copa.use.limits) is refused (422) before the engine sees
it, as is a number that is not finite (NaN, Infinity) or that the recipe's number_format cannot
format (an integer past the float range for '.1f'), a request past its time limit is answered 504
(its queued generation withdrawn), requests beyond the in-flight limit are answered 503 at once,
and /health runs on the event loop, never behind them. Nor can a connection hold a place: one that
has not sent a whole request head within the read time limit is closed, and a body not received
within it is answered 408 (else idle connections fill uvicorn's connection limit and every request
gets 503). No refusal echoes the input. SIGTERM / Ctrl-C: in-flight requests get a few seconds to
finish, then the rest are cancelled.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint's annotations at
# run time, and the request model is made per signature, inside make_app.
import asyncio
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from copa.text import one_line
from copa.use.limits import DEFAULT_TIMEOUT_S, InputRefused, check_finite

API_KEY_ENV = "COPA_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SHUTDOWN_GRACE_S = 5.0  # SIGTERM / Ctrl-C: how long in-flight requests may still finish
MAX_CONNECTIONS = 256  # open connections beyond this are answered 503 by uvicorn
READ_TIMEOUT_S = 10.0  # a client's time to send a request head, and again to send its body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]


def body_limit(fields: int, max_input_tokens: int, chars_per_token: int = 64) -> int:
    """The largest request body worth reading: every field at its token limit, each character
    escaped in JSON (at most 6 bytes: \\uXXXX), and room for names and punctuation."""
    return max(64 * 1024, fields * max_input_tokens * chars_per_token * 6 + 4096)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 without reading it
    whole (a Content-Length over the limit: without reading any of it), and one not received
    whole within `read_timeout_s` is answered 408 (a client that stops sending holds nothing)."""

    def __init__(self, app: ASGIApp, max_bytes: int,
                 read_timeout_s: float = READ_TIMEOUT_S) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, int(max_bytes), float(read_timeout_s)

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_big(send)
            return
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + self.read_timeout_s  # for the whole body, not per chunk
        while more:  # bounded: at most max_bytes are ever held, for at most read_timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await self._refuse(send, 408, f"request body not received within "
                                              f"{self.read_timeout_s:g} s "
                                              "(copa serve --read-timeout)")
                return
            if message["type"] != "http.request":
                break  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_big(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_big(self, send: Callable[[Message], Awaitable[None]]) -> None:
        await self._refuse(send, 413, f"request body over {self.max_bytes} bytes: send the input "
                                      "fields only (copa serve --max-body-bytes)")

    @staticmethod
    async def _refuse(send: Callable[[Message], Awaitable[None]], status: int,
                      message: str) -> None:
        """Answer `status` and close the connection (the rest of the body is never read)."""
        payload = json.dumps({"message": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})

InputValue = str | int | float  # numbers are formatted as the training data's were


def request_model(fields: list[str]) -> type[BaseModel]:
    """The request body: every input field, required; anything else is refused."""
    definitions: dict[str, Any] = {
        name: (InputValue, Field(..., description=f"input field '{name}'")) for name in fields}
    return create_model("PredictRequest", __config__=ConfigDict(extra="forbid"), **definitions)


def response_model(fields: list[str]) -> type[BaseModel]:
    definitions: dict[str, Any] = {
        name: (str, Field(..., description=f"output field '{name}'")) for name in fields}
    return create_model("PredictResponse", **definitions)


def _explain(errors: list[dict[str, Any]], fields: list[str], content_type: str = "") -> str:
    """One clause per field at fault, e.g. "petal_width: missing" (FastAPI's own detail is
    kept beside it). A value of the wrong type fails each member of the union: said once."""
    said: dict[str, str] = {}
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        where = loc[0] if loc else "body"
        kind = error.get("type", "")
        if where == "body":  # pydantic's "a valid dictionary" misleads: JSON sent as text/plain
            what = _body_problem(kind, content_type)
        elif where not in fields and kind != "extra_forbidden":
            what = error.get("msg", "invalid")  # not a JSON object, or not JSON at all
        elif kind == "missing":
            what = "missing"
        elif kind == "extra_forbidden":
            what = "not an input field of this task"
        else:
            what = f"must be a string or a number (got {_kind(error.get('input'))})"
        said.setdefault(one_line(where, 60), what)
    return "; ".join(f"{k}: {v}" for k, v in list(said.items())[:10]) + \
        f" (the inputs are {', '.join(fields)})"


def _body_problem(kind: str, content_type: str) -> str:
    """Why the body as a whole is refused: FastAPI reads JSON only under a JSON content type
    (else it sees bytes), and says "Field required" of an empty body."""
    if "json" not in content_type.lower():
        return (f"sent as {one_line(content_type, 60) or 'no Content-Type'}: send a JSON object "
                "with Content-Type: application/json")
    if kind == "missing":
        return "empty: send a JSON object of the input fields"
    return "not a JSON object of the input fields"


def _caused_by(exc: BaseException | None, kind: type[BaseException]) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, kind):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _kind(value: Any) -> str:
    """What a refused value is, never the value itself (it may be megabytes)."""
    return "None" if value is None else f"a {type(value).__name__}"


def _without_input(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's errors without the input they quote (a refusal never echoes the request)."""
    return [{"type": e.get("type"), "loc": [one_line(str(p), 60) for p in e.get("loc", ())],
             "msg": one_line(str(e.get("msg", "")), 200)} for e in errors[:20]]


def make_app(program: Any, api_key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
             max_body_bytes: int | None = None, max_in_flight: int | None = None,
             read_timeout_s: float = READ_TIMEOUT_S) -> FastAPI:
    """The service for a loaded arm (copa.use.load.LoadedProgram, or anything with its
    input_fields, output_fields, arm, bundle and answer(); its `limit` sets the token limit).

    timeout_s: one request's time limit (504 past it); max_body_bytes: the largest body read
    (413 over it; default from the token limit); max_in_flight: requests answered at once
    (503 beyond; default 4 x the engine's batch size); read_timeout_s: the time to send a body
    (408 past it; the request head's limit is run_server's)."""
    from importlib.metadata import version

    from copa.inference.engine import RequestTimeout, time_limit

    inputs, outputs = list(program.input_fields), list(program.output_fields)
    recipe = program.bundle.recipe
    app = FastAPI(title=f"copa: {recipe.name} ({program.arm})", version=version("copa"),
                  description=f"`{recipe.task.signature}`, answered by the {program.arm} arm "
                              f"(model: {program.bundle.model_role}). "
                              f"{recipe.task.instructions}".strip())
    Body = request_model(inputs)
    Answer = response_model(outputs)
    bearer = HTTPBearer(auto_error=False, description="Set with --api-key or COPA_API_KEY")

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer ...)",
                                headers={"WWW-Authenticate": "Bearer"})

    limit = getattr(program, "limit", None)
    if max_body_bytes is None:
        max_body_bytes = body_limit(len(inputs), limit.max_tokens, limit.chars_per_token) \
            if limit is not None else 1 << 20
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, read_timeout_s=read_timeout_s)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, headers=exc.headers,
                            content={"message": str(exc.detail), "detail": exc.detail})

    @app.exception_handler(RequestValidationError)
    async def unprocessable(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors())
        message = _explain(errors, inputs, request.headers.get("content-type", ""))
        return JSONResponse(status_code=422, content={"message": message,
                                                      "detail": _without_input(errors)})

    engine = getattr(getattr(program, "lm", None), "engine", None)
    if max_in_flight is None:
        max_in_flight = 4 * int(getattr(engine, "max_batch_size", 8) or 8)
    slots = threading.BoundedSemaphore(max(1, int(max_in_flight)))

    @app.get("/health")
    async def health() -> dict[str, Any]:  # on the event loop: never queued behind /predict
        state: dict[str, Any] = {"status": "ok", "task": recipe.name, "arm": program.arm,
                                 "inputs": inputs, "outputs": outputs}
        sizes = getattr(engine, "batch_sizes", None)  # copa's local engine: is it batching?
        if sizes is not None:
            state["engine"] = {"requests": engine.requests, "batches": len(sizes),
                               "largest_batch": max(sizes, default=0)}
        return state

    def answer(values: dict[str, Any], deadline: float) -> dict[str, str]:
        left = deadline - time.monotonic()
        if left <= 0:  # it waited for a thread past its time: the caller is gone
            raise RequestTimeout("the request's time limit passed before it started")
        with time_limit(left):
            return program.answer(values)

    async def predict(body: Body) -> dict[str, str]:  # type: ignore[valid-type]
        values = body.model_dump()  # type: ignore[attr-defined]
        try:
            check_finite(values)  # refused before it waits for a slot
        except InputRefused as exc:
            raise HTTPException(422, str(exc)) from None
        if not slots.acquire(blocking=False):
            raise HTTPException(503, f"busy: {max_in_flight} requests in flight; retry shortly",
                                headers={"Retry-After": "1"})
        deadline = time.monotonic() + timeout_s
        try:
            # The time limit twice: inside (the engine withdraws a queued request) and here
            # (an engine that cannot withdraw, e.g. a server's, still frees the caller).
            return await asyncio.wait_for(run_in_threadpool(answer, values, deadline),
                                          timeout_s + 1.0)
        except InputRefused as exc:  # too long, or a number the recipe's format cannot take
            raise HTTPException(422, str(exc)) from None
        except Exception as exc:
            if isinstance(exc, TimeoutError) or _caused_by(exc, RequestTimeout):  # DSPy wraps it
                raise HTTPException(504, f"no answer within the time limit of {timeout_s:g} s "
                                         "(copa serve --timeout)") from None
            # the model or engine failed: say so, keep serving
            raise HTTPException(500, one_line(f"{type(exc).__name__}: {exc}", 300)) from None
        finally:
            slots.release()

    app.post("/predict", response_model=Answer,
             summary=f"{', '.join(inputs)} -> {', '.join(outputs)}",
             dependencies=[Depends(authorized)] if api_key is not None else [])(predict)
    return app


def head_deadline_protocol(read_timeout_s: float = READ_TIMEOUT_S) -> type[asyncio.Protocol]:
    """uvicorn's h11 HTTP protocol, closing a connection that has not sent a whole request head
    within `read_timeout_s`: from when it opens, and again from each response on a kept-alive
    connection. uvicorn has no such limit (its keep-alive timer stops at the first byte), so
    idle or trickling connections would hold its connection limit and every request get 503.
    The body's own limit is BodyLimit's."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        head_timeout_s = float(read_timeout_s)
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request head arrived: its body is BodyLimit's
                self._stop_head_timer()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm_head_timer()  # before super(): a pipelined request stops it at once
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._stop_head_timer()
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_late)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_late(self) -> None:
            self._head_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered (its head came)
            if not self.transport.is_closing():
                if self.conn.our_state is not h11.ERROR:
                    self.conn.send(h11.ConnectionClosed())
                self.transport.close()

    return HeadDeadline


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
                  grace_s: float = SHUTDOWN_GRACE_S, read_timeout_s: float = READ_TIMEOUT_S,
                  max_connections: int = MAX_CONNECTIONS) -> Any:
    """The uvicorn.Config `copa serve` runs (also for tests that start its server)."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False,
        http=head_deadline_protocol(read_timeout_s), timeout_graceful_shutdown=grace_s,
        limit_concurrency=max_connections)


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
               grace_s: float = SHUTDOWN_GRACE_S, on_stop: Callable[[], None] = lambda: None,
               read_timeout_s: float = READ_TIMEOUT_S) -> None:
    """Serve until Ctrl-C / SIGTERM: requests in flight get `grace_s` to finish, then are
    cancelled; `on_stop` (e.g. closing the engine, which fails what is still queued) runs then,
    so no worker thread keeps the process alive. `read_timeout_s`: a connection's time to send
    a request head (then it is closed)."""
    import uvicorn

    server = uvicorn.Server(server_config(app, host, port, grace_s, read_timeout_s))
    try:
        server.run()
    finally:
        on_stop()
