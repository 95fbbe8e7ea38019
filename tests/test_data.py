"""Splits are deterministic, stratified for classification, and never overlap."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA, FIXTURE_SPLITS

from copa.data import load_splits
from copa.data.loaders import read_table
from copa.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parent.parent


def _inputs(recipe, rows):
    return {tuple(r[f] for f in recipe.task.input_fields) for r in rows}


def test_iris_splits_are_disjoint_stratified_and_deterministic() -> None:
    recipe = load_recipe(REPO / "recipes" / "iris.yaml")
    first, second = load_splits(recipe), load_splits(recipe)
    assert first == second
    train, val, test = (_inputs(recipe, s) for s in (first.train, first.val, first.test))
    assert not (train & val or train & test or val & test)
    assert (len(first.train), len(first.val), len(first.test)) == (60, 15, 74)
    counts = Counter(r["species"] for r in first.train)
    assert set(counts.values()) == {20}
    assert first.train[0]["sepal_length"] == "6.3"  # number_format ".1f"


def test_banking77_uses_its_own_test_file_without_leaks() -> None:
    # COPA_DATA points at tests/fixtures/data (conftest); its train.csv repeats one test message.
    path = REPO / "recipes" / "banking77.yaml"
    recipe = load_recipe(path, overrides={"data.splits": FIXTURE_SPLITS["banking77"]})
    assert str(recipe.resolve(recipe.data.source)).startswith(str(FIXTURE_DATA))
    splits = load_splits(recipe)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 20, 30)
    assert not _inputs(recipe, splits.test) & _inputs(recipe, splits.train + splits.val)
    labels = {r["label"] for s in (splits.train, splits.val, splits.test) for r in s}
    assert labels <= set(recipe.task.choices)  # filter_labels dropped card_arrival & co
    assert len({r["label"] for r in splits.train}) == 10  # stratified: every intent trains
    # The 80 train-file rows of the kept intents; the 81st repeats a test message and is dropped.
    leaked = read_table(FIXTURE_DATA / "banking77" / "train.csv")[-1]["text"]
    everything = load_splits(load_recipe(path, overrides={
        "data.splits": {"train": 79, "val": 1, "test": 30, "seed": 0}}))
    assert leaked not in {r["text"] for r in everything.train + everything.val}
    with pytest.raises(RecipeError, match="asks for train 80 \\+ val 1 of 80 rows"):
        load_splits(load_recipe(path, overrides={
            "data.splits": {"train": 80, "val": 1, "test": 30, "seed": 0}}))


def test_a_different_seed_gives_different_splits() -> None:
    iris = REPO / "recipes" / "iris.yaml"
    reseeded = load_recipe(iris, overrides={"data.splits.seed": 1})
    assert load_splits(reseeded).train != load_splits(load_recipe(iris)).train


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet"])
def test_loaders_read_every_format(tmp_path: Path, fmt: str) -> None:
    rows = [{"text": "hi", "label": "a"}, {"text": "yo", "label": "b"}]
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        path.write_text("text,label\nhi,a\nyo,b\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    assert read_table(path) == rows


def test_env_interpolation_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_text(
        "".join(json.dumps({"q": f"q{i}", "a": str(i)}) + "\n" for i in range(10)))
    (tmp_path / "r.yaml").write_text(
        "name: t\ntask: {signature: 'q -> a'}\n"
        "data: {source: '${MY_DIR:-nowhere}/x.jsonl', splits: {train: 5, val: 2, test: 3}}\n")
    recipe = load_recipe(tmp_path / "r.yaml", env={"MY_DIR": "d"})
    assert len(load_splits(recipe).train) == 5


def test_jsonl_with_raw_line_separators_inside_strings_reads_back(tmp_path: Path) -> None:
    """U+2028, U+0085 and the like are line breaks to str.splitlines() but may stand raw in a
    JSON string, as in copa's own files (write_jsonl: ensure_ascii=False): one row per "\\n"
    line, CRLF and CR-only endings too."""
    from copa.data import write_jsonl

    rows = [{"text": f"a\u2028b\x85c\x1cd\u2029e {i}", "label": "pos"} for i in range(3)]
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, rows)
    assert "\u2028" in path.read_text(encoding="utf-8")  # raw, not escaped
    assert read_table(path) == rows
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert read_table(crlf) == rows
    old_mac = tmp_path / "cr.jsonl"  # rows end in "\r" only (a raw "\r" is not JSON text)
    old_mac.write_bytes(path.read_bytes().replace(b"\n", b"\r"))
    assert read_table(old_mac) == rows


def test_run_files_with_raw_line_separators_read_back(tmp_path: Path) -> None:
    """The readers of a run's predictions/*.jsonl (compare, the study, the HTML report) split
    them on "\\n" only."""
    from copa.stages.predictions import read_predictions, write_predictions
    from copa.stages.report_html import prediction_rows

    rows = [{"inputs": {"text": f"x\u2028y {i}"}, "gold": "pos", "prediction": "pos",
             "score": 1.0} for i in range(2)]
    write_predictions(tmp_path / "predictions" / "baseline.jsonl", rows)
    assert read_predictions(tmp_path / "predictions" / "baseline.jsonl") == rows
    assert len(prediction_rows(tmp_path, ["baseline"])) == 2


def test_a_parquet_file_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["pos"]), pa.array(["neg"])],
                                        names=["text", "label", "label"]), path)
    with pytest.raises(ValueError, match=r"^column 'label' is named twice \(columns 2 and 3\)"):
        read_table(path)


def test_empty_input_texts_and_columns_the_recipe_does_not_use_are_data(tmp_path: Path) -> None:
    """What the row checks leave alone: an empty input text that is in the file (only a gold
    output must have text), nulls and lists in columns no field reads, answers as one text, a
    list, or none (the metric then scores against the output field)."""
    rows = [{"text": "" if i == 0 else f"t{i}", "label": "ab"[i % 2], "note": None,
             "tags": ["x"], "answers": [["ab"[i % 2], "c"], "ab"[i % 2], []][i % 3]}
            for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(
        "name: t\ntask: {signature: 'text -> label'}\n"
        "data: {source: d.jsonl, answers_column: answers, splits: {train: 6, val: 2, test: 2}}\n")
    splits = load_splits(load_recipe(tmp_path / "r.yaml"))
    everything = splits.train + splits.val + splits.test
    assert {r["text"] for r in everything} == {"", *(f"t{i}" for i in range(1, 10))}
    answers = {r["text"]: r["answers"] for r in everything}
    assert answers[""] == ["a", "c"] and answers["t1"] == ["b"] and answers["t2"] == []


def _recipe(tmp_path: Path, data: str, header: str, rows: list[str], recipe: str) -> Path:
    (tmp_path / data).write_text(header + "\n" + "".join(r + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(f"name: t\n{recipe}")
    return tmp_path / "r.yaml"


def test_number_format_shows_input_numbers_and_never_touches_gold_or_words(
        tmp_path: Path) -> None:
    """number_format is how input numbers are shown: a gold '4' stays '4' (it was '4.0', and
    labels 0/1/2 no longer matched choices '0', '1', '2'), and a text float() happens to take
    ('Nan', 'infinity', '1_000', ' 7') is a word, kept as written."""
    words = ["Nan", "infinity", "1_000", " 7", "\u0661\u0662"]
    path = _recipe(tmp_path, "d.csv", "question,weight,answer",
                   [f"q{i},{words[i] if i < len(words) else i * 1.25},{i % 3}"
                    for i in range(12)],
                   "task: {signature: 'question, weight -> answer', choices: ['0', '1', '2']}\n"
                   "data: {source: d.csv, splits: {train: 6, val: 3, test: 3}}\n"
                   "prompt: {number_format: '.1f'}\n")
    splits = load_splits(load_recipe(path))
    rows = {r["question"]: r for s in (splits.train, splits.val, splits.test) for r in s}
    assert {r["answer"] for r in rows.values()} == {"0", "1", "2"}
    assert [rows[f"q{i}"]["weight"] for i in range(len(words))] == words
    assert rows["q5"]["weight"] == "6.2" and rows["q8"]["weight"] == "10.0"
    from copa.data import format_value

    assert format_value("-1.5e-05", ".1e") == "-1.5e-05" and format_value("4", ".1f") == "4.0"
    assert format_value(4, ".1f") == "4.0" and format_value(True, ".1f") == "true"


def test_a_yes_no_label_is_its_json_text_and_never_silently_another_choice(
        tmp_path: Path) -> None:
    """A JSON true is 'true', as JSON and YAML write it: choices 'true' / 'false' match it,
    choices 'True' / 'False' are refused naming the data's text (no silent mismatch)."""
    (tmp_path / "d.jsonl").write_text("".join(
        json.dumps({"text": f"t{i}", "label": i % 2 == 0}) + "\n" for i in range(10)))
    (tmp_path / "r.yaml").write_text(
        "name: t\ntask: {signature: 'text -> label', choices: ['true', 'false']}\n"
        "data: {source: d.jsonl, splits: {train: 6, val: 2, test: 2}}\n")
    splits = load_splits(load_recipe(tmp_path / "r.yaml"))
    assert {r["label"] for r in splits.train} == {"true", "false"}
    with pytest.raises(RecipeError, match="not among the choices: 'false', 'true'"):
        load_splits(load_recipe(tmp_path / "r.yaml",
                                overrides={"task.choices": ["True", "False"]}))


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_csv_and_tsv_rows_may_end_in_any_line_ending(tmp_path: Path, ending: str) -> None:
    """An old Mac export ends rows in a bare \\r (refused as 'new-line character seen in
    unquoted field'); a quoted cell keeps its own line break whatever the file's endings."""
    for suffix, sep in (("csv", ","), ("tsv", "\t")):
        path = tmp_path / f"d.{suffix}"
        path.write_bytes(ending.join([f"text{sep}label", f"a{sep}pos", f'"b{ending}c"{sep}neg',
                                      ""]).encode())
        assert read_table(path) == [{"text": "a", "label": "pos"},
                                    {"text": f"b{ending}c", "label": "neg"}]


