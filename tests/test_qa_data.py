"""Question-answering data and metrics: SQuAD-format loading, GSM8K's reasoning / answer split,
user loaders, splits that keep a paragraph or an article in one split, and SQuAD EM / F1."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest
from conftest import FIXTURE_DATA, FIXTURE_SPLITS

from copa.checks import check_recipe
from copa.data import load_splits
from copa.data.loaders import gsm8k_rows, squad_rows
from copa.dspy.metrics import answer_found, make_metric, squad_em, squad_f1, squad_normalize
from copa.prompting import build_messages, parse_completion
from copa.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parent.parent

NESTED = {"version": "v2.0", "data": [
    {"title": "Rivers", "paragraphs": [
        {"context": "The Oder flows north. It is 840 km long.", "qas": [
            {"id": "a", "question": "Which way does the Oder flow?",
             "answers": [{"text": "north", "answer_start": 14},
                         {"text": "north", "answer_start": 14},
                         {"text": "flows north", "answer_start": 8}]},
            {"id": "b", "question": "Who named the Oder?", "answers": [],
             "plausible_answers": [{"text": "The Oder", "answer_start": 0}],
             "is_impossible": True}]}]},
    {"title": "Hills", "paragraphs": [
        {"context": "Mount Kell is 300 m high.", "qas": [
            {"id": "c", "question": "How high is Mount Kell?",
             "answers": [{"text": "300 m", "answer_start": 14}], "is_impossible": False}]}]},
]}


def _squad_recipe(tmp_path: Path, extra: str = "", data_file: Path | None = None) -> Path:
    data_file = data_file or tmp_path / "nested.json"
    if not data_file.exists():
        data_file.write_text(json.dumps(NESTED))
    path = tmp_path / "qa.yaml"
    path.write_text(f"""\
name: qa
task: {{signature: "context, question -> answer"}}
data:
  source: {data_file}
  loader: squad
  answers_column: answers
  splits: {{train: 1, val: 1, test: 1, seed: 0}}
{extra}""")
    return path


def test_squad_loader_takes_the_context_from_the_parent_and_keeps_every_answer() -> None:
    rows = squad_rows(NESTED)
    assert [r["id"] for r in rows] == ["a", "c"]  # the impossible question is dropped
    first = rows[0]
    assert first["context"] == "The Oder flows north. It is 840 km long."
    assert first["title"] == "Rivers"
    assert first["answer"] == "north"
    assert first["answers"] == ["north", "flows north"]  # repeats once, in order
    assert rows[1]["context"] == "Mount Kell is 300 m high." and rows[1]["title"] == "Hills"

    kept = squad_rows(NESTED, impossible="keep", impossible_answer="no answer")
    assert [r["id"] for r in kept] == ["a", "b", "c"]
    assert kept[1]["answers"] == ["no answer"] and kept[1]["is_impossible"] is True
    assert kept[1]["context"] == first["context"]


def test_kept_unanswerable_questions_get_the_recipes_answer(tmp_path: Path) -> None:
    recipe = load_recipe(_squad_recipe(
        tmp_path, "  loader_options: {impossible: keep, impossible_answer: unanswerable}\n"))
    splits = load_splits(recipe)
    rows = splits.train + splits.val + splits.test
    assert len(rows) == 3
    unanswerable = [r for r in rows if r["question"] == "Who named the Oder?"]
    assert unanswerable == [{"context": "The Oder flows north. It is 840 km long.",
                             "question": "Who named the Oder?", "answer": "unanswerable",
                             "answers": ["unanswerable"]}]


def test_too_few_answerable_questions_name_the_splits(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="asks for 3 rows .* the data has 2"):
        load_splits(load_recipe(_squad_recipe(tmp_path)))


def test_squad_problems_name_where_they_are(tmp_path: Path) -> None:
    broken = json.loads(json.dumps(NESTED))
    del broken["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["text"]
    with pytest.raises(ValueError, match=r"data\[1\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]"):
        squad_rows(broken)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(RecipeError) as info:
        check_recipe(load_recipe(_squad_recipe(tmp_path, data_file=path)))
    assert any(p.path == "data.source" and "answers[0]: needs a 'text'" in p.message
               for p in info.value.problems)
    with pytest.raises(RecipeError, match="the squad loader takes impossible, impossible_answer"):
        load_recipe(_squad_recipe(tmp_path, "  loader_options: {impossibel: keep}\n"))
    with pytest.raises(RecipeError, match="write one of drop, keep"):
        load_recipe(_squad_recipe(tmp_path, "  loader_options: {impossible: maybe}\n"))
    (tmp_path / "qa.yaml").write_text((tmp_path / "qa.yaml").read_text().replace(
        "loader: squad", "loader: sqaud"))
    with pytest.raises(RecipeError, match="unknown loader 'sqaud'"):
        load_recipe(tmp_path / "qa.yaml")


def test_a_user_loader_reads_any_nested_format(tmp_path: Path) -> None:
    (tmp_path / "shelf.py").write_text(
        "import json\n"
        "def rows(path, marker='?'):\n"
        "    books = json.loads(path.read_text())['books']\n"
        "    return [{'context': b['blurb'], 'question': q['q'] + marker, 'answer': q['a']}\n"
        "            for b in books for q in b['quiz']]\n"
        "def broken(path):\n"
        "    raise KeyError('books')\n")
    (tmp_path / "shelf.json").write_text(json.dumps({"books": [
        {"blurb": f"Book {i} is blue.", "quiz": [{"q": f"Color of book {i}", "a": "blue"}]}
        for i in range(4)]}))
    path = tmp_path / "shelf.yaml"
    path.write_text("""\
