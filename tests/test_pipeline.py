"""The whole pipeline on a tiny real model: real Axolotl training and merge, real DSPy
optimization, four arms, report, stage cache, resume after SIGKILL, reproducibility.

These take minutes (each Axolotl subprocess pays its import time), so they share one run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_OPTIMIZE, write_tiny_recipe

from copa import pipeline
from copa.data import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    folder = tmp_path_factory.mktemp("tiny-run")
    recipe = write_tiny_recipe(folder, tiny_model_dir)
    messages: list[str] = []
    run = pipeline.run(recipe, run_dir=folder / "run", emit=messages.append)
    return run, recipe, messages


def test_every_stage_ran_and_is_marked_done(tiny_run) -> None:
    run, _, messages = tiny_run
    stages = json.loads((run.dir / "manifest.json").read_text())["stages"]
    # plain_finetune: only for a fine-tune trained with demos (tests/test_demo_training.py)
    expected = [s for s in pipeline.STAGES if s != "plain_finetune"]
    assert [s for s in expected if stages[s]["status"] == "done"] == expected
    assert "plain_finetune" not in stages and not (run.dir / "plain").exists()
    assert any(m.startswith("  step 3/3") for m in messages)


def test_merged_model_is_standalone_and_equals_base_plus_adapter(tiny_run,
                                                                tiny_model_dir: Path) -> None:
    """The merged folder loads alone (no adapter config) and computes what base + LoRA adapter
    computes, and not what the base alone computes: the merge applied the trained adapter."""
    import peft
    import torch
    import transformers

    run, _, _ = tiny_run
    assert not (run.merged / "adapter_config.json").exists()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run.merged)
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                        add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    adapter = run.manifest.stage("train")["artifacts"]["adapter"]
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(run.merged)(ids).logits
        base_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        base = base_model(ids).logits
        with_adapter = peft.PeftModel.from_pretrained(base_model, adapter)(ids).logits
    assert torch.allclose(merged, with_adapter, atol=1e-4)
    assert not torch.allclose(merged, base, atol=1e-4)


def test_fine_tuning_changed_the_weights(tiny_run, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    run, _, _ = tiny_run
    base = load_file(next(tiny_model_dir.glob("*.safetensors")))
    merged = load_file(next(Path(run.merged).glob("*.safetensors")))
    name = next(k for k in base if "q_proj" in k)
    assert not (base[name] == merged[name]).all()


def test_report_has_four_arms_with_cis_and_synergy(tiny_run) -> None:
    run, _, _ = tiny_run
    report = json.loads((run.dir / "report.json").read_text())
    assert list(report["arms"]) == ["baseline", "prompt_only", "finetune_only", "combined"]
    for arm in report["arms"].values():
        assert arm["n"] == 9
        lo, hi = arm["ci95"]
        assert 0 <= lo <= arm["score"] <= hi <= 1
    assert set(report["synergy"]) >= {"value", "ci95", "definition"}
    assert report["synergy"]["value"] is not None  # demo-free training: a fair comparison
    assert set(report["versions"]) >= {"copa", "axolotl", "dspy", "transformers", "torch"}
    assert {"train", "merge", "optimize", "evaluate"} <= set(report["stage_seconds"])
    # The val guard keeps the candidate with the best val score (ties: fewer demos).
    combined = report["prompt_optimization"]["combined"]
    assert combined["val_scores"][combined["winner"]] == max(combined["val_scores"].values())
    assert (run.dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| combined | fine-tuned (merged) |" in (run.dir / "report.md").read_text()
    for arm in report["arms"]:
        assert len(read_jsonl(run.dir / "predictions" / f"{arm}.jsonl")) == 9
    # Where the guard declined the optimizer's pick (the tiny model ties on val, and a tie keeps
    # the plain program), the pick is scored on test too: the evidence for guard_margin.
    optimized = report["prompt_optimization"]
    declined = [a for a in ("prompt_only", "combined") if optimized[a]["winner"] != "optimized"]
    assert declined
    for arm in declined:
        entry = report["guard"][arm]
        picked = read_jsonl(run.dir / "predictions" / f"{arm}_pick.jsonl")
        assert entry["kept"] == optimized[arm]["winner"] and len(picked) == 9
        assert entry["test"]["pick"] == sum(r["score"] for r in picked) / 9
        assert entry["val"]["pick"] == optimized[arm]["val_scores"]["optimized"]
    assert "pick" not in "".join(report["arms"])  # never an arm


def test_the_report_lists_every_candidate_the_optimizer_scored(tiny_run) -> None:
    """Random search (num_candidate_programs: 1) scores seeds -3 (zero-shot), -2 (labeled
    demos), -1 (unshuffled bootstrap) and 0 on val; each is a row in optimize.json, in the
    report and in `copa optimize`'s output, on copa's own 0..1 scale."""
    run, _, messages = tiny_run
    summary = json.loads((run.optimize_dir / "optimize.json").read_text())
    report = (run.dir / "report.md").read_text()
    for arm in ("prompt_only", "combined"):
        rows = summary[arm]["candidates"]
        assert sorted(r["source"] for r in rows) == [f"random search seed {s}"
                                                     for s in (-1, -2, -3, 0)]
        scores = [r["val_score"] for r in rows]
        assert scores == sorted(scores, reverse=True)
        zero_shot = next(r for r in rows if r["source"] == "random search seed -3")
        assert zero_shot["demos"] == 0
        # The zero-shot candidate is the plain program: DSPy's score, rescaled, is copa's.
        assert zero_shot["val_score"] == pytest.approx(summary[arm]["val_scores"]["plain"])
    assert report.count("| random search seed -3 |") == 2
    assert sum("candidates on val" in m for m in messages) == 2


def test_test_split_is_never_seen_by_training_or_optimization(tiny_run) -> None:
    run, _, _ = tiny_run
    fields = run.recipe.task.input_fields

    def keys(rows):
        return {tuple(r[f] for f in fields) for r in rows}

    test = keys(read_jsonl(run.rendered / "splits" / "test.jsonl"))
    seen = keys(read_jsonl(run.rendered / "splits" / "train.jsonl"))
    seen |= keys(read_jsonl(run.rendered / "splits" / "val.jsonl"))
    assert not test & seen
    for arm in ("prompt_only", "combined"):
        program = json.loads((run.optimize_dir / f"program_{arm}.json").read_text())
        demos = [d for p in program.values() if isinstance(p, dict) for d in p.get("demos", [])]
        assert not keys(d for d in demos if all(f in d for f in fields)) & test
    # No test row is a training target: the last user turn of every training row is the
    # rendered input of a train-split row (checked positively, so the comparison is live).
    from copa.prompting import training_row

    def last_user(row: dict) -> str:
        return [m["content"] for m in row["messages"] if m["role"] == "user"][-1]

    demos = json.loads((run.rendered / "demos.json").read_text())
    trained = {last_user(r) for r in read_jsonl(run.rendered / "train.jsonl")}
    spec = run.checked.spec
    rendered = {split: {last_user(training_row(spec, row, demos))
                        for row in read_jsonl(run.rendered / "splits" / f"{split}.jsonl")}
                for split in ("train", "test")}
    assert trained == rendered["train"]
    assert not trained & rendered["test"]


def test_editing_only_optimize_skips_training_and_merge(tiny_run) -> None:
    run, recipe, _ = tiny_run
    original = recipe.read_text()
    recipe.write_text(original.replace("num_candidate_programs: 1", "num_candidate_programs: 2"))
    messages: list[str] = []
    try:
        pipeline.run(recipe, run_dir=run.dir, emit=messages.append, force=())
    finally:
        recipe.write_text(original)
    assert "[train] unchanged, skipped" in messages
    assert "[merge] unchanged, skipped" in messages
    assert "[optimize] running" in messages
    assert "[evaluate] running" in messages
    # Arms that do not depend on the optimizer are not re-generated either.
    assert any(m.strip().startswith("baseline") and "unchanged" in m for m in messages)
    assert any(m.strip().startswith("finetune_only") and "unchanged" in m for m in messages)
    # The LM calls the new optimizer setting repeats are DSPy response-cache hits, kept in the
    # run directory under the weights' hashes (copa.inference.cache; tests/test_cache.py).
    fingerprints = json.loads((run.dir / "cache" / "fingerprints.json").read_text())
    assert str(run.merged.resolve()) in fingerprints
    assert any((run.dir / "cache" / "dspy").iterdir())


def test_run_directory_of_another_recipe_is_protected(tiny_run, tmp_path: Path,
                                                      tiny_model_dir: Path) -> None:
    from copa.recipe import RecipeError
    from copa.runs import open_run

    run, _, _ = tiny_run
    other = write_tiny_recipe(tmp_path / "other", tiny_model_dir)
    with pytest.raises(RecipeError, match="belongs to recipe"):
        open_run(other, run_dir=run.dir)


def test_a_run_directory_whose_recipe_is_gone_is_taken_over(tiny_run, tmp_path: Path,
                                                            tiny_model_dir: Path) -> None:
    """A run directory copied from another machine names a recipe path that is not here."""
    from copa.runs import open_run

    run, _, _ = tiny_run
    moved = tmp_path / "copied-run"
    moved.mkdir()
    manifest = json.loads((run.dir / "manifest.json").read_text())
    manifest["recipe"] = str(tmp_path / "elsewhere" / "recipe.yaml")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    other = write_tiny_recipe(tmp_path / "other", tiny_model_dir)
    said: list[str] = []
    with open_run(other, run_dir=moved, emit=said.append) as taken:
        assert taken.manifest.data["recipe"] == str(Path(other).resolve())
    assert any("not on this machine" in line for line in said)


def test_same_recipe_and_seed_give_the_same_metrics(tiny_run, tmp_path: Path) -> None:
    run, recipe, _ = tiny_run
    again = pipeline.run(recipe, run_dir=tmp_path / "again", emit=lambda _: None)
    first = json.loads((run.dir / "report.json").read_text())
    second = json.loads((again.dir / "report.json").read_text())
    # The first run's report was rewritten by the optimize-edit test: compare arms that do
    # not depend on the optimizer settings, and the merged weights' predictions.
    for arm in ("baseline", "finetune_only"):
        assert first["arms"][arm] == second["arms"][arm]
    assert read_jsonl(run.dir / "predictions" / "finetune_only.jsonl") == read_jsonl(
        again.dir / "predictions" / "finetune_only.jsonl")
    # Bitwise the same adapter: LoRA's random init is seeded (copa.backends.axolotl_plugin).
    from safetensors.torch import load_file

    adapters = [load_file(Path(r.manifest.stage("train")["artifacts"]["adapter"])
                          / "adapter_model.safetensors") for r in (run, again)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(adapters[0][k].equal(adapters[1][k]) for k in adapters[0])


def test_training_killed_with_sigkill_resumes_from_its_checkpoint(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_tiny_recipe(tmp_path, tiny_model_dir, max_steps=40, save_steps=2)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "copa.cli", "train", str(recipe), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    checkpoints = run_dir / "train" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
        if done:
            break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("no checkpoint appeared")
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: copa and its axolotl subprocess
    proc.wait()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "running"  # never marked done

    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from checkpoint-" in result.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "done"
    final = max(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["global_step"] == 40


def test_an_axolotl_failure_is_a_short_clear_error(tmp_path: Path,
                                                   tiny_model_dir: Path) -> None:
    recipe = write_tiny_recipe(tmp_path, tiny_model_dir, extra="")
    text = recipe.read_text().replace(
        "  sequence_len: 128\n", "  sequence_len: 128\n  axolotl: {optimizer: no_such_optim}\n")
    recipe.write_text(text)
    result = subprocess.run([sys.executable, "-m", "copa.cli", "train", str(recipe), "--run-dir",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) < 15
    assert "no_such_optim is not a valid" in result.stderr
    assert "full log:" in result.stderr


def test_copa_optimizer_fine_tunes_then_optimizes_prompts(tiny_run) -> None:
    import dspy

    from copa import COPAOptimizer
    from copa.dspy.program import make_program, to_examples

    run, recipe, _ = tiny_run
    train = to_examples(run.recipe, read_jsonl(run.rendered / "splits" / "train.jsonl"))
    val = to_examples(run.recipe, read_jsonl(run.rendered / "splits" / "val.jsonl"))
    messages: list[str] = []
    optimizer = COPAOptimizer(recipe, run_dir=run.dir, emit=messages.append)
    program = optimizer.compile(make_program(run.recipe), trainset=train, valset=val)
    assert "[train] unchanged, skipped" in messages  # the stage cache, not a second training
    assert any("on 12 train / 6 val" in m for m in messages)  # the given val, not the trainset
    scores = optimizer.result.val_scores
    assert set(scores) >= {"plain", "optimized"}
    assert scores[optimizer.result.winner] == max(scores.values())  # the val guard's choice
    # The program answers with the merged model: the plain program on the LM it carries gives
    # the fine-tune-only arm's test predictions (the same model and prompt).
    (lm,) = {id(p.lm): p.lm for p in program.predictors()}.values()
    assert lm.model.startswith("local/merged")
    plain = make_program(run.recipe)
    plain.set_lm(lm)
    expected = read_jsonl(run.dir / "predictions" / "finetune_only.jsonl")[:3]
    with dspy.context(adapter=optimizer.adapter):
        got = [plain(**row["inputs"]).species for row in expected]
    assert got == [row["prediction"] for row in expected]


def test_copa_optimizer_trains_on_its_trainset_and_holds_out_val(tiny_run,
                                                                 tmp_path: Path) -> None:
    """compile(trainset=...) fine-tunes on those examples, rendered through the recipe's
    template, and with no valset holds a seeded fifth out as val instead of choosing on the
    rows it trained on."""
    from copa import COPAOptimizer
    from copa.dspy.program import make_program, to_examples
    from copa.prompting import training_row

    run, recipe, _ = tiny_run
    given = read_jsonl(run.rendered / "splits" / "train.jsonl")[:10]
    messages: list[str] = []
    optimizer = COPAOptimizer(recipe, run_dir=tmp_path / "compiled", emit=messages.append)
    optimizer.compile(make_program(run.recipe), trainset=to_examples(run.recipe, given))
    assert any("no valset given; holding out 2 of the 10 trainset examples as val" in m
               for m in messages)
    assert "[train] running" in messages  # other rows than the recipe's: a new fine-tune
    assert any("on 8 train / 2 val" in m for m in messages)
    rendered = tmp_path / "compiled" / "rendered"
    train, val = (read_jsonl(rendered / "splits" / f"{s}.jsonl") for s in ("train", "val"))
    assert (len(train), len(val)) == (8, 2)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, train + val)) == sorted(map(key, given))
    assert not set(map(key, train)) & set(map(key, val))

    def last_user(row: dict) -> str:
        return [m["content"] for m in row["messages"] if m["role"] == "user"][-1]

    trained = [last_user(r) for r in read_jsonl(rendered / "train.jsonl")]
    spec = run.checked.spec
    assert trained == [last_user(training_row(spec, r)) for r in train]


# A user optimizer (optimize.optimizer: 'recorder:Recorder') that writes down what copa built it
# with and keeps the student as it is: what each optimize: key became, seen from the optimizer.
RECORDER = '''
import json

import dspy


def _model(lm):
    return None if lm is None else lm.model


class Recorder(dspy.teleprompt.Teleprompter):
    def __init__(self, metric, record, task_model=None, prompt_model=None,
                 teacher_settings=None, num_threads=None, seed=None):
        self.record = record
        self.seen = {"task_model": _model(task_model), "prompt_model": _model(prompt_model),
                     "prompt_max_tokens": prompt_model.kwargs.get("max_tokens"),
                     "teacher": _model((teacher_settings or {}).get("lm"))}

    def compile(self, student, *, trainset, valset=None, tag=None):
        with open(self.record, "a") as out:
            out.write(json.dumps({**self.seen, "tag": tag, "train": len(trainset)}) + "\\n")
        return student
'''


def test_copa_run_and_copa_optimizer_read_every_optimize_key_alike(tiny_run,
                                                                   tmp_path: Path) -> None:
    """The combined arm's prompt step is one code path: the optimize stage (`copa run`) and
    COPAOptimizer.compile give the recipe's optimizer the same proposer, teacher, token budget
    and params, and apply the same guard_margin. (Last in this file: it leaves the shared
    run's optimize stage on this recipe.)"""
    from copa import COPAOptimizer
    from copa.dspy.program import make_program, to_examples

    run, recipe, _ = tiny_run
    record = tmp_path / "record.jsonl"
    (recipe.parent / "recorder.py").write_text(RECORDER)
    original = recipe.read_text()
    keys = (f"  optimizer: 'recorder:Recorder'\n  params: {{record: '{record}', tag: x}}\n"
            "  proposer: base\n  teacher: base\n  max_tokens: 17\n  guard_margin: 0.5\n")
    assert TINY_OPTIMIZE in original
    recipe.write_text(original.replace(TINY_OPTIMIZE, keys))
    through: dict[str, list[str]] = {"run": [], "api": []}
    try:
        pipeline.run(recipe, stages=["optimize"], run_dir=run.dir, emit=through["run"].append)
        train = to_examples(run.recipe, read_jsonl(run.rendered / "splits" / "train.jsonl"))
        val = to_examples(run.recipe, read_jsonl(run.rendered / "splits" / "val.jsonl"))
        optimizer = COPAOptimizer(recipe, run_dir=run.dir, emit=through["api"].append)
        optimizer.compile(make_program(run.recipe), trainset=train, valset=val)
    finally:
        recipe.write_text(original)
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    on_merged = [s for s in seen if s["task_model"].startswith("local/merged")]
    assert len(on_merged) == 2, seen  # the stage's combined arm, then compile's
    for path, s in zip(("run", "api"), on_merged):
        assert s["prompt_model"] == "local/proposer", path  # optimize.proposer
        assert s["teacher"] == "local/teacher", path  # optimize.teacher
        assert s["prompt_max_tokens"] == 17, path  # optimize.max_tokens
        assert (s["tag"], s["train"]) == ("x", 12), path  # optimize.params, to compile()
        assert any("(guard_margin 0.5)" in m for m in through[path]), path