_LABELS = "task: {signature: 'text -> label', choices: [pos, neg, neutral]}\n"


def _labelled(tmp_path: Path) -> Path:
    return _recipe(tmp_path, "d.csv", "text,label",
                   [f"t{i},{['pos', 'neg', 'neutral'][i % 3]}" for i in range(21)],
                   _LABELS + "data: {source: d.csv, splits: {train: 6, val: 3, test: 3}}\n")


def test_filter_labels_names_labels_of_the_data(tmp_path: Path) -> None:
    """A misspelt label kept nothing of its class, silently, while task.choices still offered
    it; an empty list was read as no filter."""
    path = _labelled(tmp_path)
    with pytest.raises(RecipeError) as caught:
        load_splits(load_recipe(path, overrides={"data.filter_labels": ["pos", "neg",
                                                                        "nuetral"]}))
    assert [str(p) for p in caught.value.problems] == [
        f"{path}: task.choices: 'neutral' is a choice that data.filter_labels drops (no row "
        "keeps it as its label, so answering it is always wrong): add it to data.filter_labels "
        "or remove it from task.choices",
        f"{path}: data.filter_labels: no row has the label 'nuetral' (did you mean 'neutral'?)"]
    with pytest.raises(RecipeError, match="data.filter_labels: no row has the label 'x' "
                                          r"\(labels present: neg, neutral, pos\)"):
        load_splits(load_recipe(path, overrides={"data.filter_labels": ["pos", "neg",
                                                                        "neutral", "x"]}))
    with pytest.raises(RecipeError, match="data.filter_labels: an empty list keeps no row: "
                                          "write null to keep every label"):
        load_recipe(path, overrides={"data.filter_labels": []})
    kept = load_splits(load_recipe(path, overrides={"data.filter_labels": ["pos", "neg"],
                                                    "task.choices": ["pos", "neg"]}))
    assert {r["label"] for r in kept.train + kept.val + kept.test} == {"pos", "neg"}


