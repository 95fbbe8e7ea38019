"""Task metrics, usable as DSPy metrics: metric(example, prediction, trace=None) -> float.

Plain functions (an example and a prediction: DSPy objects or dicts): no DSPy import, so the
training process scores val with the same metric as every arm (copa.backends.valcurve)."""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from copa.registry import METRICS, builtin
from copa.text import one_line
from copa.usercode import import_object

Metric = Callable[..., float]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


# What an answer may carry around a label without naming another one: surrounding whitespace,
# quotes, brackets and markdown emphasis, trailing sentence punctuation, letter case. Signs and
# symbols stay ('-1' is not '1', 'C++' is not 'C#' or 'C').
_OPENERS = "\"'`\u201c\u2018\u00ab([{<*"
_CLOSERS = "\"'`\u201d\u2019\u00bb)]}>*"
_SENTENCE_END = ".,;:!?"


def _fold(text: str) -> str:
    """text case-folded in Unicode NFC: 'café' typed as one code point or as 'e' and a combining
    accent is one text (a model may write either). Unicode's canonical caseless form (NFD,
    then casefold), composed; an ASCII text is only lower-cased."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


def normalize(text: Any) -> str:
    """The form two answers are compared in: case-folded, in Unicode NFC, whitespace collapsed,
    and stripped of surrounding quotes, brackets, '*' and trailing .,;:!? (nothing else: a sign
    or a '#' may be what tells two labels apart). Texts that differ only in what this removes
    are one answer."""
    text = " ".join(_fold("" if text is None else str(text)).split())
    while True:
        stripped = text.lstrip(_OPENERS).rstrip(_CLOSERS + _SENTENCE_END).strip()
        if stripped == text:
            return text
        text = stripped


def same_answer(a: Any, b: Any) -> bool:
    """Whether two answers are the same text (surrounding whitespace aside), or the same
    non-empty normalized text: two answers made only of punctuation (':)' and '') normalize to
    nothing, and are one answer only when they are the same text."""
    a, b = ("" if v is None else str(v) for v in (a, b))
    if a.strip() == b.strip():
        return True
    key = normalize(a)
    return bool(key) and key == normalize(b)


def indistinguishable(choices: Sequence[str]) -> tuple[str, str] | None:
    """Two choices the scorer would take for one another (the same normalized form, e.g. 'Pos'
    and 'pos'), or None."""
    seen: dict[str, str] = {}
    for choice in choices:
        key = normalize(choice)
        if key in seen and seen[key] != choice:
            return seen[key], choice
        seen.setdefault(key, choice)
    return None


def match_choice(text: Any, choices: Sequence[str]) -> str | None:
    """The choice `text` is: the same text (surrounding whitespace aside), else the one choice
    with its normalized form; None when there is none, or more than one."""
    text = "" if text is None else str(text).strip()
    if text in choices:
        return text
    key = normalize(text)
    same = list(dict.fromkeys(c for c in choices if key and normalize(c) == key))
    return same[0] if len(same) == 1 else None


def _first_line(prediction: Any) -> str:
    return str(prediction).strip().split("\n")[0].strip() if prediction else ""


def named_choice(prediction: Any, choices: Sequence[str]) -> str | None:
    """The choice a free-text answer gives: its first line as a choice (match_choice), else the
    one choice its first line names as a whole word ('It is setosa'). A choice named only inside
    another named choice ('1' in '-1', 'C' in 'C++') is not named. None when it names no choice,
    or several."""
    first = _first_line(prediction)
    exact = match_choice(first, choices)
    if exact is not None:
        return exact
    text = " ".join(_fold(first).split())
    spans: list[tuple[int, int, str]] = []
    for choice in dict.fromkeys(choices):
        key = normalize(choice)
        if key:
            pattern = rf"(?<!\w){re.escape(key)}(?!\w)"
            spans += [(m.start(), m.end(), choice) for m in re.finditer(pattern, text)]
    named = {c for s, e, c in spans
             if not any(s2 <= s and e <= e2 and e2 - s2 > e - s for s2, e2, _ in spans)}
    return named.pop() if len(named) == 1 else None


def to_choice(prediction: Any, choices: Sequence[str] | None) -> str:
    """Map a free-text answer onto a label: the choice it gives (named_choice), else its first
    line, normalized."""
    found = named_choice(prediction, choices) if choices else None
    return found if found is not None else normalize(_first_line(prediction))


def gsm8k_number(text: Any) -> float | None:
    """The first number after '####' (GSM8K's answer line), else the last number in the text."""
    text = str(text or "")
    marked = "####" in text
    numbers = _NUMBER.findall(text.split("####")[-1] if marked else text)
    if not numbers:
        return None
    try:
        return float(numbers[0 if marked else -1].replace(",", ""))
    except ValueError:
        return None


def token_f1(gold: Any, pred: Any, choices: Sequence[str] | None = None) -> float:
    gold_tokens, pred_tokens = normalize(gold).split(), normalize(pred).split()
    common = Counter(gold_tokens) & Counter(pred_tokens)
    overlap = sum(common.values())
    if not gold_tokens or not pred_tokens:
        return float(same_answer(gold, pred))
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_normalize(text: Any) -> str:
    """SQuAD's answer normalization: lowercase, punctuation and articles (a, an, the) removed,
    whitespace collapsed."""
    text = str(text or "").lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_em(golds: Sequence[Any], pred: Any) -> float:
    """SQuAD exact match: 1 if the normalized prediction equals any normalized gold answer."""
    return float(any(squad_normalize(g) == squad_normalize(pred) for g in golds))


def squad_f1(golds: Sequence[Any], pred: Any) -> float:
    """SQuAD token F1 on normalized answers, the best over the gold answers."""
    def f1(gold: Any) -> float:
        gold_tokens, pred_tokens = squad_normalize(gold).split(), squad_normalize(pred).split()
        if not gold_tokens or not pred_tokens:  # e.g. an answer made only of articles
            return float(gold_tokens == pred_tokens)
        overlap = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
        if overlap == 0:
            return 0.0
        precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
        return 2 * precision * recall / (precision + recall)

    return max((f1(g) for g in golds), default=0.0)


def answer_found(passages: Sequence[str], golds: Sequence[Any]) -> bool:
    """Whether a gold answer occurs in the passages, as whole words (both SQuAD-normalized):
    retrieval recall@k's hit."""
    text = f" {' '.join(squad_normalize(p) for p in passages)} "
    return any(squad_normalize(g) and f" {squad_normalize(g)} " in text for g in golds)


def exact_match(gold: Any, pred: Any, choices: Sequence[str] | None = None) -> float:
    return float(same_answer(gold, pred))


def label_accuracy(gold: Any, pred: Any, choices: Sequence[str] | None = None) -> float:
    """The choice the answer gives (named_choice) against the label's choice: only the label
    itself counts, never another choice that looks like it. A label outside the choices (or no
    choices) is compared with the answer's first line (same_answer)."""
    label = match_choice(gold, choices) if choices else None
    if label is not None:
        return float(named_choice(pred, choices) == label)
    return float(same_answer(_first_line(pred), gold))


def gsm8k_answer(gold: Any, pred: Any, choices: Sequence[str] | None = None) -> float:
    g, p = gsm8k_number(gold), gsm8k_number(pred)
    return float(g is not None and p is not None and abs(g - p) < 1e-6)


class MetricValueError(ValueError):
    """A metric gave something other than a finite number for a row: a fault of the metric (NaN
    from 0/0, None, a string), neither a wrong answer nor a failed LM call, and no score can be
    made of it. A user error: one line naming the recipe key, exit 2."""


def bad_score(result: Any) -> str | None:
    """What is wrong with a metric's result for one row, or None when it is a finite number: a
    number (a bool too), or an object float() takes through __float__ (GEPA's
    dspy.Prediction(score=..., feedback=...)). NaN, +-inf, None, a string are wrong."""
    try:
        value = float(result) if hasattr(type(result), "__float__") else None
    except (TypeError, ValueError):
        value = None
    if value is not None and math.isfinite(value):
        return None
    shown = one_line(repr(result) if value is None else str(value), 80)
    return (f"returned {shown} ({type(result).__name__}): a metric must return a finite number "
            "for every row, e.g. 0.0 for an answer it cannot score")


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, "")


