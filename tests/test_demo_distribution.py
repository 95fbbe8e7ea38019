"""`finetune.demos: {k: [lo, hi], pick: random | retrieved}`: every training row with its own
k demos from the train split, rendered by the path the DSPy adapter formats with. Fast: the
render stage alone (no Axolotl), the tiny model's tokenizer for the length check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import write_tiny_recipe

from copa.checks import check_recipe
from copa.data import read_jsonl
from copa.data.demos import DemoIndex, draw_demos
from copa.recipe import RecipeError, load_recipe

FIELDS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
RANDOM = {"k": [0, 3], "pick": "random"}
RETRIEVED = {"k": [0, 3], "pick": "retrieved"}


def _render(folder: Path, model: Path, demos: Any, **more: Any) -> tuple[Any, Path]:
    from copa.stages.render import render

    recipe = load_recipe(write_tiny_recipe(folder, model), overrides={
        "finetune.demos": demos, "finetune.sequence_len": 1024, **more})
    checked = check_recipe(recipe)
    out = folder / "rendered"
    render(checked, out, base_model=str(model), validate_axolotl=False)
    return checked, out


def _inputs(row: dict[str, Any]) -> tuple:
    return tuple(str(row[f]) for f in FIELDS)


@pytest.fixture(scope="module", params=[RANDOM, RETRIEVED], ids=["random", "retrieved"])
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             tiny_model_dir: Path) -> tuple[Any, Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("demo-distribution")
    checked, out = _render(folder, tiny_model_dir, request.param)
    return checked, out, request.param


def test_a_training_row_never_carries_itself_or_a_val_or_test_row(rendered) -> None:
    checked, out, _ = rendered
    train = read_jsonl(out / "splits" / "train.jsonl")
    held_out = {_inputs(r) for name in ("val", "test")
                for r in read_jsonl(out / "splits" / f"{name}.jsonl")}
    drawn = json.loads((out / "train_demos.json").read_text())
    assert len(drawn) == len(train)
    assert any(drawn)
    for i, demos in enumerate(drawn):
        assert i not in demos
        assert all(_inputs(train[j]) != _inputs(train[i]) for j in demos)
        assert not {_inputs(train[j]) for j in demos} & held_out
    # and the rows as written: each demo's user turn is a train row's, never its own
    spec = checked.spec
    train_turns = {spec.user_message(r) for r in train}
    for row, target in zip(read_jsonl(out / "train.jsonl"), train):
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        assert users[-1] == spec.user_message(target)
        assert all(u in train_turns and u != users[-1] for u in users[:-1])


def test_the_training_text_is_what_the_adapter_sends_for_the_same_demos(rendered) -> None:
    """Byte for byte: the DSPy TemplateAdapter's messages for the row's inputs and demos, and
    the row's answer, are the rendered training row (k = 0 rows: the plain prompt)."""
    from copa.dspy.kit import task_kit
    from copa.dspy.program import to_examples

    checked, out, _ = rendered
    recipe = checked.recipe
    train = read_jsonl(out / "splits" / "train.jsonl")
    drawn = json.loads((out / "train_demos.json").read_text())
    kit = task_kit(recipe, train, [], checked.spec)
    signature = kit.program.signature
    rows = read_jsonl(out / "train.jsonl")
    assert {len(d) for d in drawn} >= {0, 1}
    for row, target, demos in zip(rows, train, drawn):
        sent = kit.adapter.format(signature, to_examples(recipe, [train[j] for j in demos]),
                                  {f: target[f] for f in FIELDS})
        answer = checked.spec.assistant_message(target)
        expected = [*sent, {"role": "assistant", "content": answer}]
        got = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        assert got == expected
        assert json.dumps(got).encode() == json.dumps(expected).encode()
        assert [m["training"] for m in row["messages"]] == [False] * len(sent) + [True]


def test_the_demo_free_rows_are_rendered_beside_for_the_fair_arm(rendered) -> None:
    from copa.prompting import training_row

    checked, out, _ = rendered
    train = read_jsonl(out / "splits" / "train.jsonl")
    plain = read_jsonl(out / "plain" / "train.jsonl")
    assert plain == [training_row(checked.spec, r) for r in train]
    config = (out / "plain" / "axolotl.yml").read_text()
    assert str(out / "plain" / "train.jsonl") in config


def test_k_is_drawn_in_range_per_row_and_seeded() -> None:
    rows = [{"t": f"row {i} word{i % 5}"} for i in range(40)]
    for pick in ("random", "retrieved"):
        drawn = draw_demos(rows, rows, ["t"], (1, 3), pick, seed=0)
        counts = [len(d) for d in drawn]
        assert set(counts) == {1, 2, 3}
        assert drawn == draw_demos(rows, rows, ["t"], (1, 3), pick, seed=0)
        assert counts != [len(d) for d in draw_demos(rows, rows, ["t"], (1, 3), pick, seed=1)]
    assert {len(d) for d in draw_demos(rows, rows, ["t"], (0, 0), "random", 0)} == {0}
    assert {len(d) for d in draw_demos(rows, rows, ["t"], (2, 2), "random", 0)} == {2}