name: shelf
task: {signature: "context, question -> answer"}
data:
  source: shelf.json
  loader: shelf:rows
  loader_options: {marker: "!"}
  splits: {train: 2, val: 1, test: 1, seed: 0}
""")
    splits = load_splits(load_recipe(path))
    rows = splits.train + splits.val + splits.test
    assert sorted(r["question"] for r in rows) == [f"Color of book {i}!" for i in range(4)]
    path.write_text(path.read_text().replace("shelf:rows", "shelf:broken").replace(
        '  loader_options: {marker: "!"}\n', ""))
    with pytest.raises(RecipeError) as info:
        load_splits(load_recipe(path))
    assert info.value.problems[0].path == "data.loader"
    assert "shelf:broken raised KeyError" in info.value.problems[0].message


def test_paragraph_and_article_splits_share_no_group() -> None:
    by_title = {r["question"]: r["title"] for r in squad_rows(json.loads(
        (FIXTURE_DATA / "squad" / "dev-v2.0-subset.json").read_text()))}
    for name, group in (("squad", "context"), ("squad_rag", "title")):
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml",
                             overrides={"data.splits": FIXTURE_SPLITS[name]})
        assert recipe.data.group_by == group
        splits = load_splits(recipe)
        assert splits == load_splits(recipe)  # deterministic
        assert [len(s) for s in (splits.train, splits.val, splits.test)] == [8, 4, 6]
        groups = [{by_title[r["question"]] if group == "title" else r["context"] for r in s}
                  for s in (splits.train, splits.val, splits.test)]
        assert not (groups[0] & groups[2] or groups[1] & groups[2] or groups[0] & groups[1])
        assert all(set(r) == set(recipe.task.input_fields) | {"answer", "answers"}
                   for r in splits.train)  # the group key is gone; every gold answer is kept
    # Without group_by, paragraphs would be shared (the same sizes, split by row).
    loose = load_splits(load_recipe(REPO / "recipes" / "squad.yaml", overrides={
        "data.splits": FIXTURE_SPLITS["squad"], "data.group_by": None}))
    assert {r["context"] for r in loose.train} & {r["context"] for r in loose.test}


def test_gsm8k_loader_splits_the_solution_from_the_number() -> None:
    rows = gsm8k_rows([{"question": "q?", "answer":
                        "Ada has 3+4 = <<3+4=7>>7.\nThen 7*2 = <<7*2=14>>14.\n#### 1,400"}])
    assert rows == [{"question": "q?", "reasoning": "Ada has 3+4 = 7.\nThen 7*2 = 14.",
                     "answer": "1400"}]
    kept = gsm8k_rows([{"question": "q?", "answer": "1 = <<1=1>>1\n#### 1"}], calculations="keep")
    assert kept[0]["reasoning"] == "1 = <<1=1>>1"
    with pytest.raises(ValueError, match="row 1: its answer has no '#### <number>' line"):
        gsm8k_rows([{"question": "q?", "answer": "no marker"}])


def test_a_chain_of_thought_training_row_has_the_reasoning_and_the_answer() -> None:
    recipe = load_recipe(REPO / "recipes" / "gsm8k.yaml",
                         overrides={"data.splits": FIXTURE_SPLITS["gsm8k"]})
    checked = check_recipe(recipe)
    assert checked.spec.output_fields == ("reasoning", "answer")
    row = checked.splits.train[0]
    messages = build_messages(checked.spec, row, target=row)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert "reasoning: ..." in messages[0]["content"]  # the system turn names the form
    assert messages[1]["content"] == row["question"]
    target = messages[2]["content"]
    assert target.startswith("reasoning: ") and "<<" not in target and "####" not in target
    assert target.endswith(f"\nanswer: {row['answer']}")
    parsed = parse_completion(target, ["reasoning", "answer"])
    assert parsed == {"reasoning": row["reasoning"], "answer": row["answer"]}
    metric = make_metric("gsm8k_answer", "answer")
    assert metric(dspy.Example(**row), dspy.Prediction(**parsed)) == 1.0


# ---- SQuAD exact match and F1, against values worked out by hand ------------------------------

def test_squad_normalization() -> None:
    assert squad_normalize("The  Norman-Arab, architecture!") == "normanarab architecture"
    assert squad_normalize("An apple and a pear") == "apple and pear"
    assert squad_normalize("theatre") == "theatre"  # articles only as whole words


def test_squad_exact_match_by_hand() -> None:
    assert squad_em(["Denmark, Iceland and Norway"], "denmark iceland and norway") == 1.0
    assert squad_em(["the 10th century"], "10th century.") == 1.0
    assert squad_em(["France"], "in France") == 0.0
    assert squad_em(["north", "flows north"], "Flows north") == 1.0  # any gold answer
    assert squad_em(["France"], "") == 0.0


def test_squad_f1_by_hand() -> None:
    # gold: in, 10th, and, 11th, centuries (5); predicted: 10th, century (2); common: 10th.
    # P = 1/2, R = 1/5, F1 = 2 * 0.1 / 0.7 = 2/7
    assert squad_f1(["in the 10th and 11th centuries"], "10th century") == pytest.approx(2 / 7)
    # best over golds: 3 of 5 gold tokens (F1 0.75) or 3 of 4 (P 1, R 3/4: F1 6/7)
    assert squad_f1(["in the 10th and 11th centuries", "10th and 11th centuries"],
                    "the 10th and 11th") == pytest.approx(6 / 7)
    assert squad_f1(["France"], "France") == 1.0
    assert squad_f1(["France"], "") == 0.0
    assert squad_f1(["Paris"], "France") == 0.0
    # repeated tokens count once per occurrence in both: P = 2/3, R = 2/2, F1 = 0.8
    assert squad_f1(["red red"], "red red red") == pytest.approx(0.8)


def test_squad_metrics_take_every_gold_answer_from_the_example() -> None:
    example = dspy.Example(context="c", question="q", answer="north",
                           answers=["north", "flows north"]).with_inputs("context", "question")
    f1 = make_metric("squad_f1", "answer", answers_field="answers")
    em = make_metric("squad_em", "answer", answers_field="answers")
    assert em(example, dspy.Prediction(answer="it flows north")) == 0.0
    assert f1(example, dspy.Prediction(answer="it flows north")) == pytest.approx(0.8)
    assert em(example, dspy.Prediction(answer="Flows North.")) == 1.0
    # while bootstrapping demos (trace set) DSPy wants pass / fail: exact only
    assert f1(example, dspy.Prediction(answer="it flows north"), trace=[]) is False
    # without the answers field, only the answer field counts
    plain = make_metric("squad_em", "answer")
    assert plain(example, dspy.Prediction(answer="flows north")) == 0.0


def test_answer_found_matches_whole_normalized_words() -> None:
    passages = ["The Oder flows north.", "Mount Kell is 300 m high."]
    assert answer_found(passages, ["flows North"])
    assert answer_found(passages, ["nope", "300 m"])
    assert not answer_found(passages, ["30"])  # not part of a word
    assert not answer_found(passages, ["the"])  # normalizes to nothing
