"""The render stage: a checked recipe -> data splits, training rows, prompt preview, Axolotl config.

Every file is written atomically, and rendering is deterministic: the same recipe gives
byte-identical files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from copa.checks import Checked
from copa.data import Row, write_jsonl
from copa.data.demos import is_distribution, trains_with_demos
from copa.data.retrieval import INDEX_DIR
from copa.files import atomic_write_text
from copa.prompting import PromptSpec, preview, training_row
from copa.recipe import Recipe
from copa.runs import PLAIN_DIR, TRAIN_CONFIG, TRAIN_ROWS, Run
from copa.text import one_line

if TYPE_CHECKING:
    from copa.data.retrieval import Retriever

SPLITS = ("train", "val", "test")
TRAIN_DEMOS = "train_demos.json"  # a demo distribution's draw: row -> indices of its demos


@dataclass(frozen=True)
class Rendered:
    dir: Path
    config_path: Path
    train_rows: int
    demos: list[Row]
    index_dir: Path | None = None  # a RAG recipe's retrieval index


def choose_fixed_demos(recipe: Recipe, train: Sequence[Row]) -> list[Row]:
    """A deterministic demo set for demo-aware fine-tuning: one row per label first."""
    n = recipe.finetune.num_demos
    if n == 0:
        return []
    label_field = recipe.task.output_fields[-1]
    chosen: list[Row] = []
    seen: set[str] = set()
    for row in train:
        if row[label_field] not in seen:
            seen.add(row[label_field])
            chosen.append(row)
        if len(chosen) == n:
            return chosen
    for row in train:
        if row not in chosen:
            chosen.append(row)
        if len(chosen) == n:
            break
    return chosen


def training_rows(spec: PromptSpec, rows: Sequence[Row], demos: Sequence[Row] = ()) -> list[dict]:
    """Chat rows for Axolotl; rows used as demos are not also trained on as targets."""
    return [training_row(spec, row, demos) for row in rows if row not in demos]


def render_stage(run: Run, demos: Sequence[Row] | None = None) -> dict[str, Any]:
    """Pipeline stage: the run's rendered/ folder. `demos`: the demos every training row
    carries (with `optimize.order: p->w` the pipeline runs the prompt stage's "p" first, on
    what render_inputs wrote, and hands over the demos it chose)."""
    result = render(run.checked, run.rendered, work_dir=run.train_dir, demos=demos,
                    emit=run.emit, plain_work_dir=run.plain_dir / "train")
    artifacts = {"config": str(result.config_path), "train_rows": result.train_rows}
    if result.index_dir is not None:
        artifacts["retriever"] = str(result.index_dir)
    return artifacts


def render_inputs(run: Run) -> None:
    """What the prompt stage reads, written ahead of the rest: the splits, and a RAG recipe's
    retrieval index."""
    write_splits(run.checked, run.rendered)
    build_index(run.recipe, run.rendered, run.emit)


def build_index(recipe: Recipe, out_dir: Path, emit: Callable[[str], None] = lambda _: None
                ) -> Retriever | None:
    """A RAG recipe's retrieval index in out_dir/retriever (built once, reused while the
    corpus and settings are the same); None without a retrieve section."""
    if recipe.retrieve is None:
        return None
    from copa.data.retrieval import index_for

    emit(f"  indexing {recipe.retrieve.corpus} ({recipe.retrieve.retriever})")
    retriever = index_for(recipe, Path(out_dir) / INDEX_DIR)
    emit(f"  {len(retriever.passages)} passages indexed; {recipe.retrieve.k} retrieved per "
         "question")
    return retriever


def write_splits(checked: Checked, out_dir: Path) -> None:
    """splits/{train,val,test}.jsonl: what every later stage reads its rows from."""
    for name in SPLITS:
        write_jsonl(Path(out_dir) / "splits" / f"{name}.jsonl", getattr(checked.splits, name))


def render(checked: Checked, out_dir: Path, *, work_dir: Path | None = None,
           base_model: str | None = None, hardware=None, demos: Sequence[Row] | None = None,
           validate_axolotl: bool = True, emit: Callable[[str], None] = lambda _: None,
           plain_work_dir: Path | None = None) -> Rendered:
    """Write splits/, train.jsonl, val.jsonl, prompt_preview.txt, demos.json and axolotl.yml;
    for a recipe that trains with demos also plain/ (the same rows without them)."""
    from copa.backends import get_backend  # render owns the config; the backend loads lazily
    from copa.models import resolve_model

    recipe, spec, splits = checked.recipe, checked.spec, checked.splits
    backend = get_backend()
    out_dir = Path(out_dir).resolve()
    work_dir = Path(work_dir).resolve() if work_dir else out_dir / "train"
    write_splits(checked, out_dir)
    for note in splits.notes:
        emit(f"  note: {note}")
    train, val = splits.train, splits.val
    retriever = build_index(recipe, out_dir, emit)
    if retriever is not None:
        from copa.data.retrieval import with_passages

        # The passages the program will retrieve for each question, never the gold paragraph.
        train, val = with_passages(recipe, retriever, train), with_passages(recipe, retriever, val)
    if demos is None:
        demos = choose_fixed_demos(recipe, train) if recipe.finetune.demos == "fixed" else []
    demos = list(demos)
    distribution = recipe.finetune.demos if is_distribution(recipe.finetune.demos) else None
    # A chain-of-thought recipe that does not fine-tune may have no reasoning to train on:
    # then it has no training rows (and its preview shows prompts only).
    trainable = recipe.finetune.enabled or all(f in row for row in [*train, *val]
                                               for f in spec.output_fields)
    if distribution is not None and trainable:
        rows, val_rows = distributed_rows(recipe, spec, train, val, out_dir, emit)
    else:
        rows, val_rows = ((training_rows(spec, train, demos), training_rows(spec, val, demos))
                          if trainable else ([], []))
        (out_dir / TRAIN_DEMOS).unlink(missing_ok=True)
    write_jsonl(out_dir / TRAIN_ROWS, rows)
    write_jsonl(out_dir / "val.jsonl", val_rows)
    atomic_write_text(out_dir / "demos.json", json.dumps(demos, indent=2) + "\n")
    atomic_write_text(out_dir / "prompt_preview.txt", preview(spec, train[:2], trainable))

    if base_model is None:
        emit(f"resolving model {recipe.model.base}")
        base_model = resolve_model(recipe.model.base, recipe.base_dir)
    label = str(recipe.source_path) if recipe.source_path else "<recipe>"
    if validate_axolotl:  # what Axolotl will do with the rows: drop the too long ones
        tokenizer = load_tokenizer(base_model, recipe, emit, label)
        if tokenizer is not None:
            too_long_rows(rows, base_model, recipe, label, emit, tokenizer=tokenizer)
            too_long_answers(spec, [*splits.train, *splits.val, *splits.test], train[:1],
                             tokenizer, recipe, label, emit)
    config = backend.checked_config(recipe, base_model, out_dir / TRAIN_ROWS, work_dir,
                                    hardware, validate=validate_axolotl)
    config_path = out_dir / TRAIN_CONFIG
    backend.write_config(config, config_path)
    # The fair fine-tune-only arm: the same rows without demos, trained beside (copa.runs).
    plain_rows = training_rows(spec, train) if trainable else []
    plain = out_dir / PLAIN_DIR
    if trains_with_demos(recipe) and plain_rows != rows:
        write_jsonl(plain / TRAIN_ROWS, plain_rows)
        write_jsonl(plain / "val.jsonl", training_rows(spec, val))
        plain_work = Path(plain_work_dir).resolve() if plain_work_dir else plain / "train"
        backend.write_config(backend.checked_config(recipe, base_model, plain / TRAIN_ROWS,
                                                    plain_work, hardware,
                                                    validate=validate_axolotl),
                             plain / TRAIN_CONFIG)
    elif plain.exists():  # rendered before with demos: no second fine-tune now
        shutil.rmtree(plain)
    return Rendered(dir=out_dir, config_path=config_path, train_rows=len(rows), demos=demos,
                    index_dir=None if retriever is None else out_dir / INDEX_DIR)


def distributed_rows(recipe: Recipe, spec: PromptSpec, train: Sequence[Row], val: Sequence[Row],
                     out_dir: Path, emit: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """finetune.demos as a distribution: every row with its own k demos from the train split
    (train rows leave themselves out), rendered by the path the DSPy adapter formats with.
    Which demos each train row got goes to train_demos.json (indices into splits/train)."""
    from copa.data.demos import DemoIndex, draw_demos

    dist, fields = recipe.finetune.demos, recipe.task.input_fields
    index = DemoIndex(train, fields) if dist.pick == "retrieved" else None
    seed = recipe.finetune.seed
    drawn = draw_demos(train, train, fields, dist.k, dist.pick, seed, "train", index)
    val_drawn = draw_demos(val, train, fields, dist.k, dist.pick, seed, "val", index)
    rows = [training_row(spec, row, [train[j] for j in js]) for row, js in zip(train, drawn)]
    val_rows = [training_row(spec, row, [train[j] for j in js])
                for row, js in zip(val, val_drawn)]
    atomic_write_text(out_dir / TRAIN_DEMOS, json.dumps(drawn) + "\n")
    counts = [len(js) for js in drawn]
    emit(f"  training rows carry {dist.pick} demos, k in [{dist.k[0]}, {dist.k[1]}] "
         f"(mean {sum(counts) / max(len(counts), 1):.2f})")
    return rows, val_rows


def load_tokenizer(model_path: str, recipe: Recipe, emit: Callable[[str], None],
                   label: str = "<recipe>") -> Any:
    """The model's tokenizer, for the length checks; None (said) where it cannot be loaded
    and nothing needs it: a model only a server runs (serve.engine openai), not fine-tuned.
    Where training needs it, a tokenizer that is not there (or not reachable) is one line
    naming model.base."""
    import transformers

    from copa.recipe import RecipeError
    from copa.recipe.schema import Problem

    try:
        return transformers.AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        if recipe.finetune.enabled:
            said = one_line(str(exc).split(". ")[0], 200) or type(exc).__name__
            raise RecipeError([Problem(file=label, path="model.base", message=(
                f"cannot load the tokenizer of {recipe.model.base}: {said}"))]) from None
        emit(f"  note: no tokenizer for {model_path} ({type(exc).__name__}): answers are not "
             "checked against evaluate.max_tokens")
        return None


def too_long_rows(rows: Sequence[dict], model_path: str, recipe: Recipe, label: str,
                  emit: Callable[[str], None], tokenizer: Any = None) -> int:
    """How many training rows are longer than finetune.sequence_len in the model's own tokens.
    Axolotl drops such rows without a word (and fails deep inside when it drops them all), so
    copa says it here: a warning for some, a recipe error for all."""
    if not rows or not recipe.finetune.enabled:
        return 0
    from copa.recipe import RecipeError
    from copa.recipe.schema import Problem

    if tokenizer is None:
        tokenizer = load_tokenizer(model_path, recipe, lambda _: None, label)
    limit = recipe.finetune.sequence_len
    lengths = [len(tokenizer.apply_chat_template(row["messages"], tokenize=True,
                                                 return_dict=True)["input_ids"])
               for row in rows]
    over = sum(n > limit for n in lengths)
    if over == len(rows):
        fits = 1 << (max(lengths) - 1).bit_length()
        raise RecipeError([Problem(
            file=label, path="finetune.sequence_len",
            message=f"every training row is longer than {limit} tokens (shortest "
                    f"{min(lengths)}, longest {max(lengths)}), and Axolotl would drop them all; "
                    f"write sequence_len: {fits}")])
    if over:
        emit(f"  warning: {over} of {len(rows)} training rows are longer than "
             f"finetune.sequence_len ({limit} tokens; longest {max(lengths)}): Axolotl drops "
             "them. Raise sequence_len to train on them.")
    return over


def too_long_answers(spec: PromptSpec, rows: Sequence[Row], context: Sequence[Row],
                     tokenizer: Any, recipe: Recipe, label: str,
                     emit: Callable[[str], None]) -> int:
    """The longest gold answer, in the model's tokens, as the model must write it for the
    template adapter to parse it: the assistant turn the template renders, field prefixes
    included; for chain_of_thought without its reasoning (the model writes that at a length of
    its choosing); with data.answers_column the shortest accepted answer. The end of turn is
    not needed: a reply cut right after the answer parses whole. Every generation (the arms,
    the optimizer's, finetune.eval's val scoring) stops at evaluate.max_tokens, so a gold
    answer longer than that can never be scored right: a recipe error, before anything trains.
    Gold reasoning longer than that is a warning. `context`: a row to render the prompt with
    (the answer's first token may merge with the prompt's last)."""
    from copa.prompting import build_messages
    from copa.recipe import RecipeError
    from copa.recipe.schema import Problem

    if not rows:
        return 0
    limit = recipe.evaluate.max_tokens
    blank = {f: "" for f in (*spec.input_fields, *spec.output_fields)}
    prompt = tokenizer.apply_chat_template(
        build_messages(spec, {**blank, **(context[0] if context else {})}), tokenize=False,
        add_generation_prompt=True)

    def ids(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    base = ids(prompt)
    lengths: dict[str, int] = {}

    def tokens(text: str) -> int:
        if text not in lengths:
            lengths[text] = ids(prompt + text) - base
        return lengths[text]

    reasoning = recipe.task.module == "chain_of_thought" and "reasoning" in spec.output_fields
    answer = recipe.task.output_fields[-1]

    def shortest(row: Row) -> str:
        """The row's answer turn as the model must write it: with data.answers_column, any
        accepted answer scores, so the shortest."""
        accepted = (row.get("answers") if recipe.data.answers_column else None) or [row[answer]]
        return min((spec.assistant_message({**blank, **row, answer: text,
                                            **({"reasoning": ""} if reasoning else {})})
                    for text in accepted), key=tokens)

    needed = [shortest(row) for row in rows]
    longest = max(needed, key=tokens)
    over = sum(tokens(text) > limit for text in needed)
    if over:
        without = " without its reasoning" if reasoning else ""
        raise RecipeError([Problem(file=label, path="evaluate.max_tokens", message=(
            f"{limit} is too few tokens for the answer the model must write in {over} of "
            f"{len(rows)} rows: the longest, {one_line(repr(longest), 80)}{without}, is "
            f"{tokens(longest)} tokens in the model's tokenizer (a reply cut short scores "
            f"0); write max_tokens: {tokens(longest)}"
            + (" plus room for the reasoning" if reasoning else " or more")))])
    if reasoning:
        full = [spec.assistant_message({**blank, **row}) for row in rows]
        cut = sum(tokens(text) > limit for text in full)
        if cut:
            emit(f"  warning: {cut} of {len(rows)} gold answers with their reasoning are longer "
                 f"than evaluate.max_tokens ({limit} tokens; longest "
                 f"{max(tokens(t) for t in full)}): a model that reasons as long is cut off "
                 "before its answer")
    return tokens(longest)