def test_split_from_is_gone_and_copas_own_files_with_it_still_load(tmp_path: Path) -> None:
    """data.split_from was never read (data.test_source decides): a recipe setting it is told
    so, not sent to 'splits'; recipe.json and exports written while it existed still load, and
    stage keys still hold it."""
    from copa.recipe import recipe_from_dict, recipe_key_dict, recipe_read_back, recipe_to_write

    path = _labelled(tmp_path)
    with pytest.raises(RecipeError, match="data.split_from: no longer a key \\(copa never read "
                                          "it\\): data.test_source decides"):
        load_recipe(path, overrides={"data.split_from": "files"})
    recipe = load_recipe(path)
    written = recipe_to_write(recipe)
    written["data"]["split_from"] = "source"  # as recipe.json held it
    assert recipe_from_dict(recipe_read_back(written)) == recipe.model_copy(
        update={"source_path": None})
    (tmp_path / "export.yaml").write_text(path.read_text().replace(
        "data: {", "data: {split_from: source, "))
    assert load_recipe(tmp_path / "export.yaml", written=True).data == recipe.data
    assert recipe_key_dict(recipe, "data")["data"]["split_from"] == "source"


def test_a_label_in_another_unicode_form_than_its_choice_is_named_so(tmp_path: Path) -> None:
    """'not among the choices: 'café'' beside a choice 'café' reads as a bug: say it is the
    choice in other code points."""
    path = _recipe(tmp_path, "d.csv", "text,label",
                   [f"t{i},{['cafe' + chr(0x301), 'tea'][i % 2]}" for i in range(12)],
                   "task: {signature: 'text -> label', choices: [caf\u00e9, tea]}\n"
                   "data: {source: d.csv, splits: {train: 6, val: 3, test: 3}}\n")
    with pytest.raises(RecipeError, match=r"\('cafe\\u0301' is the choice 'caf\\xe9' in another "
                                          "Unicode form: write one form in both\\)"):
        load_splits(load_recipe(path))