def test_retrieved_demos_are_the_nearest_train_rows() -> None:
    rows = [{"t": "card payment fee"}, {"t": "cash withdrawal declined"},
            {"t": "card payment charged twice"}, {"t": "transfer not received"},
            {"t": "card fee"}]
    index = DemoIndex(rows, ["t"])
    assert index.nearest(rows[0], 2, leave_out=0) == [4, 2]
    assert index.nearest({"t": "card payment fee"}, 1) == [0]  # at inference: itself is fine
    drawn = draw_demos(rows, rows, ["t"], (2, 2), "retrieved", seed=0)
    assert drawn[0] == [4, 2] and all(i not in d for i, d in enumerate(drawn))


def test_rows_are_measured_with_their_demos_against_sequence_len(tmp_path: Path,
                                                                 tiny_model_dir: Path) -> None:
    """Iris rows fit in 128 tokens alone, not with 3 demos: the length check (render's, before
    Axolotl would drop them) sees the rows as trained, demos included."""
    from copa.stages.render import too_long_rows

    checked, out = _render(tmp_path, tiny_model_dir, {"k": [3, 3], "pick": "random"})
    recipe = load_recipe(write_tiny_recipe(tmp_path, tiny_model_dir), overrides={
        "finetune.demos": {"k": [3, 3]}, "finetune.sequence_len": 128})
    plain = read_jsonl(out / "plain" / "train.jsonl")
    assert too_long_rows(plain, str(tiny_model_dir), recipe, "r.yaml", print) == 0
    with pytest.raises(RecipeError, match="finetune.sequence_len: every training row"):
        too_long_rows(read_jsonl(out / "train.jsonl"), str(tiny_model_dir), recipe, "r.yaml",
                      print)


def test_fixed_demos_still_render_one_set_in_every_row(tmp_path: Path,
                                                       tiny_model_dir: Path) -> None:
    _, out = _render(tmp_path, tiny_model_dir, "fixed", **{"finetune.num_demos": 2})
    demos = json.loads((out / "demos.json").read_text())
    rows = read_jsonl(out / "train.jsonl")
    assert len(demos) == 2 and len(rows) == 10 and (out / "plain" / "train.jsonl").is_file()
    for row in rows:
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert answers[:2] == [d["species"] for d in demos] and len(answers) == 3
    _, out = _render(tmp_path, tiny_model_dir, "none")  # no demos: no second fine-tune
    assert not (out / "plain").exists() and not (out / "train_demos.json").exists()


@pytest.mark.parametrize("value, says", [
    ({"k": [3, 1]}, "finetune.demos: k: needs 0 <= lo <= hi"),
    ({"k": [0, 2], "pick": "nearest"}, "finetune.demos: pick: Input should be 'random'"),
    ({"pick": "random"}, "finetune.demos: k: Field required"),
    ("fixd", "finetune.demos: must be none, fixed, program or a mapping"),
])
def test_a_bad_demo_distribution_is_one_line_naming_the_key(value: Any, says: str,
                                                             tmp_path: Path) -> None:
    path = write_tiny_recipe(tmp_path, tmp_path)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides={"finetune.demos": value})
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_demo_distribution_with_p_to_w_is_refused(tmp_path: Path,
                                                    tiny_model_dir: Path) -> None:
    recipe = load_recipe(write_tiny_recipe(tmp_path, tiny_model_dir), overrides={
        "finetune.demos": RANDOM, "optimize.order": "p->w"})
    with pytest.raises(RecipeError, match="finetune.demos: optimize.order: p->w chooses"):
        check_recipe(recipe)


def test_a_study_shares_the_demo_free_model_with_its_demo_free_cell(tmp_path: Path,
                                                                     tiny_model_dir: Path) -> None:
    """The demo-free rows and config rendered beside a demo-trained fine-tune are, up to their
    paths, what a `demos: none` cell renders: one shared model (study/shared.py) serves both,
    and linking it makes the cell's plain_finetune stage current (nothing trains)."""
    from copa.runs import open_run
    from copa.stages.render import render
    from copa.study.shared import has_plain_model, link_plain_model, shared_train_key

    _, none = _render(tmp_path / "none", tiny_model_dir, "none")
    recipe = write_tiny_recipe(tmp_path / "cell", tiny_model_dir)
    overrides = {"finetune.demos": RANDOM, "finetune.sequence_len": 1024}
    with open_run(recipe, run_dir=tmp_path / "cell" / "run", overrides=overrides) as run:
        render(run.checked, run.rendered, work_dir=run.train_dir, base_model=str(tiny_model_dir),
               validate_axolotl=False, plain_work_dir=run.plain_dir / "train")
        assert run.trains_plain
        assert shared_train_key(run.rendered / "plain") == shared_train_key(none)
        assert shared_train_key(run.rendered) != shared_train_key(none)
        assert not has_plain_model(run)
        folder = tmp_path / "models" / "shared"
        for sub in ("merged", "train/checkpoints"):
            (folder / sub).mkdir(parents=True)
        (folder / "merged" / "config.json").write_text("{}")
        (folder / "train.log").write_text("")
        (folder / "model.json").write_text(json.dumps({
            "key": "k", "adapter": str(folder / "train" / "checkpoints"),
            "merged": str(folder / "merged"), "log": str(folder / "train.log")}))
        link_plain_model(run, folder)
        assert has_plain_model(run)
        assert run.plain_merged.resolve() == (folder / "merged").resolve()
