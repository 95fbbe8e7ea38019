"""Issue 12.1: the render stage's key covers the data's content, and the optimizer reads only
the rendered splits, so a data file edited in place can never put a test row into the
optimizer's train/val."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from copa import pipeline
from copa.data import read_jsonl
from copa.pipeline import stage_key
from copa.runs import open_run

ROWS = [{"text": f"row {i}", "label": "pos" if i % 2 else "neg"} for i in range(40)]


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _recipe(folder: Path, model: Path, test_source: bool = False) -> Path:
    _write_rows(folder / "data.jsonl", ROWS)
    data = {"source": "data.jsonl", "splits": {"train": 12, "val": 6, "test": 9, "seed": 0}}
    if test_source:
        _write_rows(folder / "test.jsonl", [{"text": f"held out {i}", "label": "pos"}
                                            for i in range(10)])
        data["test_source"] = "test.jsonl"
        data["stratify"] = False
    recipe = {"name": "leak", "model": {"base": str(model)},
              "task": {"signature": "text -> label", "choices": ["pos", "neg"]},
              "data": data, "finetune": {"max_steps": 1, "sequence_len": 64},
              "evaluate": {"metric": "label_accuracy"}}
    path = folder / "leak.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _edit_in_place(path: Path) -> None:
    _write_rows(path, [{**r, "text": "edited " + r["text"]} for r in read_jsonl(path)])


def test_a_data_file_edited_in_place_re_renders(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    for expected in ("[render] running", "[render] unchanged, skipped"):
        messages: list[str] = []
        pipeline.run(recipe, stages=["render"], run_dir=run_dir, emit=messages.append)
        assert expected in messages  # the stage cache works: the next assertion means something
    _edit_in_place(tmp_path / "data.jsonl")
    messages = []
    pipeline.run(recipe, stages=["render"], run_dir=run_dir, emit=messages.append)
    assert "[render] running" in messages
    for split in ("train", "val", "test"):
        rows = read_jsonl(run_dir / "rendered" / "splits" / f"{split}.jsonl")
        assert all(r["text"].startswith("edited ") for r in rows), split


@pytest.mark.parametrize("edited", ["data.jsonl", "test.jsonl"])
def test_the_render_key_covers_every_data_file(tmp_path: Path, tiny_model_dir: Path,
                                               edited: str) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, test_source=True)
    before = stage_key(open_run(recipe, run_dir=tmp_path / "run"), "render")
    assert stage_key(open_run(recipe, run_dir=tmp_path / "run"), "render") == before
    _edit_in_place(tmp_path / edited)
    assert stage_key(open_run(recipe, run_dir=tmp_path / "run"), "render") != before


def test_the_optimizer_reads_only_the_rendered_splits(tmp_path: Path,
                                                      tiny_model_dir: Path) -> None:
    from copa.stages.optimize import kit_for

    recipe = _recipe(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    pipeline.run(recipe, stages=["render"], run_dir=run_dir, emit=lambda _: None)
    _edit_in_place(tmp_path / "data.jsonl")
    # A run opened after the edit loads fresh splits; the optimizer must not use them.
    run = open_run(recipe, run_dir=run_dir)
    assert all(r["text"].startswith("edited ") for r in run.checked.splits.train)
    kit = kit_for(run)
    splits = run_dir / "rendered" / "splits"
    for examples, name in ((kit.trainset, "train"), (kit.valset, "val")):
        rendered = read_jsonl(splits / f"{name}.jsonl")
        assert [e.text for e in examples] == [r["text"] for r in rendered]
        assert not any(e.text.startswith("edited ") for e in examples)


def test_keys_added_later_change_no_stage_key_at_their_defaults(tmp_path: Path,
                                                                tiny_model_dir: Path) -> None:
    """A run directory made before `optimize.strategy` or `data.group_by` existed keeps its
    stages after an upgrade: at their defaults they are not in the content keys; set, they are."""
    from copa.recipe import load_recipe, recipe_key_dict

    path = _recipe(tmp_path, tiny_model_dir)
    plain = recipe_key_dict(load_recipe(path), "data", "optimize")
    assert "group_by" not in plain["data"] and "strategy" not in plain["optimize"]
    assert "guard_margin" not in plain["optimize"]
    assert "stratify" in plain["data"]  # keys that always existed stay
    grouped = recipe_key_dict(load_recipe(path, overrides={"data.group_by": "label",
                                                        "optimize.strategy": "p -> w",
                                                        "optimize.guard_margin": 0.05}),
                           "data", "optimize")
    assert grouped["data"]["group_by"] == "label"
    assert grouped["optimize"]["strategy"] == "p -> w"
    assert grouped["optimize"]["guard_margin"] == 0.05
