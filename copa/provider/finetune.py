"""One fine-tune of chat rows, as DSPy's weight optimizers hand them over: the rows become Axolotl
`chat_template` rows (loss on the final assistant turn only), the recipe's finetune section
(with any train_kwargs over it, checked like recipe keys) becomes the Axolotl config, and the
backend that the pipeline's train and merge stages use trains and merges them.

Each fine-tune has a folder named by its content (rows, settings, base model, versions):

  <root>/<key>/  train.jsonl, axolotl.yml, train/ (checkpoints, logs), merged/, finetune.json

finetune.json is written last: a folder that has it is done and is reused as it is (the stage
cache rule); a killed fine-tune resumes from its last checkpoint when asked again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from copa.files import atomic_write_json, sha256_json
from copa.prompting import target_row
from copa.recipe import Recipe, recipe_from_dict
from copa.text import one_line

ROLES = ("system", "user", "assistant")
Emit = Callable[[str], None]


class FinetuneError(Exception):
    """Rows or settings a fine-tune cannot start from (Axolotl's own failures are TrainError)."""


@dataclass(frozen=True)
class Finetuned:
    key: str
    model_dir: Path
    rows: int
    cached: bool
    seconds: float


def one_answer_warning(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """A warning when every row teaches the same answer, else None. BootstrapFinetune keeps only
    the traces its metric scores correct: a student at chance on all but one label (a base model
    under `p -> w`) hands over rows of that label alone, and the fine-tune learns to answer
    nothing else."""
    answers = {row["messages"][-1]["content"] for row in rows}
    if len(rows) < 2 or len(answers) > 1:
        return None
    shown = one_line(next(iter(answers)), 40)
    return (f"all {len(rows)} fine-tuning rows end in the same answer ({shown!r}): the model "
            "will learn to give only that one. BootstrapFinetune keeps only traces its metric "
            "scores correct; a stronger student (fine-tune on the gold labels first: w -> p) or "
            "a teacher program gives it rows of every answer")


def axolotl_rows(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """DSPy chat rows ({"messages": [...]}, whatever adapter formatted them) as Axolotl
    chat_template rows that train on the final assistant turn only."""
    if not rows:
        raise FinetuneError(
            "no training rows: DSPy handed over none (BootstrapFinetune keeps only the traces "
            "its metric scores as correct; with a weak model, give it a teacher program, more "
            "train examples, or metric=None)")
    out = []
    for n, row in enumerate(rows):
        messages = row.get("messages") if isinstance(row, Mapping) else None
        if not isinstance(messages, list) or not messages:
            raise FinetuneError(f"training row {n}: expected DSPy's chat format "
                                f"{{'messages': [...]}}, got {_shape(row)}")
        for message in messages:
            if not (isinstance(message, Mapping) and message.get("role") in ROLES
                    and isinstance(message.get("content"), str)):
                raise FinetuneError(f"training row {n}: a message needs a role ({', '.join(ROLES)})"
                                    f" and text content, got {_shape(message)}")
        if messages[-1]["role"] != "assistant":
            raise FinetuneError(f"training row {n}: its last message is "
                                f"'{messages[-1]['role']}'; the answer to learn must be the "
                                "last, an assistant message")
        out.append(target_row([{"role": m["role"], "content": m["content"]} for m in messages]))
    return out


def _shape(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping with keys " + ", ".join(map(str, value)) if value else "{}"
    return type(value).__name__


def with_train_kwargs(recipe: Recipe, train_kwargs: Mapping[str, Any] | None) -> Recipe:
    """The recipe with train_kwargs over its finetune section, checked as recipe keys are
    (unknown keys get a 'did you mean', values their ranges)."""
    if not train_kwargs:
        return recipe
    label = f"train_kwargs (over {recipe.source_path or 'the recipe'})"
    raw = recipe.model_dump(mode="json")
    raw["finetune"] = {**raw["finetune"], **dict(train_kwargs)}
    changed = recipe_from_dict(raw, label)
    changed.source_path = recipe.source_path
    return changed


def finetune_key(recipe: Recipe, base_model: str, rows: list[dict[str, Any]],
                 versions: Mapping[str, str]) -> str:
    """What a fine-tune's weights depend on."""
    return sha256_json([rows, recipe.model_dump(mode="json")["finetune"], base_model,
                        recipe.model.trust_remote_code, dict(versions)])


def run_finetune(recipe: Recipe, base_model: str, rows: list[dict[str, Any]], root: Path,
                 emit: Emit = print, on_process: Callable[[Any], None] | None = None,
                 on_phase: Callable[[str], None] | None = None) -> Finetuned:
    """Train and merge Axolotl chat_template `rows` on `base_model` in root/<key>/ (or reuse
    a finished one): the backend's train and merge, as the pipeline's stages call them."""
    from copa.backends import get_backend
    from copa.data import write_jsonl
    from copa.runs import TRAIN_CONFIG, TRAIN_ROWS, run_dir_locked, versions

    backend = get_backend()
    key = finetune_key(recipe, base_model, rows, versions())
    folder = (Path(root) / key[:16]).resolve()
    done, merged = folder / "finetune.json", folder / "merged"
    phase = on_phase or (lambda _: None)
    with run_dir_locked(folder, wait=True, emit=emit):  # one process per fine-tune folder
        if done.is_file() and (merged / "config.json").is_file():
            emit(f"  fine-tune {key[:16]}: unchanged, reusing {merged}")
            return Finetuned(key, merged, len(rows), True, 0.0)
        start = time.time()
        phase("preparing")
        train_path, config_path, work = folder / TRAIN_ROWS, folder / TRAIN_CONFIG, \
            folder / "train"
        write_jsonl(train_path, rows)
        config = backend.checked_config(recipe, base_model, train_path, work)
        backend.write_config(config, config_path)
        steps = backend.steps_for(recipe, len(rows))
        emit(f"  fine-tune {key[:16]}: {len(rows)} rows on {base_model}, {steps} steps "
             f"(Axolotl; its log: {work / 'axolotl-train.log'})")
        phase("training")
        trained = backend.train(recipe, config_path, work, emit=emit, total_steps=steps,
                                on_process=on_process)
        phase("merging")
        backend.merge(config_path, trained, merged, work, on_process=on_process)
        seconds = time.time() - start
        atomic_write_json(done, {"key": key, "base_model": base_model, "rows": len(rows),
                                 "model": str(merged), "seconds": round(seconds, 2)})
    return Finetuned(key, merged, len(rows), False, seconds)
