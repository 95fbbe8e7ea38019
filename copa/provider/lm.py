"""AxolotlProvider: DSPy 3.4's fine-tuning Provider on copa's Axolotl backend, and `copa.lm()`,
the dspy.LM that carries it.

    lm = copa.lm("smollm2-135m-instruct", recipe="recipes/iris.yaml")
    program.set_lm(lm)
    tuned = dspy.BootstrapFinetune(metric).compile(program, trainset=train)

DSPy calls `finetune` in a thread of its own and hands back `lm.copy(model=<returned id>)`; the
id names the merged model folder ("copa/<folder>"), and the LM's engine (a RoutingEngine) runs
each request on the model its id names, so the copy answers with the fine-tuned weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
from dspy.clients.provider import Provider, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat

from copa.dspy.lms import routing_lm
from copa.inference.router import RoutingEngine, is_copa_model, model_id
from copa.inference.router import model_of as router_model_of
from copa.provider.finetune import (
    Emit,
    FinetuneError,
    axolotl_rows,
    one_answer_warning,
    run_finetune,
    with_train_kwargs,
)
from copa.recipe import Recipe

STATES = ("pending", "preparing", "training", "merging", "succeeded", "failed", "cancelled")


class TrainingCancelled(Exception):
    pass


class AxolotlTrainingJob(TrainingJob):
    """A fine-tune DSPy started: `status()` says where it is, `cancel()` stops Axolotl."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._job_lock = threading.Lock()
        self._phase = "pending"
        self._process: subprocess.Popen | None = None
        self.cancel_requested = False
        self.model_dir: Path | None = None  # the merged model, once done

    def status(self) -> str:
        """One of STATES."""
        return self._phase

    def _set_state(self, state: str) -> None:
        with self._job_lock:
            if self._phase != "cancelled":
                self._phase = state
        if self.cancel_requested:
            raise TrainingCancelled("the fine-tune was cancelled")

    def _attach(self, process: subprocess.Popen) -> None:
        with self._job_lock:
            self._process = process
            cancelled = self.cancel_requested
        if cancelled:
            _stop(process)

    def cancel(self) -> bool:
        """Stop the running Axolotl process (and its children); DSPy's waiters get
        CancelledError at once."""
        with self._job_lock:
            self.cancel_requested = True
            self._phase = "cancelled"
            process = self._process
        if process is not None:
            _stop(process)
        super().cancel()
        return True

    def set_result(self, result: Any) -> None:
        if not self.cancelled():  # a cancelled job's thread still ends with a result
            super().set_result(result)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


class AxolotlProvider(Provider):
    """DSPy Provider: fine-tunes with the recipe's finetune section on copa's Axolotl backend
    and serves the result on copa's in-process engine. launch / kill load and unload a model
    (both idempotent)."""

    def __init__(self, recipe: Recipe, finetunes_dir: Path, engine: RoutingEngine,
                 emit: Emit = print, fingerprints: Path | None = None) -> None:
        super().__init__()
        self.finetunable = True
        self.TrainingJob = AxolotlTrainingJob
        self.recipe = recipe
        self.finetunes_dir = Path(finetunes_dir)
        self.engine = engine
        self.emit = emit
        self.fingerprints = fingerprints  # set: ids carry a hash of the weights (response cache)
        self.history: list[dict[str, Any]] = []  # one entry per fine-tune, for reports

    @staticmethod
    def is_provider_model(model: str) -> bool:
        return is_copa_model(model)

    def launch(self, lm: dspy.LM, launch_kwargs: dict[str, Any] | None = None) -> None:
        if is_copa_model(lm.model):
            self.engine.engine_for(lm.model)

    def kill(self, lm: dspy.LM, launch_kwargs: dict[str, Any] | None = None) -> None:
        if is_copa_model(lm.model):
            self.engine.release(lm.model)

    def finetune(self, job: TrainingJob, model: str, train_data: list[dict[str, Any]],
                 train_data_format: TrainDataFormat | str | None,
                 train_kwargs: dict[str, Any] | None = None) -> str:
        """Train and merge; return the merged model's id. Any failure is an Exception (DSPy's
        thread hands Exceptions to the waiting compile; anything else would leave it waiting)."""
        try:
            return self._finetune(job, model, train_data, train_data_format, train_kwargs)
        except Exception:
            _set(job, "failed", quiet=True)
            raise
        except BaseException as exc:
            _set(job, "failed", quiet=True)
            raise FinetuneError(f"fine-tune stopped: {type(exc).__name__}: {exc}") from exc

    def _finetune(self, job: TrainingJob, model: str, train_data: list[dict[str, Any]],
                  train_data_format: TrainDataFormat | str | None,
                  train_kwargs: dict[str, Any] | None) -> str:
        fmt = getattr(train_data_format, "value", train_data_format)
        if fmt not in (None, TrainDataFormat.CHAT.value):
            raise FinetuneError(f"AxolotlProvider trains chat rows; got data format {fmt!r} "
                                "(format the rows with a ChatAdapter or copa's TemplateAdapter)")
        if not is_copa_model(model):
            raise FinetuneError(f"{model!r} is not a copa model id; make the LM with copa.lm()")
        recipe = with_train_kwargs(self.recipe, train_kwargs)
        rows = axolotl_rows(train_data)
        warning = one_answer_warning(rows)
        if warning:
            self.emit(f"  warning: {warning}")
        attach = getattr(job, "_attach", None)
        result = run_finetune(recipe, router_model_of(model), rows, self.finetunes_dir,
                              emit=self.emit, on_process=attach,
                              on_phase=lambda state: _set(job, state))
        _set(job, "succeeded")
        if isinstance(job, AxolotlTrainingJob):
            job.model_dir = result.model_dir
        self.history.append({"key": result.key[:16], "base_model": router_model_of(model),
                             "model": str(result.model_dir), "rows": result.rows,
                             "reused": result.cached, "seconds": round(result.seconds, 2),
                             **({"warning": warning} if warning else {})})
        return model_id(str(result.model_dir), self._tag(result.model_dir))

    def _tag(self, model_dir: Path) -> str | None:
        if self.fingerprints is None:
            return None
        from copa.inference.cache import weights_tag

        return weights_tag(model_dir, self.fingerprints, self.recipe.serve.precision)

    def __deepcopy__(self, memo: dict) -> AxolotlProvider:
        return self  # settings and a shared history: one provider per copa.lm()


