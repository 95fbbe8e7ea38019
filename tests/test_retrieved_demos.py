"""The retrieved-demos program (`optimize.optimizer: retrieved`): per input the k nearest train
rows are its demos; the val guard scores it beside plain; it saves with its rows and loads back
(copa.dspy.retrieved.load_program, what copa.load uses). Real DSPy on copa's real batching
engine, over a stand-in model that answers with its first demo's label (fast: no weights)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import dspy
import pytest
from conftest import LabelModel, engine_lm

from copa.dspy.retrieved import RetrievedDemos, load_program, retrieved_info
from copa.dspy.search import demo_count, prompt_optimize
from copa.recipe.schema import Recipe
from copa.stages.val import demo_count as saved_demo_count

_LABEL = re.compile(r"\[\[ ## label ## \]\]\s*(\w+)")


class FirstDemoModel(LabelModel):
    """Answers with the label of the first demo in its prompt ('neg' without demos): right
    exactly when the most similar train row has the input's label."""

    path = "first-demo"

    def label(self, chat: list[dict[str, str]]) -> str:
        demos = [m["content"] for m in chat[1:-1] if m["role"] == "assistant"]
        found = _LABEL.search(demos[0]) if demos else None
        return found.group(1) if found else "neg"


@pytest.fixture
def lm() -> Iterator[dspy.LM]:
    with engine_lm(FirstDemoModel(), "first-demo") as model:
        yield model


def _examples(texts: list[str]) -> list[dspy.Example]:
    return [dspy.Example(text=t, label="pos" if "sunny" in t else "neg").with_inputs("text")
            for t in texts]


TRAIN = _examples(["sunny beach day", "sunny park walk", "rainy office meeting",
                   "rainy traffic jam", "sunny garden party", "rainy cold commute"])
VAL = _examples(["a sunny beach", "rainy traffic again", "garden party sunny", "cold rainy"])


def _recipe() -> Recipe:
    return Recipe.model_validate({
        "name": "knn", "task": {"signature": "text -> label", "choices": ["pos", "neg"]},
        "data": {"source": "data.jsonl"},
        "optimize": {"optimizer": "retrieved", "params": {"k": 2, "by": "bm25"},
                     "num_threads": 2},
        "evaluate": {"metric": "label_accuracy"}})


def _exact(example, prediction, trace=None) -> float:
    return float(example.label == prediction.label)


def test_the_guard_scores_it_beside_plain_and_it_round_trips_through_its_file(
        lm: dspy.LM, tmp_path: Path) -> None:
    result = prompt_optimize(_recipe(), dspy.Predict("text -> label"), lm, dspy.ChatAdapter(),
                             TRAIN, VAL, _exact, emit=lambda _: None)
    assert result.val_scores == {"plain": 0.5, "optimized": 1.0}
    assert result.winner == "optimized" and isinstance(result.program, RetrievedDemos)
    assert result.summary()["retrieved"] == {"k": 2, "by": "bm25", "rows": 6}
    assert demo_count(result.program) == 2
    path = tmp_path / "program.json"
    result.program.save(str(path))
    state = json.loads(path.read_text())
    assert saved_demo_count(state) == 2 and retrieved_info(state)["rows"] == 6
    loaded = load_program(dspy.Predict("text -> label"), path)
    assert isinstance(loaded, RetrievedDemos)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        for example in VAL:
            inputs = dict(example.inputs())
            assert loaded.demos_for(inputs) == result.program.demos_for(inputs)
            assert loaded(**inputs).label == example.label
    # the plain program saved the same way loads as itself
    dspy.Predict("text -> label").save(str(tmp_path / "plain.json"))
    assert type(load_program(dspy.Predict("text -> label"), tmp_path / "plain.json")) \
        is dspy.Predict


def test_the_demos_are_the_nearest_train_rows_most_similar_first() -> None:
    program = RetrievedDemos(dspy.Predict("text -> label"),
                             [dict(e) for e in TRAIN], ["text"], k=2)
    demos = program.demos_for({"text": "sunny garden"})
    assert [d.text for d in demos] == ["sunny garden party", "sunny beach day"]
    copy = program.deepcopy()
    assert copy.demos_for({"text": "rainy"}) == program.demos_for({"text": "rainy"})
    assert copy.program is not program.program  # concurrent calls never share a predictor


def test_hidden_states_rank_a_rows_own_text_first_and_the_model_travels_in_the_file(
        lm: dspy.LM, tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [{"text": str(t.text), "label": str(t.label)} for t in TRAIN]
    program = RetrievedDemos(dspy.Predict("text -> label"), rows, ["text"], 2, "hidden",
                             str(tiny_model_dir))
    for i, row in enumerate(rows):  # cosine 1 with itself: first whatever the row order
        assert program.demos_for({"text": row["text"]})[0].text == row["text"], i
    path = tmp_path / "program.json"
    program.save(str(path))
    assert json.loads(path.read_text())["copa_retrieved"]["model"] == str(tiny_model_dir)
    loaded = load_program(dspy.Predict("text -> label"), path)
    query = {"text": "rainy office meeting"}
    assert [d.text for d in loaded.demos_for(query)] == [d.text for d in program.demos_for(query)]
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        assert loaded(text="rainy office meeting").label == "neg"


def test_hidden_needs_a_model_and_a_bad_method_is_one_line(tmp_path: Path) -> None:
    from copa.checks import demo_problems

    with pytest.raises(ValueError, match="needs the model"):
        RetrievedDemos(dspy.Predict("text -> label"), [{"text": "a", "label": "pos"}],
                       ["text"], 1, "hidden")
    recipe = _recipe().model_copy(deep=True)
    recipe.optimize.params = {"k": 2, "by": "cosine"}
    [problem] = demo_problems(recipe, "r.yaml")
    assert problem.path == "optimize.params.by" and "bm25 or hidden" in problem.message
    recipe.optimize.params = {"k": 2, "by": "hidden"}
    assert demo_problems(recipe, "r.yaml") == []
