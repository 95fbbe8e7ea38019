"""The task metrics, where DSPy code has always found them. They live in `copa.metrics` (plain
functions of an example and a prediction, nothing of DSPy), so that the training process can
score val with the very same metric (copa.backends.axolotl_plugin) without importing DSPy."""

from copa.metrics import (  # noqa: F401 - re-exported
    Metric,
    answer_found,
    gsm8k_number,
    load_user_metric,
    make_metric,
    normalize,
    squad_em,
    squad_f1,
    squad_normalize,
    to_choice,
    token_f1,
)