def _set(job: TrainingJob, state: str, quiet: bool = False) -> None:
    if isinstance(job, AxolotlTrainingJob):
        try:
            job._set_state(state)
        except TrainingCancelled:
            if not quiet:
                raise


def _default_recipe(model: str) -> Recipe:
    """A recipe whose finetune and serve sections are the defaults (the task is unused)."""
    from copa.recipe import recipe_from_dict

    return recipe_from_dict({"name": "copa-lm", "model": {"base": model},
                             "task": {"signature": "question -> answer"},
                             "data": {"source": "dspy"}}, "<copa.lm defaults>")


def provider_lm(model: str, *, recipe: str | os.PathLike[str] | Recipe | None = None,
                run_dir: str | os.PathLike[str] | None = None, cache: bool = False,
                max_tokens: int | None = None, emit: Callable[[str], None] = print,
                **lm_kwargs: Any) -> dspy.LM:
    """A dspy.LM on copa's in-process engine whose provider is AxolotlProvider.

    model: a model alias, local folder, .gguf file or hub id (or a "copa/..." id).
    recipe: a recipe file (or loaded Recipe) whose finetune: section trains and whose serve:
    section sets the engine; without one, their defaults. Fine-tunes go to
    <run_dir>/finetunes/ (run_dir: the recipe's run directory unless given).
    cache: DSPy's response cache, keyed by a hash of the weights (in run_dir/cache).
    """
    from copa.models import resolve_model
    from copa.recipe import load_recipe
    from copa.runs import run_dir_for

    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):  # 0 fell back to the recipe's silently
        raise ValueError(f"max_tokens must be a whole number >= 1, or None for the recipe's "
                         f"evaluate.max_tokens (got {max_tokens!r})")
    if recipe is None:
        loaded = _default_recipe(model)
    elif isinstance(recipe, Recipe):
        loaded = recipe
    else:
        loaded = load_recipe(recipe)
    max_tokens = loaded.evaluate.max_tokens if max_tokens is None else max_tokens
    directory = Path(run_dir) if run_dir else run_dir_for(loaded)
    folder = router_model_of(model) if is_copa_model(model) else resolve_model(model,
                                                                               loaded.base_dir)

    def provider(engine: RoutingEngine, fingerprints: Path | None) -> AxolotlProvider:
        return AxolotlProvider(loaded, directory / "finetunes", engine, emit=emit,
                               fingerprints=fingerprints)

    return routing_lm(loaded, folder, directory, cache=cache, max_tokens=max_tokens,
                      provider=provider, **lm_kwargs)
