"""Task metrics, usable as DSPy metrics: metric(example, prediction, trace=None) -> float."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from copa.recipe.usercode import import_object

Metric = Callable[..., float]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


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


def token_f1(gold: Any, pred: Any) -> float:
    gold_tokens, pred_tokens = normalize(gold).split(), normalize(pred).split()
    common = Counter(gold_tokens) & Counter(pred_tokens)
    overlap = sum(common.values())
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def make_metric(name: str, output_field: str, choices: Sequence[str] | None = None,
                base_dir: Path | None = None) -> Metric:
    """The recipe's metric as a DSPy metric on the signature's answer field (a user metric is
    looked up with the recipe's folder, base_dir, on sys.path)."""

    def value(obj: Any) -> Any:
        return obj.get(output_field) if isinstance(obj, dict) else getattr(obj, output_field, "")

    if name == "exact_match":
        def score(gold: Any, pred: Any) -> float:
            return float(normalize(gold) == normalize(pred))
    elif name == "label_accuracy":
        def score(gold: Any, pred: Any) -> float:
            return float(normalize(to_choice(pred, choices)) == normalize(gold))
    elif name == "gsm8k_answer":
        def score(gold: Any, pred: Any) -> float:
            g, p = gsm8k_number(gold), gsm8k_number(pred)
            return float(g is not None and p is not None and abs(g - p) < 1e-6)
    elif name == "token_f1":
        score = token_f1
    else:
        return load_user_metric(name, base_dir)

    def metric(example: Any, prediction: Any, trace: Any = None) -> float:
        result = score(value(example), value(prediction))
        # While bootstrapping demos (trace set) DSPy wants pass/fail.
        return result >= 1.0 if trace is not None else result

    metric.__name__ = name
    return metric


def load_user_metric(spec: str, base_dir: Path | None = None) -> Metric:
    """'package.module:function' named by the recipe (only that is imported, nothing else)."""
    return import_object(spec, base_dir)