def _read_inputs(split: list[dict]) -> set[str]:
    import unicodedata

    return {" ".join(unicodedata.normalize("NFC", r["text"]).split()) for r in split}


def test_rows_dropped_as_repeats_are_said_with_how_many_disagreed(tmp_path: Path) -> None:
    """dedupe keeps an input's first row; the rows it drops (one of them labelled otherwise)
    are said by `copa validate`, not dropped without a word."""
    from click.testing import CliRunner

    from copa.cli import cli

    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(12)]
    rows += [{"text": "t0", "label": "a"}, {"text": " t1 ", "label": "a"}]  # t1 was 'b'
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(
        "name: t\ntask: {signature: 'text -> label', choices: [a, b]}\n"
        "data: {source: d.jsonl, splits: {train: 6, val: 2, test: 2}}\n")
    splits = load_splits(load_recipe(tmp_path / "r.yaml"))
    said = ("data.source: 2 row(s) repeat an earlier row's input and were dropped "
            "(data.dedupe), 1 of them with another label than the row kept")
    assert splits.notes == [said]
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0 and f"note: {said}" in result.output


def test_a_choice_no_row_has_is_noted(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(
        "name: t\ntask: {signature: 'text -> label', choices: [a, b, c]}\n"
        "data: {source: d.jsonl, splits: {train: 6, val: 2, test: 2}}\n")
    notes = load_splits(load_recipe(tmp_path / "r.yaml")).notes
    assert notes == ["task.choices: 1 of 3 choices have no row in the data: 'c'"]


def test_fractions_that_fit_the_rows_never_ask_for_more_rows(tmp_path: Path) -> None:
    """0.9 / 0.05 / 0.05 of 12 rows, each rounded alone, asked for 11 + 1 + 1 = 13 rows and the
    recipe was refused; the split rounded up the most gives a row back (no split goes to 0)."""
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(
        "name: t\ntask: {signature: 'text -> label', choices: [a, b]}\n"
        "data: {source: d.jsonl, splits: {train: 0.9, val: 0.05, test: 0.05}}\n")
    splits = load_splits(load_recipe(tmp_path / "r.yaml"))
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [10, 1, 1]


@pytest.mark.parametrize("seed", range(4))
def test_a_repeated_input_is_never_in_two_splits(tmp_path: Path, seed: int) -> None:
    """data.dedupe: false keeps repeated inputs: each input's copies stay in one split (they
    were split at random, a test row was a train row). Deduped, an input typed in another
    Unicode form or with other runs of whitespace ('café' / 'cafe' + U+0301, 'a  b' / 'a b') is
    the same input: one row kept, not one in train and one in test."""
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    (tmp_path / "r.yaml").write_text(
        "name: t\ntask: {signature: 'text -> label', choices: [a, b]}\n"
        f"data: {{source: d.jsonl, dedupe: false, splits: {{train: 18, val: 6, test: 9, "
        f"seed: {seed}}}}}\n")
    splits = load_splits(load_recipe(tmp_path / "r.yaml"))
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [18, 6, 9]
    parts = [_read_inputs(s) for s in (splits.train, splits.val, splits.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), parts
    assert all("_group" not in r for s in (splits.train, splits.test) for r in s)

    variants = [("caf\u00e9", "cafe\u0301"), ("a  b", "a b"), ("x\ty", " x y ")]
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(12)]
    rows += [{"text": v, "label": "ab"[n % 2]} for pair in variants for n, v in enumerate(pair)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits(load_recipe(tmp_path / "r.yaml", overrides={
        "data.dedupe": True, "data.splits": {"train": 9, "val": 3, "test": 3, "seed": seed}}))
    everything = [_read_inputs([r]).pop()
                  for s in (splits.train, splits.val, splits.test) for r in s]
    assert len(everything) == len(set(everything)) == 15
