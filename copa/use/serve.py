"""copa serve: a loaded arm as an HTTP JSON service (FastAPI on uvicorn).

POST /predict takes the signature's input fields and answers its output fields; GET /health
says it is up and what it serves; /docs and /openapi.json describe the request and response
models, which are generated from the signature. Requests run in FastAPI's thread pool, so
concurrent ones meet in the one engine, which batches them.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint's annotations at
# run time, and the request model is made per signature, inside make_app.
import secrets
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model

API_KEY_ENV = "COPA_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

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


def _explain(errors: list[dict[str, Any]], fields: list[str]) -> str:
    """One clause per field at fault, e.g. "petal_width: missing" (FastAPI's own detail is
    kept beside it). A value of the wrong type fails each member of the union: said once."""
    said: dict[str, str] = {}
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        where = loc[0] if loc else "body"
        kind = error.get("type", "")
        if where == "body" or where not in fields and kind != "extra_forbidden":
            what = error.get("msg", "invalid")  # not a JSON object, or not JSON at all
        elif kind == "missing":
            what = "missing"
        elif kind == "extra_forbidden":
            what = "not an input field of this task"
        else:
            what = f"must be a string or a number (got {error.get('input')!r})"
        said.setdefault(where, what)
    return "; ".join(f"{k}: {v}" for k, v in said.items()) + \
        f" (the inputs are {', '.join(fields)})"


def make_app(program: Any, api_key: str | None = None) -> FastAPI:
    """The service for a loaded arm (copa.use.load.LoadedProgram, or anything with its
    input_fields, output_fields, arm, bundle and answer())."""
    import copa

    inputs, outputs = list(program.input_fields), list(program.output_fields)
    recipe = program.bundle.recipe
    app = FastAPI(title=f"copa: {recipe.name} ({program.arm})", version=copa.__version__,
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

    @app.exception_handler(RequestValidationError)
    async def unprocessable(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors())
        return JSONResponse(status_code=422, content={"message": _explain(errors, inputs),
                                                      "detail": errors})

    engine = getattr(getattr(program, "lm", None), "engine", None)

    @app.get("/health")
    def health() -> dict[str, Any]:
        state: dict[str, Any] = {"status": "ok", "task": recipe.name, "arm": program.arm,
                                 "inputs": inputs, "outputs": outputs}
        sizes = getattr(engine, "batch_sizes", None)  # copa's local engine: is it batching?
        if sizes is not None:
            state["engine"] = {"requests": sum(sizes), "batches": len(sizes),
                               "largest_batch": max(sizes, default=0)}
        return state

    def predict(body: Body) -> dict[str, str]:  # type: ignore[valid-type]
        try:
            return program.answer(body.model_dump())  # type: ignore[attr-defined]
        except Exception as exc:  # the model or engine failed: say so, keep serving
            raise HTTPException(500, f"{type(exc).__name__}: {exc}") from None

    app.post("/predict", response_model=Answer,
             summary=f"{', '.join(inputs)} -> {', '.join(outputs)}",
             dependencies=[Depends(authorized)] if api_key is not None else [])(predict)
    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until Ctrl-C / SIGTERM (uvicorn finishes the requests in flight)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                  access_log=False)).run()