def checked_metric(function: Callable[..., Any], name: str, output_field: str,
                   where: str = "evaluate.metric") -> Metric:
    """A user metric that raises MetricValueError for a result that is not a finite number
    (bad_score), naming `where` (the recipe key), the metric, the row and the value; results
    are returned as they are. The first such error is also kept as `.problem`, for callers
    whose DSPy optimizer counts a metric's exception as a failed row and goes on."""

    @functools.wraps(function)
    def metric(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        problem = bad_score(result)
        if problem:
            example, prediction = (list(args) + [None, None])[:2]
            error = MetricValueError(
                f"{where}: '{name}' on a row (gold "
                f"{one_line(repr(_field(example, output_field)), 60)}, answer "
                f"{one_line(repr(_field(prediction, output_field)), 60)}) {problem}")
            if metric.problem is None:
                metric.problem = error
            raise error
        return result

    metric.problem = None
    return metric


def make_metric(name: str, output_field: str, choices: Sequence[str] | None = None,
                base_dir: Path | None = None, answers_field: str | None = None,
                where: str = "evaluate.metric") -> Metric:
    """The recipe's metric as a DSPy metric on the signature's answer field: a built-in one by
    its entry in copa.registry.METRICS, else a user metric (looked up with the recipe's folder,
    base_dir, on sys.path), whose results are checked to be finite numbers (checked_metric,
    naming `where`: the recipe key that names it). With `answers_field`, a metric scored
    against every accepted answer (squad_em, squad_f1) takes the best match over the example's
    list of gold answers there."""
    entry = METRICS.get(name)
    if entry is None:
        return checked_metric(load_user_metric(name, base_dir), name, output_field, where)
    score = builtin(entry.function)

    def value(obj: Any) -> Any:
        return _field(obj, output_field)

    def golds(example: Any) -> list[Any]:
        found = None
        if answers_field:
            found = (example.get(answers_field) if isinstance(example, dict)
                     else getattr(example, answers_field, None))
        return list(found) if found else [value(example)]

    def metric(example: Any, prediction: Any, trace: Any = None) -> float:
        if entry.golds:
            result = score(golds(example), value(prediction))
        else:
            result = score(value(example), value(prediction), choices)
        # While bootstrapping demos (trace set) DSPy wants pass/fail.
        return result >= 1.0 if trace is not None else result

    metric.__name__ = name
    return metric


def load_user_metric(spec: str, base_dir: Path | None = None) -> Metric:
    """'package.module:function' named by the recipe (only that is imported, nothing else)."""
    return import_object(spec, base_dir)
