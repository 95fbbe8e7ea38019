"""Task metrics, usable as DSPy metrics: metric(example, prediction, trace=None) -> float.

Plain functions (an example and a prediction: DSPy objects or dicts): no DSPy import, so the
training process scores val with the same metric as every arm (copa.backends.valcurve)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from copa.registry import METRICS, builtin
from copa.usercode import import_object

Metric = Callable[..., float]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: Any) -> str:
    text = str(text or "").strip().lower()
    text = text.strip(string.punctuation + " \n\t\"'`")
    return " ".join(text.split())


def to_choice(prediction: str, choices: Sequence[str] | None) -> str:
    """Map a free-text answer onto a label: its first line, or the one choice it names."""
    first = normalize(str(prediction).strip().split("\n")[0]) if prediction else ""
    if not choices:
        return first
    normalized = {normalize(c): c for c in choices}
    if first in normalized:
        return normalized[first]
    named = [c for n, c in normalized.items() if re.search(rf"\b{re.escape(n)}\b", first)]
    return named[0] if len(named) == 1 else first


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
        return float(gold_tokens == pred_tokens)
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
    return float(normalize(gold) == normalize(pred))


def label_accuracy(gold: Any, pred: Any, choices: Sequence[str] | None = None) -> float:
    """The answer mapped onto one of the task's choices (to_choice), against the label."""
    return float(normalize(to_choice(pred, choices)) == normalize(gold))


def gsm8k_answer(gold: Any, pred: Any, choices: Sequence[str] | None = None) -> float:
    g, p = gsm8k_number(gold), gsm8k_number(pred)
    return float(g is not None and p is not None and abs(g - p) < 1e-6)


def make_metric(name: str, output_field: str, choices: Sequence[str] | None = None,
                base_dir: Path | None = None, answers_field: str | None = None) -> Metric:
    """The recipe's metric as a DSPy metric on the signature's answer field: a built-in one by
    its entry in copa.registry.METRICS, else a user metric (looked up with the recipe's folder,
    base_dir, on sys.path). With `answers_field`, a metric scored against every accepted answer
    (squad_em, squad_f1) takes the best match over the example's list of gold answers there."""
    entry = METRICS.get(name)
    if entry is None:
        return load_user_metric(name, base_dir)
    score = builtin(entry.function)

    def value(obj: Any) -> Any:
        return obj.get(output_field) if isinstance(obj, dict) else getattr(obj, output_field, "")

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
