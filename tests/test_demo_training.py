"""Fine-tuning with demos in the training rows, on the tiny model (real Axolotl, real DSPy):
copa trains the demo-free fine-tune beside it, so the fine-tune-only arm is a model prompted as
it was trained, the demo-trained model prompted plainly is an arm of its own, and synergy is
against the best of every single-lever arm (never "not comparable").

Two settings: `optimize.order: p->w` (one demo set, the base model's optimizer's, in every row)
and `finetune.demos: {k: [1, 2], pick: retrieved}` with the retrieved-demos program on both
models, whose program must come back through copa.load, copa predict and copa export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import save_varied_llama, write_tiny_recipe

from copa import pipeline
from copa.data import read_jsonl

pytestmark = pytest.mark.slow

SETTINGS: dict[str, dict[str, Any]] = {
    # Labeled demos only: always 2 (a random tiny model passes no bootstrap).
    "optimize.order: p->w": {"optimize.order": "p->w", "optimize.optimizer": "BootstrapFewShot",
                             "optimize.params": {"max_bootstrapped_demos": 0,
                                                 "max_labeled_demos": 2},
                             "finetune.sequence_len": 512},
    # guard off: the retrieved program is the combined arm whatever val says (the tiny model's
    # val scores say nothing), so its save / load round trip is what the arm ran
    "retrieved": {"finetune.demos": {"k": [1, 2], "pick": "retrieved"},
                  "optimize.optimizer": "retrieved", "optimize.params": {"k": 2},
                  "optimize.guard": False, "finetune.sequence_len": 512},
}
ARMS = ["baseline", "prompt_only", "finetune_only", "demo_finetune", "combined"]


@pytest.fixture(scope="module", params=list(SETTINGS))
def demo_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             tiny_model_dir: Path) -> tuple[str, Any, list[str]]:
    folder = tmp_path_factory.mktemp("demo-run")
    # answers that differ with the prompt, so "the same answers" compares something
    model = save_varied_llama(tiny_model_dir, folder / "varied", seed=1)
    messages: list[str] = []
    run = pipeline.run(write_tiny_recipe(folder, model), run_dir=folder / "run",
                       emit=messages.append, overrides=SETTINGS[request.param])
    return request.param, run, messages


def test_the_demo_free_fine_tune_is_trained_and_is_the_fine_tune_only_arm(demo_run) -> None:
    setting, run, messages = demo_run
    stages = json.loads((run.dir / "manifest.json").read_text())["stages"]
    assert stages["plain_finetune"]["status"] == "done"
    assert "  the demo-free fine-tune (the fine-tune-only arm's model)" in messages
    train = read_jsonl(run.rendered / "splits" / "train.jsonl")
    assert len(read_jsonl(run.rendered / "plain" / "train.jsonl")) == len(train)
    assert (run.plain_merged / "config.json").is_file()
    report = json.loads((run.dir / "report.json").read_text())
    assert list(report["arms"]) == ARMS
    arms = report["arms"]
    assert arms["finetune_only"]["model_dir"] == "plain/merged"
    assert arms["finetune_only"]["model"] == "demo-free fine-tune (plain/merged)"
    assert arms["demo_finetune"]["model_dir"] == "merged"
    assert arms["demo_finetune"]["model"].startswith("demo-trained fine-tune (merged; rows with")
    assert arms["demo_finetune"]["prompt"] == "plain" == arms["finetune_only"]["prompt"]
    singles = max(arms[a]["score"] for a in ("prompt_only", "finetune_only", "demo_finetune"))
    assert report["synergy"]["value"] == pytest.approx(arms["combined"]["score"] - singles)
    # val: fine-tune-only scored on the demo-free model, demo_finetune is the optimize stage's
    # plain candidate on the demo-trained one
    assert report["val"]["from"]["finetune_only"] == "evaluate"
    assert set(report["val"]["scores"]) == set(ARMS)
    text = (run.dir / "report.md").read_text()
    assert "not comparable" not in text
    assert "| fine-tune-only | demo-free fine-tune (plain/merged) | plain |" in text
    if setting.startswith("optimize.order"):
        assert "  p -> w: optimizing prompts on the base model first" in messages
        demos = json.loads((run.rendered / "demos.json").read_text())
        assert len(demos) == 2 and all(d in train for d in demos)
        for row in read_jsonl(run.rendered / "train.jsonl"):
            answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            assert answers[:2] == [d["species"] for d in demos] and len(answers) == 3


def test_copa_load_runs_the_fine_tune_only_arm_on_the_demo_free_model(demo_run) -> None:
    import copa

    _, run, _ = demo_run
    expected = read_jsonl(run.dir / "predictions" / "finetune_only.jsonl")[:4]
    with copa.load(str(run.dir), arm="finetune_only") as program:
        assert program.bundle.model_path == str(run.plain_merged)
        assert [program(**r["inputs"]).species for r in expected] == [
            r["prediction"] for r in expected]


@pytest.mark.parametrize("demo_run", ["retrieved"], indirect=True)
def test_the_retrieved_program_comes_back_through_load_predict_and_export(
        demo_run, tmp_path: Path) -> None:
    import copa
    from copa.cli import cli
    from copa.dspy.retrieved import RetrievedDemos
    from copa.use.export import export

    _, run, messages = demo_run
    kept = [m for m in messages if m.startswith("  kept instruction")]
    # the program holds no demos of its own: the log says how many each input gets
    assert kept and all(m.endswith(", 2 demos chosen per input (bm25)") for m in kept), kept
    saved = json.loads((run.optimize_dir / "program_combined.json").read_text())
    assert saved["copa_retrieved"]["k"] == 2
    assert len(saved["copa_retrieved"]["rows"]) == 12  # the train split, nothing else
    report = json.loads((run.dir / "report.json").read_text())
    assert report["arms"]["combined"]["prompt"] == "optimized: 2 retrieved demos per input (bm25)"
    expected = read_jsonl(run.dir / "predictions" / "combined.jsonl")
    plain = read_jsonl(run.dir / "predictions" / "demo_finetune.jsonl")
    # the same model, plain vs retrieved demos: the demos changed answers
    assert [r["prediction"] for r in expected] != [r["prediction"] for r in plain]
    with copa.load(str(run.dir), arm="combined") as program:
        assert isinstance(program.program, RetrievedDemos)
        assert [program(**r["inputs"]).species for r in expected[:4]] == [
            r["prediction"] for r in expected[:4]]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r["inputs"]) + "\n" for r in expected[:4]))
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli, ["predict", str(run.dir), "-i", str(source), "-o", str(out),
                                      "--arm", "combined"])
    assert result.exit_code == 0, result.output
    assert [w["prediction"]["species"] for w in read_jsonl(out)] == [
        r["prediction"] for r in expected[:4]]
    copy = tmp_path / "run-copy"
    shutil.copytree(run.dir, copy, symlinks=True)
    exported = export(copy, tmp_path / "exported", arm="combined", emit=lambda _: None)
    shutil.rmtree(copy)
    with copa.load(str(exported)) as program:
        assert isinstance(program.program, RetrievedDemos)
        assert [program(**r["inputs"]).species for r in expected[:4]] == [
            r["prediction"] for r in expected[:4]]
