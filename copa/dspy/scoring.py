"""Scoring a program on a devset: dspy.Evaluate with the rows whose call failed counted (a
budget of them, evaluate.max_errors), a metric's bad value said as the metric's fault, and
DSPy's own progress chatter kept in the run's log. The prompt search's val scores, the
evaluate stage's arms and the export check all score through here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

from copa.metrics import MetricValueError, bad_score


def raise_metric_fault(metric: Callable[..., Any]) -> None:
    """A user metric's first result that was no finite number (copa.metrics.checked_metric), if
    any, raised: DSPy's optimizers count a metric's exception as a failed row and go on (or
    stop with their own message), and the metric's fault must be said as such."""
    problem = getattr(metric, "problem", None)
    if problem is not None:
        raise problem from None


class ScoreError(Exception):
    """More failed calls than the budget allows: the scores would not be results."""

    def __init__(self, errors: int, rows: int, max_errors: int, first: str | None):
        self.errors, self.rows, self.max_errors, self.first = errors, rows, max_errors, first
        super().__init__(f"{errors} calls failed on {rows} rows, over evaluate.max_errors="
                         f"{max_errors} (first: {first or 'unknown'})")


@dataclass
class Scored:
    """A program scored on a devset. Rows whose call (or metric) raised score 0 and are counted
    in `errors`; `failed[i]` says which. A model answer that does not parse is a wrong answer
    (score 0), not an error. A metric that returns no finite number (NaN, None, a string) is
    neither: evaluate_program raises MetricValueError."""

    mean: float
    results: list[Any]  # (example, prediction, score)
    errors: int = 0
    failed: list[bool] = field(default_factory=list)
    first_error: str | None = None

    @property
    def all_failed(self) -> bool:
        return bool(self.results) and self.errors == len(self.results)


def evaluate_program(program: dspy.Module, devset: list[dspy.Example],
                     metric: Callable[..., Any], num_threads: int,
                     max_errors: int | None = None) -> Scored:
    """Score a program on a devset with dspy.Evaluate, counting the rows whose call failed.

    With max_errors, more failures than that raise ScoreError (DSPy stops early); without it,
    every row is tried."""
    import math
    import threading

    from dspy.utils.exceptions import AdapterParseError

    outputs = list(devset[0].labels().keys()) if devset else []
    messages: list[str] = []
    lock = threading.Lock()

    def call(**inputs: Any) -> Any:
        try:
            return program(**inputs)
        except AdapterParseError:  # the model answered; its answer is wrong, not a failed call
            return dspy.Prediction(**{name: "" for name in outputs})
        except Exception as exc:
            with lock:
                messages.append(f"{type(exc).__name__}: {exc}")
            raise

    bad_values: list[MetricValueError] = []  # a metric's fault: no score, and no failed call

    def judged(example: Any, prediction: Any) -> Any:
        try:
            result = metric(example, prediction)  # as dspy.Evaluate calls it
            problem = bad_score(result)
            if problem:
                raise MetricValueError(f"metric '{getattr(metric, '__name__', metric)}' "
                                       f"{problem}")
            return result
        except MetricValueError as exc:
            with lock:
                bad_values.append(exc)
            raise
        except Exception as exc:
            with lock:
                messages.append(f"metric: {type(exc).__name__}: {exc}")
            raise

    budget = len(devset) + 1 if max_errors is None else max_errors + 1  # DSPy stops AT its value
    evaluator = dspy.Evaluate(devset=devset, metric=judged, num_threads=num_threads,
                              display_progress=False, max_errors=budget,
                              failure_score=float("nan"))  # marks the rows DSPy gave up on
    try:
        result = evaluator(call)
    except Exception:
        if bad_values:
            raise bad_values[0] from None
        if max_errors is not None and len(messages) > max_errors:
            raise ScoreError(len(messages), len(devset), max_errors,
                             messages[0] if messages else None) from None
        raise
    if bad_values:
        raise bad_values[0]
    failed = [isinstance(s, float) and math.isnan(s) for _, _, s in result.results]
    results = [(ex, pred, 0.0 if bad else s)
               for (ex, pred, s), bad in zip(result.results, failed, strict=True)]
    errors = sum(failed)
    if max_errors is not None and errors > max_errors:
        raise ScoreError(errors, len(devset), max_errors, messages[0] if messages else None)
    scores = [float(s) for _, _, s in results]
    return Scored(sum(scores) / len(scores) if scores else 0.0, results, errors, failed,
                  messages[0] if messages else None)


def score(program: dspy.Module, devset: list[dspy.Example], metric: Callable[..., Any],
          num_threads: int) -> tuple[float, list[Any]]:
    """Mean metric (0..1) and per-example (example, prediction, score) on a devset; failed
    calls score 0 (evaluate_program counts them)."""
    scored = evaluate_program(program, devset, metric, num_threads)
    return scored.mean, scored.results


class LMErrorCounter(BaseCallback):
    """Counts failed LM calls anywhere under it (an optimizer's own evaluations included)."""

    def __init__(self) -> None:
        import threading

        self.errors = 0
        self.first: str | None = None
        self._lock = threading.Lock()

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None
                  ) -> None:
        if exception is not None:
            with self._lock:
                self.errors += 1
                self.first = self.first or f"{type(exception).__name__}: {exception}"


@contextmanager
def dspy_chatter_to(log_path: Path | None) -> Iterator[None]:
    """DSPy optimizers print progress bars and notes; keep them in the run's log, not the
    terminal (a user reads copa's own one-line progress)."""
    import contextlib
    import logging

    if log_path is None:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("dspy")
    with open(log_path, "a", encoding="utf-8") as handle:
        handler = logging.StreamHandler(handle)
        old_level, old_propagate = logger.level, logger.propagate
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
                yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = old_propagate
